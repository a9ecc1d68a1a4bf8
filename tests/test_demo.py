"""puzzle.demo: a tiny demo parent trained on a sample of the stdlib, loaded back with the Auto classes."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import pytest
import torch

from puzzle import demo
from puzzle.corpus import iter_documents
from puzzle.demo import DemoConfig, build_demo_parent, demo_data_config
from puzzle.errors import ConfigError

# A few stdlib files, a 2-layer model and 150 steps: a few seconds on one core.
TINY = DemoConfig(
    max_files=24, held_out_fraction=0.25, vocab_size=384, num_hidden_layers=2, hidden_size=64,
    num_attention_heads=2, head_dim=32, num_key_value_heads=1, intermediate_size=128, seq_len=64,
    batch_size=8, train_tokens=64 * 8 * 150, eval_tokens=64 * 16 * 2, threads=1,
)


class Rebuilt(Exception):
    """Raised by a stubbed `_build` to show that a rebuild was attempted."""


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("PUZZLE_DEMO_DIR", str(root))
        m.setenv("PUZZLE_QUIET", "1")
        yield root


@pytest.fixture(scope="module")
def parent(demo_root):
    return build_demo_parent(TINY)


def _stub_build(*args, **kwargs):
    raise Rebuilt


def test_build_writes_hf_folder_loaded_by_auto_classes(parent, demo_root):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert parent.path == demo_root / "parent" and not parent.cached
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "demo.json"} <= set(os.listdir(parent.path))
    model = AutoModelForCausalLM.from_pretrained(parent.path)
    tokenizer = AutoTokenizer.from_pretrained(parent.path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads == 1 and not model.config.tie_word_embeddings
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == model.config.eos_token_id == 0
    text = "def f(x):\n    return x  # é\n"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == text  # byte-level: everything round-trips
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], TINY.vocab_size)
    record = json.loads((parent.path / "demo.json").read_text())
    assert record["fingerprint"] == parent.fingerprint and DemoConfig.from_dict(record["config"]) == TINY


def test_training_beats_the_unigram_baseline(parent):
    m = parent.metrics
    assert all(math.isfinite(x) for x in (m.held_out_loss, m.unigram_loss, m.initial_loss, m.final_train_loss))
    assert m.held_out_loss < m.unigram_loss - 0.3 < m.initial_loss - 0.3  # measured: 4.17 vs 4.90, 5.95
    assert m.steps == 150 and m.train_tokens == TINY.train_tokens and m.eval_tokens == 2 * 16 * 63
    # The split is the one later stages get from demo_data_config.
    splits = [d.split for d in iter_documents(demo_data_config(TINY))]
    assert (m.train_files, m.held_out_files) == (splits.count("train"), splits.count("held_out"))
    assert m.train_files + m.held_out_files == TINY.max_files


def test_second_call_is_cached(parent, monkeypatch):
    monkeypatch.setattr(demo, "_build", _stub_build)
    again = build_demo_parent(TINY)
    assert again.cached and again.path == parent.path and again.metrics == parent.metrics


def test_other_config_rebuilds_and_failure_keeps_old_folder(parent, monkeypatch):
    monkeypatch.setattr(demo, "_build", _stub_build)
    with pytest.raises(Rebuilt):
        build_demo_parent(replace(TINY, seed=1))
    with pytest.raises(Rebuilt):
        build_demo_parent(TINY, force=True)
    assert build_demo_parent(TINY).cached  # the interrupted builds left the old parent intact
    assert sorted(p.name for p in parent.path.parent.iterdir()) == ["parent"]  # no temp folders left


def test_corrupt_folder_rebuilds(parent, monkeypatch):
    weights = parent.path / "model.safetensors"
    original = weights.read_bytes()
    monkeypatch.setattr(demo, "_build", _stub_build)
    try:
        weights.write_bytes(original[: len(original) // 2])
        with pytest.raises(Rebuilt):
            build_demo_parent(TINY)
    finally:
        weights.write_bytes(original)
    (parent.path / "tokenizer.json").rename(parent.path / "tokenizer.json.bak")
    try:
        with pytest.raises(Rebuilt):
            build_demo_parent(TINY)
    finally:
        (parent.path / "tokenizer.json.bak").rename(parent.path / "tokenizer.json")
    assert build_demo_parent(TINY).cached


def test_moe_demo_parent_is_a_mixtral_whose_experts_all_learn(demo_root):
    from transformers import AutoModelForCausalLM

    moe = build_demo_parent(replace(TINY, num_local_experts=4, num_experts_per_tok=2), out=demo_root / "parent-moe")
    model = AutoModelForCausalLM.from_pretrained(moe.path)
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 4
    assert moe.metrics.held_out_loss < moe.metrics.unigram_loss - 0.3
    # The load-balancing loss keeps every expert in use: each gets a real share of the routing on held-out text.
    ids = torch.randint(0, TINY.vocab_size, (4, 64))
    with torch.no_grad():
        logits = model(ids, output_router_logits=True).router_logits[0]  # layer 0, (tokens, experts)
    share = torch.bincount(logits.topk(2, dim=-1).indices.flatten(), minlength=4) / logits.shape[0] / 2
    assert share.min() > 0.05, share


def test_moe_fields_do_not_change_a_dense_parents_fingerprint(parent, monkeypatch):
    """Cached dense demo parents stay valid: the MoE fields count only when the parent has experts."""
    monkeypatch.setattr(demo, "_build", _stub_build)
    assert build_demo_parent(replace(TINY, num_experts_per_tok=1, router_aux_loss_coef=0.5)).cached


@pytest.mark.slow
def test_moe_demo_searches_expert_counts_and_windows(tmp_path, monkeypatch):
    """`puzzle demo --moe` end to end: its children keep fewer experts (or route to fewer) where that fits the
    targets, and the report compares predicted and measured speed."""
    from puzzle.checkpoint import load_architecture
    from puzzle.demo_search import run_moe_demo

    monkeypatch.setenv("PUZZLE_DEMO_DIR", str(tmp_path / "cache"))
    search = run_moe_demo(tmp_path / "run")
    names = {c["name"] for c in json.loads((search.paths.manifest).read_text())["candidates"]}
    assert {"moe_k6_top2", "moe_k4_top2", "moe_k2_top2", "moe_k8_top1", "kv4_w64"} <= names
    report = json.loads((search.paths.root / "report.json").read_text())
    children = {c["name"]: c for c in report["children"]}
    assert set(children) == {"half-memory", "1.3x", "1.2x-vllm"}
    assert children["1.2x-vllm"]["vllm_serving"] == "transformers"
    half = load_architecture(search.paths.root / "children" / "half-memory")
    assert sum(b.ffn.moe.num_local_experts for b in half.blocks if b.ffn.moe) < 8 * len(half.blocks)
    for child in children.values():
        assert child["predicted_speedup"] and child["measured_speedup"] and math.isfinite(child["kl"])


def test_demo_data_config_describes_the_stdlib_corpus():
    import sysconfig

    cfg = demo_data_config(DemoConfig())
    assert cfg.paths == (sysconfig.get_paths()["stdlib"],) and cfg.patterns == ("*.py",)
    assert {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"} <= set(cfg.exclude)
    assert cfg.seq_len == 256 and cfg.held_out_fraction == 0.05


def test_lr_schedule_warms_up_then_decays():
    cfg = replace(TINY, learning_rate=1.0, warmup_fraction=0.1, min_lr_ratio=0.1)
    lrs = [demo._lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"seq_len": 2048}, "seq_len"),
        ({"vocab_size": 100}, "vocab_size"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"held_out_fraction": 0.0}, "held_out_fraction"),
        ({"train_tokens": 10}, "train_tokens"),
    ],
)
def test_config_invalid_field_raises_config_error(kw, field):
    with pytest.raises(ConfigError, match=field):
        DemoConfig(**kw)


def test_config_from_dict_round_trip_and_unknown_key():
    cfg = DemoConfig()
    assert DemoConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="'layers'"):
        DemoConfig.from_dict({"layers": 4})
