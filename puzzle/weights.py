"""A checkpoint's tensors one at a time: lazy reads from its safetensors shards, sharded writes of a new one.

Parents of 70B and more do not fit one device, or one host's memory, whole. `LazyWeights` reads a tensor from its
shard only when asked for (the file is mapped only for that read), and `ShardedWriter` writes a new checkpoint's
tensors as they come, holding at most one shard in memory, into the layout transformers writes
(`model.safetensors`, or `model-0000k-of-0000N.safetensors` + `model.safetensors.index.json`).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from puzzle.arch import BUFFER_SUFFIXES
from puzzle.checkpoint import SAFETENSORS_INDEX, SPLIT_FAMILIES, read_config, renamed, weight_files, weight_renames
from puzzle.errors import InputError

SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")


class LazyWeights(Mapping[str, torch.Tensor]):
    """The tensors of a model folder by their DeciLM names, each read from its shard when asked for."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if read_config(self.path).get("model_type") in SPLIT_FAMILIES:  # fused experts: `puzzle convert` splits them
            raise InputError(f"{self.path}: gpt-oss's fused expert tensors are read whole; convert the parent first "
                             "(`puzzle convert`), then read the converted folder")
        renames = weight_renames(self.path)
        self._where = {renamed(key, renames): (file, key) for file, keys in weight_files(self.path).items() for key in keys}

    def __getitem__(self, name: str) -> torch.Tensor:
        file, key = self._where[name]
        with safe_open(self.path / file, framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def nbytes(self) -> int:
        """Bytes of all tensors as stored (from the shard headers; nothing is read)."""
        total = 0
        for file in {f for f, _ in self._where.values()}:
            with safe_open(self.path / file, framework="pt") as f:
                total += sum(_slice_bytes(f.get_slice(k)) for k in f.keys())
        return total


def _slice_bytes(view) -> int:
    numel = 1
    for d in view.get_shape():
        numel *= d
    return numel * _DTYPE_BYTES[view.get_dtype()]


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


class ShardedWriter:
    """Write tensors one at a time into shards of at most `max_shard_bytes` (a tensor larger than that gets a
    shard of its own); `close()` names the shards and writes the index. Write into a temporary folder (files.
    atomic_output_dir): a half-written checkpoint is never visible under its final name."""

    def __init__(self, folder: Path, max_shard_bytes: int = SHARD_BYTES):
        self.folder, self.max_shard_bytes = Path(folder), max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []  # tensor names of each written shard, in order
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in shard for shard in self._shards):
            raise ValueError(f"tensor {name} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        save_file(self._pending, self.folder / f".shard-{len(self._shards)}.safetensors", metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give every shard its final name and write the index; returns the file names."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for k, name in enumerate(names):
            os.replace(self.folder / f".shard-{k}.safetensors", self.folder / name)
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {t: names[k] for k, shard in enumerate(self._shards) for t in shard}}
            (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names


def write_tensors(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int = SHARD_BYTES
                  ) -> tuple[torch.dtype | None, int]:
    """Write (name, tensor) pairs as they come into `folder`'s shards; returns (the first floating tensor's dtype,
    the number of parameters written: buffers such as a router's correction bias not counted), what the config and
    the parameter check need."""
    writer, dtype, numel = ShardedWriter(folder, max_shard_bytes), None, 0
    for name, tensor in tensors:
        writer.add(name, tensor)
        numel += 0 if name.endswith(BUFFER_SUFFIXES) else tensor.numel()
        if dtype is None and tensor.is_floating_point():
            dtype = tensor.dtype
    writer.close()
    return dtype, numel


def write_model_config(folder: Path, config, architecture: str, dtype: torch.dtype | None,
                       generation_from: Path | None = None) -> None:
    """config.json and generation_config.json as `save_pretrained` writes them for a model of `config` in `dtype`:
    the generation config is `generation_from`'s when that folder has one (as a model loaded from it carries), else
    the one transformers derives from the config."""
    from transformers import GenerationConfig

    config = copy.deepcopy(config)
    config.dtype = str(dtype or torch.float32).removeprefix("torch.")
    config.architectures = [architecture]
    config.save_pretrained(folder)
    generation = None
    if generation_from is not None and (Path(generation_from) / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(generation_from)
    (generation or GenerationConfig.from_model_config(config)).save_pretrained(folder)


def checkpoint_tensors(path: Path) -> Mapping[str, torch.Tensor]:
    """A model folder's tensors by their DeciLM names for a stage that writes a new checkpoint from them: read one
    at a time (`LazyWeights`), except a gpt-oss folder's, whose fused expert tensors are split in memory with the
    model held whole (`puzzle convert` it first to stream it)."""
    if read_config(Path(path)).get("model_type") in SPLIT_FAMILIES:
        from puzzle.checkpoint import load_model

        return load_model(path, dtype=None).state_dict()
    return LazyWeights(path)
