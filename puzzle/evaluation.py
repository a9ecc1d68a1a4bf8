"""Evaluation with lm-evaluation-harness: `puzzle eval` and the quality numbers of the report .

`puzzle eval CKPT --tasks TASKS` (README "Commands"). Models run through lm-eval's Hugging Face backend
(`HFLM`), so a puzzle checkpoint is evaluated exactly as a user loads it: through the modeling files inside
the folder, with no puzzle import. Plain HF parents run the same way. Code in a folder runs without asking only
when it is this puzzle version's own modeling code; anything else needs `trust_remote_code` (the user's opt-in).

Tasks are lm-eval task YAMLs reading local JSON/JSONL files (`dataset_path: json`, `dataset_kwargs.data_files`).
lm-eval hands relative data paths to `datasets`, which resolves them against the working directory; here they
are resolved against the YAML's own folder instead, and checked, before lm-eval sees the config, so a task
folder works from anywhere and a missing file is one clear error. Nothing is downloaded.

    result = evaluate("runs/demo/children/2x", ["puzzle_stdlib_next_line", "puzzle_stdlib_ppl"])
    result.tasks["puzzle_stdlib_next_line"].metrics["acc"]
    evaluate_many({"parent": parent, "2x": child}, "my_tasks/")    # tasks built once, every model scored

Task names are the shipped demo tasks (`puzzle/tasks/`, made by `puzzle.eval_tasks`); a path is a folder of
the user's own task YAMLs (every task in it) or one YAML file. Results are written to
`CKPT/eval/results.json` (versioned `EvalResult`); a later run on other tasks adds to the same file.
"""

from __future__ import annotations

import copy
import datetime as _dt
import gc
import glob
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from puzzle.checkpoint import fingerprint, read_config, remote_code_allowed
from puzzle.config import is_int
from puzzle.data import load_tokenizer
from puzzle.errors import ConfigError, InputError
from puzzle.eval_tasks import SHIPPED_TASKS_DIR
from puzzle.files import read_json, write_json_atomic
from puzzle.progress import log

RESULTS_VERSION = 1
RESULTS_FILE = Path("eval") / "results.json"
DTYPES = ("auto", "float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
TaskNames = str | Path | Sequence[str | Path]  # shipped names / task folders / YAML files; a string may hold several


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """How models are evaluated; the tasks are passed separately."""

    batch_size: int = 8
    limit: int | float | None = None  # documents per task: a count, a fraction (< 1), or None for all
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: the dtype stored in the checkpoint
    max_length: int | None = None  # context window for lm-eval; None: the model's max_position_embeddings
    num_fewshot: int | None = None  # None: the task YAML's own value (0 when it sets none)
    fewshot_seed: int = 1234  # lm-eval's default
    # Bootstrap resamples for the stderr of non-mean metrics (perplexities); lm-eval's 100000 takes minutes.
    bootstrap_iters: int = 1000
    write: bool = True  # write CKPT/eval/results.json
    # Run code shipped in a model folder that is not this puzzle version's own modeling code (user's opt-in).
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_length"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise ConfigError(f"eval.{name} must be a positive integer, got {value!r}")
        if self.limit is not None and not (
            (is_int(self.limit) and self.limit >= 1) or (isinstance(self.limit, float) and 0 < self.limit < 1)
        ):
            raise ConfigError(f"eval.limit must be a count >= 1 or a fraction between 0 and 1, got {self.limit!r}")
        if self.num_fewshot is not None and (not is_int(self.num_fewshot) or self.num_fewshot < 0):
            raise ConfigError(f"eval.num_fewshot must be a non-negative integer, got {self.num_fewshot!r}")
        if not is_int(self.bootstrap_iters) or self.bootstrap_iters < 0:
            raise ConfigError(f"eval.bootstrap_iters must be a non-negative integer, got {self.bootstrap_iters!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"eval.dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ConfigError(f"eval.device {self.device!r} is not one of auto, cpu, cuda, cuda:N, mps")


# ----------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, kw_only=True)
class TaskResult:
    """One task's metrics, as lm-eval aggregates them (`acc`, `acc_norm`, `word_perplexity`, ...)."""

    task: str
    metrics: dict[str, float]
    stderr: dict[str, float | None]  # None where lm-eval computes none
    higher_is_better: dict[str, bool]
    samples: int  # documents evaluated
    output_type: str  # multiple_choice, loglikelihood_rolling, ...
    num_fewshot: int
    limit: int | float | None
    source: str  # the task YAML

    @property
    def main_metric(self) -> str:
        """The metric to compare models by: accuracy for multiple choice, bits per byte for perplexity tasks
        (word and byte perplexity are the same quantity on other scales), else the first one."""
        return next((m for m in ("acc", "bits_per_byte") if m in self.metrics), next(iter(self.metrics)))


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    """A model's scores on a set of tasks; saved as `CKPT/eval/results.json`."""

    model: str
    fingerprint: str  # `puzzle.checkpoint.fingerprint`: results of other weights are never merged
    tasks: dict[str, TaskResult]
    config: EvalConfig
    device: str
    lm_eval_version: str
    seconds: float
    created: str
    version: int = RESULTS_VERSION

    def score(self, task: str, metric: str | None = None) -> float:
        """A metric of a task; without `metric`, the task's first (acc for multiple choice)."""
        if task not in self.tasks:
            raise InputError(f"{self.model}: no result for task {task!r}; evaluated: {', '.join(self.tasks)}")
        metrics = self.tasks[task].metrics
        name = metric or next(iter(metrics))
        if name not in metrics:
            raise InputError(f"task {task!r} has no metric {name!r}; it has {', '.join(metrics)}")
        return metrics[name]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "results.json") -> EvalResult:
        if not isinstance(data, dict) or data.get("version") != RESULTS_VERSION:
            raise InputError(f"{where}: not an eval results file of version {RESULTS_VERSION}; re-run puzzle eval")
        try:
            tasks = {name: TaskResult(**task) for name, task in data["tasks"].items()}
            config = EvalConfig(**data["config"])
            return cls(**{**data, "tasks": tasks, "config": config})
        except (KeyError, TypeError, AttributeError, ConfigError) as err:
            raise InputError(f"{where}: malformed eval results ({err}); re-run puzzle eval") from None


def results_path(ckpt: Path) -> Path:
    return Path(ckpt) / RESULTS_FILE


def load_results(ckpt: Path) -> EvalResult:
    """The results saved for a checkpoint (every task evaluated on these weights so far)."""
    path = results_path(ckpt)
    return EvalResult.from_dict(read_json(path, "eval results (run puzzle eval first)"), str(path))


def save_results(result: EvalResult, path: Path) -> None:
    """Write `result` atomically, keeping earlier tasks of the same weights that this run did not evaluate."""
    path = Path(path)
    tasks = result.tasks
    if path.is_file():
        try:
            previous = EvalResult.from_dict(read_json(path), str(path))
        except InputError:  # an older or broken file of our own: this run replaces it
            previous = None
        if previous is not None and previous.fingerprint == result.fingerprint:
            tasks = {**previous.tasks, **result.tasks}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, replace(result, tasks=tasks).to_dict())
    except OSError as err:
        raise InputError(f"{path}: cannot write eval results ({err.strerror}); pass --out FILE or --no-write") from None


# ----------------------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """A task YAML read and made location-independent: `config` has absolute, checked data paths."""

    name: str
    yaml_path: Path
    config: dict[str, Any]


@dataclass
class TaskSet:
    """Tasks built once by lm-eval (datasets loaded), reused for every model of `evaluate_many`."""

    specs: list[TaskSpec]
    loaded: dict[str, Any] = field(repr=False)  # lm-eval's TaskManager.load() result

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]


def shipped_tasks() -> dict[str, Path]:
    """{task name: YAML} of the tasks shipped in puzzle/tasks/."""
    return _yaml_tasks(SHIPPED_TASKS_DIR)


def _yaml_tasks(folder: Path) -> dict[str, Path]:
    """{task name: YAML} of every single task (not group or tag) defined under `folder`."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder), include_defaults=False)
    index = manager.task_index
    return {name: Path(index[name].yaml_path) for name in sorted(manager.all_subtasks) if index[name].yaml_path}


def _read_yaml(path: Path) -> dict[str, Any]:
    """A task YAML as lm-eval reads it: `include:` merged, `!function` imported (lm-eval >= 0.4.13's loader)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        return load_yaml(path, resolve_func=True)
    except Exception as err:  # YAML syntax, include cycles, the helper module of a !function: say which file
        raise InputError(f"{path}: lm-eval cannot read this task YAML ({_first_line(err)})") from None


def _split_items(tasks: TaskNames) -> list[str | Path]:
    if isinstance(tasks, Path):
        return [tasks]
    if isinstance(tasks, str):
        tasks = [tasks]
    items: list[str | Path] = []
    for task in tasks:
        items.extend([task] if isinstance(task, Path) else [t.strip() for t in str(task).split(",") if t.strip()])
    if not items:
        raise InputError("no task given; name shipped tasks (" + ", ".join(shipped_tasks()) + ") or a task folder")
    return items


def _looks_like_path(item: str | Path) -> bool:
    text = str(item)
    return isinstance(item, Path) or "/" in text or text.endswith((".yaml", ".yml")) or Path(text).exists()


def _find_yamls(item: str | Path, shipped: dict[str, Path]) -> dict[str, Path]:
    """{task name: YAML} that one `--tasks` item stands for."""
    if not _looks_like_path(item):
        if item not in shipped:
            raise InputError(
                f"unknown task {item!r}; shipped tasks are {', '.join(shipped)}, "
                "or give a folder (or YAML file) of your own lm-eval tasks"
            )
        return {str(item): shipped[str(item)]}
    path = Path(item).expanduser()
    if path.is_dir():
        found = _yaml_tasks(path)
        if not found:
            raise InputError(f"{path}: no lm-eval task YAML (a file with a `task:` name) in this folder; "
                             "name a YAML file itself to see why lm-eval skips it")
        return found
    if not path.is_file():
        raise InputError(f"{item}: no such task file or folder; give a shipped task name ({', '.join(shipped)}), "
                         "a folder of lm-eval task YAMLs or one YAML file")
    name = _read_yaml(path).get("task")
    if not isinstance(name, str):
        raise InputError(f"{path}: not a single lm-eval task (needs a `task:` name; groups are not supported)")
    return {name: path}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _resolve_file(value: str, base: Path, where: str) -> str:
    """`value` made absolute against the YAML folder `base`, and checked to exist (globs: to match)."""
    if "://" in value:  # a URL is left to `datasets`; offline it fails with its own message
        return value
    path = Path(value).expanduser()
    path = path if path.is_absolute() else (base / path)
    if any(c in value for c in "*?["):
        if not glob.glob(str(path), recursive=True):
            raise InputError(f"{where}: no data file matches {path}; create it or fix the path (relative to the YAML)")
    elif not path.exists():
        shipped = base.is_relative_to(SHIPPED_TASKS_DIR)
        hint = "; `puzzle eval --make-tasks` regenerates the shipped tasks" if shipped else ""
        raise InputError(f"{where}: data file {path} not found; create it or fix the path (relative to the YAML){hint}")
    return str(path.resolve())


def _localize(config: dict[str, Any], yaml_path: Path) -> dict[str, Any]:
    """The config with `data_files`, `data_dir` and a local `dataset_path` resolved against the YAML's folder."""
    base = yaml_path.parent
    config = copy.copy(config)
    kwargs = dict(config.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    where = f"{yaml_path}: dataset_kwargs.data_files"
    if isinstance(files, str):
        kwargs["data_files"] = _resolve_file(files, base, where)
    elif isinstance(files, list):
        kwargs["data_files"] = [_resolve_file(str(f), base, where) for f in files]
    elif isinstance(files, dict):
        kwargs["data_files"] = {
            split: [_resolve_file(str(f), base, where) for f in v] if isinstance(v, list)
            else _resolve_file(str(v), base, where)
            for split, v in files.items()
        }
    if isinstance(kwargs.get("data_dir"), str):
        kwargs["data_dir"] = _resolve_file(kwargs["data_dir"], base, f"{yaml_path}: dataset_kwargs.data_dir")
    if kwargs:
        config["dataset_kwargs"] = kwargs
    path = config.get("dataset_path")
    if isinstance(path, str) and (path.startswith((".", "/", "~")) or (base / path).exists()):
        config["dataset_path"] = _resolve_file(path, base, f"{yaml_path}: dataset_path")
    return config


def resolve_tasks(tasks: TaskNames) -> list[TaskSpec]:
    """Task names and paths (comma-separated in a string) -> the task configs, data paths checked."""
    shipped = shipped_tasks()
    found: dict[str, Path] = {}
    for item in _split_items(tasks):
        for name, yaml_path in _find_yamls(item, shipped).items():
            if name in found and found[name].resolve() != yaml_path.resolve():
                raise InputError(f"task {name!r} is defined twice: {found[name]} and {yaml_path}; rename one")
            found[name] = yaml_path
    return [TaskSpec(name=name, yaml_path=path, config=_localize(_read_yaml(path), path))
            for name, path in found.items()]


def load_tasks(tasks: TaskNames) -> TaskSet:
    """Resolve the tasks and build them with lm-eval (reading their data) once, for one or many models."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_defaults=False)  # indexing lm-eval's thousands of built-in tasks takes seconds
    specs = resolve_tasks(tasks)
    loaded: dict[str, Any] = {"tasks": {}, "groups": {}, "group_map": {}}
    for spec in specs:
        try:
            built = manager.load(copy.deepcopy(spec.config))
        except Exception as err:  # bad fields, unreadable data: lm-eval and datasets raise many types
            raise InputError(
                f"{spec.yaml_path}: lm-eval cannot build task {spec.name!r} ({_first_line(err)})"
            ) from None
        loaded["tasks"].update(built["tasks"])
    return TaskSet(specs=specs, loaded=loaded)


# ----------------------------------------------------------------------------------------------------------
# Models


def _device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r} asked for but CUDA is not available; use --device cpu")
    return requested


def _check_model_folder(ckpt: Path, cfg: EvalConfig) -> None:
    config = read_config(ckpt)  # a missing folder or config.json is one clear error
    remote_code_allowed(ckpt, cfg.trust_remote_code)  # code that is not puzzle's needs the user's opt-in
    if not any((ckpt / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{ckpt}: no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the parent's tokenizer files into it")
    vocab, tokens = config.get("vocab_size"), len(load_tokenizer(ckpt, cfg.trust_remote_code))
    if isinstance(vocab, int) and tokens > vocab:
        raise InputError(f"{ckpt}: the tokenizer has {tokens} tokens but config.json's vocab_size is {vocab}; its ids "
                         "would index past the embedding: copy the tokenizer the model was trained with")


def _open_model(ckpt: Path, cfg: EvalConfig, device: str) -> Any:
    """lm-eval's HF model over the folder, loaded as users load it (the folder's own code)."""
    from lm_eval.models.huggingface import HFLM

    trust = remote_code_allowed(ckpt, cfg.trust_remote_code)
    try:
        return HFLM(
            pretrained=str(ckpt), backend="causal", trust_remote_code=trust, device=device, dtype=cfg.dtype,
            batch_size=cfg.batch_size, max_length=cfg.max_length,
        )
    except (OSError, ValueError) as err:
        raise InputError(f"{ckpt}: transformers cannot load this model ({_first_line(err)})") from None


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def _run(lm: Any, taskset: TaskSet, cfg: EvalConfig) -> dict[str, Any]:
    from lm_eval.evaluator import evaluate as lm_evaluate

    for task in taskset.loaded["tasks"].values():  # what simple_evaluate does, without re-building the tasks
        if cfg.num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=cfg.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=cfg.fewshot_seed)
    return lm_evaluate(lm=lm, task_dict=taskset.loaded, limit=cfg.limit, bootstrap_iters=cfg.bootstrap_iters,
                       log_samples=False)


def _task_result(raw: dict[str, Any], spec: TaskSpec, cfg: EvalConfig) -> TaskResult:
    """lm-eval's `"acc,none"` / `"acc_stderr,none"` keys -> metrics and stderr by metric name."""
    metrics: dict[str, float] = {}
    stderr: dict[str, float | None] = {}
    for key, value in raw["results"][spec.name].items():
        if "," not in key:  # name, alias, sample_len
            continue
        metric, filter_name = key.split(",", 1)
        suffix = "" if filter_name == "none" else f",{filter_name}"
        if metric.endswith("_stderr"):
            stderr[metric.removesuffix("_stderr") + suffix] = float(value) if isinstance(value, (int, float)) else None
        else:
            metrics[metric + suffix] = float(value)
    return TaskResult(
        task=spec.name, metrics=metrics, stderr={m: stderr.get(m) for m in metrics},
        higher_is_better={m: bool(v) for m, v in raw["higher_is_better"].get(spec.name, {}).items()},
        samples=int(raw["n-samples"][spec.name]["effective"]), output_type=str(spec.config.get("output_type")),
        num_fewshot=int(raw["n-shot"].get(spec.name, 0)), limit=cfg.limit, source=str(spec.yaml_path),
    )


def evaluate(ckpt: Path, tasks: TaskNames | TaskSet, cfg: EvalConfig = EvalConfig(), *,
             out: Path | None = None) -> EvalResult:
    """Evaluate one model folder (puzzle checkpoint or plain HF model) on lm-eval tasks.

    `tasks`: shipped task names, folders or YAML files of lm-eval tasks (a list, or comma-separated), or a
    `TaskSet` from `load_tasks`. Writes the result to `out` (default `CKPT/eval/results.json`) unless
    `cfg.write` is false.
    """
    import lm_eval
    import torch

    ckpt = Path(ckpt)
    _check_model_folder(ckpt, cfg)  # before the tasks' data is read
    device = _device(cfg.device)
    taskset = tasks if isinstance(tasks, TaskSet) else load_tasks(tasks)
    log(f"evaluating {ckpt} on {', '.join(taskset.names)} ({device})")
    started = time.perf_counter()
    lm = _open_model(ckpt, cfg, device)
    raw = _run(lm, taskset, cfg)
    del lm  # evaluate_many holds one model at a time
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    result = EvalResult(
        model=str(ckpt.resolve()), fingerprint=fingerprint(ckpt),
        tasks={spec.name: _task_result(raw, spec, cfg) for spec in taskset.specs},
        config=cfg, device=device, lm_eval_version=lm_eval.__version__,
        seconds=round(time.perf_counter() - started, 2),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    if cfg.write:
        save_results(result, out if out is not None else results_path(ckpt))
    return result


def evaluate_many(models: dict[str, Path], tasks: TaskNames | TaskSet,
                  cfg: EvalConfig = EvalConfig()) -> dict[str, EvalResult]:
    """Evaluate several models on the same tasks (built once); {name: result}, in the order given."""
    for path in models.values():
        _check_model_folder(Path(path), cfg)  # fail before hours of evaluation, not after
    taskset = tasks if isinstance(tasks, TaskSet) else load_tasks(tasks)
    return {name: evaluate(Path(path), taskset, cfg) for name, path in models.items()}
