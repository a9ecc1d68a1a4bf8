"""FFN Fusion: a run of sequential FFNs replaced by one wide FFN on their shared input.

Bercovich et al., "FFN Fusion: Rethinking Sequential Computation in Large Language Models" (2025);
docs/methods.md, "FFN Fusion". Once attention is gone from some layers,
their FFNs follow each other with nothing in between:

    h_1 = x,  h_{j+1} = h_j + f_j(h_j)          sequential: what the model computes
    y   = x + sum_j f_j(x)                      parallel:   what the fused model computes

with f_j(h) = down_j(act(gate_j(g_j * n(h))) * up_j(g_j * n(h))) and n the RMSNorm without its gain g_j.
The parallel form is one FFN of width sum_j I_j: each g_j folded into the columns of gate_j / up_j, gate
and up concatenated along the intermediate axis, down along its input axis, down biases summed, and a
unit-gain norm in front. The fused FFN sits in the first layer of its group (which keeps its attention, if
it has one); the group's other layers become fully no-op. The result is the same checkpoint format, and
vLLM-native whenever the input was.

A *run* is a maximal chain of gated FFNs with no attention between them: an FFN and the FFNs of the
following layers whose attention is no-op. Note that the chain starts at the FFN of the layer *before*
the first attention-free layer: nothing separates the two, so they too can read the same input. Which
FFNs to fuse is decided on calibration tokens by the dependency of f_j on its predecessors, the cosine
distance between f_j's output on its true (sequential) input and on the group's input; a group grows
while that is <= `threshold` and it has fewer than `max_run` members. The last FFN of each run stays
separate by default (the paper: it helps quality).

    report = fuse_ffn("children/2.0x", "children/2.0x-fused", FusionConfig(data=DataConfig(paths=("corpus",))))
    report = fuse_ffn("children/2.0x", None, FusionConfig(threshold=None))      # dry run, no calibration
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from puzzle.arch import Architecture, FFNConfig
from puzzle.checkpoint import decilm_config, load_architecture, load_model, save_model
from puzzle.config import check_int, from_mapping, to_mapping
from puzzle.corpus import DataConfig
from puzzle.data import TokenData, load_token_data, load_tokenizer
from puzzle.distill.activations import logits_from_hidden, run_layers
from puzzle.distill.gkd import GKDConfig, run_gkd
from puzzle.distill.losses import cosine_distance
from puzzle.errors import ConfigError, InputError, OutputExistsError
from puzzle.jobs import Shard, device_for
from puzzle.metrics import QualitySums
from puzzle.modeling.modeling_decilm import DeciLMForCausalLM, DeciLMMLP
from puzzle.progress import log, track

FUSION_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class FusionConfig:
    """What to fuse and how to check it; every default of the fuse stage lives here."""

    # Fuse f_j into its group while its dependency on the group's input is at most this (cosine distance,
    # 0 = f_j ignores its predecessors). None: no calibration, fuse every run up to max_run. The paper
    # gives no number; the demo's attention-free runs measure 0.003-0.02, so 0.05 fuses those.
    threshold: float | None = 0.05
    max_run: int | None = None  # most FFNs in one fused layer; None: no limit
    keep_last: bool = True  # the FFN Fusion paper: leaving each run's last FFN unfused helps quality
    data: DataConfig | None = None  # train split: calibration; held-out split: the quality check
    calibration_tokens: int = 1 << 15
    eval_tokens: int = 1 << 15  # held-out tokens for KL / LM loss after fusion; 0 skips the check
    batch_size: int = 8
    distill_tokens: int = 0  # > 0: short KD from the unfused model afterwards (puzzle.distill.gkd)
    device: str = "auto"  # auto: cuda:LOCAL_RANK when available, else cpu
    trust_remote_code: bool = False  # run code shipped with the checkpoint's tokenizer (user's opt-in)

    def __post_init__(self) -> None:
        if self.threshold is not None and not (isinstance(self.threshold, (int, float)) and self.threshold >= 0):
            raise ConfigError(f"fuse.threshold must be a non-negative number or null, got {self.threshold!r}")
        check_int("fuse.max_run", self.max_run, minimum=2, optional=True)
        for name in ("calibration_tokens", "eval_tokens", "distill_tokens", "batch_size"):
            check_int(f"fuse.{name}", getattr(self, name), minimum=1 if name == "batch_size" else 0)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"fuse.device must be auto, cpu or cuda, got {self.device!r}")


# ----------------------------------------------------------------------------------------------------------
# Reports (saved in the child's puzzle.json under "fusion")


@dataclass(frozen=True, kw_only=True)
class RunPlan:
    """One run and what happens to it."""

    layers: tuple[int, ...]  # the run's FFN layers, in order
    dependency: tuple[float | None, ...]  # per layer: cosine distance, run input vs true input (None: first / unmeasured)
    groups: tuple[tuple[int, ...], ...]  # a partition of `layers`; a group of >= 2 is fused into its first layer
    notes: tuple[str, ...]  # per layer: why a group starts there ("" when it simply joins)

    @property
    def fused(self) -> tuple[tuple[int, ...], ...]:
        return tuple(g for g in self.groups if len(g) > 1)


@dataclass(frozen=True, kw_only=True)
class FusionQuality:
    """The fused model against the unfused one on held-out tokens."""

    tokens: int
    kl: float  # mean KL(unfused || fused) per token, nats
    top1: float  # fraction of positions where both models' argmax agree
    lm_loss_before: float  # nats/token
    lm_loss_after: float


@dataclass(frozen=True, kw_only=True)
class FusionReport:
    source: str
    out: str | None  # None: dry run, nothing written
    runs: tuple[RunPlan, ...]
    calibration_tokens: int  # 0: no calibration (threshold None)
    ffn_depth_before: int  # FFN sub-blocks executed one after another per token
    ffn_depth_after: int
    params_before: int
    params_after: int
    predicted_speedup: float  # DecodeCostModel: batch-1 decode step time before / after
    vllm_native: bool
    quality: FusionQuality | None = None  # right after fusion
    distill_tokens: int = 0  # trained by the short KD (0: none)
    quality_distilled: FusionQuality | None = None  # after the KD
    config: dict[str, Any] = field(default_factory=dict)
    version: int = FUSION_VERSION

    @property
    def fused_groups(self) -> tuple[tuple[int, ...], ...]:
        return tuple(g for run in self.runs for g in run.fused)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "fusion report") -> FusionReport:
        if data.get("version") != FUSION_VERSION:
            raise InputError(f"{where}: version {data.get('version')} is not {FUSION_VERSION}; rerun fuse-ffn")
        return from_mapping(cls, data, where)


# ----------------------------------------------------------------------------------------------------------
# Runs, groups and the fused architecture (pure functions of the description)


def find_runs(arch: Architecture) -> list[tuple[int, ...]]:
    """Maximal chains of >= 2 gated FFNs with no attention between them, as their layer indices.

    Any attention (softmax or linear) or a linear FFN ends a chain; a layer whose attention and FFN are both
    no-op is the identity and does not.
    """
    runs, chain = [], []
    for i, block in enumerate(arch.blocks):
        if not block.attention.no_op or block.ffn.replace_with_linear:
            runs.append(chain)
            chain = []
        if block.ffn.is_gated:
            chain.append(i)
    runs.append(chain)
    return [tuple(run) for run in runs if len(run) >= 2]


def choose_groups(
    layers: Sequence[int],
    dependency: dict[tuple[int, int], float],
    *,
    threshold: float | None,
    max_run: int | None,
    keep_last: bool,
) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]:
    """Cut one run into consecutive groups, greedily from its start; returns (groups, note per layer).

    `dependency[(a, j)]` is the cosine distance of f_j's output on the input of layer a's FFN vs on its own:
    the error fusing j into a group that starts at a makes. f_j joins the open group while that is
    <= threshold (always when threshold is None) and the group has fewer than max_run members.
    """
    layers = tuple(layers)
    fusable = layers[:-1] if keep_last else layers
    groups: list[list[int]] = []
    notes = {j: "" for j in layers}
    for j in fusable:
        if groups:
            start = groups[-1][0]
            d = dependency.get((start, j))
            if max_run is not None and len(groups[-1]) >= max_run:
                notes[j] = f"max-run {max_run} reached"
            elif threshold is not None and d is not None and d > threshold:
                notes[j] = f"dependency on L{start}'s input {d:.3g} > threshold {threshold:g}"
            elif threshold is not None and d is None:
                raise AssertionError(f"dependency ({start}, {j}) was not measured")
            else:
                groups[-1].append(j)
                continue
        groups.append([j])
    if keep_last:
        groups.append([layers[-1]])
        notes[layers[-1]] = "last FFN of the run (--keep-last)"
    return tuple(tuple(g) for g in groups), tuple(notes[j] for j in layers)


def fused_architecture(arch: Architecture, groups: Iterable[Sequence[int]]) -> Architecture:
    """The description after fusion: each group's width summed into its first layer, the rest no-op."""
    for group in groups:
        if len(group) < 2:
            continue
        width = sum(arch.blocks[i].ffn.intermediate_size for i in group)
        arch = arch.with_block(group[0], ffn=FFNConfig(intermediate_size=width))
        for i in group[1:]:
            assert arch.blocks[i].attention.no_op, f"layer {i} has attention; it cannot join a fused FFN"
            arch = arch.with_block(i, ffn=FFNConfig(no_op=True))
    return arch


def ffn_depth(arch: Architecture) -> int:
    """FFN sub-blocks a token goes through one after another (a fused FFN counts once)."""
    return sum(1 for block in arch.blocks if not block.ffn.no_op)


@dataclass(frozen=True, kw_only=True)
class DecodeCostModel:
    """A batch-1 decode step, estimated: each kernel costs a fixed overhead, each weight byte is read once.

    Fusion leaves the weight bytes unchanged, so the whole predicted gain is the (k-1) FFNs' kernels a fused
    group of k no longer runs. Defaults: H100, bf16, CUDA graphs, vLLM-style kernels (an FFN is add+norm,
    gate_up GEMM, act*mul, down GEMM), fitted to benchmarks/results/ffn_fusion_latency_nvidia-h100-80gb-hbm3.md
    (about 16 us saved per folded Llama-8B FFN at batch 1, weights streamed at about 2.8 TB/s). KV-cache
    reads (short context) and tensor-parallel all-reduces (one saved per folded FFN) are not counted.
    """

    kernel_s: float = 4e-6  # per kernel: launch gap plus the GEMM's ramp-up and tail
    bytes_per_s: float = 2.8e12
    bytes_per_param: int = 2
    ffn_kernels: int = 4
    attention_kernels: int = 5  # add+norm, qkv GEMM, rope, attention, o_proj

    def step_seconds(self, arch: Architecture) -> float:
        kernels = 2 + sum(  # final norm and LM head
            (self.attention_kernels if not b.attention.no_op else 0) + (self.ffn_kernels if not b.ffn.no_op else 0)
            for b in arch.blocks
        )
        embedding = arch.shape.vocab_size * arch.shape.hidden_size  # one row of the embedding read; LM head in full
        weight_bytes = (arch.total_params() - embedding * (0 if arch.shape.tie_word_embeddings else 1)) * self.bytes_per_param
        return kernels * self.kernel_s + weight_bytes / self.bytes_per_s


# ----------------------------------------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class FFNWeights:
    """One gated FFN with its RMSNorm gain: f(h) = down(act(gate(g * n(h))) * up(g * n(h)))."""

    norm: torch.Tensor  # (C,) RMSNorm gain g
    gate: torch.Tensor  # (I, C)
    up: torch.Tensor  # (I, C)
    down: torch.Tensor  # (C, I)
    gate_bias: torch.Tensor | None = None  # (I,)
    up_bias: torch.Tensor | None = None  # (I,)
    down_bias: torch.Tensor | None = None  # (C,)

    @property
    def width(self) -> int:
        return self.gate.shape[0]


def fuse_ffn_weights(ffns: Sequence[FFNWeights]) -> FFNWeights:
    """One FFN of width sum_j I_j computing sum_j f_j on a shared unit-gain norm (exact up to rounding).

    W g (.) n = (W diag(g)) n, so each gain scales the columns of its own gate / up rows; the fold is done
    in fp32 and stored in the weights' dtype.
    """
    assert len({f.down_bias is None for f in ffns}) == 1, "mlp_bias is global: all FFNs have biases or none do"
    dtype = ffns[0].gate.dtype
    gate = torch.cat([f.gate.float() * f.norm.float()[None, :] for f in ffns]).to(dtype)  # (sum I, C)
    up = torch.cat([f.up.float() * f.norm.float()[None, :] for f in ffns]).to(dtype)  # (sum I, C)
    down = torch.cat([f.down for f in ffns], dim=1)  # (C, sum I)
    biased = ffns[0].down_bias is not None
    return FFNWeights(
        norm=torch.ones_like(ffns[0].norm),
        gate=gate,
        up=up,
        down=down,
        gate_bias=torch.cat([f.gate_bias for f in ffns]) if biased else None,
        up_bias=torch.cat([f.up_bias for f in ffns]) if biased else None,
        down_bias=torch.stack([f.down_bias.float() for f in ffns]).sum(0).to(dtype) if biased else None,
    )


def layer_ffn_weights(layer: torch.nn.Module) -> FFNWeights:
    mlp = layer.mlp
    return FFNWeights(
        norm=layer.post_attention_layernorm.weight.detach(),
        gate=mlp.gate_proj.weight.detach(), up=mlp.up_proj.weight.detach(), down=mlp.down_proj.weight.detach(),
        gate_bias=_detach(mlp.gate_proj.bias), up_bias=_detach(mlp.up_proj.bias), down_bias=_detach(mlp.down_proj.bias),
    )


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


@torch.no_grad()
def fuse_layers_(model: DeciLMForCausalLM, groups: Iterable[Sequence[int]]) -> DeciLMForCausalLM:
    """Fuse each group's FFNs into its first layer, in place; the group's other layers become no-op.

    Trust but verify: each fused layer is checked against the sum of the original FFNs on a random input.
    """
    groups = [tuple(g) for g in groups if len(g) > 1]
    layers = model.model.layers
    config = decilm_config(model.config.to_dict(), fused_architecture(Architecture.from_config(model.config.to_dict()), groups))
    param = next(model.parameters())
    probe = torch.randn(1, 3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    probe = probe.to(param.device, param.dtype)  # (1, 3, C)
    tolerance = 1e-5 if param.dtype == torch.float32 else 3e-2
    for group in groups:
        eps = {layers[i].post_attention_layernorm.variance_epsilon for i in group}
        assert len(eps) == 1, f"layers {group} have different RMSNorm eps {eps}"  # rms_norm_eps is global
        expected = sum(layers[i].ffn_branch(probe).float() for i in group)  # the parallel formulation
        fused = fuse_ffn_weights([layer_ffn_weights(layers[i]) for i in group])
        with torch.device("meta"):
            mlp = DeciLMMLP(config, fused.width)
        state = {"gate_proj.weight": fused.gate, "up_proj.weight": fused.up, "down_proj.weight": fused.down}
        if fused.down_bias is not None:
            state |= {"gate_proj.bias": fused.gate_bias, "up_proj.bias": fused.up_bias, "down_proj.bias": fused.down_bias}
        mlp.load_state_dict(state, assign=True)
        host = layers[group[0]]
        host.mlp = mlp
        host.post_attention_layernorm.weight.copy_(fused.norm)
        for i in group[1:]:
            layers[i].mlp = layers[i].post_attention_layernorm = None
        got = host.ffn_branch(probe).float()
        error = ((got - expected).norm() / expected.norm().clamp_min(1e-12)).item()
        assert error < tolerance, f"fused FFN of layers {group} differs from the parallel sum (relative error {error:.2e})"
    model.config = model.model.config = config
    return model


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
            for a, j in pairs:
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
        raise InputError(
            f"{ckpt}: no two FFNs follow each other without attention between them, so there is nothing to fuse; "
            "FFN fusion needs layers whose attention is no-op (a `puzzle search` child with attention removed)"
        )
    model = data = None
    if out is not None or cfg.threshold is not None:  # a dry run without calibration reads no weights
        model = load_model(ckpt, dtype=None, device=device_for(Shard(), cfg.device)).requires_grad_(False)
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
        raise InputError(f"{ckpt}: {_nothing_fused(plans, cfg)}; nothing was written")
    report = replace(report, quality=_fuse_and_check(model, report.fused_groups, data, cfg))
    info = {"stage": "fuse-ffn", "parent": str(ckpt.resolve()), **(info or {}), "fusion": report.to_dict()}
    if not cfg.distill_tokens:
        save_model(model, Path(out), source=ckpt, overwrite=overwrite, info=info)
    else:  # run_gkd reads folders: stage the fused model beside `out`
        staging = Path(out).with_name(f".{Path(out).name}.before-kd")
        save_model(model, staging, source=ckpt, overwrite=True, info=info)
        del model  # GKD loads its own student and teacher
        try:
            report = _distill(staging, ckpt, Path(out), report, cfg, overwrite)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log(f"fuse-ffn: {len(report.fused_groups)} fused FFN(s) -> {out}")
    return report


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


def _fuse_and_check(model: DeciLMForCausalLM, groups: Sequence[Sequence[int]], data: TokenData | None,
                    cfg: FusionConfig) -> FusionQuality | None:
    if data is None or cfg.eval_tokens == 0:
        fuse_layers_(model, groups)
        return None
    n_tokens = min(max(cfg.eval_tokens, data.config.seq_len), data.num_tokens("held_out"))
    batches = list(data.batches("held_out", cfg.batch_size, n_tokens=n_tokens, shuffle=False))
    reference = final_hidden(model, batches)
    fuse_layers_(model, groups)
    return compare_to_reference(model, batches, reference)


def _nothing_fused(plans: Sequence[RunPlan], cfg: FusionConfig) -> str:
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


