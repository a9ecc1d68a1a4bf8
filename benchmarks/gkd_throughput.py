"""KD throughput of a ~1B-parameter heterogeneous student from its teacher, through `run_gkd`.

    python benchmarks/gkd_throughput.py                          # one GPU, bf16: KL + cosine, then logits-only
    python benchmarks/gkd_throughput.py --tiny                   # seconds on CPU: a smoke check of the same path
    python benchmarks/gkd_throughput.py --batch-size 4 --grad-accum 2 --cosine-weight 0

The teacher has Llama-3.2-1B's shape (16 layers, hidden 2048, 32 heads with 8 KV heads, FFN 8192, a 128256
vocabulary, tied embeddings); the student removes attention in 4 layers and narrows 6 FFNs to 50 or 25 %,
as a Puzzle child would. Weights are random: the cost does not depend on them. The text is the Python
standard library read by a small BPE tokenizer; which token ids occur does not change the cost either, the
models keep the full vocabulary. tokens/s is `run_gkd`'s own figure (training steps only, after a short
warm-up run in the same process). Writes benchmarks/results/gkd_throughput_<device>.{json,md}
(gkd_throughput_tiny.* with --tiny).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import puzzle  # noqa: E402
from benchmarks.common import RESULTS, write_results  # noqa: E402
from puzzle.arch import Architecture, AttentionConfig, FFNConfig  # noqa: E402
from puzzle.checkpoint import build_model, decilm_config, decilm_config_from_parent, save_model  # noqa: E402
from puzzle.corpus import iter_documents  # noqa: E402
from puzzle.demo import DemoConfig, demo_data_config, train_tokenizer  # noqa: E402
from puzzle.distill.gkd import GKDConfig, run_gkd  # noqa: E402

LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=64, intermediate_size=8192, tie_word_embeddings=True,
                   max_position_embeddings=131072, rms_norm_eps=1e-5,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
TINY = dict(vocab_size=1024, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=128, tie_word_embeddings=True, max_position_embeddings=256)
# The student: layers without attention, layers with the FFN at 50 % and at 25 % of the teacher's width.
STUDENT = {16: ((3, 6, 9, 12), (2, 7, 10, 14), (5, 13)), 4: ((1,), (2,), (3,))}


TEXT = DemoConfig(max_files=300, held_out_fraction=0.1, vocab_size=1024)  # 30 held-out files: enough windows


def build_pair(shape: dict, work: Path, device: str) -> tuple[Path, Path, Architecture, Architecture]:
    """(teacher dir, student dir, their architectures): random weights, bf16 on disk, one tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer([d.text for d in iter_documents(demo_data_config(TEXT)) if d.split == "train"], TEXT)
    torch.manual_seed(0)
    with torch.device(device):  # random init of 1B parameters is minutes on CPU, a second on a GPU
        teacher = LlamaForCausalLM(LlamaConfig(**shape, bos_token_id=0, eos_token_id=0)).to(torch.bfloat16)
    teacher.save_pretrained(work / "teacher")
    tokenizer.save_pretrained(work / "teacher")
    config = decilm_config_from_parent(work / "teacher", json.loads((work / "teacher" / "config.json").read_text()))
    teacher_arch = arch = Architecture.from_config(config)
    no_attention, half, quarter = STUDENT[arch.num_layers]
    for i in no_attention:
        arch = arch.with_block(i, attention=AttentionConfig(no_op=True))
    for layers, divisor in ((half, 2), (quarter, 4)):
        for i in layers:
            arch = arch.with_block(i, ffn=FFNConfig(intermediate_size=shape["intermediate_size"] // divisor))
    with torch.device(device):
        student = build_model(decilm_config(config, arch), dtype=torch.bfloat16)
    save_model(student.cpu(), work / "student", source=work / "teacher")
    del teacher, student
    return work / "teacher", work / "student", teacher_arch, arch


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def measure(teacher: Path, student: Path, data_cfg, work: Path, args, cosine_weight: float) -> dict:
    """A short warm-up run (kernels, allocator), then the measured one; returns the table row."""
    tokens_per_step = args.batch_size * args.grad_accum * args.seq_len
    common = dict(batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len, lr=1e-5,
                  cosine_weight=cosine_weight, eval_tokens=args.seq_len, checkpoint_every=10**9,
                  activation_checkpointing=args.activation_checkpointing)
    run_gkd(student, teacher, data_cfg, work / "warmup", GKDConfig(tokens=2 * tokens_per_step, **common), overwrite=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = run_gkd(student, teacher, data_cfg, work / "out", GKDConfig(tokens=args.steps * tokens_per_step, **common),
                     overwrite=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"loss": "KL + cosine" if cosine_weight > 0 else "KL only", "cosine_weight": cosine_weight,
            "tokens_per_s": result.tokens_per_s, "steps": result.steps, "tokens": result.tokens,
            "seconds": result.seconds, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
            "seq_len": args.seq_len, "precision": result.precision,
            "peak_gpu_memory_gib": round(peak, 1) if peak is not None else None}


def markdown(record: dict) -> str:
    count = lambda n: f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"  # noqa: E731
    lines = [
        f"{count(record['student_params'])}-parameter heterogeneous student distilled from a "
        f"{count(record['teacher_params'])}-parameter teacher ({record['student']}); accelerate "
        f"{record['accelerate']}. tokens/s over training steps only. Command: `{record['command']}`.",
        "",
        "| loss | tokens/s | batch x seq (x accum) | steps | precision | peak GPU memory |",
        "|---|---:|---|---:|---|---:|",
    ]
    for r in record["rows"]:
        memory = f"{r['peak_gpu_memory_gib']} GiB" if r["peak_gpu_memory_gib"] is not None else "-"
        lines.append(f"| {r['loss']} | {r['tokens_per_s']:,.0f} | {r['batch_size']} x {r['seq_len']} (x {r['grad_accum']}) "
                     f"| {r['steps']} | {r['precision']} | {memory} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU: a smoke check of the benchmark")
    parser.add_argument("--steps", type=int, default=None, help="measured optimizer steps (default 30; tiny 4)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (tiny 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 2048 (tiny 64)")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--cosine-weight", type=float, nargs="+", default=[1.0, 0.0], help="one run per value")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON and markdown results")
    args = parser.parse_args()
    args.steps = args.steps or (4 if args.tiny else 30)
    args.batch_size = args.batch_size or (2 if args.tiny else 8)
    args.seq_len = args.seq_len or (64 if args.tiny else 2048)
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.tiny:
        sys.exit("no GPU: the 1B benchmark needs one; use --tiny for a CPU smoke check")
    import accelerate

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gkd-bench-") as tmp:
        work = Path(tmp)
        teacher, student, teacher_arch, arch = build_pair(TINY if args.tiny else LLAMA_32_1B, work, device)
        data_cfg = demo_data_config(TEXT)
        rows = [measure(teacher, student, data_cfg, work, args, w) for w in args.cosine_weight]
    ffn = [b.ffn.intermediate_size for b in arch.blocks]
    record = {
        "command": " ".join(["python", "benchmarks/gkd_throughput.py", *sys.argv[1:]]),
        "accelerate": accelerate.__version__, "puzzle": puzzle.__version__,
        "teacher_params": teacher_arch.total_params(), "student_params": arch.total_params(),
        "student": (f"{arch.num_layers} layers, no attention in {sum(not b.attention.has_softmax for b in arch.blocks)}, "
                    f"FFN widths {ffn}"),
        "rows": rows, "wall_s": round(time.perf_counter() - started, 1),
    }
    name = "gkd_throughput_tiny" if args.tiny else "gkd_throughput_" + re.sub(r"[^a-z0-9]+", "-", device_name().lower()).strip("-")
    paths = write_results(name, record, markdown(record), args.results)
    print(paths[1].read_text())
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
