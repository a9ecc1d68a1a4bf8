"""Shared pieces of the MIP tests: random small search spaces and a brute-force reference solver.

The reference enumerates every child (16^6 = 16.7M for 6 layers x 4 x 4 options) with numpy, as the outer
sum of the two half-models, and applies the targets with the same relative tolerance as the solvers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest

from puzzle.mip import LayerOptions, Option, Problem, Solution, Targets

TOL = 1e-9
KINDS = ["gqa", "window", "linear", "noop"]


def random_problem(seed: int, layers: int = 6, n_attention: int = 4, n_ffn: int = 4) -> Problem:
    """A small Llama-like search space with random costs; option 0 is the parent."""
    rng = random.Random(seed)
    out = []
    for _ in range(layers):
        t_att, t_ffn = rng.uniform(0.8e-3, 1.2e-3), rng.uniform(1.6e-3, 2.4e-3)
        p_att, p_ffn = rng.randint(4_000_000, 6_000_000), rng.randint(10_000_000, 14_000_000)
        attention = [Option(name="parent", score=0.0, decode_time_s=t_att, prefill_time_s=30 * t_att,
                            param_bytes=p_att, kv_bytes_per_token=4096, has_attention=True)]
        for j in range(1, n_attention):
            kind = ["gqa", "window", rng.choice(["linear", "noop"])][j - 1] if j <= 3 else rng.choice(KINDS)
            f = rng.uniform(0.2, 0.9)
            if kind == "gqa":
                option = Option(name=f"gqa{j}", score=rng.uniform(0.01, 0.3), decode_time_s=t_att * f,
                                prefill_time_s=30 * t_att * rng.uniform(0.5, 1.0), param_bytes=int(p_att * f),
                                kv_bytes_per_token=4096 >> rng.randint(1, 3), has_attention=True)
            elif kind == "window":
                option = Option(name=f"window{j}", score=rng.uniform(0.05, 0.5), decode_time_s=t_att * f,
                                prefill_time_s=30 * t_att * f, param_bytes=p_att, kv_bytes_per_token=4096,
                                kv_window=rng.choice([128, 1024]), has_attention=True)
            elif kind == "linear":
                option = Option(name=f"linear{j}", score=rng.uniform(0.2, 1.0), decode_time_s=t_att * f / 5,
                                prefill_time_s=3 * t_att * f, param_bytes=p_att // 4, has_attention=False)
            else:
                option = Option(name=f"noop{j}", score=rng.uniform(0.5, 2.0), decode_time_s=0.0,
                                prefill_time_s=0.0, param_bytes=0, has_attention=False)
            attention.append(option)
        ffn = [Option(name="parent", score=0.0, decode_time_s=t_ffn, prefill_time_s=30 * t_ffn, param_bytes=p_ffn,
                      has_attention=False)]
        for j in range(1, n_ffn):
            width = 0.0 if j == n_ffn - 1 else rng.uniform(0.1, 0.9)
            ffn.append(Option(name=f"ffn{j}", score=rng.uniform(0.0, 1.5) * (1.2 - width), decode_time_s=t_ffn * width,
                              prefill_time_s=30 * t_ffn * width, param_bytes=int(p_ffn * width), has_attention=False))
        out.append(LayerOptions(attention=tuple(attention), ffn=tuple(ffn)))
    return Problem(layers=tuple(out), fixed_decode_time_s=0.7e-3, fixed_prefill_time_s=20e-3,
                   fixed_param_bytes=30_000_000)


@dataclass
class Reference:
    """Every child of a problem at one operating point, enumerated as a (left half x right half) grid."""

    problem: Problem
    batch_size: int = 8
    context_len: int = 2048
    generate_tokens: int = 128

    def __post_init__(self) -> None:
        n = self.problem.num_layers
        self.halves = (range(0, n // 2), range(n // 2, n))

    def _layer(self, i: int, metric: str, previous: Solution | None = None) -> np.ndarray:
        layer = self.problem.layers[i]

        def cost(o: Option) -> float:
            kv_tokens = self.context_len if o.kv_window is None else min(self.context_len, o.kv_window)
            return {
                "score": o.score,
                "decode": o.decode_time_s,
                "latency": o.prefill_time_s + self.generate_tokens * o.decode_time_s,
                "memory": o.param_bytes + self.batch_size * o.kv_bytes_per_token * kv_tokens,
                "kv": o.kv_bytes_per_token,
                "attention": float(o.has_attention),
            }[metric]

        if metric == "shared":
            assert previous is not None
            return np.array([[float(a == previous.attention[i]) + float(f == previous.ffn[i])
                              for f in range(len(layer.ffn))] for a in range(len(layer.attention))]).ravel()
        return np.array([[cost(a) + cost(f) for f in layer.ffn] for a in layer.attention]).ravel()

    def halves_of(self, metric: str, previous: Solution | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Metric of every combination of the left and of the right layers; constants in the left."""
        sides = []
        for half in self.halves:
            total = np.zeros(1)
            for i in half:
                total = np.add.outer(total, self._layer(i, metric, previous)).ravel()
            sides.append(total)
        p = self.problem
        constant = {"decode": p.fixed_decode_time_s, "memory": p.fixed_param_bytes,
                    "latency": p.fixed_prefill_time_s + self.generate_tokens * p.fixed_decode_time_s}.get(metric, 0.0)
        return sides[0] + constant, sides[1]

    def grid(self, metric: str, previous: Solution | None = None) -> np.ndarray:
        """Metric of every child, shape (left combos, right combos)."""
        left, right = self.halves_of(metric, previous)
        return np.add.outer(left, right)

    @property
    def shape(self) -> tuple[int, int]:
        sizes = [len(layer.attention) * len(layer.ffn) for layer in self.problem.layers]
        return int(np.prod([sizes[i] for i in self.halves[0]])), int(np.prod([sizes[i] for i in self.halves[1]]))

    def feasible(self, targets: Targets, previous: tuple[Solution, ...] = (), skip: str = "") -> np.ndarray:
        """Mask of the children that meet every target except `skip`."""
        assert (targets.batch_size, targets.context_len or self.context_len) == (self.batch_size, self.context_len)
        mask = np.ones(self.shape, dtype=bool)
        checks = {
            "min_throughput": ("decode", lambda g, v: self.batch_size / g * (1 + TOL) >= v),
            "max_latency_s": ("latency", lambda g, v: g <= v * (1 + TOL)),
            "max_memory_bytes": ("memory", lambda g, v: g <= v * (1 + TOL)),
            "max_kv_bytes_per_token": ("kv", lambda g, v: g <= v * (1 + TOL)),
            "min_attention_layers": ("attention", lambda g, v: g >= v * (1 - TOL)),
            "max_attention_layers": ("attention", lambda g, v: g <= v * (1 + TOL)),
        }
        for name, (metric, holds) in checks.items():
            if getattr(targets, name) is not None and name != skip:
                mask &= holds(self.grid(metric), getattr(targets, name))
        if targets.diversity is not None:
            most = targets.diversity.max_shared_fraction * 2 * self.problem.num_layers
            for k, solution in enumerate(previous):
                if skip != f"diversity[{k}]":
                    mask &= self.grid("shared", solution) <= most * (1 + TOL)
        return mask

    def best(self, targets: Targets, previous: tuple[Solution, ...] = (), values: np.ndarray | None = None,
             skip: str = "", maximise: bool = False) -> float | None:
        """Smallest (largest) of `values` (default: score) over the children that meet the targets but `skip`."""
        mask = self.feasible(targets, previous, skip)
        if not mask.any():
            return None
        chosen = (self.grid("score") if values is None else values)[mask]
        return float(chosen.max() if maximise else chosen.min())

    def safe_quantile(self, metric: str, q: float) -> float:
        """A bound near the q-quantile of `metric` that no child's value lies within 2e-8 of (relative).

        Bounds then never fall in the 1e-9 band where solvers and this reference may round differently. The
        quantile is taken on a sample; the children near it are found exactly by searching the right half.
        """
        left, right = self.halves_of(metric)
        rng = np.random.default_rng(0)
        sample = left[rng.integers(0, left.size, 20_000)] + right[rng.integers(0, right.size, 20_000)]
        value = float(np.quantile(sample, q))
        band = 1e-6 * abs(value)
        right = np.sort(right)
        lo, hi = np.searchsorted(right, value - left - band), np.searchsorted(right, value - left + band, "right")
        # the band edges stand in for the children beyond them, none of which is closer than the edge
        edges = [[value - band, value + band]]
        found = [a + right[i:j] for a, i, j in zip(left, lo, hi, strict=True) if j > i]
        near = np.unique(np.concatenate([*found, *edges]))
        gaps = np.diff(near)
        j = int(np.argmax(gaps))
        assert gaps[j] > 2e-8 * abs(value), "no safe gap near the quantile"
        return float((near[j] + near[j + 1]) / 2)


@pytest.fixture(scope="module")
def references() -> dict[int, Reference]:
    """Reference enumerations of the three seeded problems, shared by a test module."""
    return {seed: Reference(random_problem(seed)) for seed in (0, 1, 2)}


def large_problem(seed: int = 0, layers: int = 126, n: int = 30) -> Problem:
    """A Llama-70B-sized search space: `n` attention and `n` FFN variants per layer, scores that grow with speed."""
    rng = random.Random(seed)
    out = []
    for _ in range(layers):
        sensitivity = rng.uniform(0.2, 3.0)  # some layers matter more than others
        attention = [Option(name="parent", score=0.0, decode_time_s=40e-6, prefill_time_s=2e-3,
                            param_bytes=2 * 8192 * 10240, kv_bytes_per_token=2 * 2 * 8 * 128, has_attention=True)]
        for j in range(1, n - 2):
            speed = rng.uniform(0.0, 1.0)
            kv_heads = rng.choice([8, 4, 2, 1])
            attention.append(Option(
                name=f"attn{j}", score=sensitivity * (1 - speed) ** 1.5 * rng.uniform(0.02, 0.4),
                decode_time_s=40e-6 * (0.2 + 0.8 * speed), prefill_time_s=2e-3 * (0.2 + 0.8 * speed),
                param_bytes=2 * 8192 * (8192 + 2 * 128 * kv_heads), kv_bytes_per_token=2 * 2 * kv_heads * 128,
                kv_window=rng.choice([None, None, 128, 1024, 4096]), has_attention=True))
        attention.append(Option(name="linear", score=sensitivity * rng.uniform(0.3, 1.0), decode_time_s=4e-6,
                                prefill_time_s=1e-4, param_bytes=2 * 8192 * 8192, has_attention=False))
        attention.append(Option(name="noop", score=sensitivity * rng.uniform(0.5, 1.5), decode_time_s=0.0,
                                prefill_time_s=0.0, param_bytes=0, has_attention=False))
        ffn = [Option(name="parent", score=0.0, decode_time_s=80e-6, prefill_time_s=5e-3,
                      param_bytes=2 * 3 * 8192 * 28672, has_attention=False)]
        for j in range(1, n):
            width = rng.uniform(0.05, 0.95) if j < n - 1 else 0.0
            ffn.append(Option(
                name=f"ffn{j}", score=sensitivity * ((1 - width) ** 2 * rng.uniform(0.1, 1.0) + 0.5 * (width == 0)),
                decode_time_s=80e-6 * width, prefill_time_s=5e-3 * width, param_bytes=int(2 * 3 * 8192 * 28672 * width),
                has_attention=False))
        out.append(LayerOptions(attention=tuple(attention), ffn=tuple(ffn)))
    return Problem(layers=tuple(out), fixed_decode_time_s=300e-6, fixed_prefill_time_s=20e-3,
                   fixed_param_bytes=2 * 2 * 128256 * 8192)


@pytest.fixture(scope="session")
def make_problem():
    """`random_problem` as a fixture, so test modules need not import conftest."""
    return random_problem


@pytest.fixture(scope="session")
def large():
    """The 126-layer x (30 + 30) option search space."""
    return large_problem()
