"""The prune stage: checkpoint in, pruned (and optionally distilled) checkpoint out; behind `puzzle prune`.

Checks everything the config files allow, loads the parent within its memory budget (`parent_memory_gb`: layers
beyond it are read from its files per forward), measures importance on the calibration data (importance.py), turns
the targets into a plan (plan.py), writes the child tensor by tensor, each parent tensor sliced as it is read from
its shards (slicing.py; neither model is ever held whole), then measures the written child against the parent on
held-out tokens. The child is written as a plain LlamaForCausalLM folder when every layer is
the same Llama layer (export.py), else in puzzle's DeciLM format. With `cfg.distill` the child first
learns from the parent (puzzle.distill.gkd); a killed KD resumes when the same call is repeated.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from puzzle.arch import Architecture
from puzzle.checkpoint import decilm_config, finish_checkpoint_dir, load_architecture, normalized_config
from puzzle.config import to_mapping
from puzzle.data import TokenData, load_token_data, load_tokenizer
from puzzle.distill.gkd import run_gkd
from puzzle.errors import ConfigError, OutputExistsError
from puzzle.files import atomic_output_dir, read_json, write_json_atomic
from puzzle.jobs import Shard, device_for
from puzzle.memory import load_within_budget, shard_bytes_within
from puzzle.metrics import Quality
from puzzle.modeling.configuration_decilm import DeciLMConfig
from puzzle.modeling.modeling_decilm import DeciLMForCausalLM
from puzzle.nemotron_h_puzzle import VLLM_SUFFIX, write_nemotron_h_puzzle
from puzzle.progress import log
from puzzle.prune.config import PruneConfig, PruneResult, ShapeSummary, size_range
from puzzle.prune.export import plain_llama_blockers, write_plain_llama
from puzzle.prune.importance import Importance, Needs, measure_importance
from puzzle.prune.plan import (
    PrunePlan,
    check_targets,
    expert_targets,
    ffn_targets,
    head_targets,
    make_plan,
    mamba_targets,
    needs_calibration,
)
from puzzle.prune.slicing import check_params, child_config, sliced_tensors
from puzzle.scoring import model_quality
from puzzle.weights import SHARD_BYTES, LazyWeights, checkpoint_tensors, write_model_config, write_tensors


def prune(ckpt: Path, out: Path, cfg: PruneConfig = PruneConfig(), *, overwrite: bool = False,
          info: dict[str, Any] | None = None) -> PruneResult:
    """Prune checkpoint `ckpt` to `cfg`'s targets (width and / or depth) and write the child to `out`.

    Reads any checkpoint puzzle reads (plain HF parents, puzzle / Llama-Nemotron children). Importance comes
    from `cfg.data`'s train split, the quality check from its held-out split; with `cfg.distill` the child
    is retrained by KD from `ckpt`. The child's puzzle.json holds the result under "prune" (plus `info`).
    Raises ConfigError / InputError / OutputExistsError before any weight is read when the request cannot work.
    """
    ckpt, out = Path(ckpt), Path(out)
    config, arch = _check_request(ckpt, out, cfg, overwrite)
    data = load_token_data(cfg.data, load_tokenizer(ckpt, cfg.trust_remote_code)) if cfg.data is not None else None
    check = data is not None and cfg.eval_tokens > 0
    # the parent runs (importance, quality check) within its memory budget; the child is sliced from its files
    parent = _load(ckpt, cfg, "prune: parent") if needs_calibration(arch, cfg) or check else None
    importance = _importance(parent, arch, cfg, data)
    plan = make_plan(arch, cfg, importance)
    child_cfg, child_arch = child_config(decilm_config(config).to_dict(), plan)
    unrouted = _unrouted_experts(plan, importance)
    result = PruneResult(
        source=str(ckpt), out=str(out), output_format=_output_format(config, child_arch, cfg),
        before=summarize(arch), after=summarize(child_arch), kept_layers=tuple(p.source for p in plan.layers),
        metric=cfg.metric if cfg.drop_layers else None,
        layer_scores=_floats(importance.layers), window_scores=_floats(importance.windows) if cfg.contiguous else None,
        calibration_tokens=importance.tokens,
        kept_experts=tuple(p.experts for p in plan.layers) if any(p.experts for p in plan.layers) else None,
        unrouted_experts=unrouted, config=to_mapping(cfg),
    )
    details = {"stage": "prune", "parent": str(ckpt.resolve()), **(info or {})}
    tensors = sliced_tensors(checkpoint_tensors(ckpt), plan, arch)
    target = out if cfg.distill is None else out.with_name(f".{out.name}.pruned")
    with atomic_output_dir(target, overwrite or cfg.distill is not None) as tmp:
        # KD reads a DeciLM folder: the staged child is one whatever the final format
        fmt = result.output_format if cfg.distill is None else "decilm"
        _write_child(tmp, tensors, child_cfg, fmt, source=ckpt, info={**details, "prune": result.to_dict()},
                     max_shard_bytes=shard_bytes_within(cfg.parent_memory_gb, device_for(Shard(), cfg.device)))
        if check:
            result = replace(result, quality=_quality(parent, _load(tmp, cfg, "prune: child"), data, cfg))
            _update_info(tmp, "prune", result.to_dict())
    del parent
    if cfg.distill is not None:
        return _distill_and_write(target, ckpt, result, cfg, details, overwrite)
    _write_nemotron_h(out)
    _log_written(result, out)
    return result


def _load(path: Path, cfg: PruneConfig, what: str) -> DeciLMForCausalLM:
    return load_within_budget(path, cfg.parent_memory_gb, "prune.parent_memory_gb", what=what, dtype=None,
                              device=device_for(Shard(), cfg.device))


def _update_info(folder: Path, key: str, value: Any) -> None:
    """puzzle.json with `key` replaced: the result once the written child has been checked."""
    info = read_json(folder / "puzzle.json", "puzzle.json")
    write_json_atomic(folder / "puzzle.json", {**info, key: value})


def _unrouted_experts(plan: PrunePlan, importance: Importance) -> tuple[str, ...]:
    """The kept experts (parent layer and expert) whose width was pruned by weight norm, no calibration token having
    reached them; said in the log."""
    kept = {p.source: p.experts for p in plan.layers if p.expert_ffn is not None}
    names = tuple(f"L{i}.E{e}" for i, e in importance.unrouted if i in kept and (kept[i] is None or e in kept[i]))
    if names:
        log(f"prune: no calibration token reached expert(s) {', '.join(names)}; their neurons are kept by weight norm "
            "(give more --calibration-tokens to rank them by activations)")
    return names


def summarize(arch: Architecture) -> ShapeSummary:
    heads = arch.shape.num_attention_heads
    return ShapeSummary(
        layers=arch.num_layers, hidden_size=arch.shape.hidden_size, num_attention_heads=heads,
        kv_heads=tuple(b.attention.num_kv_heads(heads) for b in arch.blocks),
        ffn_sizes=tuple(b.ffn.intermediate_size or 0 for b in arch.blocks), params=arch.total_params(),
        **_expert_summary(arch),
    )


def _expert_summary(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """ShapeSummary's expert fields: per layer experts and their width (0: dense); none without MoE layers."""
    moes = [b.ffn.moe for b in arch.blocks]
    if not any(moes):
        return {}
    return {"experts": tuple(m.num_local_experts if m else 0 for m in moes),
            "expert_ffn_sizes": tuple(m.expert_intermediate_dim if m else 0 for m in moes)}


def _check_request(ckpt: Path, out: Path, cfg: PruneConfig, overwrite: bool) -> tuple[dict[str, Any], Architecture]:
    """What can be refused from the config files alone; returns the parent's (config dict, architecture)."""
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it or choose another output path")
    if out.resolve() == ckpt.resolve():
        raise OutputExistsError(f"{out} is the input checkpoint; choose another output path")
    config = normalized_config(ckpt)
    arch = Architecture.from_config(config, str(ckpt / "config.json"))
    check_targets(arch, cfg)
    if cfg.data is None and needs_calibration(arch, cfg):
        raise ConfigError("pruning ranks channels, heads and layers on calibration text: give --data PATH "
                          "(a text / JSONL file or folder)")
    if cfg.data is None and cfg.distill is not None:
        raise ConfigError("--distill-tokens needs training text: give --data PATH")
    hidden_pruned = cfg.hidden_size is not None and cfg.hidden_size < arch.shape.hidden_size
    if cfg.distill is not None and cfg.distill.cosine_weight > 0 and hidden_pruned:
        raise ConfigError("KD with a hidden-state cosine term cannot compare a narrower hidden size with the "
                          "parent's; use logits-only KD (distill.cosine_weight: 0, Minitron's choice)")
    if cfg.output_format == "plain" and config.get("puzzle_parent_family") != "llama":
        raise ConfigError(f"{ckpt}: a plain LlamaForCausalLM needs a Llama parent; drop --plain to write puzzle's format")
    return config, arch




def _importance(model: DeciLMForCausalLM, arch: Architecture, cfg: PruneConfig, data: TokenData | None) -> Importance:
    if not needs_calibration(arch, cfg):
        return Importance()
    _, heads = head_targets(arch, cfg.heads, cfg.kv_heads)
    moe = expert_targets(arch, cfg.experts, cfg.expert_ffn_size)
    mamba = mamba_targets(arch, cfg.mamba_heads, cfg.mamba_head_dim)
    needs = Needs(
        hidden=cfg.hidden_size is not None and cfg.hidden_size < arch.shape.hidden_size,
        heads=tuple(i for i, h in enumerate(heads) if h is not None),
        mamba_heads=tuple(i for i, t in enumerate(mamba) if t is not None and t[0] is not None),
        mamba_channels=tuple(i for i, t in enumerate(mamba) if t is not None and t[1] is not None),
        ffn=tuple(i for i, s in enumerate(ffn_targets(arch, cfg.ffn_size)) if s is not None),
        experts=tuple(i for i, t in enumerate(moe) if t is not None and t[0] is not None),
        expert_ffn=tuple(i for i, t in enumerate(moe) if t is not None and t[1] is not None),
        expert_ranking=cfg.expert_ranking, drop=cfg.drop_layers, metric=cfg.metric, contiguous=cfg.contiguous,
    )
    n_tokens = max(cfg.calibration_tokens, data.config.seq_len)
    return measure_importance(model, data.batches("train", cfg.batch_size, n_tokens=n_tokens, seed=0), needs)


def _quality(parent: DeciLMForCausalLM, child: DeciLMForCausalLM, data: TokenData, cfg: PruneConfig) -> Quality:
    n_tokens = min(max(cfg.eval_tokens, data.config.seq_len), data.num_tokens("held_out"))
    return model_quality(parent, child, data.batches("held_out", cfg.batch_size, n_tokens=n_tokens, shuffle=False))


def _output_format(config: dict[str, Any], arch: Architecture, cfg: PruneConfig) -> str:
    blockers = plain_llama_blockers(config, arch)
    if cfg.output_format == "plain" and blockers:
        raise ConfigError(f"the pruned model cannot be a plain LlamaForCausalLM: {'; '.join(blockers)}; "
                          "drop --plain to write puzzle's format")
    return "plain" if cfg.output_format != "decilm" and not blockers else "decilm"


def _floats(scores: torch.Tensor | None) -> tuple[float, ...] | None:
    return None if scores is None else tuple(round(float(s), 6) for s in scores)


def _write_child(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], config: DeciLMConfig, fmt: str, *,
                 source: Path, info: dict[str, Any], generation_from: Path | None = None,
                 extra_files: tuple[Path, ...] = (), max_shard_bytes: int = SHARD_BYTES) -> None:
    """The child of `config` into `folder` (inside atomic_output_dir) as its tensors come, in `fmt` (plain: a
    LlamaForCausalLM folder; decilm: what `save_model` writes), checking its parameter count."""
    arch = Architecture.from_config(config.to_dict())
    if config.tie_word_embeddings:  # one tensor, stored once (as save_pretrained does)
        tensors = ((k, v) for k, v in tensors if k != "lm_head.weight")
    if fmt == "plain":
        numel = write_plain_llama(folder, tensors, config.to_dict(), source=source, info=info, extra_files=extra_files,
                                  max_shard_bytes=max_shard_bytes)
    else:
        dtype, numel = write_tensors(folder, tensors, max_shard_bytes)
        write_model_config(folder, config, "DeciLMForCausalLM", dtype, generation_from=generation_from)
        finish_checkpoint_dir(folder, read_json(folder / "config.json", "config.json"), source, info)
        for file in extra_files:
            shutil.copy2(file, folder / file.name)
    check_params(numel, arch)


def _write_nemotron_h(out: Path) -> None:
    """A hybrid child that vLLM's Nemotron-H model can serve: also in its layout, beside `out`."""
    if (out / "config.json").exists() and load_architecture(out).vllm_serving() == "nemotron_h":
        write_nemotron_h_puzzle(out, out.with_name(out.name + VLLM_SUFFIX), overwrite=True)


def _log_written(result: PruneResult, out: Path) -> None:
    experts = ""
    if result.before.experts:
        b, a = result.before, result.after
        experts = (f", experts per MoE layer {size_range(b.experts)} -> {size_range(a.experts)}, "
                   f"expert width {size_range(b.expert_ffn_sizes)} -> {size_range(a.expert_ffn_sizes)}")
    log(f"prune: {result.before.params:,} -> {result.after.params:,} parameters{experts} -> {out}")


def _distill_and_write(staging: Path, ckpt: Path, result: PruneResult, cfg: PruneConfig,
                       details: dict[str, Any], overwrite: bool) -> PruneResult:
    """KD of the pruned child staged in `staging` (a hidden folder beside `out`) from `ckpt` (puzzle.distill.gkd)
    into another, then the final write, streamed from the trained child. Both folders stay when KD fails, so
    repeating the call resumes the KD."""
    out = Path(result.out)
    trained = out.with_name(f".{out.name}.kd")
    gkd = replace(cfg.distill, trust_remote_code=cfg.trust_remote_code)
    if gkd.cosine_weight > 0 and gkd.layer_map is None:  # hidden states are compared layer by kept layer
        gkd = replace(gkd, layer_map=result.kept_layers)
    kd = run_gkd(staging, ckpt, cfg.data, trained, gkd, overwrite=True, info=details)
    details = {**details, "gkd": read_json(trained / "puzzle.json")["gkd"]}
    a = kd.after
    result = replace(result, distill_tokens=kd.tokens,
                     quality_distilled=Quality(kl=a.kl, lm_loss=a.lm_loss, top1=a.top1, tokens=a.positions,
                                               reference_lm_loss=a.teacher_lm_loss))
    with atomic_output_dir(out, overwrite) as tmp:
        _write_child(tmp, LazyWeights(trained).items(), decilm_config(normalized_config(trained)), result.output_format,
                     source=ckpt, info={**details, "prune": result.to_dict()}, generation_from=trained,
                     extra_files=(trained / "gkd.json",))
    _write_nemotron_h(out)
    _log_written(result, out)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(trained, ignore_errors=True)
    return result
