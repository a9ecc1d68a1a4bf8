"""Free memory of a device, and how much of it the parent's weights may take.

The stages that run the parent (library calibration, BLD, scoring, report) hold as many of its layers on the
device as `parent_budget` allows (`parent_memory_gb`, default half the free memory) and leave the rest in the
parent's safetensors files, read in per forward (`checkpoint.load_model(max_bytes=...)`), so a parent larger than
the device still runs, slower, in bounded memory; the log says the sizes. `realize` streams the parent tensor by
tensor (`puzzle.weights`) and holds none of it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

from puzzle.errors import ConfigError


def free_bytes(device: torch.device | str) -> int:
    """Bytes free on `device`: CUDA's free memory, or the host's available memory for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):  # not Linux: the physical memory, as the best available bound
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


PARENT_MEMORY_FRACTION = 0.5  # of the free memory, when parent_memory_gb is unset: the rest is for activations and units


def parent_budget(parent_memory_gb: float | None, device: torch.device | str) -> int:
    """Bytes the parent's weights may take on `device`."""
    if parent_memory_gb is not None:
        if not parent_memory_gb > 0:
            raise ConfigError(f"parent_memory_gb must be positive, got {parent_memory_gb}")
        return int(parent_memory_gb * 2**30)
    return int(PARENT_MEMORY_FRACTION * free_bytes(device))


_LIBC = None


def return_freed_memory() -> None:
    """Give the heap memory freed since the last call back to the OS (glibc's malloc_trim; a no-op elsewhere).

    A parent read layer by layer allocates and frees a layer's tensors over and over; glibc keeps such freed chunks
    in its heap (they are below its mmap threshold once it has adapted), and the process would grow by several
    layers' worth of fragments over a run."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def load_within_budget(path, memory_gb: float | None, setting: str, *, what: str, dtype: torch.dtype | None,
                       device: torch.device | str):
    """The model of folder `path` (gradients off) with its weights in `parent_budget(memory_gb, device)`: whole
    when it fits, else its first layers held and the others read from its files per forward; the log says its
    size, the budget and the `setting` that sets it. `dtype=None` keeps the stored dtype."""
    from puzzle.checkpoint import load_architecture, load_model, read_config
    from puzzle.progress import log

    stored = read_config(path).get("dtype") or read_config(path).get("torch_dtype") or "float32"
    dtype_used = dtype or getattr(torch, str(stored).removeprefix("torch."), torch.float32)
    need = load_architecture(path).total_params() * dtype_used.itemsize
    budget = parent_budget(memory_gb, device)
    model = load_model(path, dtype=dtype, device=device, max_bytes=budget).requires_grad_(False)
    offloaded = getattr(model, "offloaded_layers", 0)  # a gpt-oss folder is converted, so held, whole
    kept = model.config.num_hidden_layers - offloaded
    held = f"layers 0-{kept - 1} held" if kept else "no layer held"
    log(f"{what}: {need / 2**30:.2f} GiB ({str(dtype_used).removeprefix('torch.')}) on {device}, budget "
        f"{budget / 2**30:.2f} GiB" + (f": {held}, the other {offloaded} read from {path} per forward ({setting})"
                                        if offloaded else ""))
    return model


def shard_bytes_within(memory_gb: float | None, device: torch.device | str) -> int:
    """Shard size of a checkpoint a stage writes and then reads back within `parent_budget(memory_gb, device)`:
    loading a layer maps its whole shard, so no shard is larger than the budget (nor than transformers' 5 GB)."""
    from puzzle.weights import SHARD_BYTES

    return min(SHARD_BYTES, parent_budget(memory_gb, device))
