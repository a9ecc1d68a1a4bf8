"""`puzzle distill CHILD --teacher PARENT --data DATA --out OUT`: global knowledge distillation of a child."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from puzzle.cli.options import Device, Exclude, ModelDir, Overwrite, TrustRemoteCode
from puzzle.cli.output import console, done

_Int = lambda flag, text: Annotated[Optional[int], typer.Option(flag, min=1, help=text, show_default=False)]  # noqa: E731
_Float = lambda flag, text: Annotated[Optional[float], typer.Option(flag, help=text, show_default=False)]  # noqa: E731


def distill_command(
    child: ModelDir,
    teacher: Annotated[Path, typer.Option("--teacher", help="The parent the child learns from.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Output folder for the distilled child; a killed run found there resumes.", show_default=False)],
    data: Annotated[Optional[list[Path]], typer.Option("--data", help="Text / JSONL / datasets folder (repeatable).", show_default=False)] = None,
    tokens: _Int("--tokens", "Training tokens (default 2^27).") = None,
    batch_size: _Int("--batch-size", "Windows per process per micro-step (default 8).") = None,
    grad_accum: _Int("--grad-accum", "Micro-steps per optimizer step (default 1).") = None,
    seq_len: _Int("--seq-len", "Window length (default: the data config's).") = None,
    lr: _Float("--lr", "Peak learning rate (default 1e-4); warm-up, then cosine decay.") = None,
    temperature: _Float("--temperature", "KL temperature (default 1).") = None,
    cosine_weight: _Float("--cosine-weight", "Weight of the per-layer (1 - cos) term; 0 = logits-only KL (default 1).") = None,
    checkpoint_every: _Int("--checkpoint-every", "Optimizer steps between resumable checkpoints (default 500).") = None,
    eval_tokens: _Int("--eval-tokens", "Held-out tokens for the metrics before and after (default 2^17).") = None,
    fsdp: Annotated[Optional[bool], typer.Option("--fsdp/--no-fsdp", metavar="", help="Shard the child over the processes (FSDP2) instead of DDP.", show_default=False)] = None,
    device: Device = None,
    exclude: Exclude = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML with `gkd` and `data` sections; flags override it.")] = None,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Distil CHILD from its parent: KL on next-token distributions plus per-layer cosine distance.

    Held-out KL to the teacher, LM loss and top-1 agreement are measured before and after and written to
    OUT/gkd.json beside the checkpoint. Several GPUs: launch the same command with accelerate or torchrun.

    Examples:
      puzzle distill runs/demo/children/2x --teacher runs/demo/parent --data ~/data/fineweb --out children/2x-distilled --tokens 65536
      torchrun --nproc-per-node 8 -m puzzle distill CHILD --teacher PARENT --data DATA --out OUT --config gkd.yaml
    """
    from puzzle.distill.gkd import load_gkd_settings, run_gkd

    options = dict(tokens=tokens, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr,
                   temperature=temperature, cosine_weight=cosine_weight, checkpoint_every=checkpoint_every,
                   eval_tokens=eval_tokens, fsdp=fsdp, device=device,
                   trust_remote_code=trust_remote_code or None)
    cfg, data_cfg = load_gkd_settings(config, options, {"paths": [str(p) for p in data] if data else None,
                                                        "exclude": exclude or None})
    result = run_gkd(child, teacher, data_cfg, out, cfg, overwrite=overwrite,
                     info={"command": shlex.join(["puzzle", *sys.argv[1:]])})
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun / accelerate launch, the first process reports
    table = Table(title=f"held-out, {result.after.positions:,} positions (teacher LM loss {result.after.teacher_lm_loss:.4f})")
    for column in ("", "KL to teacher", "LM loss", "top-1 agreement"):
        table.add_column(column, justify="right")
    for name, m in (("before", result.before), ("after", result.after)):
        table.add_row(name, f"{m.kl:.4f}", f"{m.lm_loss:.4f}", f"{m.top1:.3f}")
    console.print(table)
    done(f"distilled {child} -> {out} ({result.tokens:,} tokens, {result.tokens_per_s:,.0f} tokens/s)")
