"""The stages of `puzzle search` over a run directory (DESIGN.md section 3); this module only chains them.

Every stage reads the run directory, writes its outputs atomically and records `stages/{stage}.json`
with a fingerprint of the config sections it depends on. A stage whose record matches is skipped, so a
killed search resumes where it stopped. An expensive stage (library, bld) whose config changed is an
error, not a silent retrain; cheap ones simply rerun.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from puzzle.blocks.library import CalibrationConfig, Manifest, build_library, check_parent
from puzzle.blocks.space import SearchSpace
from puzzle.checkpoint import convert, fingerprint, load_architecture, load_model, read_json, write_json_atomic
from puzzle.config import deep_merge, from_mapping, read_yaml, to_mapping, write_yaml
from puzzle.data import DataConfig, load_token_data
from puzzle.distill.bld import BLDConfig, load_unit, pending_units, train_units, unit_path
from puzzle.errors import ConfigError, StageError
from puzzle.jobs import Shard, device_for, my_share
from puzzle.progress import log
from puzzle.run import RunPaths
from puzzle.scoring import ScoreConfig, score_candidates

STAGES = ("convert", "library", "bld", "score")
EXPENSIVE = {"library", "bld"}


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """Everything `puzzle search` needs; each section is the config of one stage."""

    data: DataConfig | None = None  # text the parent is calibrated, distilled and scored on
    space: SearchSpace = field(default_factory=SearchSpace)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    bld: BLDConfig = field(default_factory=BLDConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    device: str = "auto"  # auto: cuda:LOCAL_RANK when available, else cpu
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # the parent's compute dtype; auto: bf16 on GPU


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
    sections = {
        "convert": [],
        "library": ["data", "space", "calibration"],
        "bld": ["data", "space", "calibration", "bld"],
        "score": ["data", "space", "calibration", "bld", "score"],
    }[stage]
    payload = json.dumps({s: to_mapping(getattr(cfg, s)) for s in sections}, sort_keys=True)
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
            self._model = load_model(self.paths.parent, dtype=self.dtype, device=self.device)
            self._model.requires_grad_(False)
        return self._model

    def data(self):
        if self._data is None:
            if self.cfg.data is None:
                raise ConfigError("no data: give --data PATH or a `data:` section in the config")
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(self.paths.parent, trust_remote_code=True)
            except (OSError, ValueError) as err:
                raise StageError(f"{self.paths.parent}: no usable tokenizer ({err}); the parent folder needs one") from None
            self._data = load_token_data(self.cfg.data, tokenizer)
        return self._data

    # -- stage records -----------------------------------------------------------------------------------
    def _record(self, stage: str) -> Path:
        return self.paths.root / "stages" / f"{stage}.json"

    def is_done(self, stage: str) -> bool:
        record = self._record(stage)
        if not record.exists():
            return False
        key = read_json(record).get("key")
        if key == _section_key(self.cfg, stage):
            return True
        if stage in EXPENSIVE:
            raise StageError(
                f"{self.paths.root}: the {stage} stage ran with a different config; start a new --out run, "
                f"or delete {self.paths.library} to rebuild the library"
            )
        return False

    def mark_done(self, stage: str, info: dict | None = None) -> None:
        self._record(stage).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self._record(stage), {"key": _section_key(self.cfg, stage), **(info or {})})

    # -- stages ------------------------------------------------------------------------------------------
    def convert(self) -> None:
        if self.paths.parent.exists():
            if self.parent_source is not None and fingerprint(self.parent_source) != read_json(self._record("convert")).get("source"):
                raise StageError(f"{self.paths.root} was started from another parent; use a new --out run directory")
            return
        if self.parent_source is None:
            raise StageError(f"{self.paths.parent} is missing; run `puzzle search PARENT --out {self.paths.root}`")
        convert(self.parent_source, self.paths.parent, info={"stage": "convert"})
        self.mark_done("convert", {"source": fingerprint(self.parent_source)})

    def library(self) -> Manifest:
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
        from puzzle.blocks.library import unit_params

        mine = my_share(manifest.units, lambda u: unit_params(u, arch), self.shard)
        worker = f"{self.shard.rank}/{self.shard.world_size}"
        train_units(mine, self.parent_model(), arch, self.paths, self.data(), self.cfg.bld, self.device, worker)

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

    def _block_loader(self, manifest: Manifest, weights: str) -> Callable:
        parent = self.parent_model()
        if weights == "bld":
            def load(c):
                return load_unit(unit_path(self.paths, c), c, parent.config, parent.device) if c.trainable else None
            return load
        from puzzle.blocks.init import init_candidate
        from puzzle.blocks.library import load_stats, to_device_stats

        arch = load_architecture(self.paths.parent)

        def load_init(c):
            if not c.trainable:
                return None
            stats = to_device_stats(load_stats(self.paths, c.layer), parent.device)
            return init_candidate(c, parent, arch, stats, self.cfg.bld.linear_attention_init)
        return load_init


def save_resolved_config(paths: RunPaths, cfg: SearchConfig) -> None:
    """The resolved config is written into the run; a rerun with another config must not mix results."""
    paths.root.mkdir(parents=True, exist_ok=True)
    write_yaml(paths.config, to_mapping(cfg), header=f"# resolved config of this run; rerun with: puzzle search --out {paths.root}\n")


def load_run_config(paths: RunPaths) -> SearchConfig:
    if not paths.config.exists():
        raise StageError(f"{paths.root}: no config.yaml; is this a puzzle search run directory?")
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
            raise ConfigError(f"{out} is not a run directory yet; give the parent model: puzzle search PARENT --out {out}")
        cfg = load_search_config(config, overrides, base=base)
    save_resolved_config(paths, cfg)
    return Search(paths, cfg, parent_source=Path(parent) if parent is not None else None)


def run_search(out: Path, *, parent: Path | None = None, config: Path | None = None,
               overrides: dict[str, Any] | None = None, stage: str | None = None, workers: int = 1,
               launcher: str = "local", base: dict[str, Any] | None = None) -> Search:
    if stage is not None and stage not in STAGES:
        raise ConfigError(f"--stage {stage!r} is not a stage; choose one of {', '.join(STAGES)}")
    search = open_run(out, parent, config, overrides, base)
    search.convert()  # every stage reads the converted parent; cheap, and a no-op once done
    for name in STAGES if stage is None else (stage,):
        if name == "library":
            if not search.is_done("library"):
                log(f"[bold]library[/]: candidates and calibration statistics -> {search.paths.manifest}")
                search.library()
        elif name == "bld":
            if not (search.is_done("bld") and search.bld_done()):
                _bld(search, workers, launcher)
        elif name == "score":
            if not search.is_done("score"):
                search.score("bld")
    return search


def run_bld(out: Path, workers: int = 1, launcher: str = "local", as_worker: bool = False) -> None:
    search = open_run(out)
    if as_worker:
        from puzzle.jobs import set_threads_from_env, shard_from_env

        set_threads_from_env()
        search.shard = shard_from_env()
        search.bld_worker()
        return
    _bld(search, workers, launcher)


def run_score(out: Path, weights: Literal["bld", "init"] = "bld") -> Path:
    search = open_run(out)
    search.score(weights)
    return search.paths.scores if weights == "bld" else search.paths.scores_init


def _bld(search: Search, workers: int, launcher: str) -> None:
    """Train every pending unit, in this process or in `workers` processes; then record the stage."""
    from puzzle import jobs
    from puzzle.progress import track

    if launcher not in ("local", "torchrun", "slurm"):
        raise ConfigError(f"--launcher {launcher!r}: choose local, torchrun or slurm")
    manifest = search.manifest()
    pending = pending_units(manifest, search.paths)
    if pending and workers == 1 and launcher == "local":
        search.bld_worker()
    elif pending:
        argv = ["bld", str(search.paths.root), "--worker"]
        log_dir = search.paths.logs / "bld"
        with track(f"bld: {workers} workers ({launcher})", len(manifest.units)) as bar:
            seen = [len(manifest.units) - len(pending)]
            bar.advance(seen[0])

            def poll() -> None:
                finished = len(manifest.units) - len(pending_units(manifest, search.paths))
                bar.advance(finished - seen[0])
                seen[0] = finished

            if launcher == "local":
                jobs.launch_local(argv, workers, log_dir, poll=poll)
            elif launcher == "torchrun":
                import subprocess

                run = subprocess.run(jobs.torchrun_command(argv, workers))
                if run.returncode != 0:
                    raise StageError(f"torchrun exited with {run.returncode}")
            else:
                jobs.launch_slurm(argv, workers, log_dir, jobs.SlurmConfig(), "puzzle-bld", poll=poll)
            poll()
    missing = pending_units(manifest, search.paths)
    if missing:
        raise StageError(f"{len(missing)} units were not trained (e.g. {missing[0].unit_id}); see {search.paths.logs / 'bld'}")
    search.mark_done("bld")
