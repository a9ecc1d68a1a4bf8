"""`--launcher slurm`: the search as a chain of Slurm jobs, submitted with submitit (docs/run-directory.md).

    prepare (1 task: convert, library) -> bld (array) -> score (array) -> finish (1 task: merge the scores,
    profile, solve, realize, fuse, prune, report)

With a `gkd:` section, global distillation gets a job of its own, the ranks of one torch.distributed run:

    ... -> score -> select (1 task: merge the scores, profile, solve, realize, fuse, prune)
        -> distill (slurm.nodes x slurm.distill_tasks_per_node tasks) -> report (1 task)

Each distill task is one process that submitit starts (srun under sbatch, a local process with the local
executor); `export_torch_distributed` turns submitit's view of the job (its tasks, nodes, first host) into
torch's env:// variables, which accelerate reads, so GKD runs its one DDP / FSDP2 path as under torchrun. No
torchrun inside the job: srun already starts one process per task on every node, and a submitit task that
is its own rank is requeued by submitit like every other task.

Each job starts when the one before ended well (`afterok`). Every task works from the run directory, so a task
that is preempted or runs out of time is requeued with the same arguments and continues (submitit's
Checkpointable), and submitting again after a failure redoes only what is missing. With `slurm.executor: local`
submitit runs the same tasks as local processes, one job after the other: the same code path without a cluster.
`RUN/jobs.json` lists the jobs; `puzzle status RUN` reads it with the stage records and the queue.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from puzzle.errors import ConfigError, StageError
from puzzle.files import read_json, write_json_atomic, write_text_atomic
from puzzle.jobs import SlurmConfig
from puzzle.run import RunPaths

JOBS_FILE = "jobs.json"
JOBS = ("prepare", "bld", "score", "finish", "select", "distill", "report")  # every job `run_task` runs


def chain(distill: bool) -> tuple[str, ...]:
    """The jobs of a search, in order; distillation (a `gkd:` section) has a job of its own, on its own GPUs."""
    if distill:
        return "prepare", "bld", "score", "select", "distill", "report"
    return "prepare", "bld", "score", "finish"


@dataclass(frozen=True)
class StageJob:
    stage: str
    job_id: str  # the array's id for an array job
    tasks: int  # array tasks
    logs: str  # folder of the tasks' logs ({job_id}_{task}_{rank}_log.out)
    ranks: int = 1  # processes of each task (the distill job's torch.distributed ranks)


def log_path(job: StageJob, task: int, rank: int = 0) -> Path:
    """Where submitit writes the output of rank `rank` of task `task` (stderr goes to the same file)."""
    name = f"{job.job_id}_{task}" if job.tasks > 1 else job.job_id
    return Path(job.logs) / f"{name}_{rank}_log.out"


try:  # submitit's Checkpointable: requeued with the same arguments on preemption or time-out
    from submitit.helpers import Checkpointable as _Requeueable
except ModuleNotFoundError:  # only `--launcher slurm` needs submitit
    _Requeueable = object  # type: ignore[assignment,misc]


class StageTask(_Requeueable):
    """One task of a stage job: `work(*args)` (pipeline.run_task). Requeued as it was on preemption or time-out:
    the work resumes from the run directory."""

    def __init__(self, work: Callable[..., Any]):
        self.work = work

    def __call__(self, *args: Any) -> Any:
        return self.work(*args)


def export_torch_distributed() -> int:
    """In a task of the distill job: export RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (the
    job's first host) and MASTER_PORT (drawn from the job id, the same in every task) from Slurm's or the local
    executor's variables, as torchrun would set them. Returns the rank. CUDA_VISIBLE_DEVICES is left as Slurm
    set it: a rank takes cuda:LOCAL_RANK of the GPUs it sees (accelerate's rule), which also holds where Slurm
    binds one GPU to each task."""
    from submitit.helpers import TorchDistributedEnvironment

    # overwrite: the job's own placement decides, not variables inherited from the shell that submitted it
    return TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True).rank


def _minutes(text: str) -> int:
    """Slurm's time formats ('45' minutes, 'MM:SS', 'HH:MM:SS', 'D-HH', 'D-HH:MM:SS') -> whole minutes."""
    days, _, rest = text.strip().rpartition("-")
    try:
        parts = [int(p) for p in rest.split(":")]
        d = int(days) if days else 0
    except ValueError:
        raise ConfigError(f"slurm.time {text!r}: write minutes, HH:MM:SS or D-HH:MM:SS") from None
    if days:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    else:
        hours, minutes, seconds = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}.get(len(parts), (None,) * 3)
        if hours is None:
            raise ConfigError(f"slurm.time {text!r}: write minutes, HH:MM:SS or D-HH:MM:SS")
    return d * 1440 + hours * 60 + minutes + (1 if seconds else 0)


def _extra(args: tuple[str, ...]) -> dict[str, Any]:
    """('--account=abc', '--exclusive') -> {'account': 'abc', 'exclusive': ''} for submitit."""
    out = {}
    for arg in args:
        key, _, value = arg.lstrip("-").partition("=")
        out[key.replace("-", "_")] = value
    return out


def ranks(cfg: SlurmConfig, stage: str) -> int:
    """Processes of each task of a stage job: the distill job's ranks over all its nodes, else one."""
    return cfg.nodes * cfg.distill_tasks_per_node if stage == "distill" else 1


def sbatch_options(cfg: SlurmConfig, stage: str) -> dict[str, Any]:
    """The sbatch options of one stage job's tasks (submitit's names), from the `slurm:` section."""
    threads = [f"export OMP_NUM_THREADS={cfg.cpus_per_task} PUZZLE_NUM_THREADS={cfg.cpus_per_task}"]
    per_node = cfg.distill_tasks_per_node if stage == "distill" else 1
    params: dict[str, Any] = dict(job_name=f"puzzle-{stage}", time=_minutes(cfg.time), cpus_per_task=cfg.cpus_per_task,
                                  ntasks_per_node=per_node, nodes=cfg.nodes if stage == "distill" else 1,
                                  stderr_to_stdout=True, setup=threads + list(cfg.setup),
                                  additional_parameters=_extra(cfg.extra_args))
    if cfg.gpus_per_task:  # per node, not --gpus-per-task: every rank sees the node's GPUs and takes cuda:LOCAL_RANK
        params["gpus_per_node"] = cfg.gpus_per_task * per_node
    for name in ("partition", "mem", "account", "qos", "array_parallelism"):
        if getattr(cfg, name) is not None:
            params[name] = getattr(cfg, name)
    return params


def executor(paths: RunPaths, cfg: SlurmConfig, stage: str):
    """A submitit executor for one stage job of this run (its logs in RUN/logs/slurm/)."""
    import submitit

    folder = paths.logs / "slurm"
    if cfg.executor == "local":
        options = sbatch_options(cfg, stage)
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=_minutes(cfg.time), setup=options["setup"],
                             tasks_per_node=options["ntasks_per_node"], gpus_per_node=options.get("gpus_per_node", 0))
        return ex
    if shutil.which("sbatch") is None:
        raise ConfigError("--launcher slurm: sbatch is not on PATH; run on a Slurm login node, or set "
                          "slurm.executor: local to run the same jobs as local processes")
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.max_requeue)
    ex.update_parameters(**sbatch_options(cfg, stage))
    return ex


def write_scripts(search, workers: int, parent: Path | None) -> Path:
    """--dry-run: the chain as sbatch scripts plus a submit.sh that submits them with the same dependencies,
    for clusters where jobs are submitted by hand. Each task runs `python -m puzzle run-task`. Returns submit.sh."""
    from submitit.slurm.slurm import _make_sbatch_string

    paths, cfg = search.paths, search.cfg.slurm
    jobs = chain(search.cfg.gkd is not None)
    folder = paths.root / "slurm-scripts"
    folder.mkdir(parents=True, exist_ok=True)
    (paths.logs / "slurm").mkdir(parents=True, exist_ok=True)  # Slurm does not create the folder of --output
    submit = ["#!/bin/bash", "# Submits the search's jobs, each after the one before ended well (puzzle search --dry-run).",
              "set -euo pipefail", 'cd "$(dirname "$0")"']
    previous = None
    for n, stage in enumerate(jobs, start=1):
        tasks = _tasks(stage, workers)
        rank = "${SLURM_ARRAY_TASK_ID}" if tasks > 1 else "0"
        command = " ".join([shlex.quote(sys.executable), "-m", "puzzle", "run-task", shlex.quote(str(paths.root.resolve())),
                            stage, "--rank", rank, "--world", str(tasks), "--score-world", str(workers)]
                           + (["--parent", shlex.quote(str(Path(parent).resolve()))] if parent and stage == "prepare" else []))
        options = sbatch_options(cfg, stage)
        # srun starts the command once per task (the distill job's ranks); the script keeps submitit's
        # `export SUBMITIT_EXECUTOR=slurm`, by which each rank reads its place from Slurm's variables
        text = _make_sbatch_string(command=command, folder=paths.logs / "slurm", map_count=tasks if tasks > 1 else None,
                                   **options)
        script = folder / f"{n}-{stage}.sbatch"
        write_text_atomic(script, text.rstrip("\n") + "\n")
        after = f' --dependency=afterok:"${previous}" --kill-on-invalid-dep=yes' if previous else ""
        submit.append(f'{stage}=$(sbatch --parsable{after} {script.name} | cut -d";" -f1)')
        previous = stage
    submit.append('echo "submitted: ' + ", ".join(f"{s} ${s}" for s in jobs) + '"')
    path = folder / "submit.sh"
    write_text_atomic(path, "\n".join(submit) + "\n")
    path.chmod(0o755)
    return path


def _tasks(stage: str, workers: int) -> int:
    return workers if stage in ("bld", "score") else 1


def _submit(ex, work: Callable[..., Any], paths: RunPaths, stage: str, tasks: int, parent: Path | None,
            score_world: int, processes: int = 1) -> tuple[StageJob, list]:
    """One stage job of `tasks` tasks (an array when more than one), task k running
    `work(run, stage, k, tasks, parent, score_world)` in each of its `processes` (the executor's tasks per
    node and nodes say where). Returns the job and submitit's per-task handles."""
    calls = [(str(paths.root), stage, k, tasks, str(parent) if parent and stage == "prepare" else None, score_world)
             for k in range(tasks)]
    if tasks > 1:
        submitted = ex.map_array(StageTask(work), *zip(*calls))
    else:
        submitted = [ex.submit(StageTask(work), *calls[0])]
    job_id = str(submitted[0].job_id).split("_")[0]
    return StageJob(stage=stage, job_id=job_id, tasks=tasks, logs=str(paths.logs / "slurm"), ranks=processes), submitted


def submit_search(search, work: Callable[..., Any], workers: int, parent: Path | None, wait: bool,
                  stage_done: Callable[[], dict[str, bool]], progress: Callable[[str], None] | None = None) -> list[StageJob]:
    """Submit the chain for this run, each task running `work(run, stage, rank, world, parent, score_world)`;
    returns its jobs (written to RUN/jobs.json). A local executor always waits, each job before the next."""
    cfg, paths = search.cfg.slurm, search.paths
    local = cfg.executor == "local"
    if search.cfg.gkd is None and (cfg.nodes > 1 or cfg.distill_tasks_per_node > 1):
        from puzzle.progress import log

        log(f"[yellow]slurm[/]: nodes {cfg.nodes} x distill_tasks_per_node {cfg.distill_tasks_per_node} size the distill "
            "job, and this search has no `gkd:` section: every job runs as one process on one node")
    jobs: list[StageJob] = []
    for stage in chain(search.cfg.gkd is not None):
        ex = executor(paths, cfg, stage)
        if jobs and not local:  # and cancelled by Slurm when the job before failed, not left pending forever
            ex.update_parameters(dependency=f"afterok:{jobs[-1].job_id}",
                                 additional_parameters={**_extra(cfg.extra_args), "kill_on_invalid_dep": "yes"})
        job, submitted = _submit(ex, work, paths, stage, _tasks(stage, workers), parent, workers, ranks(cfg, stage))
        jobs.append(job)
        write_json_atomic(paths.root / JOBS_FILE, {"version": 1, "executor": cfg.executor, "submitted": time.time(),
                                                  "jobs": [asdict(j) for j in jobs]})
        if progress:
            progress(f"{stage}: job {job.job_id} ({describe(job)})")
        if local:  # no dependencies without Slurm: each job ends before the next starts
            _wait_local(job, submitted)
    if wait and not local:
        wait_for(paths.root, jobs, stage_done)
    return jobs


def bld_array(search, work: Callable[..., Any], workers: int, poll: Callable[[], None]) -> StageJob:
    """BLD alone as one array of `workers` tasks (`puzzle bld --launcher slurm`); waits for it to end."""
    job, submitted = _submit(executor(search.paths, search.cfg.slurm, "bld"), work, search.paths, "bld", workers,
                             None, workers)
    if search.cfg.slurm.executor == "local":
        try:
            _wait_local(job, submitted)
        except StageError:
            pass  # the caller names the missing units and the failed tasks
        return job
    while queue_states([job.job_id]):
        poll()
        time.sleep(2)
    return job


def describe(job: StageJob) -> str:
    """'2 tasks' for an array, '4 ranks' for the distill job, '1 task' otherwise."""
    count, unit = (job.ranks, "rank") if job.ranks > 1 else (job.tasks, "task")
    return f"{count} {unit}{'s' if count > 1 else ''}"


def _wait_local(job: StageJob, submitted) -> None:
    for task, j in enumerate(submitted):
        try:
            j.results()  # every process of the task
        except Exception:  # submitit's FailedJobError: the task's own error is the last one in its stderr log
            for rank in range(job.ranks):
                paths = j.task(rank).paths
                if error := last_error(paths.stderr) or last_error(paths.stdout):
                    raise StageError(f"{job.stage} {_name(job, task, rank)} failed: {error} (log: {paths.stderr})") from None
            raise StageError(f"{job.stage} task {task} failed: see its log (log: {j.paths.stderr})") from None


def _name(job: StageJob, task: int, rank: int) -> str:
    return f"rank {rank}" if job.ranks > 1 else f"task {task}"


def last_error(log: Path) -> str | None:
    """The last error line of a task's log (a Python error, puzzle's one-line error, Slurm's cancel or time-out
    notice), or None."""
    if not log.exists():
        return None
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"error|cancelled|due to time limit", line, re.IGNORECASE)
              and "submitit" not in line.lower() and not line.startswith("raise ")]
    return re.sub(r"^puzzle\.errors\.\w+: ", "", errors[-1])[:300] if errors else None  # our errors read as in the CLI


def queue_states(job_ids: list[str]) -> dict[str, str]:
    """{job id or array task id: state} of these jobs while Slurm still lists them (empty without squeue)."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    out = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i %T"], capture_output=True, text=True)
    if out.returncode != 0:
        return {}
    return dict(line.split(None, 1) for line in out.stdout.splitlines() if line.strip())


def wait_for(run: Path, jobs: list[StageJob], stage_done: Callable[[], dict[str, bool]], poll_s: float = 2.0) -> None:
    """Block until the chain has left the queue, showing its state; a failed task is then an error."""
    from puzzle.progress import log

    shown = None
    while states := queue_states([j.job_id for j in jobs]):
        line = ", ".join(f"{j.stage} {summary}" for j in jobs if (summary := queue_summary(j, states)))
        if line != shown:
            log(f"slurm: {line}")
            shown = line
        time.sleep(poll_s)
    problems = failed_tasks(jobs, stage_done())
    if problems:
        raise StageError("; ".join(problems) + f"; fix the cause and submit again (`puzzle status {run}`)")


def queue_summary(job: StageJob, states: dict[str, str]) -> str:
    """'2 running 1 pending' for this job's tasks Slurm still lists ('' when none)."""
    mine = [s for k, s in states.items() if k == job.job_id or k.startswith(job.job_id + "_")]
    if not mine:
        return ""
    counts: dict[str, int] = {}
    for s in mine:
        counts[s.lower()] = counts.get(s.lower(), 0) + 1
    return " ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def load_jobs(run: Path) -> list[StageJob]:
    path = Path(run) / JOBS_FILE
    if not path.exists():
        return []
    return [StageJob(**j) for j in read_json(path).get("jobs", [])]


def failed_tasks(jobs: list[StageJob], done: dict[str, bool]) -> list[str]:
    """'STAGE task i (job J) failed: <error> (log: path)' ('STAGE rank r ...' for the distill job's processes)
    for every task whose log reports an error, unless its stage is `done` since (a later submission finished it)."""
    out = []
    for job in jobs:
        if done.get(job.stage):
            continue
        for task in range(job.tasks):
            for rank in range(job.ranks):
                if error := last_error(log_path(job, task, rank)):
                    out.append(f"{job.stage} {_name(job, task, rank)} (job {job.job_id}) failed: {error} "
                               f"(log: {log_path(job, task, rank)})")
    return out
