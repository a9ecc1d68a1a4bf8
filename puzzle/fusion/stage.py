"""`fuse_ffn`: measure dependencies on calibration tokens, fuse, check against the unfused model, optionally distil."""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from puzzle.checkpoint import decilm_config, finish_checkpoint_dir, load_architecture, normalized_config
from puzzle.config import to_mapping
from puzzle.data import TokenData, load_token_data, load_tokenizer
from puzzle.distill.activations import layer_weights, logits_from_hidden, run_layers
from puzzle.distill.gkd import GKDConfig, run_gkd
from puzzle.distill.losses import cosine_distance
from puzzle.errors import ConfigError, NothingToFuse, OutputExistsError
from puzzle.files import atomic_output_dir, read_json, write_json_atomic
from puzzle.fusion.config import FusionConfig, FusionQuality, FusionReport, RunPlan
from puzzle.fusion.runs import DecodeCostModel, choose_groups, ffn_depth, find_runs, fused_architecture
from puzzle.fusion.weights import fused_tensors
from puzzle.jobs import Shard, device_for
from puzzle.memory import load_within_budget, shard_bytes_within
from puzzle.metrics import QualitySums
from puzzle.modeling.modeling_decilm import DeciLMForCausalLM
from puzzle.progress import log, track
from puzzle.weights import SHARD_BYTES, checkpoint_tensors, write_model_config, write_tensors

# ----------------------------------------------------------------------------------------------------------
# Measurements on tokens


@torch.no_grad()
def measure_dependency(
    model: DeciLMForCausalLM, runs: Sequence[Sequence[int]], batches: Iterable[torch.Tensor], max_run: int | None = None
) -> tuple[dict[tuple[int, int], float], int]:
    """({(a, j): mean cosine distance of f_j(h_a) vs f_j(h_j)}, tokens) for j after a in a run.

    h_j is layer j's true FFN input (the sequential model); pairs cover every j against its run's first
    layer and every (a, j) less than max_run apart, which is all `choose_groups` asks for.
    """
    pairs = [
        (run[p], run[q]) for run in runs for p in range(len(run)) for q in range(p + 1, len(run))
        if p == 0 or max_run is None or q - p < max_run
    ]
    members = {i for run in runs for i in run}
    layers = model.model.layers
    sums = dict.fromkeys(pairs, 0.0)
    tokens = 0
    batches = list(batches)
    with track("fuse-ffn: dependency", len(batches)) as bar:
        for ids in batches:  # (B, T)
            _, io = run_layers(model, ids, stop=max(members) + 1, capture=members)
            n = ids.numel()
            for j in sorted({j for _, j in pairs}):
                with layer_weights(layers[j]):  # a layer left in the files is read once for all its pairs
                    for a in (a for a, k in pairs if k == j):
                        sums[(a, j)] += cosine_distance(layers[j].ffn_branch(io[a].h), io[j].ffn).item() * n
            tokens += n
            bar.advance(1)
    return {pair: s / max(tokens, 1) for pair, s in sums.items()}, tokens


@torch.no_grad()
def final_hidden(model: DeciLMForCausalLM, batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The last hidden state (before the final norm) of each batch, kept on the CPU."""
    return [run_layers(model, ids)[0].cpu() for ids in batches]


@torch.no_grad()
def compare_to_reference(
    model: DeciLMForCausalLM, batches: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], chunk: int = 4096
) -> FusionQuality:
    """KL(reference || model), top-1 agreement and both LM losses; `reference` from `final_hidden`.

    The reference shares the model's final norm and LM head (fusion changes neither).
    """
    sums = QualitySums(model.device)
    for ids, ref in zip(batches, reference):
        hidden = run_layers(model, ids)[0]
        h, r = hidden[:, :-1].flatten(0, 1), ref[:, :-1].flatten(0, 1).to(hidden.device)  # (N, C)
        y = ids[:, 1:].flatten().to(hidden.device)
        for s in range(0, h.shape[0], chunk):
            sums.add_logits(logits_from_hidden(model, r[s:s + chunk]), logits_from_hidden(model, h[s:s + chunk]), y[s:s + chunk])
    q = sums.quality()
    return FusionQuality(tokens=q.tokens, kl=q.kl, top1=q.top1, lm_loss_before=q.reference_lm_loss, lm_loss_after=q.lm_loss)


# ----------------------------------------------------------------------------------------------------------
# The stage


def fuse_ffn(
    ckpt: Path, out: Path | None, cfg: FusionConfig, *, overwrite: bool = False,
    info: dict[str, Any] | None = None,
) -> FusionReport:
    """Fuse the attention-free FFN runs of checkpoint `ckpt` into `out`; `out=None` is a dry run.

    Reads any checkpoint puzzle reads (puzzle / Llama-Nemotron children, plain HF parents) and writes a
    puzzle checkpoint (its `puzzle.json` holds the report under "fusion"). Measures the dependency on
    `cfg.data`'s train split (unless `cfg.threshold` is None), fuses, checks KL / LM loss on its held-out
    split, and with `cfg.distill_tokens` runs a short KD from the unfused model. Raises InputError when
    there is nothing to fuse, before anything is written.
    """
    ckpt = Path(ckpt)
    _check_request(out, cfg, overwrite)
    arch = load_architecture(ckpt)
    runs = find_runs(arch)
    if not runs:
        raise NothingToFuse(
            f"{ckpt}: no two FFNs follow each other without attention between them, so there is nothing to fuse; "
            "FFN fusion needs layers whose attention is no-op (a `puzzle search` child with attention removed)"
        )
    model = data = None
    if out is not None or cfg.threshold is not None:  # a dry run without calibration reads no weights
        model = _load(ckpt, cfg, "fuse-ffn: unfused model")
        data = load_token_data(cfg.data, load_tokenizer(ckpt, cfg.trust_remote_code)) if cfg.data is not None else None
    plans, tokens = _plan(model, runs, data, cfg)
    after, cost = fused_architecture(arch, [g for p in plans for g in p.fused]), DecodeCostModel()
    report = FusionReport(
        source=str(ckpt), out=None if out is None else str(out), runs=tuple(plans), calibration_tokens=tokens,
        ffn_depth_before=ffn_depth(arch), ffn_depth_after=ffn_depth(after),
        params_before=arch.total_params(), params_after=after.total_params(),
        predicted_speedup=cost.step_seconds(arch) / cost.step_seconds(after),
        vllm_native=not after.vllm_unsupported(), config=to_mapping(cfg),
    )
    if out is None:
        return report
    if not report.fused_groups:
        raise NothingToFuse(f"{ckpt}: {nothing_fused_reason(plans, cfg)}; nothing was written")
    batches = _check_batches(data, cfg)
    reference = final_hidden(model, batches) if batches else None  # of the unfused model, before it is let go
    del model  # the fused model is written from the files, tensor by tensor, then read back for the check
    info = {"stage": "fuse-ffn", "parent": str(ckpt.resolve()), **(info or {})}
    target = Path(out) if not cfg.distill_tokens else Path(out).with_name(f".{Path(out).name}.before-kd")
    with atomic_output_dir(target, overwrite or bool(cfg.distill_tokens)) as tmp:
        write_fused(ckpt, tmp, report.fused_groups, info={**info, "fusion": report.to_dict()},
                    max_shard_bytes=shard_bytes_within(cfg.parent_memory_gb, device_for(Shard(), cfg.device)))
        if reference is not None:
            fused = _load(tmp, cfg, "fuse-ffn: fused model")
            report = replace(report, quality=compare_to_reference(fused, batches, reference))
            del fused
            _update_info(tmp, "fusion", report.to_dict())
    if cfg.distill_tokens:  # run_gkd reads folders: the fused model is staged beside `out`
        try:
            report = _distill(target, ckpt, Path(out), report, cfg, overwrite)
        finally:
            shutil.rmtree(target, ignore_errors=True)
    log(f"fuse-ffn: {len(report.fused_groups)} fused FFN(s) -> {out}")
    return report


def _load(path: Path, cfg: FusionConfig, what: str) -> DeciLMForCausalLM:
    return load_within_budget(path, cfg.parent_memory_gb, "fuse.parent_memory_gb", what=what, dtype=None,
                              device=device_for(Shard(), cfg.device))


def write_fused(ckpt: Path, folder: Path, groups: Sequence[Sequence[int]], info: dict[str, Any],
                max_shard_bytes: int = SHARD_BYTES) -> None:
    """The fused checkpoint of `ckpt` into `folder` (inside `atomic_output_dir`), streamed: each tensor is read
    from `ckpt`'s shards when reached and written as it comes (one group's FFNs held at a time), with the config,
    modeling, tokenizer and puzzle.json files `save_model` writes for the fused model held whole."""
    config = decilm_config(normalized_config(ckpt), fused_architecture(load_architecture(ckpt), groups))
    dtype, _ = write_tensors(folder, fused_tensors(checkpoint_tensors(ckpt), config, groups), max_shard_bytes)
    write_model_config(folder, config, "DeciLMForCausalLM", dtype, generation_from=ckpt)
    finish_checkpoint_dir(folder, read_json(folder / "config.json", "config.json"), ckpt, info)


def _update_info(folder: Path, key: str, value: Any) -> None:
    """puzzle.json with `key` replaced: the report once the written model has been checked."""
    info = read_json(folder / "puzzle.json", "puzzle.json")
    write_json_atomic(folder / "puzzle.json", {**info, key: value})


def _check_request(out: Path | None, cfg: FusionConfig, overwrite: bool) -> None:
    """What can be refused before any weight is read."""
    if cfg.data is None and cfg.threshold is not None:
        raise ConfigError(
            "fusion by --threshold needs calibration data: give --data PATH, or --no-calibration to fuse "
            "every attention-free run up to --max-run"
        )
    if cfg.data is None and cfg.distill_tokens:
        raise ConfigError("--distill-tokens needs training data: give --data PATH")
    if out is not None and Path(out).exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it or choose another output path")


def _plan(model: DeciLMForCausalLM | None, runs: list[tuple[int, ...]], data: TokenData | None, cfg: FusionConfig) -> tuple[list[RunPlan], int]:
    dependency, tokens = {}, 0
    if cfg.threshold is not None:
        batches = data.batches("train", cfg.batch_size, n_tokens=max(cfg.calibration_tokens, data.config.seq_len), seed=0)
        dependency, tokens = measure_dependency(model, runs, batches, cfg.max_run)
    plans = []
    for run in runs:
        groups, notes = choose_groups(run, dependency, threshold=cfg.threshold, max_run=cfg.max_run, keep_last=cfg.keep_last)
        scores = tuple(None if j == run[0] else dependency.get((run[0], j)) for j in run)
        plans.append(RunPlan(layers=run, dependency=scores, groups=groups, notes=notes))
    return plans, tokens


def _check_batches(data: TokenData | None, cfg: FusionConfig) -> list[torch.Tensor]:
    """The held-out batches of the quality check (none: no check)."""
    if data is None or cfg.eval_tokens == 0:
        return []
    n_tokens = min(max(cfg.eval_tokens, data.config.seq_len), data.num_tokens("held_out"))
    return list(data.batches("held_out", cfg.batch_size, n_tokens=n_tokens, shuffle=False))


def nothing_fused_reason(plans: Sequence[RunPlan], cfg: FusionConfig) -> str:
    """Why no group was fused, and which option would fuse one."""
    if cfg.keep_last and all(len(p.layers) == 2 for p in plans):
        return "every run has two FFNs and the last one is kept separate; pass --no-keep-last to fuse them"
    scores = [d for p in plans for d in p.dependency if d is not None]
    lowest = f" (the lowest is {min(scores):.3g})" if scores else ""
    return f"no FFN's dependency is within --threshold {cfg.threshold}{lowest}; raise --threshold to fuse"


def _distill(fused: Path, ckpt: Path, out: Path, report: FusionReport, cfg: FusionConfig, overwrite: bool) -> FusionReport:
    """Short KD of the fused model (folder `fused`) from the unfused one into `out` (puzzle.distill.gkd).

    Hidden states are compared only where both models have one: not inside a fused group, whose
    intermediate states the fused model no longer computes.
    """
    inside = {i for g in report.fused_groups for i in g[:-1]}
    layers = len(load_architecture(ckpt).blocks)
    gkd = GKDConfig(
        tokens=cfg.distill_tokens, batch_size=cfg.batch_size, eval_tokens=cfg.eval_tokens or GKDConfig.eval_tokens,
        layer_map=tuple(-1 if i in inside else i for i in range(layers)),
        device=cfg.device, trust_remote_code=cfg.trust_remote_code,
    )
    result = run_gkd(fused, ckpt, cfg.data, out, gkd, overwrite=overwrite, info={"stage": "fuse-ffn"})
    a = result.after
    distilled = FusionQuality(tokens=a.positions, kl=a.kl, top1=a.top1, lm_loss_before=a.teacher_lm_loss, lm_loss_after=a.lm_loss)
    return replace(report, distill_tokens=result.tokens, quality_distilled=distilled)


