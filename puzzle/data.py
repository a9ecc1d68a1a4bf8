"""Documents -> token batches: tokenization, the token cache, and deterministic batches of both splits.

Calibration, blockwise distillation (BLD), scoring and global distillation all read their tokens here:

    cfg = DataConfig(paths=("corpus/",), seq_len=256)
    data = load_token_data(cfg, tokenizer)                    # tokenized once, then cached
    for input_ids in data.batches("train", 8, n_tokens=10**6, start_step=resume_step): ...   # (B, T)
    for input_ids in data.batches("held_out", 8, shuffle=False): ...                           # fixed order

The documents and their split come from `puzzle.corpus`. Each split is one token stream, documents in
identity order, each followed by the tokenizer's EOS (BOS if it has none). Batches are non-overlapping
`seq_len` windows of that stream.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from puzzle.config import is_int
from puzzle.corpus import SPLITS, DataConfig, Document, iter_documents, source_fingerprint
from puzzle.errors import ConfigError, InputError
from puzzle.files import atomic_path, write_json_atomic
from puzzle.progress import track

_CACHE_VERSION = 1  # bump when the cache layout or the tokenization rule changes
_TOKEN_DTYPE = np.dtype("<i4")
_ENCODE_BATCH_CHARS = 4_000_000  # texts handed to the tokenizer at once: bounded memory, enough to parallelise


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
    counts = {split: 0 for split in SPLITS}
    documents = {split: 0 for split in SPLITS}
    backend = _backend(tokenizer)
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # fast: skips offsets
    with contextlib.ExitStack() as stack:  # both token files are renamed into place only if all went well
        tmp = {split: stack.enter_context(atomic_path(entry / f"{split}.bin")) for split in SPLITS}
        handles = {split: stack.enter_context(open(tmp[split], "wb")) for split in SPLITS}
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
        _check_splits(cfg, documents)
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
        if not is_int(start_step) or start_step < 0:
            raise ConfigError(f"start_step must be a non-negative integer, got {start_step!r}")
        if not is_int(skip_tokens) or skip_tokens < 0 or (skip_tokens and shuffle):
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
        if not is_int(batch_size) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not is_int(seq_len) or seq_len < 2:
            raise ConfigError(f"seq_len must be an integer >= 2, got {seq_len!r}")
        per_epoch = self.num_tokens(split) // seq_len
        if per_epoch == 0:
            raise InputError(
                f"the {split} split has {self.num_tokens(split)} tokens, fewer than seq_len={seq_len}; "
                "add documents, lower seq_len or change `held_out_fraction` in the data config"
            )
        if n_tokens is None:
            return per_epoch, seq_len
        if not is_int(n_tokens) or n_tokens < seq_len:
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
