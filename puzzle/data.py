"""Text sources -> token batches, with a fixed held-out split (docs/architecture.md).

Calibration, blockwise distillation (BLD), scoring and global distillation all read their tokens here:

    cfg = DataConfig(paths=("corpus/",), seq_len=256)
    data = load_token_data(cfg, tokenizer)                    # tokenized once, then cached
    for input_ids in data.batches("train", 8, n_tokens=10**6, start_step=resume_step): ...   # (B, T)
    for input_ids in data.batches("held_out", 8, shuffle=False): ...                           # fixed order

Sources are local only (never a hub download): text files, directories searched recursively, JSON/JSONL
records with a text field, and HF `datasets` folders written by `save_to_disk`. A *document* is a file, a
JSON(L) record or a dataset row; its identity is its path relative to the directory given in
`DataConfig.paths` (a file or dataset folder given directly: its name), plus `#<record index>`. The split
is a hash of (seed, identity) alone, so a document lands in the same split whatever other documents exist,
in whatever order, on whatever machine: held-out text is never trained on by any stage. Each split is one
token stream, documents in identity order, each followed by the tokenizer's EOS (BOS if it has none).
Batches are non-overlapping `seq_len` windows of that stream.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from puzzle.errors import ConfigError, InputError
from puzzle.files import write_json_atomic
from puzzle.progress import track

SPLITS = ("train", "held_out")
DEFAULT_PATTERNS = ("*.txt", "*.md", "*.py", "*.jsonl", "*.json")
_CACHE_VERSION = 1  # bump when the cache layout or the tokenization rule changes
_TOKEN_DTYPE = np.dtype("<i4")
_ENCODE_BATCH_CHARS = 4_000_000  # texts handed to the tokenizer at once: bounded memory, enough to parallelise


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
        if not _is_int(self.seq_len) or self.seq_len < 2:
            raise ConfigError(f"DataConfig.seq_len must be an integer >= 2, got {self.seq_len!r}")
        if not isinstance(self.held_out_fraction, (int, float)) or not 0 < self.held_out_fraction < 1:
            raise ConfigError(
                f"DataConfig.held_out_fraction must be between 0 and 1 (exclusive), got {self.held_out_fraction!r}"
            )
        if not _is_int(self.seed):
            raise ConfigError(f"DataConfig.seed must be an integer, got {self.seed!r}")
        if self.max_documents is not None and (not _is_int(self.max_documents) or self.max_documents < 1):
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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
            raise InputError(f"data path {given} does not exist; fix `paths` in the data config")
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
    except UnicodeDecodeError as err:
        raise InputError(
            f"{source.path}: not UTF-8 text (byte {err.start}); convert it or add it to `exclude` in the data config"
        ) from None
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


# ----------------------------------------------------------------------------------------------------------
# Tokenization and the token cache


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the fast tokenizer's full definition (vocab, merges, normalizer, special tokens)."""
    return hashlib.sha256(_backend(tokenizer).to_str().encode()).hexdigest()[:16]


def _backend(tokenizer: Any) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; puzzle needs one (a tokenizer.json, "
            "AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    return backend


def _separator_id(tokenizer: Any) -> int:
    for name in ("eos_token_id", "bos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if isinstance(token_id, int):
            return token_id
    raise InputError(
        "the tokenizer has neither an EOS nor a BOS token to put between documents; "
        "set eos_token in its tokenizer_config.json"
    )


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False) -> Any:
    """The fast tokenizer of a model folder. Code shipped with it runs only when the user opted in
    (`--trust-remote-code`), as in transformers; a folder without a usable tokenizer is one clear error."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise InputError(f"{folder}: its tokenizer runs code shipped with it; pass --trust-remote-code "
                             "(trust_remote_code: true) if you trust that code") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{folder}: no usable tokenizer ({first}); copy the parent's tokenizer files into it") from None


def default_cache_dir() -> Path:
    """`$PUZZLE_CACHE_DIR/tokens`, else `~/.cache/puzzle/tokens`."""
    base = os.environ.get("PUZZLE_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "puzzle") / "tokens"


def load_token_data(cfg: DataConfig, tokenizer: Any, *, cache_dir: str | Path | None = None) -> TokenData:
    """Tokenize the sources of `cfg` (or reuse the cache) and return both splits.

    The cache entry is keyed by the config, the size and mtime of every source file, and the tokenizer's
    fingerprint, so editing a file or changing the tokenizer re-tokenizes. Raises `InputError` when either
    split ends up without documents.
    """
    separator = _separator_id(tokenizer)
    key = source_fingerprint(
        cfg, extra={"version": _CACHE_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer), "separator": separator}
    )
    entry = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = entry / key
    meta = _read_cache(entry)
    if meta is None:
        meta = _write_cache(cfg, tokenizer, separator, entry)
    arrays = {split: _open_tokens(entry / f"{split}.bin", meta["tokens"][split]) for split in SPLITS}
    return TokenData(config=cfg, tokens=arrays, documents=meta["documents"], cache_path=entry)


def _read_cache(entry: Path) -> dict[str, Any] | None:
    """The entry's meta.json if the entry is complete, else None (it will be rebuilt)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        complete = all(
            (entry / f"{split}.bin").stat().st_size == meta["tokens"][split] * _TOKEN_DTYPE.itemsize for split in SPLITS
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if complete else None


def _open_tokens(path: Path, count: int) -> np.ndarray:
    return np.memmap(path, dtype=_TOKEN_DTYPE, mode="r", shape=(count,))


def _write_cache(cfg: DataConfig, tokenizer: Any, separator: int, entry: Path) -> dict[str, Any]:
    entry.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = {split: entry / f".{split}.bin.{tag}.tmp" for split in SPLITS}
    counts = {split: 0 for split in SPLITS}
    documents = {split: 0 for split in SPLITS}
    backend = _backend(tokenizer)
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # fast: skips offsets
    handles = {split: open(tmp[split], "wb") for split in SPLITS}
    try:
        pending: list[Document] = []

        def flush() -> None:
            for doc, enc in zip(pending, encode([d.text for d in pending], add_special_tokens=False)):
                ids = np.asarray(enc.ids + [separator], dtype=_TOKEN_DTYPE)
                handles[doc.split].write(ids.tobytes())
                counts[doc.split] += len(ids)
                documents[doc.split] += 1
            pending.clear()

        with track("tokenizing", total=None) as bar:
            chars = 0
            for doc in iter_documents(cfg):
                pending.append(doc)
                chars += len(doc.text)
                if chars >= _ENCODE_BATCH_CHARS:
                    flush()
                    chars = 0
                    bar.update(docs=sum(documents.values()), tokens=sum(counts.values()))
                bar.advance(1)
            flush()
        for handle in handles.values():
            handle.close()
        _check_splits(cfg, documents)
        for split in SPLITS:
            os.replace(tmp[split], entry / f"{split}.bin")
    finally:
        for split in SPLITS:
            handles[split].close()
            tmp[split].unlink(missing_ok=True)
    meta = {"version": _CACHE_VERSION, "config": cfg.to_dict(), "tokens": counts, "documents": documents}
    write_json_atomic(entry / "meta.json", meta)  # written last: its presence marks the entry complete
    return meta


def _check_splits(cfg: DataConfig, documents: dict[str, int]) -> None:
    total = sum(documents.values())
    if total == 0:
        raise InputError(f"data paths {', '.join(cfg.paths)}: no document has any text")
    if documents["held_out"] == 0:
        raise InputError(
            f"the held-out split is empty ({total} documents, held_out_fraction={cfg.held_out_fraction}); "
            "add more documents or raise `held_out_fraction` in the data config"
        )
    if documents["train"] == 0:
        raise InputError(
            f"the train split is empty ({total} documents, held_out_fraction={cfg.held_out_fraction}); "
            "add more documents or lower `held_out_fraction` in the data config"
        )


# ----------------------------------------------------------------------------------------------------------
# Batches


@dataclass(frozen=True, kw_only=True, eq=False)
class TokenData:
    """The token streams of both splits (memory-mapped) and deterministic batches over them."""

    config: DataConfig
    tokens: dict[str, np.ndarray]  # split -> (N,) int32
    documents: dict[str, int]  # split -> number of documents
    cache_path: Path | None = None

    def num_tokens(self, split: str) -> int:
        return len(self._stream(split))

    def num_documents(self, split: str) -> int:
        self._stream(split)
        return self.documents[split]

    def num_batches(self, split: str, batch_size: int, seq_len: int | None = None, n_tokens: int | None = None) -> int:
        """How many batches `batches(...)` yields from step 0 with these arguments."""
        windows, _ = self._plan(split, batch_size, seq_len, n_tokens)
        return -(-windows // batch_size)

    def batches(
        self,
        split: str,
        batch_size: int,
        seq_len: int | None = None,
        n_tokens: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        start_step: int = 0,
        skip_tokens: int = 0,
    ) -> Iterator[torch.Tensor]:
        """LongTensor batches (batch_size, seq_len) of non-overlapping windows of the split's token stream.

        `n_tokens` caps the total at n_tokens // seq_len windows (the last batch may be smaller); without
        it one pass is made. The train split repeats epochs to reach `n_tokens`, each epoch a fresh
        permutation of the windows drawn from (seed, epoch); the held-out split never repeats.
        `shuffle=False` gives the fixed stream order (evaluation: identical on every call). Batch k is
        the same whether reached by iterating or by `start_step=k`, which costs nothing to skip.
        `skip_tokens` (fixed order only) starts after the windows that `batches(..., n_tokens=skip_tokens,
        shuffle=False)` yields, so two stages can measure on disjoint held-out tokens.
        """
        if not _is_int(start_step) or start_step < 0:
            raise ConfigError(f"start_step must be a non-negative integer, got {start_step!r}")
        if not _is_int(skip_tokens) or skip_tokens < 0 or (skip_tokens and shuffle):
            raise ConfigError(f"skip_tokens must be a non-negative integer, with shuffle=False; got {skip_tokens!r}")
        windows, seq_len = self._plan(split, batch_size, seq_len, n_tokens)
        stream = self._stream(split)
        if skip_tokens:
            skipped = skip_tokens // seq_len
            if skipped >= len(stream) // seq_len:
                raise InputError(
                    f"the {split} split has {len(stream)} tokens, all within the first {skip_tokens} that another "
                    "stage used; add documents or raise held_out_fraction in the data config")
            stream = stream[skipped * seq_len:]
            windows = min(windows, len(stream) // seq_len) if split == "held_out" else windows
        return self._iter_batches(stream, batch_size, seq_len, windows, shuffle, seed, start_step)

    def _stream(self, split: str) -> np.ndarray:
        if split not in self.tokens:
            raise ConfigError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        return self.tokens[split]

    def _plan(self, split: str, batch_size: int, seq_len: int | None, n_tokens: int | None) -> tuple[int, int]:
        """(windows to yield, seq_len) after validating the arguments."""
        seq_len = self.config.seq_len if seq_len is None else seq_len
        if not _is_int(batch_size) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not _is_int(seq_len) or seq_len < 2:
            raise ConfigError(f"seq_len must be an integer >= 2, got {seq_len!r}")
        per_epoch = self.num_tokens(split) // seq_len
        if per_epoch == 0:
            raise InputError(
                f"the {split} split has {self.num_tokens(split)} tokens, fewer than seq_len={seq_len}; "
                "add documents, lower seq_len or change `held_out_fraction` in the data config"
            )
        if n_tokens is None:
            return per_epoch, seq_len
        if not _is_int(n_tokens) or n_tokens < seq_len:
            raise ConfigError(f"n_tokens must be an integer >= seq_len ({seq_len}), got {n_tokens!r}")
        windows = n_tokens // seq_len
        return (windows if split == "train" else min(windows, per_epoch)), seq_len

    @staticmethod
    def _iter_batches(
        stream: np.ndarray, batch_size: int, seq_len: int, windows: int, shuffle: bool, seed: int, start_step: int
    ) -> Iterator[torch.Tensor]:
        per_epoch = len(stream) // seq_len
        perms: dict[int, np.ndarray] = {}
        offsets = np.arange(seq_len)
        for first in range(start_step * batch_size, windows, batch_size):
            g = np.arange(first, min(first + batch_size, windows))  # positions in the endless window stream
            epoch, pos = np.divmod(g, per_epoch)
            if shuffle:
                for e in np.unique(epoch):
                    if int(e) not in perms:
                        perms = {k: v for k, v in perms.items() if k >= e - 1}  # keep at most two epochs
                        perms[int(e)] = np.random.default_rng([seed, int(e)]).permutation(per_epoch)
                    pos = np.where(epoch == e, perms[int(e)][pos], pos)
            rows = stream[pos[:, None] * seq_len + offsets]  # (B, T)
            yield torch.from_numpy(rows.astype(np.int64))
