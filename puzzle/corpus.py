"""Where the text comes from and how it is split: `DataConfig`, documents and their held-out split.

Sources are local only (never a hub download): text files, directories searched recursively, JSON/JSONL
records with a text field, and HF `datasets` folders written by `save_to_disk`. A *document* is a file, a
JSON(L) record or a dataset row; its identity is its path relative to the directory given in
`DataConfig.paths` (a file or dataset folder given directly: its name), plus `#<record index>`. The split
is a hash of (seed, identity) alone, so a document lands in the same split whatever other documents exist,
in whatever order, on whatever machine: held-out text is never trained on by any stage. `puzzle.data` turns
the documents of each split into one token stream.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from puzzle.config import is_int
from puzzle.errors import ConfigError, InputError
from puzzle.progress import log

SPLITS = ("train", "held_out")
DEFAULT_PATTERNS = ("*.txt", "*.md", "*.py", "*.jsonl", "*.json")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the text comes from and how it is split; every field but seq_len is part of the token cache key."""

    paths: tuple[str, ...]
    patterns: tuple[str, ...] = DEFAULT_PATTERNS  # file-name globs used when a path is a directory
    # Globs of relative paths to skip. Without "/" a pattern matches any path component ("tests",
    # "__pycache__", "*.min.js"); with "/" it matches the whole relative path ("docs/*.md").
    exclude: tuple[str, ...] = ()
    text_field: str = "text"  # JSON/JSONL field or dataset column holding the text
    seq_len: int = 256  # default window length of `batches`; not part of the token cache key
    held_out_fraction: float = 0.05
    seed: int = 0  # selects the split (and the `max_documents` sample), not the batch order
    max_documents: int | None = None  # keep a fixed pseudo-random sample of this many documents

    def __post_init__(self) -> None:
        for name in ("paths", "patterns", "exclude"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"DataConfig.{name} must be a tuple of non-empty strings, got {value!r}")
        if not self.paths:
            raise ConfigError("DataConfig.paths is empty; give at least one text file, directory or dataset folder")
        if not self.patterns:
            raise ConfigError("DataConfig.patterns is empty; give file-name globs such as '*.txt'")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ConfigError(f"DataConfig.text_field must be a non-empty string, got {self.text_field!r}")
        if not is_int(self.seq_len) or self.seq_len < 2:
            raise ConfigError(f"DataConfig.seq_len must be an integer >= 2, got {self.seq_len!r}")
        if not isinstance(self.held_out_fraction, (int, float)) or not 0 < self.held_out_fraction < 1:
            raise ConfigError(
                f"DataConfig.held_out_fraction must be between 0 and 1 (exclusive), got {self.held_out_fraction!r}"
            )
        if not is_int(self.seed):
            raise ConfigError(f"DataConfig.seed must be an integer, got {self.seed!r}")
        if self.max_documents is not None and (not is_int(self.max_documents) or self.max_documents < 1):
            raise ConfigError(
                f"DataConfig.max_documents must be a positive integer or null, got {self.max_documents!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "data") -> DataConfig:
        """Build from a YAML/JSON mapping: lists become tuples, a single string path is accepted."""
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(f"{where}: unknown field {key!r}; allowed fields are {', '.join(sorted(known))}")
        values = dict(data)
        for key in ("paths", "patterns", "exclude"):
            if isinstance(values.get(key), str):
                values[key] = (values[key],)
            elif isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)


# ----------------------------------------------------------------------------------------------------------
# The split


def _unit_hash(*parts: object) -> float:
    """A number in [0, 1) from the parts, the same on every machine and Python (unlike `hash`)."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_of(identity: str, *, held_out_fraction: float, seed: int = 0) -> str:
    """The split, "held_out" or "train", of the document `identity` (see `Document.identity`)."""
    return "held_out" if _unit_hash("split", seed, identity) < held_out_fraction else "train"


@dataclass(frozen=True)
class Document:
    identity: str  # relative path, plus "#<index>" for a JSON(L) record or dataset row
    text: str
    split: str  # "train" or "held_out"


def iter_documents(cfg: DataConfig) -> Iterator[Document]:
    """Every document of the sources, in identity order (not file-system order), with its split."""
    sources = _find_sources(cfg)
    keep = None
    if cfg.max_documents is not None:
        # A fixed sample spread over the whole corpus, chosen by a hash independent of the split's hash.
        identities = (ident for source in sources for ident, _ in _records(source, cfg))
        ranked = sorted((_unit_hash("sample", cfg.seed, ident), ident) for ident in identities)
        keep = {ident for _, ident in ranked[: cfg.max_documents]}
    for source in sources:
        for identity, text in _records(source, cfg):
            if keep is None or identity in keep:
                split = split_of(identity, held_out_fraction=cfg.held_out_fraction, seed=cfg.seed)
                yield Document(identity, text, split)


# ----------------------------------------------------------------------------------------------------------
# Sources: files, JSON(L) records, datasets folders


@dataclass(frozen=True)
class _Source:
    path: Path
    identity: str  # relative posix path; its documents' identities start with it
    kind: str  # "text", "json" or "dataset"


def _is_dataset_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    )


def _excluded(rel: str, patterns: tuple[str, ...]) -> bool:
    parts = rel.split("/")
    for pattern in patterns:
        pattern = pattern.rstrip("/")
        if "/" in pattern:
            if fnmatch.fnmatchcase(rel, pattern):
                return True
        elif any(fnmatch.fnmatchcase(part, pattern) for part in parts):
            return True
    return False


def _file_kind(name: str) -> str:
    return "json" if name.endswith((".json", ".jsonl")) else "text"


def _find_sources(cfg: DataConfig) -> list[_Source]:
    """All sources under `cfg.paths`, sorted by identity; dot-directories (.git, .venv) are skipped."""
    sources: list[_Source] = []
    for given in cfg.paths:
        root = Path(given).expanduser()
        if not root.exists():
            raise InputError(f"data path {given} does not exist; fix --data or `data.paths` in the config")
        if root.is_file() or _is_dataset_dir(root):
            kind = "dataset" if root.is_dir() else _file_kind(root.name)
            sources.append(_Source(root, root.name, kind))
            continue
        found = _walk(root, cfg)
        if not found:
            raise InputError(
                f"data path {given}: no file matches {', '.join(cfg.patterns)}"
                + (f" outside the excluded {', '.join(cfg.exclude)}" if cfg.exclude else "")
                + "; fix `patterns`/`exclude` in the data config or point `paths` at the text"
            )
        sources.extend(found)
    return sorted(sources, key=lambda s: (s.identity, str(s.path)))


def _walk(root: Path, cfg: DataConfig) -> list[_Source]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        kept = []
        for name in sorted(dirnames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if name.startswith(".") or _excluded(rel, cfg.exclude):
                continue
            if _is_dataset_dir(here / name):
                found.append(_Source(here / name, rel, "dataset"))
            else:
                kept.append(name)
        dirnames[:] = kept  # os.walk descends only into these
        for name in sorted(filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if any(fnmatch.fnmatchcase(name, p) for p in cfg.patterns) and not _excluded(rel, cfg.exclude):
                found.append(_Source(here / name, rel, _file_kind(name)))
    return found


def _records(source: _Source, cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """(identity, text) of each document of one source; empty texts are skipped."""
    if source.kind == "dataset":
        yield from _dataset_records(source, cfg.text_field)
        return
    try:
        raw = source.path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:  # skipped, not fatal: one odd file must not stop a run over a whole folder
        log(f"[yellow]data[/]: skipped {source.path}: not UTF-8 text (byte {err.start}); --exclude it to silence this")
        return
    if source.kind == "text":
        if raw:
            yield source.identity, raw
        return
    yield from _json_records(source, raw, cfg.text_field)


def _record_text(record: object, field: str, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        keys = f" (its fields: {', '.join(map(str, record))})" if isinstance(record, dict) else ""
        raise InputError(
            f"{where}: record has no field {field!r}{keys}; set `text_field` in the data config to the field "
            "that holds the text, or exclude the file"
        )
    text = record[field]
    if not isinstance(text, str):
        raise InputError(f"{where}: field {field!r} is {type(text).__name__}, not a string; fix the record")
    return text


def _json_records(source: _Source, raw: str, field: str) -> Iterator[tuple[str, str]]:
    """A .json file holding a list of records or one record, or JSON Lines (whatever the extension)."""
    try:
        whole = json.loads(raw)
    except json.JSONDecodeError:
        whole = None  # not one JSON value: read it as JSON Lines, which reports the bad line
    if isinstance(whole, list):
        for i, record in enumerate(whole):
            text = _record_text(record, field, f"{source.path}: record {i}")
            if text:
                yield f"{source.identity}#{i}", text
        return
    if isinstance(whole, dict):
        text = _record_text(whole, field, str(source.path))
        if text:
            yield source.identity, text
        return
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source.path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not valid JSON ({err.msg}); fix the line or exclude the file") from None
        text = _record_text(record, field, where)
        if text:
            yield f"{source.identity}#{lineno - 1}", text


def _dataset_records(source: _Source, field: str) -> Iterator[tuple[str, str]]:
    try:
        import datasets
    except ImportError:
        raise InputError(f"{source.path} is a `datasets` folder; install the `datasets` package to read it") from None
    loaded = datasets.load_from_disk(str(source.path))
    if isinstance(loaded, datasets.DatasetDict):
        parts = [(name, loaded[name]) for name in sorted(loaded)]
    else:
        parts = [(None, loaded)]
    for name, part in parts:
        prefix = source.identity if name is None else f"{source.identity}/{name}"
        if field not in part.column_names:
            raise InputError(
                f"{source.path}{'' if name is None else f' (split {name})'}: no column {field!r} "
                f"(columns: {', '.join(part.column_names)}); set `text_field` in the data config"
            )
        for start in range(0, len(part), 1000):
            for i, text in enumerate(part[start : start + 1000][field], start=start):
                if not isinstance(text, str):
                    raise InputError(f"{source.path}: row {i} column {field!r} is not a string; fix the dataset")
                if text:
                    yield f"{prefix}#{i}", text


def _source_stats(sources: list[_Source]) -> list[list[Any]]:
    """(identity, file, size, mtime) of every file the sources read: changes invalidate the token cache."""
    stats = []
    for source in sources:
        files = sorted(p for p in source.path.rglob("*") if p.is_file()) if source.kind == "dataset" else [source.path]
        for file in files:
            st = file.stat()
            stats.append([source.identity, str(file.resolve()), st.st_size, st.st_mtime_ns])
    return stats


def source_fingerprint(cfg: DataConfig, extra: dict[str, Any] | None = None) -> str:
    """Hash of the config (less seq_len), every source file's size and mtime, and `extra` (JSON-able).

    Anything derived from the corpus (token caches, the demo parent) is stale when this changes.
    """
    payload = {
        "config": {k: v for k, v in cfg.to_dict().items() if k != "seq_len"},
        "sources": _source_stats(_find_sources(cfg)),
        "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]
