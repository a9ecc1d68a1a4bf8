"""BLD and scoring of a parent larger than its memory budget: what reading layers from the parent's files costs.

    python benchmarks/offloaded_parent.py                    # CPU: a 1024-wide random parent, fp32
    python benchmarks/offloaded_parent.py --shape 8b         # GPU: Llama-3.1-8B-shaped layers, bf16

One random parent (written tensor by tensor, the demo's tokenizer and stdlib corpus) is searched through BLD and
scoring several ways, each in its own run directory: held whole, and with `parent_memory_gb` far below its size
(`--budget-gb`: the embeddings and a few layers held, the rest read from its safetensors files when they run)
with each `bld.parent_activations` mode. Reported as ratios to the parent held whole, measured in the same run:
`recompute` re-reads every layer down to the group's at every step, `disk` produces the shared shards layer by
layer, `boundary` moves one layer boundary down per group. Scoring of an offloaded parent goes layer-major.
Writes benchmarks/results/offloaded_parent.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parents[1]))

from benchmarks.common import SHAPE_NAMES, llama_8b_config, write_results  # noqa: E402
from puzzle.checkpoint import decilm_config, expected_tensors, finish_checkpoint_dir  # noqa: E402
from puzzle.corpus import iter_documents  # noqa: E402
from puzzle.demo import DemoConfig, _save_tokenizer, demo_data_config, train_tokenizer  # noqa: E402
from puzzle.pipeline import run_search  # noqa: E402
from puzzle.progress import log  # noqa: E402
from puzzle.weights import LazyWeights, ShardedWriter  # noqa: E402

RUNS = (("whole", None, "recompute"), ("offloaded", "budget", "recompute"), ("offloaded", "budget", "disk"),
        ("offloaded", "budget", "boundary"))


def write_parent(folder: Path, shape: str, layers: int, dtype: torch.dtype, files: int) -> tuple[int, int]:
    """A random parent of `layers` layers and the demo's tokenizer in `folder`; returns (bytes, vocabulary)."""
    demo = DemoConfig(max_files=files)
    data = demo_data_config(demo)
    tokenizer = train_tokenizer([d.text for d in iter_documents(data)], demo)
    config = llama_8b_config(num_layers=layers, tiny=shape == "tiny", shape="8b" if shape == "tiny" else shape).to_dict()
    if shape == "tiny":  # 1024 wide: 48 MB per fp32 layer, so a dozen layers make a parent far over a small budget
        config |= {"hidden_size": 1024, "num_attention_heads": 8, "head_dim": 128}
        config["block_configs"] = [{"attention": {"n_heads_in_group": 4}, "ffn": {"intermediate_size": 3072}}] * layers
    config["vocab_size"] = len(tokenizer)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config = decilm_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    writer, gen = ShardedWriter(folder, max_shard_bytes=1 << 30), torch.Generator().manual_seed(0)
    for name, shape_ in expected_tensors(config).items():
        writer.add(name, (torch.randn(shape_, generator=gen) * 0.02).to(dtype))
    writer.close()
    finish_checkpoint_dir(folder, config.to_dict(), None, {})
    _save_tokenizer(tokenizer, folder)
    return LazyWeights(folder).nbytes(), len(tokenizer)


def search_config(mode: str, budget_gb: float | None, layers: int, args, files: int) -> dict:
    data = demo_data_config(DemoConfig(max_files=files))
    config = {
        "data": {"paths": list(data.paths), "patterns": list(data.patterns), "exclude": list(data.exclude),
                 "max_documents": files, "seq_len": args.seq_len, "held_out_fraction": 0.2},
        # two layers deep in the parent, one KV-head and one FFN-width candidate each
        "space": {"layers": [layers // 2, layers - 2], "attention": {"kv_heads": [2], "windows": [], "linear": False,
                                                                     "no_op": False},
                  "ffn": {"fractions": [0.5], "linear": False, "no_op": False}},
        "calibration": {"tokens": args.seq_len * 4, "batch_size": 2},
        "bld": {"tokens_per_unit": args.bld_tokens, "batch_size": args.batch_size, "eval_tokens": args.seq_len * 2,
                "checkpoint_every": 10_000, "parent_activations": mode},
        "score": {"tokens": args.score_tokens, "batch_size": args.batch_size},
    }
    return config | ({"parent_memory_gb": budget_gb} if budget_gb is not None else {})


def timed_stage(root: Path, parent: Path, config: Path, stage: str) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    began = time.perf_counter()
    run_search(root, parent=parent, config=config, stage=stage)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=["tiny", "8b", "70b"], default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="default: 12 (tiny) or 8")
    parser.add_argument("--budget-gb", type=float, default=None, help="parent_memory_gb of the offloaded runs "
                        "(default: a quarter of the parent)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--bld-tokens", type=int, default=None)
    parser.add_argument("--score-tokens", type=int, default=None)
    parser.add_argument("--runs", default=",".join(f"{w}-{m}" for w, _, m in RUNS),
                        help="which of the runs, comma-separated (the first is the baseline of the ratios)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the parent and runs go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    layers = args.layers or (12 if args.shape == "tiny" else 8)
    args.seq_len = args.seq_len or (128 if args.shape == "tiny" else 1024)
    args.bld_tokens = args.bld_tokens or 16 * args.batch_size * args.seq_len  # 16 steps
    args.score_tokens = args.score_tokens or 4 * args.batch_size * args.seq_len  # 4 batches
    dtype = torch.bfloat16 if gpu else torch.float32
    files = 60
    work = args.workdir or Path(tempfile.mkdtemp(prefix="offloaded_parent_"))
    parent = work / "parent"
    nbytes, vocab = write_parent(parent, args.shape, layers, dtype, files)
    budget = args.budget_gb if args.budget_gb is not None else nbytes / 4 / 2**30
    log(f"parent: {layers} layers, {nbytes / 2**30:.2f} GiB; offloaded runs hold {budget:.2f} GiB")
    rows = []
    chosen = args.runs.split(",")
    for where, uses_budget, mode in sorted(RUNS, key=lambda r: chosen.index(f"{r[0]}-{r[2]}") if f"{r[0]}-{r[2]}" in chosen else 99):
        name = f"{where}-{mode}"
        if name not in chosen:
            continue
        config = work / f"{name}.yaml"
        config.write_text(yaml.safe_dump(search_config(mode, budget if uses_budget else None, layers, args, files)))
        root = work / name
        run_search(root, parent=parent, config=config, stage="library")
        bld = timed_stage(root, parent, config, "bld")
        score = timed_stage(root, parent, config, "score") if mode in ("recompute",) else None
        rows.append({"run": name, "bld_s": bld, "score_s": score})
        log(f"{name}: bld {bld:.1f}s" + (f", score {score:.1f}s" if score is not None else ""))
    whole = rows[0]
    for row in rows:
        row["bld_vs_whole"] = row["bld_s"] / whole["bld_s"]
        row["score_vs_whole"] = None if None in (row["score_s"], whole["score_s"]) else row["score_s"] / whole["score_s"]
    shape = {"tiny": "1024-wide test", **SHAPE_NAMES}[args.shape]
    data = {"shape": args.shape, "layers": layers, "parent_bytes": nbytes, "budget_gb": budget, "vocab": vocab,
            "seq_len": args.seq_len, "batch_size": args.batch_size, "bld_tokens_per_unit": args.bld_tokens,
            "score_tokens": args.score_tokens, "dtype": str(dtype), "rows": rows}
    lines = [f"{shape}-shaped parent, {layers} layers, {nbytes / 2**30:.2f} GiB ({str(dtype).removeprefix('torch.')}); "
             f"offloaded runs: parent_memory_gb {budget:.2f}. BLD: 4 units in layers {layers // 2} and {layers - 2}, "
             f"{args.bld_tokens} tokens each (batch {args.batch_size} x {args.seq_len}); scoring: {args.score_tokens} tokens.",
             "", "| run | BLD s | BLD vs whole | score s | score vs whole |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        score = "" if r["score_s"] is None else f"{r['score_s']:.1f} | {r['score_vs_whole']:.2f}x"
        lines.append(f"| {r['run']} | {r['bld_s']:.1f} | {r['bld_vs_whole']:.2f}x | {score or ' | '} |")
    json_path, md_path = write_results("offloaded_parent", data, "\n".join(lines), args.out)
    print(md_path.read_text())


if __name__ == "__main__":
    main()
