"""Blockwise local distillation (BLD): train every candidate sub-block to imitate the parent's.

Puzzle (Bercovich et al. 2024), section 3. For a candidate of layer i the input is the parent's hidden
state entering that sub-block and the target is the parent sub-block's output (its residual branch);
the loss is the normalised MSE ||y_child - y_parent||^2 / ||y_parent||^2 (1.0 = as bad as removing it).
Decoupled mode trains attention and FFN candidates separately; coupled mode trains whole layers.
A linear replacement is a linear map of its normalised input, so its BLD optimum has a closed form: it is
fitted by exact least squares over its whole token budget instead of by gradient steps (which only add
noise around that optimum).

A worker trains its units in groups: one parent forward per batch (stopping after the group's last layer)
feeds every unit of the group, so the parent's cost is shared. Each finished unit is written atomically
to `library/{attn,ffn,block}/L{i}/{variant}.safetensors` with its losses and token count; a running
group checkpoints every `checkpoint_every` steps, so a killed worker resumes where it stopped and, with
the same seed on CPU, ends with the same tensors as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from puzzle.arch import Architecture
from puzzle.blocks.init import init_candidate, least_squares
from puzzle.blocks.library import Manifest, load_stats, to_device_stats, unit_params
from puzzle.blocks.space import Candidate
from puzzle.blocks.subblock import Rotary, SubBlock
from puzzle.checkpoint import decilm_config, normalized_config, safetensors_keys
from puzzle.distill.activations import LayerIO
from puzzle.distill.losses import normalized_mse
from puzzle.distill.parent_cache import (
    BoundaryActivations,
    DiskActivations,
    RecomputedActivations,
    boundary_bytes,
    cache_key,
    shard_bytes,
)
from puzzle.distill.schedule import warmup_cosine
from puzzle.errors import ConfigError, InputError, StageError
from puzzle.files import atomic_path
from puzzle.jobs import Shard, my_share
from puzzle.memory import free_bytes
from puzzle.progress import log, track
from puzzle.run import RunPaths


@dataclass(frozen=True, kw_only=True)
class BLDConfig:
    tokens_per_unit: int = 1 << 24  # Puzzle saw gains flatten after ~0.5B tokens at 70B; 16M is a fair default
    batch_size: int = 8
    lr: float = 3e-4
    min_lr_fraction: float = 0.1  # cosine decay ends at lr * this
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0  # units start from the parent's weights; decay would pull them away
    seed: int = 0
    eval_tokens: int = 16384  # held-out tokens for each unit's loss before and after training
    # units trained together, sharing one parent forward per batch, in parameters; None: as many as half the GPU's
    # free memory holds (a deep group re-runs the parent to its layer every step: fewer groups, less of that), or
    # CPU_GROUP_PARAMS on the CPU
    max_group_params: int | None = None
    checkpoint_every: int = 200  # steps between checkpoints of the running group
    linear_attention_init: Literal["least_squares", "fold"] = "least_squares"
    autocast: bool = True  # bf16 autocast for the units on CUDA (master weights stay fp32)
    # recompute: each worker runs the parent per batch; disk: computed once, in shards shared by the workers;
    # boundary: each worker keeps the hidden state at one layer boundary on disk (a parent read from its files);
    # auto: disk when the forward would otherwise be repeated (several workers or groups, or a parent read from
    # its files) and the shards fit, else boundary for a parent read from its files, else recompute
    parent_activations: Literal["auto", "recompute", "disk", "boundary"] = "auto"
    activation_cache_gb: float = 64.0  # the most disk `auto` may use for the shards

    def __post_init__(self) -> None:
        for name in ("tokens_per_unit", "batch_size", "eval_tokens", "max_group_params", "checkpoint_every"):
            if name == "max_group_params" and self.max_group_params is None:
                continue
            if getattr(self, name) < 1:
                raise ConfigError(f"bld.{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.warmup_fraction < 1 or not 0 <= self.min_lr_fraction <= 1:
            raise ConfigError("bld: lr must be > 0, warmup_fraction in [0, 1), min_lr_fraction in [0, 1]")
        if self.linear_attention_init not in ("least_squares", "fold"):
            raise ConfigError("bld.linear_attention_init must be 'least_squares' or 'fold'")
        if self.parent_activations not in ("auto", "recompute", "disk", "boundary"):
            raise ConfigError(f"bld.parent_activations must be auto, recompute, disk or boundary, got {self.parent_activations!r}")
        if not self.activation_cache_gb >= 0:
            raise ConfigError(f"bld.activation_cache_gb must be >= 0, got {self.activation_cache_gb}")


@dataclass(frozen=True, kw_only=True)
class UnitResult:
    unit_id: str
    loss_init: float  # held-out normalised MSE of the initialisation
    loss_final: float  # ... after BLD
    tokens: int
    steps: int
    seconds: float
    worker: str = "0/1"  # rank/world_size of the worker that trained it
    # "bld": the trained weights; "init": training ended worse on held-out data than the initialisation, so the
    # unit file holds the initialisation (loss_final still says what BLD reached)
    kept: str = "bld"


# ----------------------------------------------------------------------------------------------------------
# Unit files


def unit_path(paths: RunPaths, c: Candidate) -> Path:
    return paths.unit(c.kind, c.layer, c.name)


def write_unit(path: Path, block: SubBlock, layer: int, result: UnitResult) -> None:
    """Weights (checkpoint names) + result in the safetensors metadata, written through a rename."""
    state = {k: v.detach().contiguous().cpu() for k, v in block.checkpoint_state(layer).items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata={"puzzle_unit": json.dumps(asdict(result))})


def expected_unit_tensors(c: Candidate, parent_config) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes a finished unit file of `c` holds (built on the meta device: no memory)."""
    with torch.device("meta"):
        block = SubBlock(parent_config, c.kind, c.variant)
    return {k: tuple(v.shape) for k, v in block.checkpoint_state(c.layer).items()}


def unit_problem(path: Path, expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why the unit file at `path` is not a finished unit (None: it is): missing, truncated, corrupt, or
    holding other tensors than the candidate's."""
    if not path.is_file():
        return "missing"
    try:
        safetensors_keys(path)  # header, declared sizes against the file size
        with safe_open(path, framework="pt") as f:
            UnitResult(**json.loads((f.metadata() or {})["puzzle_unit"]))
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except InputError as err:
        return str(err).removeprefix(f"{path}: ")
    except Exception as err:  # unreadable metadata of any kind: the file is not a finished unit
        return f"no readable result in its metadata ({type(err).__name__}: {err})"
    if found != expected:
        wrong = sorted(set(found) ^ set(expected)) or sorted(k for k in found if found[k] != expected[k])
        return f"its tensors do not match the candidate (e.g. {wrong[0]})"
    return None


def read_unit_result(path: Path) -> UnitResult:
    with safe_open(path, framework="pt") as f:
        return UnitResult(**json.loads(f.metadata()["puzzle_unit"]))


def load_unit(path: Path, candidate: Candidate, parent_config, device: torch.device | str = "cpu") -> SubBlock:
    """A trained candidate as a SubBlock (float32)."""
    from safetensors.torch import load_file

    block = SubBlock(parent_config, candidate.kind, candidate.variant).to(device=device, dtype=torch.float32)
    block.load_checkpoint_state({k: v.float() for k, v in load_file(path, device=str(device)).items()}, candidate.layer)
    return block


# ----------------------------------------------------------------------------------------------------------
# Training


def unit_io(c: Candidate, io: LayerIO) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) of a unit from the parent's layer: decoupled sub-blocks or a whole coupled layer."""
    if c.kind == "attention":
        return io.x, io.attn
    if c.kind == "ffn":
        return io.h, io.ffn
    parts = [t for t in (io.attn, io.ffn) if t is not None]
    return io.x, sum(parts[1:], parts[0])


CPU_GROUP_PARAMS = 400_000_000
TRAINED_PARAM_BYTES = 16  # fp32 weight, gradient and AdamW's two moments
GROUP_MEMORY_FRACTION = 0.5  # of the free GPU memory; the rest holds activations and the parent's forward


def group_budget(cfg: BLDConfig, device: torch.device) -> int:
    """The most unit parameters one group trains at once: bld.max_group_params, else what the device holds."""
    if cfg.max_group_params is not None:
        return cfg.max_group_params
    if device.type != "cuda":
        return CPU_GROUP_PARAMS
    return max(1, int(GROUP_MEMORY_FRACTION * free_bytes(device) / TRAINED_PARAM_BYTES))


def plan_groups(units: list[Candidate], arch: Architecture, max_group_params: int,
                one_layer: bool = False) -> list[list[Candidate]]:
    """Consecutive units (layer order) whose parameters fit the budget train together (`one_layer`: and share a
    layer, for a source that holds a group's parent layers resident)."""
    groups, current, size = [], [], 0
    for unit in sorted(units, key=lambda c: (c.layer, c.kind, c.name)):
        params = unit_params(unit, arch)
        if current and (size + params > max_group_params or (one_layer and unit.layer != current[-1].layer)):
            groups.append(current)
            current, size = [], 0
        current.append(unit)
        size += params
    return groups + ([current] if current else [])


def bld_unit_cost(c: Candidate, arch: Architecture) -> float:
    """Relative work of one unit per token: forward + backward (3x its parameters), or one forward for the
    closed-form ones. With `parent_reach_cost` it lets workers take equal shares (`puzzle.jobs.my_share`)."""
    return unit_params(c, arch) * (1 if is_closed_form(c) else 3)


def parent_reach_cost(c: Candidate, arch: Architecture) -> float:
    """The parent's forward up to the unit's layer, paid once per worker for its deepest unit."""
    return sum(arch.layer_params(i) for i in range(c.layer + 1))


def worker_share(units: list[Candidate], arch: Architecture, shard: Shard, shared_parent: bool = False) -> list[Candidate]:
    """This worker's units (layer order): contiguous shares of about equal work, the parent's forward counted
    unless the workers share it (`shared_parent`: the disk cache spreads it evenly over them)."""
    reach = None if shared_parent else (lambda u: parent_reach_cost(u, arch))
    return my_share(units, lambda u: bld_unit_cost(u, arch), shard, reach)


def is_closed_form(c: Candidate) -> bool:
    """A decoupled linear replacement: fitted by least squares, not by gradient steps."""
    return c.kind in ("attention", "ffn") and c.variant.replace_with_linear


def _linear_and_norm(block: SubBlock):
    layer = block.layer
    if block.kind == "attention":
        return layer.self_attn.linear_attn, layer.input_layernorm
    return layer.mlp.linear_mlp, layer.post_attention_layernorm


class _Group:
    """The units of one group with their optimiser; knows how to checkpoint and evaluate itself."""

    def __init__(self, units, parent, arch, paths, cfg, steps, device, source):
        self.units, self.parent, self.cfg, self.steps, self.source = units, parent, cfg, steps, source
        self.arch, self.paths, self.device = arch, paths, device
        self.blocks = {u.unit_id: self.initial_block(u) for u in units}
        self.closed_form = {u.unit_id for u in units if is_closed_form(u)}
        self.sums: dict[str, dict[str, torch.Tensor]] = {}  # least-squares sums x x^T, x y^T per closed-form unit
        params = [p for k, b in self.blocks.items() if k not in self.closed_form for p in b.parameters()]
        for k in self.closed_form:
            self.blocks[k].requires_grad_(False)
        params = params or [torch.nn.Parameter(torch.zeros(1, device=device))]  # a group of linear units only
        # fused: one kernel for every parameter's update on CUDA (the foreach default launches several per step)
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                                           fused=device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(steps, cfg.warmup_fraction, cfg.min_lr_fraction))
        self.rotary = Rotary(parent.config).to(device)
        self.layers = sorted({u.layer for u in units})
        self.autocast = cfg.autocast and device.type == "cuda"

    def initial_block(self, u: Candidate):
        """The unit's initialisation from the parent (deterministic: the same weights every call)."""
        stats = to_device_stats(load_stats(self.paths, u.layer), self.device)
        return init_candidate(u, self.parent, self.arch, stats, self.cfg.linear_attention_init)

    def step(self, batch: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
        """One parent forward, then each unit's forward and backward in turn; returns the units' losses (on the
        device: reading them would make the host wait for the GPU every step).

        Each unit's backward runs right after its forward, while its activations are still in cache, and
        frees them before the next unit starts: the gradients are the same as one backward of the summed
        losses (no parameter is shared between units), the peak memory is that of the largest unit.
        """
        with torch.no_grad():
            io = self.source.layer_io("train", index, batch, self.layers)
        out = {}
        shared, inputs = None, None  # units come in (layer, kind) order: one fp32 copy of their inputs, shared
        for u in self.units:
            if shared != (u.layer, u.kind):
                shared, inputs = (u.layer, u.kind), tuple(t.float() for t in unit_io(u, io[u.layer]))
            x, target = inputs
            if u.unit_id in self.closed_form:
                self._accumulate(u.unit_id, x, target)
                continue
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                pred = self.blocks[u.unit_id](x, self.rotary(x))
            loss = normalized_mse(pred.float(), target)
            loss.backward()
            out[u.unit_id] = loss.detach()
        return out

    @torch.no_grad()
    def _accumulate(self, unit_id: str, x: torch.Tensor, target: torch.Tensor) -> None:
        _, norm = _linear_and_norm(self.blocks[unit_id])
        xn, y = norm(x).flatten(0, -2).double(), target.flatten(0, -2).double()  # (N, C)
        sums = self.sums.setdefault(unit_id, {"xtx": 0, "xty": 0})
        sums["xtx"] = sums["xtx"] + xn.T @ xn
        sums["xty"] = sums["xty"] + xn.T @ y

    @torch.no_grad()
    def solve_closed_form(self) -> None:
        for unit_id, sums in self.sums.items():
            linear, _ = _linear_and_norm(self.blocks[unit_id])
            linear.weight.copy_(least_squares(sums["xtx"], sums["xty"]).to(linear.weight.dtype))

    @torch.no_grad()
    def evaluate(self, batches: list[torch.Tensor]) -> dict[str, float]:
        """Held-out normalised MSE over all batches together (sum of errors / sum of target energy)."""
        err: dict[str, torch.Tensor] = {}  # summed on the device, read once at the end
        energy: dict[str, torch.Tensor] = {}
        for index, batch in enumerate(batches):
            io = self.source.layer_io("held_out", index, batch, self.layers)
            for u in self.units:
                x, target = unit_io(u, io[u.layer])
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):  # as in training
                    pred = self.blocks[u.unit_id](x.float(), self.rotary(x.float())).float()
                err[u.unit_id] = err.get(u.unit_id, 0.0) + (pred - target.float()).pow(2).sum().double()
                energy[u.unit_id] = energy.get(u.unit_id, 0.0) + target.float().pow(2).sum().double()
        return {k: err[k].item() / max(energy[k].item(), 1e-30) for k in err}

    def state(self, step: int, extra: dict) -> dict:
        return {"step": step, "blocks": {k: b.state_dict() for k, b in self.blocks.items()}, "sums": self.sums,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), **extra}

    def load(self, state: dict) -> None:
        for k, b in self.blocks.items():
            b.load_state_dict(state["blocks"][k])
        self.sums = state["sums"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


# Fields that change how the work is done, not its result: checkpoints and finished units stay valid across them.
NEUTRAL_FIELDS = ("checkpoint_every", "parent_activations", "activation_cache_gb", "max_group_params")


def _group_key(units: list[Candidate], cfg: BLDConfig, data_key: str) -> str:
    settings = {k: v for k, v in asdict(cfg).items() if k not in NEUTRAL_FIELDS}
    text = json.dumps([[u.unit_id for u in units], settings, data_key], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _save_atomic(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _load_progress(checkpoint: Path, device: torch.device) -> dict | None:
    """A running group's checkpoint, read as tensors and numbers only (never unpickling code); one that
    cannot be read that way is set aside (`*.pt.unreadable`) and the group starts over."""
    if not checkpoint.exists():
        return None
    try:
        return torch.load(checkpoint, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        aside = checkpoint.with_name(checkpoint.name + ".unreadable")
        os.replace(checkpoint, aside)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log(f"[yellow]bld[/]: {checkpoint} cannot be read as plain tensors ({first[:200]}); moved to {aside.name}, "
            "the group starts over")
        return None


LOSS_EVERY = 20  # steps between the progress bar's loss readings


def train_steps(cfg: BLDConfig, seq_len: int) -> int:
    return max(1, math.ceil(cfg.tokens_per_unit / (cfg.batch_size * seq_len)))


def train_batches(data, cfg: BLDConfig, start_step: int = 0):
    """The training batches every unit sees, in order (batch k is the same for every worker and group)."""
    steps = train_steps(cfg, data.config.seq_len)
    return data.batches("train", cfg.batch_size, n_tokens=steps * cfg.batch_size * data.config.seq_len, shuffle=True,
                        seed=cfg.seed, start_step=start_step)


def eval_batches(data, cfg: BLDConfig) -> list[torch.Tensor]:
    return list(data.batches("held_out", cfg.batch_size, n_tokens=max(cfg.eval_tokens, data.config.seq_len),
                             shuffle=False))


def train_group(units: list[Candidate], parent, arch: Architecture, paths: RunPaths, data, cfg: BLDConfig,
                device: torch.device, worker: str = "0/1", source=None) -> list[UnitResult]:
    """Train one group of units to the token budget (resuming from its checkpoint) and write each unit."""
    seq_len = data.config.seq_len
    steps = train_steps(cfg, seq_len)
    source = source or RecomputedActivations(parent)
    # a boundary source moves its boundary down to the group's first layer and holds the group's layers resident
    with source.holding(sorted({u.layer for u in units})):
        group = _Group(units, parent, arch, paths, cfg, steps, device, source)
        held_out = [b.to(device) for b in eval_batches(data, cfg)]
        checkpoint = paths.progress / f"{_group_key(units, cfg, str(data.cache_path))}.pt"
        state = _load_progress(checkpoint, device)
        if state is not None:
            group.load(state)
            log(f"bld L{group.layers[0]}-{group.layers[-1]}: resuming at step {state['step']} of {steps} from {checkpoint}")
        start, seconds = (state["step"], state["seconds"]) if state is not None else (0, 0.0)
        loss_init = state["loss_init"] if state is not None else group.evaluate(held_out)
        began = time.perf_counter()
        batches = train_batches(data, cfg, start_step=start)
        with track(f"bld L{group.layers[0]}-{group.layers[-1]} ({len(units)} units)", steps) as bar:
            bar.advance(start)
            for step, batch in enumerate(batches, start=start):
                group.optimizer.zero_grad(set_to_none=True)
                losses = group.step(batch.to(device), step)
                if losses:  # a group of least-squares units only has nothing to step
                    group.optimizer.step()
                    group.scheduler.step()
                done = step + 1
                if losses and (done % LOSS_EVERY == 0 or done == steps):  # the only host sync of the loop
                    bar.advance(1, loss=(sum(losses.values()) / len(losses)).item())
                else:
                    bar.advance(1)
                if done % cfg.checkpoint_every == 0 and done < steps:
                    _save_atomic(group.state(done, {"loss_init": loss_init,
                                                    "seconds": seconds + time.perf_counter() - began}), checkpoint)
        group.solve_closed_form()
        loss_final = group.evaluate(held_out)
        seconds += time.perf_counter() - began
        # Never hand on a unit worse than where it started (e.g. a near-exact initialisation that a few steps at
        # bld.lr pushed off): such a unit keeps its initialisation, and its result says so.
        worse = {u.unit_id for u in units if loss_final[u.unit_id] > loss_init[u.unit_id]}
        for u in units:
            if u.unit_id in worse:
                group.blocks[u.unit_id] = group.initial_block(u)
        if worse:
            log(f"bld L{group.layers[0]}-{group.layers[-1]}: {len(worse)} unit(s) ended worse on held-out data than their "
                f"initialisation and keep it: {', '.join(sorted(worse))}")
    results = []
    for u in units:
        result = UnitResult(unit_id=u.unit_id, loss_init=loss_init[u.unit_id], loss_final=loss_final[u.unit_id],
                            tokens=steps * cfg.batch_size * seq_len, steps=steps, seconds=seconds / len(units),
                            worker=worker, kept="init" if u.unit_id in worse else "bld")
        write_unit(unit_path(paths, u), group.blocks[u.unit_id], u.layer, result)
        results.append(result)
    checkpoint.unlink(missing_ok=True)
    return results


_reported_bad_units: set[tuple[Path, int]] = set()  # (file, mtime): each bad file is logged once per process


def pending_units(manifest: Manifest, paths: RunPaths, units: list[Candidate] | None = None) -> list[Candidate]:
    """The manifest's units (or the given ones) that still need training (`unfinished`)."""
    return unfinished(paths, manifest.units if units is None else units)


def unfinished(paths: RunPaths, units: list[Candidate]) -> list[Candidate]:
    """The units without a valid finished file: missing ones, and files that are truncated, corrupt or hold
    other tensors (those are logged once and retrained; the retrained unit replaces the file atomically)."""
    config = decilm_config(normalized_config(paths.parent)) if units else None
    pending = []
    for u in units:
        path = unit_path(paths, u)
        if not path.exists():
            pending.append(u)
            continue
        problem = unit_problem(path, expected_unit_tensors(u, config))
        if problem is not None:
            pending.append(u)
            key = (path, path.stat().st_mtime_ns)
            if key not in _reported_bad_units:
                _reported_bad_units.add(key)
                log(f"[yellow]bld[/]: {path} is not a finished unit ({problem}); it will be retrained")
    return pending


def train_units(units: list[Candidate], parent, arch: Architecture, paths: RunPaths, data, cfg: BLDConfig,
                device: torch.device, worker: str = "0/1", source=None) -> list[UnitResult]:
    """Train the given units (skipping finished ones), group by group."""
    pending = {u.unit_id for u in unfinished(paths, units)}
    todo = [u for u in units if u.unit_id in pending]
    results = []
    budget = group_budget(cfg, device)
    groups = plan_groups(todo, arch, budget, one_layer=isinstance(source, BoundaryActivations))
    if todo:
        log(f"bld: {len(todo)} units in {len(groups)} group(s) of at most {budget / 1e6:,.0f}M parameters"
            + ("" if cfg.max_group_params is not None else f" (half the free memory of {device})" if device.type == "cuda"
               else " (the CPU default; set bld.max_group_params to change it)"))
    for group in groups:
        try:
            results += train_group(group, parent, arch, paths, data, cfg, device, worker, source)
        except Exception as err:  # name the units: a worker's log (or `puzzle status`) shows which failed
            first = (str(err).strip().splitlines() or [""])[0][:300]
            raise StageError(f"training {', '.join(u.unit_id for u in group)} failed: {type(err).__name__}: {first}") from err
    return results


# ----------------------------------------------------------------------------------------------------------
# The parent's activations: recomputed, or shared through the disk


@dataclass(frozen=True)
class ActivationPlan:
    mode: Literal["recompute", "disk", "boundary"]
    reason: str  # one line for the user
    depth: int = 0  # layers in each shard
    root: Path | None = None


def plan_parent_activations(units: list[Candidate], arch: Architecture, parent, data, cfg: BLDConfig, paths: RunPaths,
                            world_size: int, parent_fingerprint: str) -> ActivationPlan:
    """Recompute or cache, decided from the whole manifest (not the pending units) so every worker agrees."""
    depth = max(u.layer for u in units) + 1
    seq_len = data.config.seq_len
    batches = train_steps(cfg, seq_len) + len(eval_batches(data, cfg))
    need = batches * shard_bytes(parent, cfg.batch_size * seq_len, depth)
    groups = len(plan_groups(units, arch, group_budget(cfg, parent.device)))
    key = cache_key(parent=parent_fingerprint, data=str(data.cache_path), seq_len=seq_len, batch_size=cfg.batch_size,
                    tokens=cfg.tokens_per_unit, eval_tokens=cfg.eval_tokens, seed=cfg.seed, depth=depth,
                    dtype=str(parent.dtype))
    root = paths.progress / "parent_activations" / key
    size = f"{batches} batches x {need / batches / 2**20:.1f} MiB = {need / 2**30:.2f} GiB"
    streamed = getattr(parent, "offloaded_layers", 0) > 0  # a forward re-reads layers from the parent's files
    if cfg.parent_activations == "recompute":
        return ActivationPlan("recompute", "parent activations: recomputed per batch (bld.parent_activations: recompute)")
    if cfg.parent_activations == "auto" and world_size == 1 and groups == 1 and not streamed:
        return ActivationPlan("recompute", "parent activations: recomputed per batch (one worker, one group)")
    # free disk is not part of the decision: workers deciding at different times must agree (it splits the units)
    if cfg.parent_activations == "boundary" or (cfg.parent_activations == "auto" and streamed
                                                and need > cfg.activation_cache_gb * 2**30):
        disk = boundary_bytes(parent, cfg.batch_size * seq_len, batches)
        root = paths.progress / "parent_boundaries" / cache_key(parent=parent_fingerprint, data=str(data.cache_path),
                                                                seq_len=seq_len, batch_size=cfg.batch_size,
                                                                tokens=cfg.tokens_per_unit, eval_tokens=cfg.eval_tokens,
                                                                seed=cfg.seed, dtype=str(parent.dtype))
        _check_disk(paths, disk, f"the parent's hidden states at two layer boundaries ({disk / 2**30:.2f} GiB)")
        return ActivationPlan("boundary", "parent activations: the hidden state at one layer boundary per batch on disk, "
                                          f"moved down layer by layer as the groups go ({disk / 2**30:.2f} GiB at most)",
                              root=root)
    if cfg.parent_activations == "auto" and need > cfg.activation_cache_gb * 2**30:
        return ActivationPlan("recompute", f"parent activations: recomputed per batch by each worker (a cache needs "
                                           f"{size}, over bld.activation_cache_gb = {cfg.activation_cache_gb:g})")
    written = sum(f.stat().st_size for f in root.glob("*.safetensors")) if root.exists() else 0
    _check_disk(paths, need - written, f"the parent-activation cache ({size})")
    return ActivationPlan("disk", f"parent activations: computed once, shared on disk by {world_size} worker(s) "
                                  f"x {groups} group(s) ({size})", depth, root)


def _check_disk(paths: RunPaths, need: int, what: str) -> None:
    free = shutil.disk_usage(paths.progress if paths.progress.exists() else paths.root).free
    if need > free:
        raise ConfigError(f"bld: {what} needs more than the {free / 2**30:.1f} GiB free in {paths.root}; free disk "
                          "space, or set bld.parent_activations: recompute")


def parent_activations(plan: ActivationPlan, parent, data, cfg: BLDConfig, shard: Shard, device: torch.device):
    """The source the groups read; with the disk cache, this worker first writes its own share of the shards
    (batch k belongs to worker k % world_size), held-out batches first."""
    if plan.mode == "recompute":
        return RecomputedActivations(parent)
    if plan.mode == "boundary":  # this worker's own: the layers it moves through are those of its groups
        batches = [("held_out", k, b) for k, b in enumerate(eval_batches(data, cfg))]
        batches += [("train", k, b) for k, b in enumerate(train_batches(data, cfg))]
        return BoundaryActivations(parent, plan.root / f"worker-{shard.rank}-of-{shard.world_size}", batches)
    cache = DiskActivations(parent, plan.root, plan.depth)
    mine = lambda k: k % shard.world_size == shard.rank  # noqa: E731
    held_out = [("held_out", k, b.to(device)) for k, b in enumerate(eval_batches(data, cfg)) if mine(k)]
    train = [("train", k, b.to(device)) for k, b in enumerate(train_batches(data, cfg)) if mine(k)]
    with track(f"parent activations ({shard.rank}/{shard.world_size})", len(held_out) + len(train)) as bar:
        cache.produce(held_out + train, on_batch=bar.advance)
    return cache
