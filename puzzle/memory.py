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
