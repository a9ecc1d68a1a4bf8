"""Replace-one-block scoring: the quality cost of each candidate, alone in the parent.

Puzzle (Bercovich et al. 2024), section 4: put one candidate into the parent, everything else unchanged,
and measure on held-out tokens KL(parent || model) of the next-token distribution (the best signal the
paper found), the LM loss and the top-1 agreement with the parent. The parent's own variant scores 0 KL by
construction. Layers are scored one at a time: the parent runs to the layer once per batch and each of
the layer's candidates runs the rest (the parent's log-probs of the batch are computed once and kept), so
memory holds one layer's candidates and one batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from puzzle.blocks.space import Candidate
from puzzle.blocks.subblock import SubBlock
from puzzle.config import check_int
from puzzle.distill.activations import logits_from_hidden, run_layers
from puzzle.errors import StageError
from puzzle.files import read_json, write_json_atomic
from puzzle.metrics import Quality, QualitySums, Reference
from puzzle.progress import track

SCORES_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    tokens: int = 1 << 17  # held-out tokens per candidate
    batch_size: int = 8
    logits_chunk: int = 4096  # positions whose logits are materialised at once (large vocabularies)
    compare_init: bool = True  # also score the initialised candidates (scores_init.json): what BLD bought

    def __post_init__(self) -> None:
        for name in ("tokens", "batch_size", "logits_chunk"):
            check_int(f"score.{name}", getattr(self, name))


@dataclass(frozen=True, kw_only=True)
class CandidateScore:
    layer: int
    kind: str
    name: str
    kl: float  # mean KL(parent || model) per token, nats
    lm_loss: float  # mean next-token cross-entropy of the model, nats
    top1: float  # fraction of positions where the model's argmax equals the parent's


@dataclass(frozen=True, kw_only=True)
class Scores:
    parent_fingerprint: str
    weights: Literal["bld", "init"]  # scored after BLD, or the initialisation before it
    tokens: int
    parent_lm_loss: float
    entries: tuple[CandidateScore, ...] = field(default_factory=tuple)
    version: int = SCORES_VERSION

    def get(self, layer: int, kind: str, name: str) -> CandidateScore:
        for e in self.entries:
            if (e.layer, e.kind, e.name) == (layer, kind, name):
                return e
        raise StageError(f"no score for {kind} {name} of layer {layer}; rerun the score stage")

    def save(self, path: Path) -> None:
        data = asdict(self)
        write_json_atomic(path, data)

    @classmethod
    def load(cls, path: Path) -> Scores:
        data = read_json(path, "scores (run the `score` stage first)")
        if data.get("version") != SCORES_VERSION:
            raise StageError(f"{path}: scores version {data.get('version')} is not {SCORES_VERSION}; rerun the score stage")
        entries = tuple(CandidateScore(**e) for e in data.pop("entries"))
        return cls(**data, entries=entries)


TARGET_CACHE_BYTES = 1 << 30  # keep the parent's log-probs of a batch across its layer's candidates up to this size


def _flat(hidden: torch.Tensor) -> torch.Tensor:
    return hidden[:, :-1].flatten(0, 1)  # (N, C): the positions that predict a next token


def _targets(model, parent_hidden: torch.Tensor, batch: torch.Tensor, chunk: int):
    p, y = _flat(parent_hidden), batch[:, 1:].flatten()
    for s in range(0, p.shape[0], chunk):
        yield Reference.from_logits(logits_from_hidden(model, p[s:s + chunk]), y[s:s + chunk])


def _candidate_logits(model, hidden: torch.Tensor, chunk: int):
    h = _flat(hidden)
    for s in range(0, h.shape[0], chunk):
        yield logits_from_hidden(model, h[s:s + chunk])


@torch.no_grad()
def score_candidates(parent, candidates: list[Candidate], load_block: Callable[[Candidate], SubBlock | None],
                     data, cfg: ScoreConfig, parent_fingerprint: str, weights: str = "bld") -> Scores:
    """Score every candidate; `load_block` gives a candidate's SubBlock (None for no-op and parent variants)."""
    batches = list(data.batches("held_out", cfg.batch_size, n_tokens=cfg.tokens, shuffle=False))
    device = parent.device
    parent_sums = QualitySums(device)
    by_layer: dict[int, list[Candidate]] = {}
    for c in candidates:
        by_layer.setdefault(c.layer, []).append(c)
    entries: list[CandidateScore] = []
    with track(f"score ({weights})", len(candidates)) as bar:
        for layer, group in sorted(by_layer.items()):
            scored = [c for c in group if not c.is_parent]
            # In the parent's dtype (bf16 on GPUs): the candidate is scored as the child will run it.
            blocks = {c.unit_id: None if (b := load_block(c)) is None else b.to(dtype=parent.dtype) for c in scored}
            sums = {c.unit_id: QualitySums(device) for c in scored}
            for batch in batches:
                batch = batch.to(device)
                parent_hidden, io = run_layers(parent, batch, capture={layer})
                positions = batch.shape[0] * (batch.shape[1] - 1)
                keep = positions * parent.config.vocab_size * 8 <= TARGET_CACHE_BYTES
                cached = list(_targets(parent, parent_hidden, batch, cfg.logits_chunk)) if keep else None
                for c in scored:
                    block = blocks[c.unit_id]
                    replacement = block if block is not None else SubBlock(parent.config, c.kind, c.variant).to(device, parent.dtype)
                    hidden, _ = run_layers(parent, hidden=io[layer].x, start=layer, replace={layer: {c.kind: replacement}})
                    targets = cached if keep else _targets(parent, parent_hidden, batch, cfg.logits_chunk)
                    for target, logits in zip(targets, _candidate_logits(parent, hidden, cfg.logits_chunk)):
                        sums[c.unit_id].add(target, logits)
                if layer == min(by_layer):
                    targets = cached if keep else _targets(parent, parent_hidden, batch, cfg.logits_chunk)
                    for target, logits in zip(targets, _candidate_logits(parent, parent_hidden, cfg.logits_chunk)):
                        parent_sums.add(target, logits)
            for c in group:
                if c.is_parent:
                    continue
                q = sums[c.unit_id].quality()
                entries.append(CandidateScore(layer=c.layer, kind=c.kind, name=c.name, kl=q.kl, lm_loss=q.lm_loss,
                                              top1=q.top1))
                bar.advance(1)
            bar.advance(len(group) - len(scored))
    parent_quality = parent_sums.quality()
    parent_loss = parent_quality.lm_loss
    for layer, group in by_layer.items():  # the parent's own variant: exactly the parent, by construction
        for c in group:
            if c.is_parent:
                entries.append(CandidateScore(layer=c.layer, kind=c.kind, name=c.name, kl=0.0, lm_loss=parent_loss, top1=1.0))
    entries.sort(key=lambda e: (e.layer, e.kind, e.name))
    return Scores(parent_fingerprint=parent_fingerprint, weights=weights, tokens=parent_quality.tokens,
                  parent_lm_loss=parent_loss, entries=tuple(entries))


def score_table(scores: Scores) -> dict[str, Any]:
    """Mean KL per variant family (for reports): {kind: {name-family: mean kl}}."""
    families: dict[tuple[str, str], list[float]] = {}
    for e in scores.entries:
        families.setdefault((e.kind, family_of(e.name)), []).append(e.kl)
    return {f"{k}/{f}": sum(v) / len(v) for (k, f), v in sorted(families.items())}


def family_of(name: str) -> str:
    """kv2 -> kv2, kv4_w128 -> window128, ffn1536 -> ffn, linear / no_op unchanged."""
    if "_w" in name:
        return "window" + name.split("_w")[1]
    if name.startswith("ffn"):
        return "ffn"
    return name


@torch.no_grad()
def model_quality(parent, model, batches, logits_chunk: int = 4096) -> Quality:
    """Held-out quality of a whole model against the parent (same metrics as the scores)."""
    sums = QualitySums(parent.device)
    for batch in batches:
        batch = batch.to(parent.device)
        p = parent.model(batch, use_cache=False).last_hidden_state[:, :-1].flatten(0, 1)  # (N, C), after the final norm
        h = model.model(batch.to(model.device), use_cache=False).last_hidden_state[:, :-1].flatten(0, 1)
        y = batch[:, 1:].flatten()
        for s in range(0, h.shape[0], logits_chunk):
            target = Reference.from_logits(parent.lm_head(p[s:s + logits_chunk]), y[s:s + logits_chunk])
            sums.add(target, model.lm_head(h[s:s + logits_chunk]).to(parent.device))
    return sums.quality()
