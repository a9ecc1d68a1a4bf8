"""The stages of `puzzle search` over a run directory (docs/architecture.md); this module only chains them.

Every stage reads the run directory, writes its outputs atomically and records `stages/{stage}.json`
with a fingerprint of the config sections it depends on. A stage whose record matches is skipped, so a
killed search resumes where it stopped. An expensive stage (library, bld) whose config changed is an
error, not a silent retrain; cheap ones simply rerun.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from puzzle import jobs, slurm, stages
from puzzle.blocks.init import init_candidate
from puzzle.blocks.library import CalibrationConfig, Manifest, build_library, check_parent, load_stats, to_device_stats
from puzzle.blocks.space import SearchSpace
from puzzle.checkpoint import (
    check_weights,
    content_digests,
    convert,
    decilm_config,
    describe_change,
    load_architecture,
    normalized_config,
)
from puzzle.config import deep_merge, from_mapping, read_yaml, to_mapping, write_yaml
from puzzle.corpus import DataConfig
from puzzle.data import load_token_data, load_tokenizer
from puzzle.distill.bld import NEUTRAL_FIELDS as BLD_NEUTRAL_FIELDS
from puzzle.distill.bld import (
    BLDConfig,
    load_unit,
    parent_activations,
    pending_units,
    plan_parent_activations,
    train_units,
    unit_path,
    worker_share,
)
from puzzle.distill.gkd import GKDConfig
from puzzle.errors import ConfigError, InfeasibleError, InputError, StageError
from puzzle.files import make_dirs, read_json, write_json_atomic, write_text_atomic
from puzzle.fusion import FusionConfig
from puzzle.jobs import Shard, SlurmConfig, device_for, set_threads_from_env, shard_from_env
from puzzle.memory import load_within_budget
from puzzle.mip.stage import ChildPlan, SolveConfig
from puzzle.profiling import (
    ProfileConfig,
)
from puzzle.progress import log, track
from puzzle.prune import PruneConfig
from puzzle.report import ReportConfig
from puzzle.run import RunPaths
from puzzle.scoring import ScoreConfig, Scores, score_candidates

STAGES = ("convert", "library", "bld", "score", "profile", "solve", "realize", "fuse", "prune", "distill", "report")
EXPENSIVE = {"library", "bld"}


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """Everything `puzzle search` needs; each section is the config of one stage."""

    data: DataConfig | None = None  # text the parent is calibrated, distilled and scored on
    space: SearchSpace = field(default_factory=SearchSpace)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    bld: BLDConfig = field(default_factory=BLDConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    solve: SolveConfig = field(default_factory=SolveConfig)
    fuse: FusionConfig | None = None  # FFN Fusion of each child's attention-free runs -> children/{name}-fused
    prune: PruneConfig | None = None  # Minitron pruning of each child -> children/{name}-pruned
    gkd: GKDConfig | None = None  # global distillation of every child from the parent -> children/{child}-kd
    report: ReportConfig = field(default_factory=ReportConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)  # resources of each array task (--launcher slurm)
    device: str = "auto"  # auto: cuda:LOCAL_RANK when available, else cpu
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # the parent's compute dtype; auto: bf16 on GPU
    # The most the parent's weights may take on the device (GiB); layers beyond it stay in the parent's safetensors
    # files and are read in per forward (slower, bounded memory). None: half the device's free memory.
    parent_memory_gb: float | None = None

    def __post_init__(self) -> None:
        if self.parent_memory_gb is not None and not self.parent_memory_gb > 0:
            raise ConfigError(f"parent_memory_gb must be a positive number of GiB, got {self.parent_memory_gb!r}")
        # BLD and scoring run on data.seq_len-token sequences: a window at least that long is plain causal
        # attention there, so it would train and score as free while the profile charges it as a window.
        seq_len = self.data.seq_len if self.data is not None else None
        unexercised = [w for w in self.space.attention.windows if seq_len is not None and w >= seq_len]
        if unexercised:
            raise ConfigError(
                f"space.attention.windows: {', '.join(map(str, unexercised))} not shorter than data.seq_len ({seq_len}), "
                f"so BLD and scoring could not tell them from full attention; use windows below {seq_len} or raise data.seq_len")


def load_search_config(path: Path | None, overrides: dict[str, Any] | None = None, base: dict | None = None) -> SearchConfig:
    """base (e.g. the demo's defaults) <- YAML file <- command-line overrides (nested dicts)."""
    data = dict(base or {})
    where = "config"
    if path is not None:
        data = deep_merge(data, read_yaml(path))
        where = str(path)
    data = deep_merge(data, overrides or {})
    return from_mapping(SearchConfig, data, where)


def _section_key(cfg: SearchConfig, stage: str) -> str:
    library = ["data", "space", "calibration"]
    sections = {
        "convert": [],
        "library": library,
        "bld": library + ["bld"],
        "score": library + ["bld", "score"],
        "profile": ["space", "profile"],
        "solve": library + ["bld", "score", "profile", "solve"],
        "realize": library + ["bld", "score", "profile", "solve"],
        "fuse": library + ["bld", "score", "profile", "solve", "fuse"],
        "prune": library + ["bld", "score", "profile", "solve", "fuse", "prune"],
        "distill": library + ["bld", "score", "profile", "solve", "fuse", "prune", "gkd"],
        "report": library + ["bld", "score", "profile", "solve", "fuse", "prune", "gkd", "report"],
    }[stage]
    settings = {s: to_mapping(getattr(cfg, s)) for s in sections}
    if "bld" in settings:  # how BLD is run (checkpoints, activation cache) does not change its units
        settings["bld"] = {k: v for k, v in settings["bld"].items() if k not in BLD_NEUTRAL_FIELDS}
    payload = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class Search:
    """One search over one run directory."""

    paths: RunPaths
    cfg: SearchConfig
    parent_source: Path | None = None
    shard: Shard = field(default_factory=Shard)
    _model: Any = None
    _data: Any = None
    jobs: list = field(default_factory=list)  # the Slurm jobs a `--launcher slurm` search submitted
    scripts: Path | None = None  # submit.sh of `--launcher slurm --dry-run`

    # -- shared resources ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return device_for(self.shard, self.cfg.device)

    @property
    def dtype(self) -> torch.dtype:
        if self.cfg.dtype == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else torch.float32
        return getattr(torch, self.cfg.dtype)

    def parent_model(self):
        if self._model is None:
            self._model = load_within_budget(self.paths.parent, self.cfg.parent_memory_gb, "parent_memory_gb",
                                             what="parent", dtype=self.dtype, device=self.device)
        return self._model

    def data(self):
        if self._data is None:
            if self.cfg.data is None:
                raise ConfigError("no data: give --data PATH or a `data:` section in the config")
            self._data = load_token_data(self.cfg.data, load_tokenizer(self.paths.parent))
        return self._data

    # -- stage records -----------------------------------------------------------------------------------
    def _record(self, stage: str) -> Path:
        return self.paths.root / "stages" / f"{stage}.json"

    def is_done(self, stage: str) -> bool:
        record = self._record(stage)
        if not record.exists() or (stage == "library" and not self.paths.manifest.exists()):
            return False
        key = read_json(record).get("key")
        if key == _section_key(self.cfg, stage):
            return True
        if stage in EXPENSIVE and self._has_results(stage):  # a deleted library is simply rebuilt
            raise StageError(
                f"{self.paths.root}: the {stage} stage ran with a different config; start a new --out run, "
                f"or delete {self.paths.library} to rebuild the library"
            )
        return False

    def _has_results(self, stage: str) -> bool:
        """Whether the expensive `stage` left results that another config must not be mixed with."""
        if stage == "library":
            return self.paths.manifest.exists()
        return any(self.paths.library.glob("*/L*/*.safetensors"))  # bld: trained units

    def mark_done(self, stage: str, info: dict | None = None) -> None:
        """Record `stage` as done; every later stage now has newer inputs and must run again."""
        self._record(stage).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self._record(stage), {"key": _section_key(self.cfg, stage), **(info or {})})
        for later in STAGES[STAGES.index(stage) + 1:]:
            if later != "bld":  # trained units stay valid; bld's own check is its config key
                self._record(later).unlink(missing_ok=True)

    # -- stages ------------------------------------------------------------------------------------------
    def convert(self) -> None:
        if self.paths.parent.exists():
            if self.parent_source is not None:
                self._check_same_parent()
            return
        if self.parent_source is None:
            raise StageError(f"{self.paths.parent} is missing; run `puzzle search PARENT --out {self.paths.root}`")
        digests = content_digests(self.parent_source)
        convert(self.parent_source, self.paths.parent, info={"stage": "convert"})
        self.mark_done("convert", {"source": str(Path(self.parent_source).resolve()), "source_files": digests})

    def _check_same_parent(self) -> None:
        """The parent given now must have the content the run was started from (a fine-tuned parent of the same
        shape must not reuse the old library, units, scores and profile)."""
        record = self._record("convert")
        before = read_json(record).get("source_files") if record.exists() else None
        now = content_digests(self.parent_source)
        if not isinstance(before, dict):  # no record (older run): the converted weights are byte copies of the source's
            before = {k: v for k, v in content_digests(self.paths.parent).items() if k != "config.json"}
            now = {k: v for k, v in now.items() if k != "config.json"}
        if before != now:
            what = describe_change(before, now)
            raise StageError(
                f"{self.parent_source} differs from the parent {self.paths.root} was started from ({what}); its library, "
                f"units, scores and profile belong to that parent: use a new --out run directory (or delete "
                f"{self.paths.parent} and {self.paths.library} to redo this run)")

    def library(self) -> Manifest:
        windows, seq_len, context = self.cfg.space.attention.windows, self.data().config.seq_len, self.cfg.profile.context_len
        if windows and seq_len < context:
            log(f"[yellow]note[/]: window attention is trained and scored on {seq_len}-token sequences but profiled at "
                f"{context} tokens of context, so its quality cost is underestimated; raise data.seq_len toward "
                "profile.context_len for a faithful score")
        manifest = build_library(self.paths, self.cfg.space, self.cfg.calibration, self.parent_model(), self.data())
        self.mark_done("library")
        return manifest

    def manifest(self) -> Manifest:
        manifest = Manifest.load(self.paths.manifest)
        check_parent(self.paths, manifest)
        return manifest

    def bld_worker(self) -> None:
        """Train this worker's share of the units (all of them for a single worker)."""
        manifest = self.manifest()
        arch = load_architecture(self.paths.parent)

        parent, data, cfg = self.parent_model(), self.data(), self.cfg.bld
        plan = plan_parent_activations(manifest.units, arch, parent, data, cfg, self.paths, self.shard.world_size,
                                       manifest.parent_fingerprint)
        mine = worker_share(manifest.units, arch, self.shard, shared_parent=plan.mode == "disk")
        if not pending_units(manifest, self.paths, mine):
            return
        log(plan.reason)
        source = parent_activations(plan, parent, data, cfg, self.shard, self.device)
        worker = f"{self.shard.rank}/{self.shard.world_size}"
        train_units(mine, parent, arch, self.paths, data, cfg, self.device, worker, source)
        if plan.mode == "boundary":  # this worker's own boundary files, of no use once its units are written
            source.remove()

    def bld_done(self) -> bool:
        return not pending_units(self.manifest(), self.paths)

    def score(self, weights: Literal["bld", "init"] = "bld") -> None:
        manifest = self.manifest()
        parent = self.parent_model()
        if weights == "bld":
            missing = pending_units(manifest, self.paths)
            if missing:
                raise StageError(f"{len(missing)} units are not trained yet (e.g. {missing[0].unit_id}); run the bld stage first")
        load = self._block_loader(manifest, weights)
        scores = score_candidates(parent, list(manifest.candidates), load, self.data(), self.cfg.score,
                                  manifest.parent_fingerprint, weights)
        scores.save(self.paths.scores if weights == "bld" else self.paths.scores_init)
        if weights == "bld":
            self.mark_done("score")

    def score_shard(self, rank: int, world: int, weights: Literal["bld", "init"] = "bld") -> Path:
        """Score the candidates of shard `rank` of `world` (contiguous layers of about equal work) into a part
        file; `merge_score_parts` joins the parts into the stage's scores file."""
        manifest = self.manifest()
        if weights == "bld" and (missing := pending_units(manifest, self.paths)):
            raise StageError(f"{len(missing)} units are not trained yet (e.g. {missing[0].unit_id}); run the bld stage first")
        layers = sorted({c.layer for c in manifest.candidates})
        n = len(load_architecture(self.paths.parent).blocks)
        per_layer = {i: sum(1 for c in manifest.candidates if c.layer == i and not c.is_parent) for i in layers}
        # a candidate at layer i runs layers i..n-1: the work of a layer is its candidates times that suffix
        mine = set(jobs.split_contiguous(layers, lambda i: per_layer[i] * (n - i + 1), world)[rank])
        part = score_part_path(self.paths, weights, rank, world)
        part.parent.mkdir(parents=True, exist_ok=True)
        if not mine:  # more shards than the work splits into
            Scores(parent_fingerprint=manifest.parent_fingerprint, weights=weights, tokens=0, parent_lm_loss=0.0).save(part)
            return part
        scores = score_candidates(self.parent_model(), [c for c in manifest.candidates if c.layer in mine],
                                  self._block_loader(manifest, weights), self.data(), self.cfg.score,
                                  manifest.parent_fingerprint, weights)
        scores.save(part)
        return part

    def _block_loader(self, manifest: Manifest, weights: str) -> Callable:
        parent = self.parent_model()
        if weights == "bld":
            def load(c):
                return load_unit(unit_path(self.paths, c), c, parent.config, parent.device) if c.trainable else None
            return load

        arch = load_architecture(self.paths.parent)

        def load_init(c):
            if not c.trainable:
                return None
            stats = to_device_stats(load_stats(self.paths, c.layer), parent.device)
            return init_candidate(c, parent, arch, stats, self.cfg.bld.linear_attention_init)
        return load_init


def score_part_path(paths: RunPaths, weights: str, rank: int, world: int) -> Path:
    return paths.root / "score_parts" / f"{weights}-{rank}-of-{world}.json"


def merge_score_parts(search: Search, world: int, weights: Literal["bld", "init"] = "bld") -> Path:
    """Join the `world` part files of a sharded scoring into the scores file (and record the score stage)."""
    parts = [score_part_path(search.paths, weights, rank, world) for rank in range(world)]
    missing = [p for p in parts if not p.exists()]
    if missing:
        raise StageError(f"{len(missing)} of {world} scoring shards are missing (e.g. {missing[0]}); a scoring task "
                         "failed: see `puzzle status` and its log, then submit again")
    loaded = [s for s in (Scores.load(p) for p in parts) if s.entries]  # a shard past the work is empty
    if not loaded:
        raise StageError(f"the scoring shards in {parts[0].parent} hold no scores; delete it and score again")
    first = loaded[0]
    if any((s.parent_fingerprint, s.weights, s.tokens) != (first.parent_fingerprint, first.weights, first.tokens)
           for s in loaded):
        raise StageError(f"the scoring shards in {parts[0].parent} come from different runs; delete it and score again")
    entries = tuple(sorted((e for s in loaded for e in s.entries), key=lambda e: (e.layer, e.kind, e.name)))
    merged = replace(first, entries=entries)
    merged.save(search.paths.scores if weights == "bld" else search.paths.scores_init)
    for p in parts:
        p.unlink()
    if weights == "bld":
        search.mark_done("score")
    return search.paths.scores if weights == "bld" else search.paths.scores_init


def save_resolved_config(paths: RunPaths, cfg: SearchConfig) -> None:
    """The resolved config is written into the run; a rerun with another config must not mix results."""
    make_dirs(paths.root)
    write_yaml(paths.config, to_mapping(cfg), header=f"# resolved config of this run; rerun with: puzzle search --out {paths.root}\n")


def load_run_config(paths: RunPaths) -> SearchConfig:
    if not paths.config.exists():
        if (paths.root / "config.json").exists():
            raise StageError(f"{paths.root} is a model folder, not a puzzle run directory; a run is made by "
                             f"`puzzle search {paths.root} --out runs/NAME --data DATA`")
        raise StageError(f"{paths.root}: no config.yaml; is this a puzzle search run directory (made by "
                         "`puzzle search PARENT --out RUN`)?")
    return from_mapping(SearchConfig, read_yaml(paths.config), str(paths.config))


# ----------------------------------------------------------------------------------------------------------
# Entry points used by the CLI


def open_run(out: Path, parent: Path | None = None, config: Path | None = None,
             overrides: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> Search:
    """A new run (needs `parent`) or an existing one; config = base <- saved <- file <- overrides."""
    paths = RunPaths(out)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if paths.config.exists():
        saved = to_mapping(load_run_config(paths))
        cfg = load_search_config(config, overrides, base=saved)
    else:
        if parent is None:
            if (paths.root / "config.json").exists():
                raise ConfigError(f"{out} is a model folder, not a puzzle run directory; a run is made by "
                                  f"`puzzle search {out} --out runs/NAME --data DATA`")
            raise ConfigError(f"{out} is not a run directory yet; give the parent model: puzzle search PARENT --out {out}")
        cfg = load_search_config(config, overrides, base=base)
        check_new_run(Path(parent), cfg, str(config) if config else "the config")  # before the run folder exists
    search = Search(paths, cfg, parent_source=Path(parent) if parent is not None else None)
    for stage in EXPENSIVE:  # refuse before the new config is saved over the one the results came from
        search.is_done(stage)
    save_resolved_config(paths, cfg)
    return search


def check_new_run(parent: Path, cfg: SearchConfig, where: str) -> None:
    """What a new search needs, checked before anything is written: the parent's weights, a tokenizer whose
    vocabulary fits the model's, and data paths that exist."""
    config = normalized_config(parent)
    check_weights(parent, decilm_config(config))
    tokenizer = load_tokenizer(parent)
    if len(tokenizer) > config["vocab_size"]:
        raise InputError(f"{parent}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{config['vocab_size']}; its ids would index past the embedding: use the tokenizer the "
                         "model was trained with")
    if cfg.data is None:
        raise ConfigError("no data: give --data PATH (text files, JSONL, or a datasets folder) or a `data:` section "
                          f"in {where}; calibration, BLD and scoring read it")
    for path in cfg.data.paths:
        if not Path(path).expanduser().exists():
            raise InputError(f"data path {path} does not exist; fix --data or `data.paths` in {where}")


def _run_stage(search: Search, name: str, workers: int = 1, launcher: str = "local", force: bool = False) -> None:
    if name == "convert":
        search.convert()
        return
    if name == "bld":
        if force or not (search.is_done("bld") and search.bld_done()):
            _bld(search, workers, launcher)
        return
    section = {"fuse": "fuse", "prune": "prune", "distill": "gkd"}.get(name)
    if force and section and getattr(search.cfg, section) is None:  # asked for by name: say why it would do nothing
        raise ConfigError(f"--stage {name} needs a `{section}:` section in the run's config ({search.paths.config}); "
                          "add one with --config (see docs/run-directory.md)")
    if not force and search.is_done(name):
        return
    if name == "library":
        log(f"[bold]library[/]: candidates and calibration statistics -> {search.paths.manifest}")
        search.library()
    elif name == "score":
        if search.cfg.score.compare_init and not search.paths.scores_init.exists():
            search.score("init")  # what BLD bought, for the report
        search.score("bld")
    else:  # profile, solve, realize, fuse, prune, distill, report: puzzle/stages.py
        getattr(stages, f"{name}_stage")(search)


def run_search(out: Path, *, parent: Path | None = None, config: Path | None = None,
               overrides: dict[str, Any] | None = None, stage: str | None = None, workers: int = 1,
               launcher: str = "local", base: dict[str, Any] | None = None, wait: bool = True,
               dry_run: bool = False) -> Search:
    """Run every stage (or only `stage`) over the run directory, skipping those already done. With
    launcher "slurm" and no `stage`, submit the search as Slurm jobs instead (waiting for them with `wait`)."""
    if stage is not None and stage not in STAGES:
        raise ConfigError(f"--stage {stage!r} is not a stage; choose one of {', '.join(STAGES)}")
    resuming = RunPaths(out).config.exists()
    search = open_run(out, parent, config, overrides, base)
    if dry_run:
        if launcher != "slurm" or stage is not None:
            raise ConfigError("--dry-run writes the Slurm scripts of a whole search: use it with --launcher slurm "
                              "and without --stage")
        search.scripts = slurm.write_scripts(search, workers, Path(parent) if parent else None)
        return search
    if launcher == "slurm" and stage is None:  # the whole search as a chain of Slurm jobs (puzzle/slurm.py)
        search.jobs = slurm.submit_search(search, run_task, workers, Path(parent) if parent else None, wait,
                                          lambda: chain_done(open_run(out)), progress=log)
        return search
    search.convert()  # every stage reads the converted parent; cheap, and a no-op once done
    if resuming and stage is None:
        log(resume_note(search))
    for name in STAGES if stage is None else (stage,):
        _run_stage(search, name, workers, launcher, force=stage is not None)
    return search


def resume_note(search: Search) -> str:
    """Where a rerun of an existing run picks up: the stages already done, and the first one that runs."""
    done = [name for name in STAGES if name != "convert" and search.is_done(name)]
    todo = [name for name in STAGES if name not in done and name != "convert"]
    if not todo:
        return f"{search.paths.root}: every stage is done (delete stages/NAME.json or use --stage NAME to redo one)"
    return (f"resuming {search.paths.root}: done {', '.join(done) if done else 'nothing yet'}; "
            f"continuing from {todo[0]}")


def run_stage(out: Path, stage: str, overrides: dict[str, Any] | None = None) -> Search:
    """One stage of an existing run, run even if it was done before (e.g. `puzzle solve` with new targets)."""
    search = open_run(out, overrides=overrides)
    _run_stage(search, stage, force=True)
    return search


def run_solve(out: Path, target: dict[str, Any] | None = None, solver: str | None = None,
              realize: bool = False, rerank: int | None = None) -> list[ChildPlan]:
    """Solve the run's targets with `target` added (or replacing the one of the same name); the others stay, so
    their children stay in the run. Returns the plans of every target; with `realize` the children are built.
    A target that cannot be met is an error and is not kept in the run's config."""
    paths = RunPaths(out)
    load_run_config(paths)  # one clear error when `out` is not a run directory
    before = paths.config.read_text()
    targets = [to_mapping(t) for t in load_run_config(paths).solve.targets]
    if target is not None:  # replaced where it stood, else appended
        names = [t["name"] for t in targets]
        targets = [target if t["name"] == target["name"] else t for t in targets] + \
            ([target] if target["name"] not in names else [])
    overrides = {"solve": {"targets": targets, **({"solver": solver} if solver else {}),
                           **({"rerank": rerank} if rerank is not None else {})}}
    try:
        search = run_stage(out, "solve", overrides)
    except InfeasibleError:
        write_text_atomic(paths.config, before)  # keep the run's targets as they were
        raise
    if realize:
        _run_stage(search, "realize", force=True)
    return stages.plans_of(search)


# The stages each one-task job of a Slurm chain runs after merging the scores (puzzle/slurm.py)
JOB_STAGES = {"finish": STAGES[STAGES.index("profile"):], "select": ("profile", "solve", "realize", "fuse", "prune"),
              "report": ("report",)}


def run_task(run: str, stage: str, rank: int, world: int, parent: str | None = None, score_world: int = 1) -> str:
    """One task of one job of a `--launcher slurm` search (puzzle/slurm.py), from the run directory."""
    set_threads_from_env()
    if stage == "prepare":
        search = open_run(Path(run), Path(parent) if parent else None)
        search.convert()
        _run_stage(search, "library")
    elif stage == "bld":
        search = open_run(Path(run))
        search.shard = Shard(rank=rank, world_size=world)
        search.bld_worker()
    elif stage == "score":
        search = open_run(Path(run))
        if not search.is_done("score"):
            if search.cfg.score.compare_init and not search.paths.scores_init.exists():
                search.score_shard(rank, world, "init")
            search.score_shard(rank, world, "bld")
    elif stage in ("finish", "select"):
        search = open_run(Path(run))
        _run_stage(search, "bld")  # records the stage: every unit is trained by now
        if not search.is_done("score"):
            if search.cfg.score.compare_init and not search.paths.scores_init.exists():
                merge_score_parts(search, score_world, "init")
            merge_score_parts(search, score_world, "bld")
        for name in JOB_STAGES[stage]:
            _run_stage(search, name)
    elif stage == "distill":
        distill_rank(run)
    elif stage == "report":
        search = open_run(Path(run))
        if not search.is_done("distill"):  # never distilled here: the distill job has the GPUs for it
            raise StageError(f"{search.paths.root}: the distill stage is not done; the report job runs after the "
                             f"distill job (see `puzzle status {search.paths.root}`)")
        _run_stage(search, "report")
    else:
        raise ConfigError(f"unknown stage job {stage!r}; choose one of {', '.join(slurm.JOBS)}")
    return stage


def distill_rank(run: str) -> None:
    """One process of the distill job: GKD of every child as one rank of a torch.distributed run."""
    slurm.export_torch_distributed()
    search = open_run(Path(run))
    if not search.is_done("distill"):
        stages.distill_stage(search, keep_finished=True)


def chain_done(search: Search) -> dict[str, bool]:
    """Which jobs of a `--launcher slurm` chain have nothing left to do, read from the run directory."""
    library = search.is_done("library")
    return {"prepare": library, "bld": library and (search.is_done("bld") or search.bld_done()),
            "score": search.is_done("score"), "finish": search.is_done("report"), "select": search.is_done("prune"),
            "distill": search.is_done("distill"), "report": search.is_done("report")}


@dataclass(frozen=True)
class RunStatus:
    """Where a run stands (`puzzle status`): stage records, BLD units, and the Slurm jobs it submitted."""

    stages: dict[str, bool]  # stage -> done
    units: tuple[int, int] | None  # (trained, total) once the library exists
    jobs: list[tuple[Any, str]]  # (slurm.StageJob, its state: "running 2, pending 1" / "ended" / "done")
    failures: list[str]  # failed tasks with their error line and log


def run_status(out: Path) -> RunStatus:
    search = open_run(out)
    stages_done = {name: search.is_done(name) for name in STAGES}
    units = None
    if search.paths.manifest.exists():
        manifest = search.manifest()
        units = (len(manifest.units) - len(pending_units(manifest, search.paths)), len(manifest.units))
    chain = slurm.load_jobs(search.paths.root)
    states = slurm.queue_states([j.job_id for j in chain])
    done = chain_done(search) if chain else {}
    rows = [(j, slurm.queue_summary(j, states) or ("done" if done.get(j.stage) else "ended")) for j in chain]
    ended = [j for j, state in rows if state == "ended"]
    return RunStatus(stages=stages_done, units=units, jobs=rows, failures=slurm.failed_tasks(ended, done))


def run_bld(out: Path, workers: int = 1, launcher: str = "local", as_worker: bool = False) -> None:
    search = open_run(out)
    if as_worker:
        set_threads_from_env()
        search.shard = shard_from_env()
        search.bld_worker()
        return
    _bld(search, workers, launcher)


def run_score(out: Path, weights: Literal["bld", "init"] = "bld") -> Path:
    search = open_run(out)
    if weights == "init":
        search.score("init")
    else:
        _run_stage(search, "score", force=True)
    return search.paths.scores if weights == "bld" else search.paths.scores_init


def _bld(search: Search, workers: int, launcher: str) -> None:
    """Train every pending unit, in this process or in `workers` processes; then record the stage."""
    if launcher not in ("local", "torchrun", "slurm"):
        raise ConfigError(f"--launcher {launcher!r}: choose local, torchrun or slurm")
    manifest = search.manifest()
    pending = pending_units(manifest, search.paths)
    array = None  # the Slurm array job, with --launcher slurm
    if pending and len(pending) < len(manifest.units):
        log(f"bld: {len(manifest.units) - len(pending)} of {len(manifest.units)} units were trained before; "
            f"training the other {len(pending)}")
    if pending and workers == 1 and launcher == "local":
        search.bld_worker()
    elif pending:
        argv = ["bld", str(search.paths.root), "--worker"]
        log_dir = search.paths.logs / "bld"
        with contextlib.ExitStack() as stack:
            # local workers start before the progress display (a forked worker must not inherit its thread)
            entry = functools.partial(run_bld, str(search.paths.root), as_worker=True)  # what each worker runs
            local = stack.enter_context(jobs.LocalWorkers(argv, workers, log_dir, entry=entry)) if launcher == "local" else None
            with track(f"bld: {workers} workers ({launcher})", len(manifest.units)) as bar:
                seen = [len(manifest.units) - len(pending)]
                bar.advance(seen[0])

                def poll() -> None:
                    finished = len(manifest.units) - len(pending_units(manifest, search.paths))
                    bar.advance(finished - seen[0])
                    seen[0] = finished

                if local is not None:
                    local.wait(poll=poll)
                elif launcher == "torchrun":
                    import subprocess

                    run = subprocess.run(jobs.torchrun_command(argv, workers))
                    if run.returncode != 0:
                        raise StageError(f"torchrun exited with {run.returncode}")
                else:
                    array = slurm.bld_array(search, run_task, workers, poll)
                poll()
    missing = pending_units(manifest, search.paths)
    if missing:
        failed = slurm.failed_tasks([array], {}) if array is not None else []
        raise StageError(f"{len(missing)} units were not trained (e.g. {missing[0].unit_id}); "
                         + ("; ".join(failed) if failed else f"see {search.paths.logs / 'bld'}")
                         + "; the same command trains only the missing units")
    shutil.rmtree(search.paths.progress / "parent_activations", ignore_errors=True)  # only BLD reads them
    search.mark_done("bld")
