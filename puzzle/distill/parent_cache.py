"""Where BLD gets the parent's activations: recomputed per batch, computed once into shards on disk, or kept at
one layer boundary on disk (a parent read from its files).

Recomputing is the default and costs no disk: a worker runs the parent's forward once per batch up to the
deepest layer of its group. When several workers (or several groups of one worker) would each repeat that
forward, the disk cache computes it once: batch k of a split is written by worker k % world_size to
`progress/parent_activations/<key>/<split>-<k>.safetensors` (the embedding and every layer's attention
and FFN branch outputs, through a rename), and everyone reads it. A worker computes and writes any shard it
needs that is not there yet, so a slow or killed worker delays nobody. The hidden states are rebuilt from
the branches with the same additions as `run_layers`, so training on the cache gives the same tensors as
training on the recomputed activations.

A parent read layer by layer from its files (`parent_memory_gb`) makes every forward re-read the layers it runs.
The shards are then produced layer-major (each layer read once per chunk of batches), and when they would not fit
`bld.activation_cache_gb` the worker keeps only the hidden state at one layer boundary for every batch
(`BoundaryActivations`): its groups go in layer order, the boundary moves down to each group's first layer over
all batches at once, and a step runs only the group's own layers, held resident. Disk: two boundaries.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from puzzle.distill.activations import LayerIO, embed, layer_weights, run_layers, run_many
from puzzle.files import atomic_path, write_json_atomic
from puzzle.memory import free_bytes
from puzzle.progress import track

HOST_STATE_FRACTION = 0.25  # of the host's available memory: the most a chunk of batches' activations may take


class RecomputedActivations:
    """The parent's forward on every request, stopping after the deepest layer asked for."""

    def __init__(self, parent):
        self.parent = parent

    def holding(self, layers: list[int]):
        return nullcontext()

    def layer_io(self, split: str, index: int, batch: torch.Tensor, layers: list[int]) -> dict[int, LayerIO]:
        _, io = run_layers(self.parent, batch, stop=max(layers) + 1, capture=set(layers))
        return io


class DiskActivations:
    """Shards of the parent's activations for layers 0..depth-1, one file per batch, shared by workers."""

    def __init__(self, parent, root: Path, depth: int):
        self.parent, self.root, self.depth = parent, root, depth

    def path(self, split: str, index: int) -> Path:
        return self.root / f"{split}-{index:06d}.safetensors"

    def holding(self, layers: list[int]):
        return nullcontext()

    def layer_io(self, split: str, index: int, batch: torch.Tensor, layers: list[int]) -> dict[int, LayerIO]:
        path = self.path(split, index)
        tensors = self._read(path, max(layers)) if path.exists() else self._compute(path, batch)
        return _rebuild(tensors, set(layers))

    def _read(self, path: Path, last: int) -> dict[str, torch.Tensor]:
        """Only what layers 0..last need: a worker of the first layers reads the first part of each shard."""
        wanted = {"x0"} | {f"{kind}.{i}" for kind in ("attn", "ffn") for i in range(last + 1)}
        with safe_open(path, framework="pt", device=str(self.parent.device)) as f:
            return {k: f.get_tensor(k) for k in f.keys() if k in wanted}

    @torch.no_grad()
    def produce(self, batches: Iterable[tuple[str, int, torch.Tensor]], on_batch: Callable[[], None] = lambda: None) -> None:
        """Write the shards of these batches that are not on disk yet; for a parent read from its files, in
        chunks of batches run layer by layer (each layer read once per chunk, not once per batch)."""
        todo = []
        for split, index, batch in batches:
            if self.path(split, index).exists():
                on_batch()
            else:
                todo.append((split, index, batch))
        if not getattr(self.parent, "offloaded_layers", 0):
            for split, index, batch in todo:
                self._compute(self.path(split, index), batch)
                on_batch()
            return
        per_batch = shard_bytes(self.parent, todo[0][2].numel(), self.depth) if todo else 1
        size = max(1, int(HOST_STATE_FRACTION * free_bytes("cpu")) // per_batch)
        for first in range(0, len(todo), size):
            chunk = todo[first:first + size]
            shards = [{"x0": embed(self.parent, b).cpu()} for _, _, b in chunk]

            def keep(i: int, ios: list[LayerIO]) -> None:
                for shard, io in zip(shards, ios):
                    for kind, t in (("attn", io.attn), ("ffn", io.ffn)):
                        if t is not None:
                            shard[f"{kind}.{i}"] = t.cpu()
            run_many(self.parent, [sh["x0"] for sh in shards], start=0, stop=self.depth, store=torch.device("cpu"),
                     capture=range(self.depth), on_layer=keep)
            for (split, index, _), shard in zip(chunk, shards):
                with atomic_path(self.path(split, index)) as tmp:
                    save_file({k: v.contiguous() for k, v in shard.items()}, tmp)
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


class BoundaryActivations:
    """The parent's hidden state entering one layer, for every BLD batch, in files under `root`; moved down layer
    by layer as the worker's groups (in layer order) need it. For a parent read from its files: each step of a
    group runs only the group's own layers (held resident while it trains) from the boundary at its first layer."""

    def __init__(self, parent, root: Path, batches: list[tuple[str, int, torch.Tensor]]):
        self.parent, self.root = parent, root
        self.batches = {(split, index): batch for split, index, batch in batches}

    def folder(self, layer: int) -> Path:
        return self.root / f"L{layer:04d}"

    def _complete(self, layer: int) -> bool:
        return (self.folder(layer) / "complete.json").exists()

    def _state(self, layer: int, split: str, index: int) -> torch.Tensor:
        """Batch (split, index)'s hidden state entering `layer` (layer 0: the embedding, not stored)."""
        if layer == 0:
            return embed(self.parent, self.batches[(split, index)].to(self.parent.device))
        with safe_open(self.folder(layer) / f"{split}-{index:06d}.safetensors", framework="pt", device=str(self.parent.device)) as f:
            return f.get_tensor("x")

    @torch.no_grad()
    def advance(self, layer: int) -> None:
        """Make the boundary at `layer` complete on disk: from the deepest complete one above it (or the embedding),
        layer by layer over chunks of batches; the boundaries above `layer` are deleted after."""
        done = [int(p.name[1:]) for p in self.root.glob("L*") if p.name[1:].isdigit() and self._complete(int(p.name[1:]))]
        start = max((d for d in done if d <= layer), default=0)
        if start < layer:
            folder = self.folder(layer)
            folder.mkdir(parents=True, exist_ok=True)
            todo = [key for key in self.batches if not (folder / f"{key[0]}-{key[1]:06d}.safetensors").exists()]
            per_batch = next(iter(self.batches.values())).numel() * self.parent.config.hidden_size * self.parent.dtype.itemsize
            size = max(1, int(HOST_STATE_FRACTION * free_bytes("cpu")) // per_batch)
            with track(f"parent boundary L{start} -> L{layer}", len(todo)) as bar:
                for first in range(0, len(todo), size):
                    chunk = todo[first:first + size]
                    states = run_many(self.parent, [self._state(start, *key).cpu() for key in chunk], start=start,
                                      stop=layer, store=torch.device("cpu"))
                    for (split, index), x in zip(chunk, states):
                        with atomic_path(folder / f"{split}-{index:06d}.safetensors") as tmp:
                            save_file({"x": x.contiguous()}, tmp)
                    bar.advance(len(chunk))
            write_json_atomic(folder / "complete.json", {"layer": layer, "batches": len(self.batches)})
        for d in done:  # only ever deeper from here: this worker's groups come in layer order
            if d < layer:
                shutil.rmtree(self.folder(d), ignore_errors=True)

    @contextmanager
    def holding(self, layers: list[int]) -> Iterator[None]:
        """While a group of these layers trains: the boundary at its first layer, its layers resident."""
        self.advance(layers[0])
        with ExitStack() as stack:
            for i in range(layers[0], layers[-1] + 1):
                stack.enter_context(layer_weights(self.parent.model.layers[i]))
            yield

    def layer_io(self, split: str, index: int, batch: torch.Tensor, layers: list[int]) -> dict[int, LayerIO]:
        x = self._state(layers[0], split, index)
        _, io = run_layers(self.parent, hidden=x, start=layers[0], stop=max(layers) + 1, capture=set(layers))
        return io

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def boundary_bytes(parent, batch_tokens: int, batches: int) -> int:
    """Disk of the boundary cache: two boundaries (the one read and the next one written) of every batch."""
    return 2 * batches * batch_tokens * parent.config.hidden_size * parent.dtype.itemsize


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
