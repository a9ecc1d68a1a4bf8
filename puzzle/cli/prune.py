"""`puzzle prune CKPT OUT`: Minitron width / depth pruning of a checkpoint (puzzle/prune/)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from puzzle.cli.options import Device, Exclude, ModelDir, OutDir, Overwrite, ParentMemory, TrustRemoteCode
from puzzle.cli.output import console, done, human_count

_Int = lambda flag, text: Annotated[Optional[int], typer.Option(flag, min=1, help=text, show_default=False)]  # noqa: E731


def prune_command(
    ckpt: ModelDir,
    out: OutDir,
    hidden_size: _Int("--hidden-size", "Hidden size of the child (embedding channels kept).") = None,
    ffn_size: Annotated[Optional[str], typer.Option("--ffn-size", help="FFN width of every layer, or one per layer: 512,512,-,384 (- keeps a layer).", show_default=False)] = None,
    heads: _Int("--heads", "Attention (query) heads of the child.") = None,
    kv_heads: _Int("--kv-heads", "KV heads of every attention layer (default: kept where --heads allows).") = None,
    experts: _Int("--experts", "Experts kept in every mixture-of-experts layer (at least its experts per token).") = None,
    expert_ffn_size: _Int("--expert-ffn-size", "Width of every kept expert (neurons ranked on the tokens routed to it).") = None,
    expert_ranking: Annotated[str, typer.Option("--expert-ranking", help="How --experts ranks experts: contribution (mean routing weight x expert output norm) or router_mass (mean router probability).")] = "contribution",
    mamba_heads: _Int("--mamba-heads", "Heads kept in every Mamba layer of a hybrid (Nemotron-H), the same number from each B/C group.") = None,
    mamba_head_dim: _Int("--mamba-head-dim", "Channels kept in every Mamba head (each head its best).") = None,
    drop_layers: Annotated[int, typer.Option("--drop-layers", min=0, help="Layers to remove (depth pruning).")] = 0,
    metric: Annotated[str, typer.Option("--metric", help="Layer ranking: cos (1 - cos(input, output), ShortGPT's block importance) or loss (LM-loss increase when removed).")] = "cos",
    contiguous: Annotated[bool, typer.Option("--contiguous", metavar="", help="Drop one block of consecutive layers instead of any layers.")] = False,
    data: Annotated[Optional[list[Path]], typer.Option("--data", help="Text / JSONL / datasets folder: train split calibrates (and trains with --distill-tokens), held-out split checks quality (repeatable).", show_default=False)] = None,
    calibration_tokens: _Int("--calibration-tokens", "Train-split tokens for the importance ranking (default 65536).") = None,
    eval_tokens: Annotated[Optional[int], typer.Option("--eval-tokens", min=0, help="Held-out tokens for KL / LM loss against the parent (default 32768; 0: skip).", show_default=False)] = None,
    distill_tokens: Annotated[int, typer.Option("--distill-tokens", min=0, help="Tokens of logits-only KD from the parent right after pruning (Minitron's retraining; 0: none).")] = 0,
    plain: Annotated[Optional[bool], typer.Option("--plain/--decilm", metavar="", help="Force a plain LlamaForCausalLM folder, or puzzle's DeciLM format (default: plain when the child is a uniform Llama).", show_default=False)] = None,
    overwrite: Overwrite = False,
    device: Device = None,
    parent_memory_gb: ParentMemory = None,
    exclude: Exclude = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Prune a model's width (hidden size, FFN neurons, heads, experts) and / or depth (layers), Minitron style.

    Channels, neurons and heads are ranked by their activations on calibration text, experts by their
    contribution to the MoE output, layers by block importance. ShortGPT's baseline is --drop-layers N alone; Minitron's width pruning is --hidden-size /
    --ffn-size [--heads] with --distill-tokens.

    Examples:
      puzzle prune runs/demo/parent children/width --data ~/data/fineweb --hidden-size 192 --ffn-size 512 --distill-tokens 65536
      puzzle prune runs/demo/parent children/shortgpt --data ~/data/fineweb --drop-layers 2
      puzzle prune runs/demo/parent children/depth --data ~/data/fineweb --drop-layers 2 --contiguous --metric loss --decilm
      puzzle prune ~/models/Mixtral-8x7B children/moe --data ~/data/fineweb --experts 6 --expert-ffn-size 192
    """
    from puzzle.corpus import DataConfig
    from puzzle.prune import PruneConfig, minitron_kd, prune

    optional = dict(calibration_tokens=calibration_tokens, eval_tokens=eval_tokens)
    cfg = PruneConfig(
        hidden_size=hidden_size, ffn_size=_ffn_size(ffn_size), heads=heads, kv_heads=kv_heads,
        experts=experts, expert_ffn_size=expert_ffn_size, expert_ranking=expert_ranking, mamba_heads=mamba_heads,
        mamba_head_dim=mamba_head_dim,
        drop_layers=drop_layers, metric=metric, contiguous=contiguous,
        data=DataConfig(paths=tuple(str(p) for p in data), exclude=tuple(exclude or ())) if data else None,
        distill=minitron_kd(distill_tokens, device=device or "auto") if distill_tokens else None,
        output_format={None: "auto", True: "plain", False: "decilm"}[plain], device=device or "auto", trust_remote_code=trust_remote_code, parent_memory_gb=parent_memory_gb, **{k: v for k, v in optional.items() if v is not None},
    )
    result = prune(ckpt, out, cfg, overwrite=overwrite, info={"command": shlex.join(["puzzle", *sys.argv[1:]])})
    print_result(result)
    done(f"pruned {ckpt} -> {out} ({'LlamaForCausalLM' if result.output_format == 'plain' else 'puzzle DeciLM format'})")


def _ffn_size(text: str | None) -> int | tuple[int | None, ...] | None:
    if text is None:
        return None
    try:
        sizes = tuple(None if part.strip() in ("-", "") else int(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter("give an integer or a comma-separated list of integers and -", param_hint="--ffn-size") from None
    return sizes[0] if len(sizes) == 1 and sizes[0] is not None else sizes


def print_result(result) -> None:
    """Before / after sizes, the layer ranking when layers were dropped, and quality against the parent."""
    from puzzle.prune.config import size_range as _sizes

    b, a = result.before, result.after
    table = Table(title=f"prune {result.source}")
    for column in ("", "parent", "child"):
        table.add_column(column, justify="right")
    table.add_row("layers", str(b.layers), str(a.layers))
    table.add_row("hidden size", str(b.hidden_size), str(a.hidden_size))
    table.add_row("attention heads", str(b.num_attention_heads), str(a.num_attention_heads))
    table.add_row("KV heads / layer", _sizes(b.kv_heads), _sizes(a.kv_heads))
    table.add_row("FFN width", _sizes(b.ffn_sizes), _sizes(a.ffn_sizes))
    if b.experts:
        table.add_row("experts / MoE layer", _sizes(b.experts), _sizes(a.experts))
        table.add_row("expert width", _sizes(b.expert_ffn_sizes), _sizes(a.expert_ffn_sizes))
    table.add_row("parameters", human_count(b.params), f"{human_count(a.params)} ({a.params / b.params:.1%})")
    console.print(table)
    if result.unrouted_experts:
        console.print(f"experts no calibration token reached (neurons kept by weight norm): "
                      f"{', '.join(result.unrouted_experts)}")
    if result.metric is not None:
        console.print(f"layer importance ({result.metric}): "
                      + ", ".join(f"L{i} {s:.4g}" for i, s in enumerate(result.layer_scores)))
        if result.window_scores:
            n = len(result.dropped_layers)
            console.print(f"importance of each block of {n} layers: "
                          + ", ".join(f"L{s}-L{s + n - 1} {v:.4g}" for s, v in enumerate(result.window_scores)))
        console.print(f"dropped layers: {', '.join(f'L{i}' for i in result.dropped_layers)}")
    for name, q in (("after pruning", result.quality), (f"after KD on {result.distill_tokens:,} tokens", result.quality_distilled)):
        if q is not None:
            parent = f" (parent {q.reference_lm_loss:.4f} on the same tokens)" if q.reference_lm_loss is not None else ""
            console.print(f"held-out ({q.tokens:,} tokens) {name}: KL to parent {q.kl:.4f}, LM loss {q.lm_loss:.4f}"
                          f"{parent}, top-1 agreement {q.top1:.1%}")
