"""puzzle.data: sources, the held-out split, tokenization cache and batches, on tiny corpora in tmp dirs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from puzzle import data as data_mod
from puzzle.corpus import DataConfig, iter_documents, split_of
from puzzle.data import load_token_data
from puzzle.errors import ConfigError, InputError

WORDS = "def class return import self yield lambda while for in if else try except with as pass".split()


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE fast tokenizer with <|endoftext|> as EOS (no hub download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _text(i: int, words: int = 60) -> str:
    rng = np.random.default_rng(i)
    return " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), words)) + "\n"


def _corpus(root: Path, n: int = 40, words: int = 60) -> Path:
    for i in range(n):
        path = root / f"d{i % 3}" / f"doc{i:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_text(i, words))
    return root


def _cfg(*paths: Path, **kw) -> DataConfig:
    kw.setdefault("held_out_fraction", 0.25)
    kw.setdefault("seq_len", 16)
    return DataConfig(paths=tuple(str(p) for p in paths), **kw)


# ----------------------------------------------------------------------------------------------------------
# The split


def test_split_of_deterministic_with_expected_fraction():
    identities = [f"dir/file{i}.txt" for i in range(20_000)]
    splits = [split_of(x, held_out_fraction=0.05, seed=0) for x in identities]
    assert splits == [split_of(x, held_out_fraction=0.05, seed=0) for x in identities]
    assert 0.04 < splits.count("held_out") / len(splits) < 0.06
    other_seed = [split_of(x, held_out_fraction=0.05, seed=1) for x in identities]
    assert other_seed != splits
    # A larger fraction only moves documents into held-out, never out of it.
    larger = [split_of(x, held_out_fraction=0.2, seed=0) for x in identities]
    assert all(b == "held_out" for a, b in zip(splits, larger) if a == "held_out")


def test_split_independent_of_other_documents_and_order(tmp_path):
    small = _corpus(tmp_path / "small", n=20)
    big = tmp_path / "big"
    # Same relative paths, written in reverse order, plus 30 extra documents.
    for i in reversed(range(20)):
        (big / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (big / f"d{i % 3}" / f"doc{i:03d}.txt").write_text(_text(i))
    for i in range(30):
        (big / "extra").mkdir(exist_ok=True)
        (big / "extra" / f"x{i}.txt").write_text(_text(100 + i))
    small_splits = {d.identity: d.split for d in iter_documents(_cfg(small))}
    big_splits = {d.identity: d.split for d in iter_documents(_cfg(big))}
    assert len(small_splits) == 20 and len(big_splits) == 50
    assert all(big_splits[k] == v for k, v in small_splits.items())
    assert set(small_splits.values()) == {"train", "held_out"}


def test_iter_documents_identity_order(tmp_path):
    docs = list(iter_documents(_cfg(_corpus(tmp_path, n=12))))
    assert [d.identity for d in docs] == sorted(d.identity for d in docs)
    assert docs[0].identity == "d0/doc000.txt" and docs[0].text == _text(0)


def test_max_documents_fixed_sample(tmp_path):
    root = _corpus(tmp_path, n=40)
    first = [d.identity for d in iter_documents(_cfg(root, max_documents=10))]
    assert len(first) == 10 and first == [d.identity for d in iter_documents(_cfg(root, max_documents=10))]
    assert len({p.split("/")[0] for p in first}) > 1  # a spread sample, not the first directory
    all_splits = {d.identity: d.split for d in iter_documents(_cfg(root))}
    assert all(all_splits[d.identity] == d.split for d in iter_documents(_cfg(root, max_documents=10)))


# ----------------------------------------------------------------------------------------------------------
# Sources


def _save_dataset(path: Path, texts: list[str], column: str = "text", splits: tuple[str, ...] = ()) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({column: texts, "id": list(range(len(texts)))})
    if splits:
        datasets.DatasetDict({s: ds for s in splits}).save_to_disk(str(path))
    else:
        ds.save_to_disk(str(path))


def test_sources_text_jsonl_json_and_datasets(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.md").write_text("beta")
    (root / "recs.jsonl").write_text('{"text": "r0"}\n\n{"text": "r2", "x": 1}\n')
    (root / "list.json").write_text(json.dumps([{"body": "j0"}, {"body": ""}, {"body": "j2"}]).replace("body", "text"))
    (root / "one.json").write_text(json.dumps({"text": "single"}))
    (root / "skip.bin").write_text("not matched")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD.txt").write_text("hidden")
    _save_dataset(root / "ds", ["row0", "row1"])
    _save_dataset(tmp_path / "dsdict", ["t0", "t1"], splits=("train", "validation"))
    docs = {d.identity: d.text for d in iter_documents(_cfg(root, tmp_path / "dsdict"))}
    assert docs == {
        "a.txt": "alpha", "sub/b.md": "beta", "recs.jsonl#0": "r0", "recs.jsonl#2": "r2",
        "list.json#0": "j0", "list.json#2": "j2", "one.json": "single", "ds#0": "row0", "ds#1": "row1",
        "dsdict/train#0": "t0", "dsdict/train#1": "t1", "dsdict/validation#0": "t0", "dsdict/validation#1": "t1",
    }


def test_sources_single_file_and_custom_text_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"content": "x"}\n{"content": "y"}\n')
    docs = [(d.identity, d.text) for d in iter_documents(_cfg(path, text_field="content"))]
    assert docs == [("data.jsonl#0", "x"), ("data.jsonl#1", "y")]


def test_exclude_component_and_path_patterns(tmp_path):
    root = _corpus(tmp_path, n=9)
    (root / "d1" / "tests").mkdir()
    (root / "d1" / "tests" / "t.txt").write_text("test")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "c.txt").write_text("cache")
    ids = {d.identity for d in iter_documents(_cfg(root, exclude=("tests", "__pycache__", "d2/*")))}
    assert ids == {f"d{i % 3}/doc{i:03d}.txt" for i in range(9) if i % 3 != 2}


# ----------------------------------------------------------------------------------------------------------
# Tokens and the cache


def test_token_streams_are_documents_joined_by_eos(tmp_path, tokenizer):
    cfg = _cfg(_corpus(tmp_path / "c", n=12))
    data = load_token_data(cfg, tokenizer, cache_dir=tmp_path / "cache")
    eos = tokenizer.eos_token_id
    for split in ("train", "held_out"):
        expected = []
        docs = [d for d in iter_documents(cfg) if d.split == split]
        for doc in docs:
            expected += tokenizer(doc.text, add_special_tokens=False)["input_ids"] + [eos]
        assert np.asarray(data.tokens[split]).tolist() == expected
        assert data.num_tokens(split) == len(expected) and data.num_documents(split) == len(docs)


def test_cache_reused_then_invalidated_by_file_change(tmp_path, tokenizer, monkeypatch):
    root = _corpus(tmp_path / "c", n=12)
    cfg = _cfg(root)
    first = load_token_data(cfg, tokenizer, cache_dir=tmp_path / "cache")

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(data_mod, "_write_cache", no_tokenizing)
        again = load_token_data(cfg, tokenizer, cache_dir=tmp_path / "cache")
        # seq_len only shapes batches: same cache entry.
        other_len = load_token_data(_cfg(root, seq_len=8), tokenizer, cache_dir=tmp_path / "cache")
    assert again.cache_path == first.cache_path == other_len.cache_path
    assert np.array_equal(again.tokens["train"], first.tokens["train"])

    changed = next(d for d in iter_documents(cfg) if d.split == "train")
    path = root / changed.identity
    path.write_text(path.read_text() + " extra words here")
    fresh = load_token_data(cfg, tokenizer, cache_dir=tmp_path / "cache")
    assert fresh.cache_path != first.cache_path
    assert fresh.num_tokens("train") > first.num_tokens("train")


def test_incomplete_cache_is_rebuilt(tmp_path, tokenizer):
    cfg = _cfg(_corpus(tmp_path / "c", n=12))
    first = load_token_data(cfg, tokenizer, cache_dir=tmp_path / "cache")
    expected = np.asarray(first.tokens["train"]).copy()
    del first
    with open(tmp_path / "cache" / os.listdir(tmp_path / "cache")[0] / "train.bin", "r+b") as f:
        f.truncate(8)  # an interrupted write
    again = load_token_data(cfg, tokenizer, cache_dir=tmp_path / "cache")
    assert np.array_equal(again.tokens["train"], expected)


def test_cache_dir_from_environment(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("PUZZLE_CACHE_DIR", str(tmp_path / "env"))
    data = load_token_data(_cfg(_corpus(tmp_path / "c", n=12)), tokenizer)
    assert data.cache_path.parent == tmp_path / "env" / "tokens"


# ----------------------------------------------------------------------------------------------------------
# Batches


@pytest.fixture()
def token_data(tmp_path, tokenizer):
    return load_token_data(_cfg(_corpus(tmp_path / "c", n=40, words=80)), tokenizer, cache_dir=tmp_path / "cache")


def test_batches_deterministic_and_start_step_resumes(token_data):
    batches = list(token_data.batches("train", 4, n_tokens=16 * 4 * 10, seed=3))
    assert len(batches) == 10 and all(b.shape == (4, 16) and b.dtype == torch.long for b in batches)
    again = list(token_data.batches("train", 4, n_tokens=16 * 4 * 10, seed=3))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    resumed = list(token_data.batches("train", 4, n_tokens=16 * 4 * 10, seed=3, start_step=6))
    assert len(resumed) == 4 and all(torch.equal(a, b) for a, b in zip(batches[6:], resumed))
    other = list(token_data.batches("train", 4, n_tokens=16 * 4 * 10, seed=4))
    assert not all(torch.equal(a, b) for a, b in zip(batches, other))


def test_train_repeats_epochs_with_fresh_permutations(token_data):
    stream = np.asarray(token_data.tokens["train"])
    per_epoch = len(stream) // 16
    windows = {tuple(stream[i * 16 : (i + 1) * 16]) for i in range(per_epoch)}
    rows = [tuple(r.tolist()) for b in token_data.batches("train", 8, n_tokens=16 * (2 * per_epoch + 3)) for r in b]
    assert len(rows) == 2 * per_epoch + 3  # the last batch is smaller, the cap is exact
    assert set(rows[:per_epoch]) == windows and set(rows[per_epoch : 2 * per_epoch]) == windows
    assert rows[:per_epoch] != rows[per_epoch : 2 * per_epoch]
    # Resuming mid-way through the second epoch gives the same rows.
    step = (per_epoch + 5) // 8
    later = token_data.batches("train", 8, n_tokens=16 * (2 * per_epoch + 3), start_step=step)
    resumed = [tuple(r.tolist()) for b in later for r in b]
    assert resumed == rows[step * 8 :]
    assert token_data.num_batches("train", 8, n_tokens=16 * (2 * per_epoch + 3)) == -(-(2 * per_epoch + 3) // 8)


def test_skip_tokens_gives_held_out_windows_disjoint_from_an_earlier_stages(token_data):
    per_epoch = token_data.num_tokens("held_out") // 16
    used = torch.cat(list(token_data.batches("held_out", 4, n_tokens=16 * 3 + 7, shuffle=False)))  # 3 windows
    rest = torch.cat(list(token_data.batches("held_out", 2, shuffle=False, skip_tokens=16 * 3 + 7)))
    everything = torch.cat(list(token_data.batches("held_out", 5, shuffle=False)))
    assert torch.equal(torch.cat([used, rest]), everything) and rest.shape[0] == per_epoch - 3
    capped = torch.cat(list(token_data.batches("held_out", 2, n_tokens=16 * 2, shuffle=False, skip_tokens=16 * 3)))
    assert torch.equal(capped, everything[3:5])
    with pytest.raises(InputError, match="all within the first"):
        next(token_data.batches("held_out", 2, shuffle=False, skip_tokens=16 * per_epoch))
    with pytest.raises(ConfigError, match="shuffle=False"):
        token_data.batches("train", 2, skip_tokens=16)


def test_held_out_fixed_order_capped_and_never_repeated(token_data):
    stream = np.asarray(token_data.tokens["held_out"])
    per_epoch = len(stream) // 16
    first = torch.cat(list(token_data.batches("held_out", 3, shuffle=False)))
    assert torch.equal(first, torch.cat(list(token_data.batches("held_out", 3, shuffle=False))))
    assert torch.equal(first, torch.from_numpy(stream[: per_epoch * 16].astype(np.int64)).view(per_epoch, 16))
    capped = torch.cat(list(token_data.batches("held_out", 3, n_tokens=16 * 2 + 5, shuffle=False)))
    assert torch.equal(capped, first[:2])
    beyond = torch.cat(list(token_data.batches("held_out", 3, n_tokens=16 * per_epoch * 5, shuffle=False)))
    assert torch.equal(beyond, first)
    assert token_data.num_batches("held_out", 3, n_tokens=16 * per_epoch * 5) == -(-per_epoch // 3)


def test_batches_seq_len_override(token_data):
    batch = next(token_data.batches("train", 2, seq_len=8))
    assert batch.shape == (2, 8)


# ----------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"paths": "corpus/"}, "paths"),
        ({"paths": ()}, "paths"),
        ({"paths": ("c",), "held_out_fraction": 0.0}, "held_out_fraction"),
        ({"paths": ("c",), "held_out_fraction": 1.0}, "held_out_fraction"),
        ({"paths": ("c",), "seq_len": 1}, "seq_len"),
        ({"paths": ("c",), "max_documents": 0}, "max_documents"),
        ({"paths": ("c",), "text_field": ""}, "text_field"),
        ({"paths": ("c",), "patterns": ()}, "patterns"),
    ],
)
def test_config_invalid_field_raises_config_error(kw, field):
    with pytest.raises(ConfigError, match=field):
        DataConfig(**kw)


def test_config_from_dict_rejects_unknown_key_and_accepts_lists():
    cfg = DataConfig.from_dict({"paths": ["a", "b"], "exclude": ["tests"], "seq_len": 32})
    assert cfg.paths == ("a", "b") and cfg.exclude == ("tests",)
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="'held_out'"):
        DataConfig.from_dict({"paths": ["a"], "held_out": 0.1})


def test_missing_path_raises_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list(iter_documents(_cfg(tmp_path / "nope")))


def test_no_matching_files_raises_input_error(tmp_path):
    (tmp_path / "a.bin").write_text("x")
    with pytest.raises(InputError, match=r"no file matches.*patterns"):
        list(iter_documents(_cfg(tmp_path)))


def test_empty_held_out_split_says_how_to_fix(tmp_path, tokenizer):
    root = _corpus(tmp_path / "c", n=3)
    cfg = _cfg(root, held_out_fraction=1e-9)
    with pytest.raises(InputError, match=r"held-out split is empty.*more documents.*held_out_fraction"):
        load_token_data(cfg, tokenizer, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.bin"))  # nothing half-written left behind


def test_jsonl_line_without_text_field_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(InputError, match=rf"{path.name}:2: record has no field 'text'.*body.*text_field"):
        list(iter_documents(_cfg(path)))


def test_jsonl_invalid_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{broken\n')
    with pytest.raises(InputError, match=rf"{path.name}:3: not valid JSON"):
        list(iter_documents(_cfg(path)))


def test_dataset_without_text_column_raises_input_error(tmp_path):
    _save_dataset(tmp_path / "ds", ["a", "b"], column="body")
    with pytest.raises(InputError, match=r"no column 'text'.*body"):
        list(iter_documents(_cfg(tmp_path / "ds")))


def test_a_non_utf8_file_is_skipped_with_a_warning_and_exclude_silences_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    (tmp_path / "good.txt").write_text("fine text")
    monkeypatch.setenv("PUZZLE_QUIET", "0")
    assert [d.identity for d in iter_documents(_cfg(tmp_path))] == ["good.txt"]
    err = " ".join(capsys.readouterr().err.split())
    assert "skipped" in err and "bad.txt: not UTF-8 text (byte 3)" in err and "--exclude" in err
    assert [d.identity for d in iter_documents(DataConfig(paths=(str(tmp_path),), exclude=("bad.txt",)))] == ["good.txt"]
    assert "bad.txt" not in capsys.readouterr().err


def test_batch_argument_errors(token_data):
    with pytest.raises(ConfigError, match="unknown split"):
        token_data.num_tokens("validation")
    with pytest.raises(ConfigError, match="n_tokens"):
        token_data.batches("train", 2, n_tokens=3)
    with pytest.raises(ConfigError, match="start_step"):
        token_data.batches("train", 2, start_step=-1)
    with pytest.raises(ConfigError, match="batch_size"):
        token_data.batches("train", 0)
    with pytest.raises(InputError, match="fewer than seq_len"):
        token_data.batches("held_out", 1, seq_len=10**7)


def test_slow_tokenizer_rejected(tmp_path):
    class Slow:
        eos_token_id = 0

    with pytest.raises(InputError, match="not a fast tokenizer"):
        load_token_data(_cfg(_corpus(tmp_path, n=12)), Slow(), cache_dir=tmp_path / "cache")


def test_a_tokenizer_that_ships_code_runs_it_only_when_the_user_opts_in(tmp_path):
    from factories import add_custom_tokenizer_code, tiny_parent_with_tokenizer

    from puzzle.data import load_tokenizer

    parent, _ = tiny_parent_with_tokenizer(tmp_path, layers=1)
    marker = tmp_path / "code-ran"
    add_custom_tokenizer_code(parent, marker)
    with pytest.raises(InputError, match="--trust-remote-code"):
        load_tokenizer(parent)
    assert not marker.exists()
    assert type(load_tokenizer(parent, trust_remote_code=True)).__name__ == "CustomTokenizer"
    assert marker.exists()


def test_a_folder_without_a_tokenizer_is_one_clear_error(tmp_path):
    from puzzle.data import load_tokenizer

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(InputError, match="no usable tokenizer"):
        load_tokenizer(tmp_path / "model")
