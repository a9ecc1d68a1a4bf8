"""The `solve` stage: a MIP problem from the run's library, scores and profile; targets; solution files.

Targets come from the config (or `--target-throughput 2x --max-memory 40GiB`): throughput and latency
relative to the parent ("2x", "0.5x") or absolute; memory and KV bytes per token as sizes ("40GiB"),
bytes, or relative to the parent. Relative values are resolved against the parent's predicted cost in the
same profile, so "2x" means twice the parent on the same device and method. Each target's child is written
to `solutions/{name}.json`; a sweep over throughput targets gives the quality/speed Pareto front.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from puzzle.arch import Architecture, AttentionConfig, BlockConfig, FFNConfig
from puzzle.blocks.library import Manifest
from puzzle.config import is_int, to_mapping
from puzzle.errors import ConfigError, InfeasibleError, StageError
from puzzle.files import read_json, write_json_atomic
from puzzle.mip.diagnose import TargetInfeasibleError
from puzzle.mip.metrics import parent_metrics
from puzzle.mip.problem import DiversityTarget, LayerOptions, Option, Problem, Targets
from puzzle.mip.solution import Solution
from puzzle.mip.solve import pareto_sweep, solve
from puzzle.profiling import Profile
from puzzle.scoring import Scores

SOLUTION_FILE_VERSION = 1
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True, kw_only=True)
class TargetSpec:
    """One deployment target as the user writes it; at least one constraint."""

    name: str
    throughput: str | float | None = None  # "2x" of the parent, or tokens/s
    latency: str | float | None = None  # "0.5x" of the parent, or seconds (prefill + generate_tokens decode steps)
    memory: str | float | None = None  # "40GiB", "0.6x", or bytes: parameters + KV cache at (batch, context)
    kv_bytes_per_token: str | float | None = None  # "0.5x" or bytes per token per sequence
    min_attention_layers: int | None = None
    max_attention_layers: int | None = None
    max_shared_fraction: float | None = None  # diversity against the targets solved before this one
    # only variants vLLM's own model for the parent serves: DeciLMForCausalLM (no linear or window attention, no
    # linear FFN), or for a hybrid (Nemotron-H) parent NemotronHPuzzleForCausalLM (no linear replacement, and Mamba
    # layers keep the parent's shape or are removed: vLLM reads one Mamba shape for the whole model)
    vllm_native: bool = False
    # only children vLLM's Transformers backend serves (Architecture.vllm_transformers_unsupported): every layer
    # keeps the parent's attention, the FFN / experts are free (for parents vLLM's DeciLM model cannot serve: MoE)
    vllm_transformers: bool = False

    def __post_init__(self) -> None:
        for flag in ("vllm_native", "vllm_transformers"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"target {self.name!r}: {flag} must be true or false, got {getattr(self, flag)!r}")
        if self.vllm_native and self.vllm_transformers:
            raise ConfigError(f"target {self.name!r}: vllm_native and vllm_transformers exclude each other; keep one")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            raise ConfigError(f"target name {self.name!r}: use letters, digits, '.', '_' or '-' (it names a folder)")
        if all(getattr(self, f) is None for f in ("throughput", "latency", "memory", "kv_bytes_per_token",
                                                     "min_attention_layers", "max_attention_layers")):
            raise ConfigError(f"target {self.name!r} has no constraint; give throughput, latency, memory, ...")


@dataclass(frozen=True, kw_only=True)
class SolveConfig:
    solver: Literal["pulp", "ortools"] = "pulp"
    objective: Literal["kl", "lm_loss"] = "kl"  # the replace-one-block score summed over layers
    targets: tuple[TargetSpec, ...] = (TargetSpec(name="1.5x", throughput="1.5x"), TargetSpec(name="2x", throughput="2x"))
    sweep: tuple[float, ...] = (1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)  # throughput multiples for the Pareto front
    # Re-ranking: per target, the MIP optimum and rerank - 1 more solutions that each share at most
    # rerank_shared_fraction of their sub-blocks with the ones before are assembled, and the child with the lowest
    # measured KL to the parent (on the tokens scoring used) is kept. Summed replace-one-block scores are not quite
    # additive, so the optimum of the sum is not always the best child (docs/methods.md). 1: the MIP optimum.
    rerank: int = 1
    rerank_shared_fraction: float = 0.85

    def __post_init__(self) -> None:
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ConfigError(f"solve.targets: names must be unique, got {names}")
        if not is_int(self.rerank) or self.rerank < 1:
            raise ConfigError(f"solve.rerank must be a whole number >= 1 (1: keep the MIP optimum), got {self.rerank!r}")
        if not 0 < self.rerank_shared_fraction < 1:
            raise ConfigError("solve.rerank_shared_fraction must be between 0 and 1 (exclusive), got "
                              f"{self.rerank_shared_fraction!r}")


def target_from_flags(name: str | None = None, **constraints) -> dict[str, Any] | None:
    """One `solve.targets` entry from command-line flags (None when no flag was given)."""
    flags = {k: True for k in ("vllm_native", "vllm_transformers") if constraints.get(k)}
    given = {k: v for k, v in constraints.items() if v is not None and k not in ("vllm_native", "vllm_transformers")}
    if not given:
        if flags:
            option = "--" + next(iter(flags)).replace("_", "-")
            raise ConfigError(f"{option} restricts a target: give it one too, e.g. --target-throughput 2x")
        return None
    label = name or "-".join(f"{k.split('_')[0]}{v}" for k, v in given.items()) + ("-vllm" if flags else "")
    return {"name": re.sub(r"[^A-Za-z0-9._-]", "_", label), **given, **flags}


def parse_relative(value: str | float | None, parent: float, what: str, size: bool = False) -> float | None:
    """'2x' -> 2 * parent; '40GiB' -> bytes (sizes); numbers unchanged."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = value.strip().lower().replace(" ", "")
    if m := re.fullmatch(r"([0-9.]+)x", text):
        return float(m.group(1)) * parent
    if size and (m := re.fullmatch(r"([0-9.]+)([a-z]*)", text)) and m.group(2) in _UNITS:
        return float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{what} {value!r}: write e.g. '2x'" + (", '40GiB'" if size else "") + " or a number") from None


# ----------------------------------------------------------------------------------------------------------
# Problem


def _option(name: str, score: float, costs: list, has_attention: bool) -> Option:
    return Option(name=name, score=max(score, 0.0), decode_time_s=sum(c.decode_time_s for c in costs),
                  prefill_time_s=sum(c.prefill_time_s for c in costs), param_bytes=sum(c.param_bytes for c in costs),
                  kv_bytes_per_token=sum(c.kv_bytes_per_token for c in costs),
                  kv_window=next((c.kv_window for c in costs if c.kv_bytes_per_token), None), has_attention=has_attention,
                  state_bytes=sum(getattr(c, "state_bytes", 0) for c in costs))


def build_problem(manifest: Manifest, scores: Scores, profile: Profile, arch: Architecture,
                  objective: str = "kl") -> Problem:
    """One LayerOptions per layer, option 0 the parent's; layers outside the search space keep the parent."""
    layers = []
    for i, block in enumerate(arch.blocks):
        def score(c):
            return getattr(scores.get(c.layer, c.kind, c.name), objective) - (
                0.0 if objective == "kl" else scores.parent_lm_loss)

        def parent_option(kind, variant):
            if variant.no_op:
                return _option("no_op", 0.0, [], False)
            return _option(variant.label(arch.shape.num_attention_heads) if kind == "attention" else variant.label(),
                           0.0, [profile.cost(kind, variant)], kind == "attention" and variant.has_softmax)

        attn = [c for c in manifest.candidates_of(i, "attention")]
        ffn = [c for c in manifest.candidates_of(i, "ffn")]
        pairs = [c for c in manifest.candidates_of(i, "block")]
        if pairs:  # coupled mode: each (attention, FFN) pair is one option; the FFN side is empty
            options = tuple(_option(c.name, score(c), _costs(profile, c.variant.attention, c.variant.ffn),
                                    c.variant.attention.has_softmax) for c in pairs)
            layers.append(LayerOptions(attention=options, ffn=(_option("(in block)", 0.0, [], False),)))
            continue
        attention_options = tuple(_option(c.name, score(c), _costs(profile, c.variant), c.variant.has_softmax)
                                  for c in attn) or (parent_option("attention", block.attention),)
        ffn_options = tuple(_option(c.name, score(c), _costs(profile, None, c.variant), False)
                            for c in ffn) or (parent_option("ffn", block.ffn),)
        layers.append(LayerOptions(attention=attention_options, ffn=ffn_options))
    return Problem(layers=tuple(layers), fixed_decode_time_s=profile.fixed.decode_time_s,
                   fixed_prefill_time_s=profile.fixed.prefill_time_s, fixed_param_bytes=profile.fixed.param_bytes)


def _costs(profile: Profile, attention: AttentionConfig | None, ffn: FFNConfig | None = None) -> list:
    out = []
    if attention is not None and not attention.no_op:
        out.append(profile.cost("attention", attention))
    if ffn is not None and not ffn.no_op:
        out.append(profile.cost("ffn", ffn))
    return out


def served_problem(problem: Problem, manifest: Manifest, arch: Architecture, spec: TargetSpec) -> Problem:
    """The problem a target may choose from: restricted to what vLLM serves when the target asks for it."""
    if spec.vllm_native:
        return vllm_native_problem(problem, manifest, arch, spec.name)
    if spec.vllm_transformers:
        return vllm_transformers_problem(problem, arch, spec.name)
    return problem


def vllm_transformers_problem(problem: Problem, arch: Architecture, target: str) -> Problem:
    """Every layer's attention fixed to the parent's (vLLM's Transformers backend needs one KV-head count, no
    window and softmax attention in every layer); the FFN variants stay."""
    reasons = arch.vllm_transformers_unsupported()
    if reasons:
        raise ConfigError(f"target {target}: vllm_transformers is impossible for this parent ({'; '.join(reasons)}); "
                          "drop vllm_transformers")
    def attention_of(option) -> str:  # coupled mode: block options "kv8+moe_k6_top2" sit with the attention ones
        return option.name.split("+")[0]

    layers = [LayerOptions(attention=tuple(o for o in layer.attention if attention_of(o) == attention_of(layer.attention[0])),
                           ffn=layer.ffn) for layer in problem.layers]
    return Problem(layers=tuple(layers), fixed_decode_time_s=problem.fixed_decode_time_s,
                   fixed_prefill_time_s=problem.fixed_prefill_time_s, fixed_param_bytes=problem.fixed_param_bytes)


def _nemotron_h_serves(variant, parent: BlockConfig) -> bool:
    """Whether vLLM's Nemotron-H model serves this variant of a hybrid parent's layer: no linear replacement, and a
    Mamba mixer of the parent's shape (or none)."""
    if isinstance(variant, BlockConfig):
        return _nemotron_h_serves(variant.attention, parent) and _nemotron_h_serves(variant.ffn, parent)
    mamba = getattr(variant, "mamba", None)
    return not variant.replace_with_linear and (mamba is None or mamba == parent.attention.mamba)


def vllm_native_problem(problem: Problem, manifest: Manifest, arch: Architecture, target: str) -> Problem:
    """The problem without the variants vLLM does not serve (the library keeps them for other targets)."""
    hybrid = arch.vllm_serving() == "nemotron_h"
    for present, what in ((arch.shape.qk_norm, "q/k RMSNorm (Qwen3)"), (arch.shape.attention_sinks, "attention sinks (gpt-oss)")):
        if present:
            raise ConfigError(f"target {target}: vllm_native is impossible for this parent: {what} is not in "
                              "vLLM's DeciLM model; drop vllm_native")
    layers = []
    for i, (layer, parent) in enumerate(zip(problem.layers, arch.blocks)):
        served = {}
        for kind in ("attention", "ffn", "block"):
            for c in manifest.candidates_of(i, kind):
                ok = _nemotron_h_serves(c.variant, parent) if hybrid else not c.variant.vllm_unsupported
                served[("attention" if kind == "block" else kind, c.name)] = ok
        parent_ok = {"attention": hybrid or not parent.attention.vllm_unsupported,
                     "ffn": hybrid or not parent.ffn.vllm_unsupported}
        kept = {kind: tuple(o for o in getattr(layer, kind) if served.get((kind, o.name), parent_ok[kind]))
                for kind in ("attention", "ffn")}
        for kind, options in kept.items():
            if not options:
                raise ConfigError(f"target {target}: layer {i} has no {kind} variant vLLM serves (the parent's is "
                                  f"{getattr(layer, kind)[0].name}); add kv-head or no-op variants to space.{kind}, or drop vllm_native")
        layers.append(LayerOptions(**kept))
    return Problem(layers=tuple(layers), fixed_decode_time_s=problem.fixed_decode_time_s,
                   fixed_prefill_time_s=problem.fixed_prefill_time_s, fixed_param_bytes=problem.fixed_param_bytes)


def resolve_targets(spec: TargetSpec, problem: Problem, profile: Profile) -> Targets:
    pc = profile.config
    parent = parent_metrics(problem, batch_size=pc["batch_size"], context_len=pc["context_len"],
                            generate_tokens=pc["generate_tokens"])
    where = f"target {spec.name}"
    return Targets(
        batch_size=pc["batch_size"], context_len=pc["context_len"], generate_tokens=pc["generate_tokens"],
        min_throughput=parse_relative(spec.throughput, parent.throughput, f"{where}: throughput"),
        max_latency_s=parse_relative(spec.latency, parent.latency_s, f"{where}: latency"),
        max_memory_bytes=_int(parse_relative(spec.memory, parent.memory_bytes, f"{where}: memory", size=True)),
        max_kv_bytes_per_token=_int(parse_relative(spec.kv_bytes_per_token, parent.kv_bytes_per_token,
                                                   f"{where}: kv_bytes_per_token", size=True)),
        min_attention_layers=spec.min_attention_layers, max_attention_layers=spec.max_attention_layers,
        diversity=DiversityTarget(max_shared_fraction=spec.max_shared_fraction) if spec.max_shared_fraction is not None else None,
    )


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


# ----------------------------------------------------------------------------------------------------------
# Solutions on disk


@dataclass(frozen=True, kw_only=True)
class ChildPlan:
    """What `realize` builds: the target, the MIP's answer, and the per-layer architecture."""

    name: str
    target: dict[str, Any]
    solution: Solution
    blocks: tuple[BlockConfig, ...]
    parent_throughput: float  # predicted, same profile
    # with solve.rerank > 1: every solution assembled for this target, in MIP order (summed score, measured KL,
    # chosen); empty when the MIP optimum was kept without re-ranking
    reranked: tuple[dict[str, Any], ...] = ()
    version: int = SOLUTION_FILE_VERSION

    @property
    def rerank_choice(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the MIP optimum's row, the kept row) of a re-ranked plan."""
        return self.reranked[0], next(r for r in self.reranked if r["chosen"])

    @property
    def predicted_speedup(self) -> float:
        return self.solution.throughput / self.parent_throughput

    def save(self, path: Path) -> None:
        write_json_atomic(path, {"version": self.version, "name": self.name, "target": self.target,
                                 "parent_throughput": self.parent_throughput, "solution": self.solution.to_dict(),
                                 "block_configs": [b.to_dict() for b in self.blocks],
                                 **({"reranked": list(self.reranked)} if self.reranked else {})})

    @classmethod
    def load(cls, path: Path) -> ChildPlan:
        data = read_json(path, "solution")
        if data.get("version") != SOLUTION_FILE_VERSION:
            raise StageError(f"{path}: solution version {data.get('version')} is not {SOLUTION_FILE_VERSION}; rerun solve")
        blocks = tuple(BlockConfig(attention=AttentionConfig(**b["attention"]), ffn=FFNConfig(**b["ffn"]))
                       for b in data["block_configs"])
        return cls(name=data["name"], target=data["target"], solution=Solution.from_dict(data["solution"]),
                   blocks=blocks, parent_throughput=data["parent_throughput"], reranked=tuple(data.get("reranked", ())))


def blocks_of(solution: Solution, manifest: Manifest, arch: Architecture) -> tuple[BlockConfig, ...]:
    """Per-layer architecture of a solution (option names back to variants)."""
    blocks = []
    for i, parent in enumerate(arch.blocks):
        pairs = {c.name: c for c in manifest.candidates_of(i, "block")}
        if pairs:
            blocks.append(pairs[solution.attention_names[i]].variant)
            continue
        attn = {c.name: c.variant for c in manifest.candidates_of(i, "attention")}
        ffn = {c.name: c.variant for c in manifest.candidates_of(i, "ffn")}
        blocks.append(BlockConfig(attention=attn.get(solution.attention_names[i], parent.attention),
                                  ffn=ffn.get(solution.ffn_names[i], parent.ffn)))
    return tuple(blocks)


def solve_targets(problem: Problem, profile: Profile, manifest: Manifest, arch: Architecture,
                  cfg: SolveConfig) -> tuple[list[ChildPlan], list[str]]:
    """Solve every target in order (each later one may ask for diversity against the earlier ones)."""
    plans, failures, previous = [], [], []
    pc = profile.config
    parent = parent_metrics(problem, batch_size=pc["batch_size"], context_len=pc["context_len"],
                            generate_tokens=pc["generate_tokens"])
    for spec in cfg.targets:
        targets = resolve_targets(spec, problem, profile)  # relative to the real parent, also for vllm_native
        allowed = served_problem(problem, manifest, arch, spec)
        try:
            solution = solve(allowed, targets, cfg.solver, previous=previous if targets.diversity else ())
        except TargetInfeasibleError as err:
            failures.append(f"target {spec.name}: {err}")
            continue
        previous.append(solution)

        plans.append(ChildPlan(name=spec.name, target=to_mapping(spec), solution=solution,
                               blocks=blocks_of(solution, manifest, arch), parent_throughput=parent.throughput))
    return plans, failures


def diverse_plans(problem: Problem, profile: Profile, manifest: Manifest, arch: Architecture, plan: ChildPlan,
                  cfg: SolveConfig) -> list[ChildPlan]:
    """`plan` (a target's MIP optimum) and up to cfg.rerank - 1 more solutions of the same target, each sharing at
    most cfg.rerank_shared_fraction of its sub-blocks with every one before it (fewer when no more exist)."""
    spec = TargetSpec(**{**plan.target, "max_shared_fraction": cfg.rerank_shared_fraction})
    targets = resolve_targets(spec, problem, profile)
    allowed = served_problem(problem, manifest, arch, spec)
    plans, previous = [plan], [plan.solution]
    while len(plans) < cfg.rerank:
        try:
            solution = solve(allowed, targets, cfg.solver, previous=previous)
        except TargetInfeasibleError:
            break  # no other solution that different meets the target
        previous.append(solution)
        plans.append(ChildPlan(name=plan.name, target=plan.target, solution=solution,
                               blocks=blocks_of(solution, manifest, arch), parent_throughput=plan.parent_throughput))
    return plans


def sweep(problem: Problem, profile: Profile, cfg: SolveConfig) -> list[dict[str, Any]]:
    """The Pareto front: best summed score at each throughput multiple of the sweep."""
    specs = [TargetSpec(name=f"sweep-{m:g}x", throughput=f"{m}x") for m in cfg.sweep]
    targets = [resolve_targets(s, problem, profile) for s in specs]
    results = pareto_sweep(problem, targets, cfg.solver)
    out = []
    for m, r in zip(cfg.sweep, results):
        if isinstance(r, InfeasibleError):
            out.append({"multiple": m, "feasible": False})
        else:
            out.append({"multiple": m, "feasible": True, "score": r.score, "throughput": r.throughput,
                        "attention_names": list(r.attention_names), "ffn_names": list(r.ffn_names)})
    return out
