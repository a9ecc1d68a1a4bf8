"""Where BLD gets the parent's activations: recomputed per batch, or computed once into shards on disk.

Recomputing is the default and costs no disk: a worker runs the parent's forward once per batch up to the
deepest layer of its group. When several workers (or several groups of one worker) would each repeat that
forward, the disk cache computes it once: batch k of a split is written by worker k % world_size to
`progress/parent_activations/<key>/<split>-<k>.safetensors` (the embedding and every layer's attention
and FFN branch outputs, through a rename), and everyone reads it. A worker computes and writes any shard it
needs that is not there yet, so a slow or killed worker delays nobody. The hidden states are rebuilt from
the branches with the same additions as `run_layers`, so training on the cache gives the same tensors as
training on the recomputed activations.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from puzzle.distill.activations import LayerIO, run_layers
from puzzle.files import atomic_path


class RecomputedActivations:
    """The parent's forward on every request, stopping after the deepest layer asked for."""

    def __init__(self, parent):
        self.parent = parent

    def layer_io(self, split: str, index: int, batch: torch.Tensor, layers: list[int]) -> dict[int, LayerIO]:
        _, io = run_layers(self.parent, batch, stop=max(layers) + 1, capture=set(layers))
        return io


class DiskActivations:
    """Shards of the parent's activations for layers 0..depth-1, one file per batch, shared by workers."""

    def __init__(self, parent, root: Path, depth: int):
        self.parent, self.root, self.depth = parent, root, depth

    def path(self, split: str, index: int) -> Path:
        return self.root / f"{split}-{index:06d}.safetensors"

    def layer_io(self, split: str, index: int, batch: torch.Tensor, layers: list[int]) -> dict[int, LayerIO]:
        path = self.path(split, index)
        tensors = self._read(path, max(layers)) if path.exists() else self._compute(path, batch)
        return _rebuild(tensors, set(layers))

    def _read(self, path: Path, last: int) -> dict[str, torch.Tensor]:
        """Only what layers 0..last need: a worker of the first layers reads the first part of each shard."""
        wanted = {"x0"} | {f"{kind}.{i}" for kind in ("attn", "ffn") for i in range(last + 1)}
        with safe_open(path, framework="pt", device=str(self.parent.device)) as f:
            return {k: f.get_tensor(k) for k in f.keys() if k in wanted}

    def produce(self, batches: Iterable[tuple[str, int, torch.Tensor]], on_batch: Callable[[], None] = lambda: None) -> None:
        """Write the shards of these batches that are not on disk yet."""
        for split, index, batch in batches:
            path = self.path(split, index)
            if not path.exists():
                self._compute(path, batch)
            on_batch()

    @torch.no_grad()
    def _compute(self, path: Path, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        _, io = run_layers(self.parent, batch, stop=self.depth, capture=range(self.depth))
        tensors = {"x0": io[0].x}  # the embedding
        for i, layer in io.items():
            if layer.attn is not None:
                tensors[f"attn.{i}"] = layer.attn
            if layer.ffn is not None:
                tensors[f"ffn.{i}"] = layer.ffn
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        with atomic_path(path) as tmp:
            save_file({k: v.cpu() for k, v in tensors.items()}, tmp)
        return tensors


def _rebuild(tensors: dict[str, torch.Tensor], capture: set[int]) -> dict[int, LayerIO]:
    """The LayerIO of each captured layer, with the hidden states summed as `run_layers` sums them."""
    x, out = tensors["x0"], {}
    for i in range(max(capture) + 1):
        attn, ffn = tensors.get(f"attn.{i}"), tensors.get(f"ffn.{i}")
        h = x if attn is None else x + attn
        io = LayerIO(x=x, attn=attn, h=h, ffn=ffn)
        if i in capture:
            out[i] = io
        x = io.y
    return out


def shard_bytes(parent, batch_tokens: int, depth: int) -> int:
    """Bytes of one batch's shard: the embedding plus each layer's non-empty branches."""
    layers = parent.model.layers[:depth]
    branches = 1 + sum((layer.self_attn is not None) + (layer.mlp is not None) for layer in layers)
    return branches * batch_tokens * parent.config.hidden_size * parent.dtype.itemsize


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
