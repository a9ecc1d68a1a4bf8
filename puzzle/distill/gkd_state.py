"""The resumable state of a GKD run: `OUT/.gkd_state/`, replaced atomically every `checkpoint_every` steps.

A checkpoint is a complete folder `step-NNNNNNNNN/` written by accelerate's `save_state` (model, optimizer,
the RNG of every process; sharded under FSDP), made current only afterwards by rewriting `latest.json`
through a rename; `latest.json` holds the LR scheduler's state (plain numbers, so no pickle is ever loaded); older folders are removed after that. A run killed at any moment
finds the previous checkpoint or the new one, never half of one. `latest.json` also carries the run's
`key` (a hash of everything the result depends on), so a different run never resumes from this state.
With several processes OUT must be on a file system they all see.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from puzzle.errors import StageError
from puzzle.files import read_json, write_json_atomic
from puzzle.progress import log

STATE_DIR = ".gkd_state"
STATE_VERSION = 2  # 2: the LR scheduler's state is in latest.json, not a pickle


@dataclass(frozen=True, kw_only=True)
class Resume:
    """What `latest.json` records besides the tensors: where training stands."""

    key: str
    step: int  # optimizer steps done
    folder: str  # the step-* folder holding the tensors
    seconds: float  # training time so far (evaluation and checkpoints excluded)
    before: dict[str, Any]  # held-out metrics of the student before training (HeldOutMetrics fields)
    scheduler: dict[str, Any]  # the LR scheduler's state_dict (numbers and lists only)
    version: int = STATE_VERSION


class TrainingState:
    """Finds, writes and removes `out/.gkd_state` for one run (every process holds one)."""

    def __init__(self, out: Path, key: str, accelerator: Any) -> None:
        self.root, self.key, self.accelerator = Path(out) / STATE_DIR, key, accelerator

    def find(self, overwrite: bool) -> Resume | None:
        """The checkpoint to resume from, or None. Another run's state is an error unless `overwrite`."""
        latest = self.root / "latest.json"
        resume = None
        if latest.exists():
            data = read_json(latest, "GKD state")
            if data.get("version") == STATE_VERSION and data.get("key") == self.key:
                resume = Resume(**data)
            elif not overwrite:
                raise StageError(
                    f"{self.root} holds the state of a GKD run with other inputs or settings; rerun with the "
                    "same ones to resume it, or pass --overwrite to discard it and start over"
                )
            else:
                log(f"discarding {self.root}: it belongs to a run with other inputs or settings")
        if self.accelerator.is_main_process:
            self._keep_only(resume.folder if resume else None)
        self.accelerator.wait_for_everyone()
        return resume

    def load(self, resume: Resume) -> None:
        self.accelerator.load_state(str(self.root / resume.folder))

    def save(self, step: int, seconds: float, before: dict[str, Any], scheduler: dict[str, Any]) -> None:
        """Write a checkpoint after `step` optimizer steps (every process calls this)."""
        acc = self.accelerator
        folder = f"step-{step:09d}"
        if acc.is_main_process:
            shutil.rmtree(self.root / folder, ignore_errors=True)  # a half-written one from a killed run
        acc.wait_for_everyone()
        acc.save_state(str(self.root / folder))
        acc.wait_for_everyone()
        if acc.is_main_process:
            resume = Resume(key=self.key, step=step, folder=folder, seconds=seconds, before=before, scheduler=scheduler)
            write_json_atomic(self.root / "latest.json", asdict(resume))  # the commit point
            self._keep_only(folder)
        acc.wait_for_everyone()

    def _keep_only(self, folder: str | None) -> None:
        """Remove every step folder but `folder`, and `latest.json` when there is none (main process only)."""
        if not self.root.exists():
            return
        for path in self.root.iterdir():
            if path.is_dir() and path.name != folder:
                shutil.rmtree(path, ignore_errors=True)
        if folder is None:
            (self.root / "latest.json").unlink(missing_ok=True)
