"""Typed exceptions for user-facing failures.

The library raises these with a message that names the file, the field and the fix; only the CLI entry
(`puzzle.cli.app.main`) turns them into one red line and a non-zero exit code. Anything else is a bug and
surfaces with its traceback.
"""


class PuzzleError(Exception):
    """Base class: a failure the user can fix; the message says how."""

    exit_code = 2


class InputError(PuzzleError):
    """A path, file or value given by the user is missing, corrupt or out of range."""


class ConfigError(PuzzleError):
    """A config file or config field is invalid."""


class UnsupportedModelError(PuzzleError):
    """The model's architecture is not one puzzle can handle."""


class OutputExistsError(PuzzleError):
    """The output path exists and `--overwrite` was not given."""


class NothingToFuse(InputError):
    """FFN Fusion found no group to fuse in a checkpoint (the message says why and what would change that)."""


class OutputError(PuzzleError):
    """An output location cannot be created or written (permissions, a read-only or virtual file system)."""


class Interrupted(PuzzleError):
    """The user stopped a long command (Ctrl-C); the message says what was kept and how to resume."""

    exit_code = 130


class InfeasibleError(PuzzleError):
    """A search target cannot be met by any architecture in the search space."""


class StageError(PuzzleError):
    """A pipeline stage finds the run directory inconsistent (missing or mismatched inputs)."""
