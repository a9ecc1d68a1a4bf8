"""`puzzle fuse-ffn CKPT OUT`: FFN Fusion of a checkpoint's attention-free runs (puzzle/fusion/)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from puzzle.cli.options import Device, Exclude, ModelDir, Overwrite, ParentMemory, TrustRemoteCode
from puzzle.cli.output import console, done, human_count

DEFAULT_THRESHOLD = 0.05  # FusionConfig.threshold; repeated here so --help can show it without importing torch


def fuse_ffn_command(
    ckpt: ModelDir,
    out: Annotated[Optional[Path], typer.Argument(help="Output folder (must not exist unless --overwrite); not needed with --dry-run.", show_default=False)] = None,
    data: Annotated[Optional[list[Path]], typer.Option("--data", help="Text / JSONL / datasets folder: train split calibrates, held-out split checks KL (repeatable).")] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", min=0.0, help=f"Fuse an FFN while the cosine distance of its output, group input vs true input, is at most this (default {DEFAULT_THRESHOLD}).", show_default=False)] = None,
    max_run: Annotated[Optional[int], typer.Option("--max-run", min=2, help="Most FFNs fused into one layer (default: no limit).", show_default=False)] = None,
    keep_last: Annotated[bool, typer.Option("--keep-last/--no-keep-last", metavar="", help="Keep the last FFN of each run unfused (the paper: better quality).")] = True,
    no_calibration: Annotated[bool, typer.Option("--no-calibration", metavar="", help="Skip the dependency measure: fuse every run up to --max-run (no --data needed).")] = False,
    calibration_tokens: Annotated[int, typer.Option("--calibration-tokens", min=1, help="Train-split tokens for the dependency measure.")] = 1 << 15,
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", min=0, help="Held-out tokens for KL / LM loss after fusion (0: skip).")] = 1 << 15,
    distill_tokens: Annotated[int, typer.Option("--distill-tokens", min=0, help="Tokens of a short KD from the unfused model afterwards (puzzle.distill.gkd; 0: none).")] = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", metavar="", help="Print runs, dependency scores, what would be fused and the predicted speed-up; write nothing.")] = False,
    overwrite: Overwrite = False,
    device: Device = None,
    parent_memory_gb: ParentMemory = None,
    exclude: Exclude = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Fuse runs of FFNs with no attention between them into single wide FFNs (FFN Fusion).

    The output is a puzzle checkpoint: each fused group is one wide FFN in its first layer, the group's
    other layers are no-op, so it still loads with transformers and serves in vLLM when the input did.

    Examples:
      puzzle fuse-ffn runs/demo/children/2x --dry-run --no-calibration
      puzzle fuse-ffn runs/llama8b/children/2x runs/llama8b/children/2x-fused --data ~/data/fineweb --threshold 0.1 --max-run 4
    """
    from puzzle.corpus import DataConfig
    from puzzle.fusion import FusionConfig, fuse_ffn

    if out is None and not dry_run:
        raise typer.BadParameter("give an output folder, or --dry-run", param_hint="OUT")
    if no_calibration and threshold is not None:
        raise typer.BadParameter("--threshold needs calibration; drop --no-calibration or --threshold", param_hint="--threshold")
    cfg = FusionConfig(
        threshold=None if no_calibration else (DEFAULT_THRESHOLD if threshold is None else threshold),
        max_run=max_run, keep_last=keep_last,
        data=DataConfig(paths=tuple(str(p) for p in data), exclude=tuple(exclude or ())) if data else None,
        calibration_tokens=calibration_tokens, eval_tokens=eval_tokens, distill_tokens=distill_tokens,
        device=device or "auto", trust_remote_code=trust_remote_code, parent_memory_gb=parent_memory_gb,
    )
    report = fuse_ffn(ckpt, None if dry_run else out, cfg, overwrite=overwrite,
                      info={"command": shlex.join(["puzzle", *sys.argv[1:]])})
    print_report(report)
    if dry_run:
        if not report.fused_groups:
            from puzzle.fusion.stage import nothing_fused_reason

            console.print(f"[yellow]nothing would be fused[/]: {nothing_fused_reason(report.runs, cfg)}")
        console.print("[dim]dry run: nothing written[/]")
    else:
        done(f"fused {len(report.fused_groups)} group(s) of FFNs: {ckpt} -> {out}")


def print_report(report) -> None:
    """The runs table and the before / after summary of a FusionReport."""
    table = Table(title=f"FFN runs of {report.source}")
    table.add_column("run", justify="right")
    table.add_column("layer", justify="right")
    table.add_column("dependency", justify="right")
    table.add_column("decision")
    for r, run in enumerate(report.runs):
        group_of = {i: g for g in run.groups for i in g}
        for k, (layer, dep, note) in enumerate(zip(run.layers, run.dependency, run.notes)):
            g = group_of[layer]
            decision = (f"[green]fused into L{g[0]}[/] (width of L{'+L'.join(map(str, g))})" if len(g) > 1 and layer == g[0]
                        else f"[green]fused into L{g[0]}[/]" if len(g) > 1 else "kept")
            table.add_row(str(r) if k == 0 else "", f"L{layer}", "-" if dep is None else f"{dep:.4f}",
                          decision + (f" [dim]({note})[/]" if note else ""), end_section=k == len(run.layers) - 1)
    console.print(table)
    if report.calibration_tokens:
        console.print(f"dependency: mean cosine distance of each FFN's output, run input vs its true input, "
                      f"over {report.calibration_tokens:,} calibration tokens")
    console.print(f"sequential FFNs {report.ffn_depth_before} -> {report.ffn_depth_after}; parameters "
                  f"{human_count(report.params_before)} -> {human_count(report.params_after)}; "
                  f"{'[green]vLLM-native[/]' if report.vllm_native else '[yellow]not vLLM-native[/]'}")
    console.print(f"predicted batch-1 decode speed-up {report.predicted_speedup:.3f}x [dim](estimate: kernel launches "
                  "+ weight bytes with H100-like constants; fusion saves launches, not bytes)[/]")
    if report.quality is not None:
        q = report.quality
        console.print(f"held-out ({q.tokens:,} tokens): KL(unfused || fused) {q.kl:.4f}, top-1 agreement {q.top1:.1%}, "
                      f"LM loss {q.lm_loss_before:.4f} -> {q.lm_loss_after:.4f}")
    if report.quality_distilled is not None:
        q = report.quality_distilled
        console.print(f"after KD on {report.distill_tokens:,} tokens: KL {q.kl:.4f}, top-1 agreement {q.top1:.1%}, "
                      f"LM loss {q.lm_loss_after:.4f} (unfused {q.lm_loss_before:.4f})")
