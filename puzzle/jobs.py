"""Work units shared by any number of workers through the run directory: sharding and launchers.

A worker learns its share from the environment, as torchrun, accelerate and Slurm set it:
`RANK`/`WORLD_SIZE` (torchrun, accelerate), else `SLURM_ARRAY_TASK_ID`/`SLURM_ARRAY_TASK_COUNT` (a Slurm
array), else `SLURM_PROCID`/`SLURM_NTASKS`, else rank 0 of 1; `LOCAL_RANK` picks the GPU. Units are split
into contiguous, cost-balanced slices in layer order, so workers never share a unit and need no
coordination beyond the files each writes atomically. Launchers start the same `--worker` command N times
locally, under torchrun, or as a Slurm array.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import torch

from puzzle import progress
from puzzle.config import check_int
from puzzle.errors import ConfigError, PuzzleError, StageError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"worker rank {self.rank} is outside world size {self.world_size}")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def shard_from_env() -> Shard:
    """This process's place among the workers, from torchrun / accelerate / Slurm variables."""
    local = _env_int("LOCAL_RANK") or 0
    for rank_var, size_var in (("RANK", "WORLD_SIZE"), ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
                               ("SLURM_PROCID", "SLURM_NTASKS")):
        rank, size = _env_int(rank_var), _env_int(size_var)
        if rank is not None and size is not None:
            if rank_var == "SLURM_ARRAY_TASK_ID":
                rank -= _env_int("SLURM_ARRAY_TASK_MIN") or 0  # arrays need not start at 0
            return Shard(rank=rank, world_size=size, local_rank=local)
    return Shard()


def device_for(shard: Shard, requested: str = "auto") -> torch.device:
    """cuda:LOCAL_RANK when a GPU is available (or asked for), else CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r} asked for but CUDA is not available; use --device cpu")
    return torch.device("cuda", shard.local_rank % torch.cuda.device_count())


def split_contiguous(items: Sequence[T], cost: Callable[[T], float], parts: int,
                     reach: Callable[[T], float] | None = None) -> list[list[T]]:
    """Cut `items` (kept in order) into `parts` contiguous slices with the smallest largest slice cost.

    A slice costs the sum of its items' `cost` plus, once, the `reach` of its last item: what a worker pays
    to get that far (for BLD: the parent's forward up to the deepest layer it trains), non-decreasing
    along `items`. Found by bisection on the largest cost, each probe filling slices greedily.
    """
    costs = [max(cost(item), 1e-9) for item in items]
    reaches = [reach(item) if reach else 0.0 for item in items]

    def pack(limit: float) -> list[list[int]]:
        slices, current, acc = [], [], 0.0
        for i, c in enumerate(costs):
            if current and acc + c + reaches[i] > limit:
                slices.append(current)
                current, acc = [], 0.0
            current.append(i)
            acc += c
        return slices + [current] if current else slices

    low = max((c + r for c, r in zip(costs, reaches)), default=0.0)
    high = sum(costs) + max(reaches, default=0.0)
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (low, mid) if len(pack(mid)) <= parts else (mid, high)
    slices = [[items[i] for i in s] for s in pack(high)]
    return slices + [[] for _ in range(parts - len(slices))]


def my_share(items: Sequence[T], cost: Callable[[T], float], shard: Shard,
             reach: Callable[[T], float] | None = None) -> list[T]:
    return split_contiguous(items, cost, shard.world_size, reach)[shard.rank]


# ----------------------------------------------------------------------------------------------------------
# Launchers


def worker_env(rank: int, world_size: int, threads: int, cpus: Sequence[int] = ()) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS=str(threads),
               PUZZLE_NUM_THREADS=str(threads))
    if cpus:
        env["PUZZLE_CPUS"] = ",".join(map(str, cpus))
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(name, None)
    return env


def worker_cpus(rank: int, workers: int, threads: int) -> list[int]:
    """The cores a local worker is bound to: its own `threads` cores when every worker can have its own, else
    none (no binding). Bound workers do not migrate between cores and lose their caches (measured on a
    2-core VM: two unbound single-threaded workers ran ~15 % slower side by side than alone)."""
    if not hasattr(os, "sched_getaffinity"):
        return []
    cores = sorted(os.sched_getaffinity(0))
    if workers < 2 or workers * threads > len(cores):
        return []
    return cores[rank * threads:(rank + 1) * threads]


def _can_fork(threads: int) -> bool:
    """Fork single-threaded workers from this process instead of starting fresh interpreters: it skips each
    worker's interpreter start and imports (~6 s of torch + transformers on 2 cores). Only single-threaded:
    once this process has used OpenMP, a forked child hangs in its first parallel region with more than one
    thread (measured with torch 2.13), as it does for DataLoader workers; and only before CUDA starts."""
    cuda_started = "torch" in sys.modules and torch.cuda.is_initialized()
    return (threads == 1 and sys.platform == "linux" and not cuda_started
            and os.environ.get("PUZZLE_NO_FORK", "") in ("", "0"))


def _run_entry(entry: Callable[[], None]) -> int:
    """A forked worker's body: run `entry`; a user error is one line in the log and its exit code."""
    try:
        entry()
    except PuzzleError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


class _Worker:
    """One local worker: a forked copy of this process calling `entry`, or a fresh `python -m puzzle <argv>`."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, entry: Callable[[], None] | None):
        self.log = open(log_path, "w")
        self.pid, self.popen, self.returncode = None, None, None
        if entry is None:
            self.popen = subprocess.Popen([sys.executable, "-m", "puzzle", *argv], env=env, stdout=self.log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
            self.pid = self.popen.pid
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker: never returns
            code = 1
            try:
                os.setsid()
                os.dup2(self.log.fileno(), 1)
                os.dup2(self.log.fileno(), 2)
                # the launcher's sys.stdout may not be fd 1 (pytest, notebooks): write to the log whatever it was
                sys.stdout = open(1, "w", buffering=1, closefd=False)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                os.environ.clear()
                os.environ.update(env)

                progress.reset_consoles()
                code = _run_entry(entry)
            except BaseException:  # noqa: BLE001 - the log is the only place left to say why
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.pid = pid

    def poll(self) -> int | None:
        if self.returncode is None:
            if self.popen is not None:
                self.returncode = self.popen.poll()
            else:
                done, status = os.waitpid(self.pid, os.WNOHANG)
                if done:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def stop(self) -> None:
        if self.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:  # a forked worker that has not called setsid yet
                os.kill(self.pid, signal.SIGTERM)
            while self.poll() is None:
                time.sleep(0.05)
        self.log.close()


class LocalWorkers:
    """`workers` local processes with RANK/WORLD_SIZE, each with its share of the CPU threads and, when there are
    enough, bound to its own cores: forks of this process calling `entry` where forking is safe, else fresh
    `python -m puzzle <argv>` processes (the same work). Start them before any progress display (its refresh
    thread must not be running when a worker is forked); leaving the `with` block stops any still running.
    """

    def __init__(self, argv: list[str], workers: int, log_dir: Path, threads_per_worker: int | None = None,
                 entry: Callable[[], None] | None = None):
        self.argv, self.workers, self.log_dir, self.entry = argv, workers, log_dir, entry
        self.threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
        self.procs: list[_Worker] = []

    def __enter__(self) -> LocalWorkers:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        entry = self.entry if _can_fork(self.threads) else None
        for rank in range(self.workers):
            env = worker_env(rank, self.workers, self.threads, worker_cpus(rank, self.workers, self.threads))
            self.procs.append(_Worker(self.argv, env, self.log_dir / f"rank{rank}.log", entry))
        return self

    def __exit__(self, *exc) -> None:
        for worker in self.procs:
            worker.stop()

    def wait(self, poll: Callable[[], None] | None = None) -> None:
        """Until all exit; `poll` is called about twice a second. A failed worker stops the wait with an error
        naming its log file (the others are stopped on leaving the `with` block)."""
        while any(w.poll() is None for w in self.procs):
            self._check()
            if poll:
                poll()
            time.sleep(0.5)
        if poll:
            poll()
        self._check()

    def _check(self) -> None:
        for rank, worker in enumerate(self.procs):
            if worker.poll() not in (None, 0):
                raise StageError(f"worker {rank} failed (exit {worker.returncode}); see {self.log_dir / f'rank{rank}.log'}")


def torchrun_command(argv: list[str], nproc_per_node: int) -> list[str]:
    return ["torchrun", f"--nproc-per-node={nproc_per_node}", "-m", "puzzle", *argv]


@dataclass(frozen=True, kw_only=True)
class SlurmConfig:
    """Resources of each task of the search's Slurm jobs (--launcher slurm; puzzle/slurm.py)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "24:00:00"  # per task; a task that runs out is requeued and resumes (max_requeue times)
    cpus_per_task: int = 8
    gpus_per_task: int = 0
    mem: str | None = None
    array_parallelism: int | None = None  # at most this many array tasks at once
    extra_args: tuple[str, ...] = ()  # further sbatch options, e.g. ("--constraint=h100", "--exclusive")
    setup: tuple[str, ...] = ()  # shell lines run before each task, e.g. ("module load cuda/12.4",)
    max_requeue: int = 3  # requeues after a time-out or preemption
    executor: Literal["slurm", "local"] = "slurm"  # local: the same jobs as local processes (no cluster)
    # The distill job (a `gkd:` section) is one job of nodes x distill_tasks_per_node processes, the ranks of one
    # torch.distributed run (DDP, or FSDP2 with gkd.fsdp); each task has gpus_per_task GPUs and its rank uses
    # cuda:LOCAL_RANK, so on a GPU cluster set gpus_per_task: 1 and distill_tasks_per_node to a node's GPUs.
    # Only the distill job spans nodes: every other task is one process on one node, and the bld and score
    # arrays spread over the cluster's nodes task by task.
    nodes: int = 1
    distill_tasks_per_node: int = 1

    def __post_init__(self) -> None:
        for name in ("cpus_per_task", "nodes", "distill_tasks_per_node"):
            check_int(f"slurm.{name}", getattr(self, name))
        for name in ("gpus_per_task", "max_requeue"):
            check_int(f"slurm.{name}", getattr(self, name), minimum=0)
        check_int("slurm.array_parallelism", self.array_parallelism, optional=True)
        if self.executor == "local" and self.nodes > 1:
            raise ConfigError(f"slurm.nodes is {self.nodes} but slurm.executor: local runs on this machine only; "
                              "set slurm.nodes: 1 or slurm.executor: slurm")


def set_threads_from_env() -> None:
    """A worker started by a launcher uses only its share of the CPU threads (and cores, when bound)."""
    threads = _env_int("PUZZLE_NUM_THREADS")
    if threads:
        torch.set_num_threads(threads)
    cpus = os.environ.get("PUZZLE_CPUS", "")
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, [int(c) for c in cpus.split(",")])
