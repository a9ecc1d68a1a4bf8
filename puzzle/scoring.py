"""Replace-one-block scoring: the quality cost of each candidate, alone in the parent.

Puzzle (Bercovich et al. 2024), section 4: put one candidate into the parent, everything else unchanged,
and measure on held-out tokens KL(parent || model) of the next-token distribution (the best signal the
paper found), the LM loss and the top-1 agreement with the parent. The parent's own variant scores 0 KL by
construction. The parent runs once per batch: its hidden state entering a layer is kept for every batch and
moved one layer down as the layers are scored, so a candidate of layer i runs only layers i..N-1 from it, and
its log-probs are computed once per batch for all of a layer's candidates (once per run when they fit).
Memory holds one layer's candidates and two hidden states per scoring batch. The parent's passes go layer by
layer over all batches (`run_many`); for a parent read from its files (`parent_memory_gb`), the candidates'
passes do too, in chunks of candidates whose hidden states fit, so each layer is read once per chunk rather
than once per candidate and batch.
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
from puzzle.distill.activations import embed, layer_weights, logits_from_hidden, run_layers, run_many
from puzzle.errors import StageError
from puzzle.files import read_json, write_json_atomic
from puzzle.memory import free_bytes
from puzzle.metrics import Quality, QualitySums, Reference
from puzzle.progress import log, track

SCORES_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    tokens: int = 1 << 17  # held-out tokens per candidate
    batch_size: int = 8
    logits_chunk: int = 4096  # positions whose logits are materialised at once (large vocabularies)
    # also score the initialised candidates (scores_init.json), for the report's "what BLD bought": a second
    # pass over every candidate, so off unless asked for (`puzzle score RUN --init` adds it later)
    compare_init: bool = False

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


TARGET_CACHE_BYTES = 1 << 30  # the most memory the parent's log-probs may take (kept over batches, or per batch) ...
TARGET_CACHE_FRACTION = 0.3  # ... or on a GPU, this share of its free memory when larger
STATE_DEVICE_FRACTION = 0.25  # the parent's kept hidden states stay on the GPU up to this share of its free memory


def _target_budget(device: torch.device) -> int:
    if device.type != "cuda":
        return TARGET_CACHE_BYTES
    return max(TARGET_CACHE_BYTES, int(TARGET_CACHE_FRACTION * free_bytes(device)))


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


def _state_device(parent, batches: list[torch.Tensor]) -> torch.device:
    """Where the parent's hidden states of all batches are kept (two per batch: at the current layer and at the
    end): on the parent's device when they fit a quarter of its free memory, else in host memory (logged)."""
    device = parent.device
    if device.type != "cuda":
        return device
    need = 2 * sum(b.numel() for b in batches) * parent.config.hidden_size * parent.dtype.itemsize
    free = free_bytes(device)
    if need <= STATE_DEVICE_FRACTION * free:
        return device
    log(f"score: the parent's hidden states of the scoring batches ({need / 2**30:.1f} GiB) are kept in host memory "
        f"({free / 2**30:.1f} GiB free on {device}); fewer score.tokens keep them on the GPU")
    return torch.device("cpu")


class _ParentPass:
    """The parent's side of scoring, computed once: per batch, its final hidden state (the targets) and its
    hidden state entering the current layer, moved one layer down by `advance` as the layers are scored.
    A candidate of layer i starts from that state and runs only layers i..N-1; the parent itself runs once."""

    def __init__(self, parent, batches: list[torch.Tensor], chunk: int):
        self.parent, self.batches, self.chunk = parent, batches, chunk
        self.store = _state_device(parent, batches)
        self.layer = 0
        self.entering = [embed(parent, batch.to(parent.device)).to(self.store) for batch in batches]
        self.final = run_many(parent, self.entering, start=0, store=self.store)
        positions = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
        # log-probs (fp32) of every batch kept for all layers when they fit (small vocabularies), else per batch
        self.budget = _target_budget(parent.device)
        self.cached = ([list(self.targets_of(k)) for k in range(len(batches))]
                       if positions * parent.config.vocab_size * 4 <= self.budget else None)

    def targets_of(self, k: int):
        return _targets(self.parent, self.final[k].to(self.parent.device), self.batches[k].to(self.parent.device), self.chunk)

    def batch_fits(self, k: int) -> bool:
        b = self.batches[k]
        return b.shape[0] * (b.shape[1] - 1) * self.parent.config.vocab_size * 4 <= self.budget

    def targets(self, k: int):
        """Batch k's parent log-probs (chunks of positions): kept for the run when all fit, else computed."""
        return self.cached[k] if self.cached is not None else self.targets_of(k)

    def reusable_targets(self, k: int) -> list | None:
        """Batch k's log-probs held for all of a layer's candidates, or None when one batch's are too large
        (then each candidate recomputes them chunk by chunk)."""
        return list(self.targets(k)) if self.batch_fits(k) else None

    def hidden(self, k: int) -> torch.Tensor:
        """Batch k's parent hidden state entering the current layer."""
        return self.entering[k].to(self.parent.device)

    def advance(self, to_layer: int) -> None:
        """Run the parent's layers from the current one to `to_layer` (exclusive) on every batch."""
        if to_layer <= self.layer:
            return
        self.entering = run_many(self.parent, self.entering, start=self.layer, stop=to_layer, store=self.store)
        self.layer = to_layer


def _add(sums: QualitySums, targets, model, hidden: torch.Tensor, chunk: int) -> None:
    for target, logits in zip(targets, _candidate_logits(model, hidden, chunk)):
        sums.add(target, logits)


def _score_layer_major(parent, state: _ParentPass, layer: int, scored: list[Candidate], replacements: dict,
                       sums: dict[str, QualitySums], chunk: int) -> None:
    """A layer's candidates over the layers below it, layer by layer for all (candidate, batch) hidden states
    at once: each of the parent's layers is read from its files once per chunk of candidates."""
    batches = state.batches
    per_candidate = sum(b.numel() for b in batches) * parent.config.hidden_size * parent.dtype.itemsize
    size = max(1, int(STATE_DEVICE_FRACTION * free_bytes(state.store)) // max(per_candidate, 1))
    for first in range(0, len(scored), size):
        group = scored[first:first + size]
        with layer_weights(parent.model.layers[layer]):  # the replaced layer's other branch, read once
            starts = [run_layers(parent, hidden=state.hidden(k), start=layer, stop=layer + 1,
                                 replace={layer: {c.kind: replacements[c.unit_id]}})[0].to(state.store)
                      for k in range(len(batches)) for c in group]
        finals = iter(run_many(parent, starts, start=layer + 1, store=state.store))
        for k in range(len(batches)):
            kept = state.reusable_targets(k)
            for c in group:
                _add(sums[c.unit_id], kept if kept is not None else state.targets_of(k), parent,
                     next(finals).to(parent.device), chunk)


@torch.no_grad()
def score_candidates(parent, candidates: list[Candidate], load_block: Callable[[Candidate], SubBlock | None],
                     data, cfg: ScoreConfig, parent_fingerprint: str, weights: str = "bld") -> Scores:
    """Score every candidate; `load_block` gives a candidate's SubBlock (None for no-op and parent variants)."""
    batches = list(data.batches("held_out", cfg.batch_size, n_tokens=cfg.tokens, shuffle=False))
    device = parent.device
    by_layer: dict[int, list[Candidate]] = {}
    for c in candidates:
        by_layer.setdefault(c.layer, []).append(c)
    entries: list[CandidateScore] = []
    with track(f"score ({weights})", len(candidates)) as bar:
        state = _ParentPass(parent, batches, cfg.logits_chunk)
        parent_sums = QualitySums(device)
        for k in range(len(batches)):
            _add(parent_sums, state.targets(k), parent, state.final[k].to(device), cfg.logits_chunk)
        for layer, group in sorted(by_layer.items()):
            state.advance(layer)
            scored = [c for c in group if not c.is_parent]
            # In the parent's dtype (bf16 on GPUs): the candidate is scored as the child will run it.
            blocks = {c.unit_id: None if (b := load_block(c)) is None else b.to(dtype=parent.dtype) for c in scored}
            sums = {c.unit_id: QualitySums(device) for c in scored}
            replacements = {c.unit_id: blocks[c.unit_id] if blocks[c.unit_id] is not None else
                            SubBlock(parent.config, c.kind, c.variant).to(device, parent.dtype) for c in scored}
            if getattr(parent, "offloaded_layers", 0):
                _score_layer_major(parent, state, layer, scored, replacements, sums, cfg.logits_chunk)
            else:
                for k in range(len(batches)):
                    x = state.hidden(k)
                    kept = state.reusable_targets(k)
                    for c in scored:
                        replace = {layer: {c.kind: replacements[c.unit_id]}}
                        hidden, _ = run_layers(parent, hidden=x, start=layer, replace=replace)
                        _add(sums[c.unit_id], kept if kept is not None else state.targets_of(k), parent, hidden, cfg.logits_chunk)
            for c in scored:
                q = sums[c.unit_id].quality()
                entries.append(CandidateScore(layer=c.layer, kind=c.kind, name=c.name, kl=q.kl, lm_loss=q.lm_loss,
                                              top1=q.top1))
            bar.advance(len(group))
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
