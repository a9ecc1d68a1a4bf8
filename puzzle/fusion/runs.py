"""Which FFNs can be fused: attention-free runs, their groups, the fused architecture and its decode cost."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from puzzle.arch import Architecture, FFNConfig

# ----------------------------------------------------------------------------------------------------------
# Runs, groups and the fused architecture (pure functions of the description)


def find_runs(arch: Architecture) -> list[tuple[int, ...]]:
    """Maximal chains of >= 2 dense FFNs with no attention between them, as their layer indices.

    Any attention (softmax, linear or a Mamba mixer), a linear or mixture-of-experts FFN, or an FFN of the other
    kind (with or without a gate: they cannot share one fused FFN) ends a chain; a layer whose attention and FFN
    are both no-op is the identity and does not.
    """
    runs, chain = [], []
    for i, block in enumerate(arch.blocks):
        other_kind = chain and block.ffn.is_dense and block.ffn.gated != arch.blocks[chain[-1]].ffn.gated
        if not block.attention.no_op or block.ffn.replace_with_linear or block.ffn.moe is not None or other_kind:
            runs.append(chain)
            chain = []
        if block.ffn.is_dense:
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
        arch = arch.with_block(group[0], ffn=FFNConfig(intermediate_size=width, gated=arch.blocks[group[0]].ffn.gated))
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


