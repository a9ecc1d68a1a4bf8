"""Free memory of a device, and the check a stage makes before it puts a whole model there.

Stages that need the whole parent on one device (library calibration, BLD, scoring, profiling's whole-model
timing, report) check it against the device's free memory first and say both numbers in the log; a parent that
does not fit is a one-line error, not an out-of-memory crash halfway through a stage. `realize` streams the parent
tensor by tensor (`puzzle.weights`) and needs no room for it.
"""

from __future__ import annotations

import os

import torch

from puzzle.errors import StageError
from puzzle.progress import log


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


def check_fits(what: str, need: int, device: torch.device | str, fix: str) -> None:
    """Log `what` needs `need` bytes on `device` and how much is free; a StageError naming `fix` if it does not fit."""
    free = free_bytes(device)
    log(f"{what}: {need / 2**30:.2f} GiB on {device} ({free / 2**30:.1f} GiB free)")
    if need > free:
        raise StageError(f"{what} needs {need / 2**30:.1f} GiB on {device}, which has {free / 2**30:.1f} GiB free; {fix}")
