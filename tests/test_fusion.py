"""FFN Fusion (puzzle/fusion/): runs, grouping, the dependency measure, exactness against a hand-written
parallel reference, the fuse_ffn stage and the `fuse-ffn` command."""

import copy
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from factories import decilm_dict, decilm_model, hf_parent, randomize_, tiny_parent_with_tokenizer
from transformers import AutoModelForCausalLM

from puzzle.arch import Architecture, AttentionConfig
from puzzle.checkpoint import build_model, decilm_config, load_architecture, load_model, normalized_config, save_model
from puzzle.cli import app as cli
from puzzle.cli.fuse_ffn import DEFAULT_THRESHOLD, fuse_ffn_command
from puzzle.corpus import DataConfig
from puzzle.distill.activations import run_layers
from puzzle.errors import ConfigError, InputError, OutputExistsError, UnsupportedModelError
from puzzle.fusion import (
    FusionConfig,
    FusionReport,
    choose_groups,
    find_runs,
    fuse_ffn,
    fuse_layers_,
    fused_architecture,
    measure_dependency,
)

WIDTHS = (96, 40, 72, 24)  # a different FFN width in every layer of a run


def chain_model(k: int, bias: bool, seed: int = 0):
    """Layer 0 has attention, layers 1..k-1 none (so FFNs 0..k-1 form one run), then one attention layer."""
    blocks = [("full", "full")] + [("no_op", "full")] * (k - 1) + [("gqa2", "full")]
    config = decilm_dict(blocks, mlp_bias=bias, rms_norm_eps=1e-5)
    for i in range(k):
        config["block_configs"][i]["ffn"]["intermediate_size"] = WIDTHS[i]
    torch.manual_seed(seed)
    model = build_model(decilm_config(config))
    with torch.no_grad():  # non-trivial norm gains and biases, so a wrong fold cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.rand(p.shape) + 0.5 if "norm" in name else 0.1 * torch.randn(p.shape))
    return model


def swiglu_by_hand(layer, h: torch.Tensor, eps: float) -> torch.Tensor:
    """f_j(h) = down(silu(gate(g * rms(h))) * up(g * rms(h))), written out from the layer's weights."""
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * layer.post_attention_layernorm.weight
    m = layer.mlp
    a = F.silu(F.linear(n, m.gate_proj.weight, m.gate_proj.bias)) * F.linear(n, m.up_proj.weight, m.up_proj.bias)
    return F.linear(a, m.down_proj.weight, m.down_proj.bias)


@torch.no_grad()
def parallel_reference(model, ids: torch.Tensor, run: tuple[int, ...]) -> torch.Tensor:
    """Logits of the parallel formulation: x_run + sum_j f_j(x_run) in place of the run's sequential FFNs."""
    _, io = run_layers(model, ids, stop=run[0] + 1, capture={run[0]})
    h = io[run[0]].h  # the run's input: FFN input of its first layer (after that layer's attention)
    y = h + sum(swiglu_by_hand(model.model.layers[j], h, model.config.rms_norm_eps) for j in run)
    final, _ = run_layers(model, hidden=y, start=run[-1] + 1)
    return model.lm_head(model.model.norm(final))


# ---- runs and groups ------------------------------------------------------------------------------------


def test_find_runs_starts_at_the_ffn_before_the_attention_free_layers():
    blocks = [("full", "full"), ("no_op", "narrow"), ("no_op", "full"),  # run 0,1,2
              ("full", "full"), ("no_op", "no_op"), ("no_op", "full"),  # an identity layer does not break a run
              ("linear", "full"),  # linear attention ends it; alone, not a run
              ("no_op", "linear"),  # a linear FFN ends a run too
              ("no_op", "full"), ("no_op", "full")]
    assert find_runs(Architecture.from_config(decilm_dict(blocks))) == [(0, 1, 2), (3, 5), (8, 9)]
    assert find_runs(Architecture.from_config(decilm_dict([("full", "full")] * 3))) == []


def test_choose_groups_threshold_max_run_and_keep_last():
    layers = (2, 3, 4, 5, 6)
    dep = {(2, 3): 0.01, (2, 4): 0.30, (4, 5): 0.02, (4, 6): 0.5, (2, 5): 0.9, (2, 6): 0.9, (3, 4): 0.1}
    groups, notes = choose_groups(layers, dep, threshold=0.1, max_run=None, keep_last=True)
    assert groups == ((2, 3), (4, 5), (6,))
    assert "0.3 > threshold 0.1" in notes[2] and "last FFN" in notes[4] and notes[1] == notes[3] == ""
    groups, _ = choose_groups(layers, dep, threshold=0.1, max_run=None, keep_last=False)
    assert groups == ((2, 3), (4, 5), (6,))  # 6 now splits on its dependency, not on keep_last
    groups, notes = choose_groups(layers, dep, threshold=None, max_run=2, keep_last=False)
    assert groups == ((2, 3), (4, 5), (6,)) and "max-run 2" in notes[2]
    assert choose_groups(layers, {}, threshold=None, max_run=None, keep_last=True)[0] == ((2, 3, 4, 5), (6,))
    assert choose_groups((0, 1), {}, threshold=None, max_run=None, keep_last=True)[0] == ((0,), (1,))


def test_fused_architecture_moves_the_widths_into_the_first_layer_and_saves_only_norms():
    model = chain_model(4, bias=True)
    arch = Architecture.from_config(model.config.to_dict())
    after = fused_architecture(arch, [(0, 1, 2)])
    assert after.blocks[0].ffn.intermediate_size == sum(WIDTHS[:3]) and after.blocks[0].attention == arch.blocks[0].attention
    assert after.blocks[1].ffn.no_op and after.blocks[2].ffn.no_op and after.blocks[3] == arch.blocks[3]
    h = arch.shape.hidden_size
    assert arch.total_params() - after.total_params() == 2 * (h + h)  # two norms and two down biases fewer
    assert not after.vllm_unsupported()


# ---- exactness ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "mlp_bias"])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_fused_model_equals_the_hand_written_parallel_reference(k, bias):
    model = chain_model(k, bias)
    run = tuple(range(k))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(k))
    expected = parallel_reference(model, ids, run)
    sequential = model(ids).logits
    fused = fuse_layers_(copy.deepcopy(model), [run])
    with torch.no_grad():
        got = fused(ids).logits
    assert (sequential - expected).abs().max() > 1e-3  # the reference really differs from the unfused model
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    layers = fused.model.layers
    assert layers[0].mlp.gate_proj.weight.shape == (sum(WIDTHS[:k]), 64)
    assert torch.equal(layers[0].post_attention_layernorm.weight, torch.ones(64))
    assert all(layers[i].mlp is None and layers[i].self_attn is None for i in run[1:])


def test_fused_model_decodes_with_a_kv_cache_like_its_full_forward():
    fused = fuse_layers_(chain_model(3, bias=False), [(0, 1)])
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = fused(ids).logits
        out = fused(ids[:, :5], use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(5, 8):
            out = fused(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:], atol=1e-5, rtol=1e-5)


# ---- dependency measure ---------------------------------------------------------------------------------


def test_dependency_equals_a_naive_per_token_loop():
    model = decilm_model([("no_op", "full"), ("no_op", "narrow"), ("no_op", "full"), ("full", "full")], seed=1)
    batches = [torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    dep, tokens = measure_dependency(model, [(0, 1, 2)], batches)
    assert tokens == 24 and set(dep) == {(0, 1), (0, 2), (1, 2)}
    layers = model.model.layers
    for (a, j), value in dep.items():
        total = 0.0
        for ids in batches:
            with torch.no_grad():
                hs = model(ids, output_hidden_states=True).hidden_states  # h_j = output of layer j-1 here
                for b in range(ids.shape[0]):
                    for t in range(ids.shape[1]):
                        u, v = layers[j].ffn_branch(hs[a][b, t]), layers[j].ffn_branch(hs[j][b, t])
                        total += 1 - (u @ v / (u.norm() * v.norm())).item()
        assert math.isclose(value, total / tokens, rel_tol=1e-4, abs_tol=1e-6)


def test_dependency_is_zero_when_the_earlier_ffns_add_nothing():
    model = decilm_model([("no_op", "full"), ("no_op", "full"), ("full", "full")], seed=2)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()
    dep, _ = measure_dependency(model, [(0, 1)], [torch.randint(0, 128, (2, 5))])
    assert dep[(0, 1)] < 1e-6


def test_max_run_limits_the_measured_pairs():
    model = decilm_model([("no_op", "full")] * 4 + [("full", "full")], seed=3)
    dep, _ = measure_dependency(model, [(0, 1, 2, 3)], [torch.randint(0, 128, (1, 4))], max_run=2)
    assert set(dep) == {(0, 1), (0, 2), (0, 3), (1, 2), (2, 3)}  # each against the run start, plus neighbours


# ---- the stage ------------------------------------------------------------------------------------------


def drop_attention(parent, layers, out):
    """A child of `parent` with no attention in `layers` (every other weight copied)."""
    model = load_model(parent)
    arch = load_architecture(parent)
    for i in layers:
        arch = arch.with_block(i, attention=AttentionConfig(no_op=True))
    child = build_model(decilm_config(normalized_config(parent), arch))
    state = {k: v for k, v in model.state_dict().items() if k in child.state_dict()}
    child.load_state_dict(state)
    return save_model(child, out, source=parent)


@pytest.fixture(scope="module")
def tiny_child(tmp_path_factory):
    """(child folder, corpus): a random 4-layer Llama with a tokenizer, attention removed in layers 1 and 2."""
    root = tmp_path_factory.mktemp("fusion")
    parent, corpus = tiny_parent_with_tokenizer(root)
    return drop_attention(parent, [1, 2], root / "child"), corpus


@pytest.fixture(autouse=True)
def _token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PUZZLE_CACHE_DIR", str(tmp_path / "cache"))


def data_cfg(corpus, **overrides):
    cfg = dict(threshold=2.0, data=DataConfig(paths=(str(corpus),), seq_len=64, held_out_fraction=0.2),
               calibration_tokens=512, eval_tokens=512, batch_size=4)
    return FusionConfig(**{**cfg, **overrides})


def test_fuse_ffn_writes_a_checkpoint_that_computes_the_parallel_form(tiny_child, tmp_path):
    child, corpus = tiny_child
    report = fuse_ffn(child, tmp_path / "fused", data_cfg(corpus), info={"command": "test"})
    assert report.fused_groups == ((0, 1),)  # run (0, 1, 2); the last FFN is kept
    assert report.runs[0].dependency[0] is None and all(d >= 0 for d in report.runs[0].dependency[1:])
    assert report.calibration_tokens == 512 and report.ffn_depth_after == report.ffn_depth_before - 1
    assert report.vllm_native and report.predicted_speedup > 1
    q = report.quality
    assert q.tokens > 0 and q.kl >= 0 and 0 <= q.top1 <= 1 and q.lm_loss_after > 0
    info = json.loads((tmp_path / "fused" / "puzzle.json").read_text())
    assert FusionReport.from_dict(info["fusion"]) == report and info["vllm_native"]
    arch = load_architecture(tmp_path / "fused")
    assert arch.blocks[0].ffn.intermediate_size == 256 and arch.blocks[1].ffn.no_op and arch.blocks[1].attention.no_op
    unfused = load_model(child)
    fused = AutoModelForCausalLM.from_pretrained(tmp_path / "fused", trust_remote_code=True).eval()  # as a user loads it
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, parallel_reference(unfused, ids, (0, 1)), atol=1e-5, rtol=1e-5)


def test_dry_run_without_calibration_reads_only_the_config(tiny_child, tmp_path):
    child, _ = tiny_child
    (tmp_path / "config_only").mkdir()
    shutil.copy(child / "config.json", tmp_path / "config_only")  # no weights: a dry run must not need them
    report = fuse_ffn(tmp_path / "config_only", None, FusionConfig(threshold=None, keep_last=False))
    assert report.out is None and report.fused_groups == ((0, 1, 2),) and report.calibration_tokens == 0
    assert report.quality is None and report.runs[0].dependency == (None, None, None)
    assert report.ffn_depth_after == report.ffn_depth_before - 2 and report.predicted_speedup > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config_only"]


def test_bad_input_is_a_typed_error_and_nothing_is_written(tiny_child, tmp_path):
    child, corpus = tiny_child
    hf_parent("llama", tmp_path / "dense")  # every layer has attention: no run
    with pytest.raises(InputError, match="nothing to fuse"):
        fuse_ffn(tmp_path / "dense", tmp_path / "a", FusionConfig(threshold=None))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UnsupportedModelError):
        fuse_ffn(tmp_path / "bert", tmp_path / "b", FusionConfig(threshold=None))
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        fuse_ffn(child, tmp_path / "exists", FusionConfig(threshold=None))
    with pytest.raises(ConfigError, match="--data"):
        fuse_ffn(child, tmp_path / "c", FusionConfig())
    with pytest.raises(InputError, match="raise --threshold"):
        fuse_ffn(child, tmp_path / "d", data_cfg(corpus, threshold=0.0, eval_tokens=0))
    assert not [p for p in tmp_path.iterdir() if p.name in "abcd" or p.name.startswith(".")]


def test_distill_tokens_runs_a_short_kd_into_out(tiny_child, tmp_path):
    child, corpus = tiny_child
    report = fuse_ffn(child, tmp_path / "out", data_cfg(corpus, distill_tokens=512))
    assert report.distill_tokens == 512 and report.quality_distilled.kl >= 0
    info = json.loads((tmp_path / "out" / "puzzle.json").read_text())
    assert info["fusion"]["runs"] and info["gkd"]["tokens"] == 512
    assert load_architecture(tmp_path / "out").blocks[1].ffn.no_op
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the staging folder is gone


def test_config_rejects_bad_values():
    for bad in (dict(threshold=-1.0), dict(max_run=1), dict(batch_size=0), dict(device="tpu")):
        with pytest.raises(ConfigError):
            FusionConfig(**bad)
    assert FusionConfig().threshold == DEFAULT_THRESHOLD  # --help shows the library default


# ---- command line ---------------------------------------------------------------------------------------


@pytest.fixture
def puzzle_cli():
    """`puzzle` with fuse-ffn registered (as puzzle/cli/app.py does once the command ships)."""
    if "fuse-ffn" not in [c.name for c in cli.app.registered_commands]:
        cli.app.command("fuse-ffn")(fuse_ffn_command)
    return cli.run


def test_cli_fuses_and_prints_the_runs_table(tiny_child, tmp_path, puzzle_cli, capsys):
    child, corpus = tiny_child
    args = ["fuse-ffn", str(child), str(tmp_path / "out"), "--data", str(corpus), "--threshold", "2",
            "--calibration-tokens", "512", "--eval-tokens", "512", "--device", "cpu"]
    assert puzzle_cli(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "fused into L0" in out and "last FFN" in out and "KL(unfused || fused)" in out
    assert json.loads((tmp_path / "out" / "puzzle.json").read_text())["command"].startswith("puzzle")


def test_cli_dry_run_and_one_line_errors(tiny_child, tmp_path, puzzle_cli, capsys):
    child, _ = tiny_child
    assert puzzle_cli(["fuse-ffn", str(child), "--dry-run", "--no-calibration"]) == 0
    assert "dry run: nothing written" in capsys.readouterr().out
    hf_parent("llama", tmp_path / "dense")
    assert puzzle_cli(["fuse-ffn", str(tmp_path / "dense"), str(tmp_path / "out"), "--no-calibration"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("error: ") and "nothing to fuse" in lines[0] and len(lines) == 1
    assert not (tmp_path / "out").exists()
    assert puzzle_cli(["fuse-ffn", str(child), str(tmp_path / "out")]) == 2  # --threshold without --data
    assert "--data" in capsys.readouterr().err
    assert puzzle_cli(["fuse-ffn", "--help"]) == 0
    assert "Example" in capsys.readouterr().out


# ---- vLLM serves the fused checkpoint natively ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PUZZLE_VLLM_PYTHON"), reason="set PUZZLE_VLLM_PYTHON to a python with vllm installed")
def test_vllm_serves_a_fused_child_with_the_greedy_tokens_of_transformers(tmp_path):
    # head_dim 64 (vLLM's CPU attention); layer 0 keeps attention and hosts FFNs 0-2, layers 1-2 become empty.
    config = decilm_dict([("full", "full"), ("no_op", "narrow"), ("no_op", "full"), ("gqa2", "full")],
                         vocab_size=512, hidden_size=256, num_attention_heads=4, head_dim=64)
    torch.manual_seed(9)
    fused = fuse_layers_(randomize_(build_model(decilm_config(config)), 9), [(0, 1, 2)])
    save_model(fused, tmp_path / "fused")
    prompts = [[3, 17, 42], [5, 9, 100, 200, 7]]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    script = Path(__file__).parents[1] / "scripts" / "vllm_greedy.py"
    run = subprocess.run([os.environ["PUZZLE_VLLM_PYTHON"], str(script), "--model", str(tmp_path / "fused"),
                          "--prompts-json", str(tmp_path / "prompts.json"), "--max-tokens", "12", "--dtype", "float32",
                          "--ignore-eos", "--out", str(tmp_path / "vllm.json")],
                         env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": ""},
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads((tmp_path / "vllm.json").read_text())
    assert "nemotron_nas" in str(result["vllm_model_class"]), result  # native DeciLM, not a fallback
    model = load_model(tmp_path / "fused")
    for prompt, tokens in zip(prompts, result["tokens"]):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert tokens == expected[0, len(prompt):].tolist()


def test_dry_run_that_would_fuse_nothing_says_why_and_what_would(tmp_path, puzzle_cli, capsys):
    from factories import decilm_model

    from puzzle.checkpoint import save_model

    # One run of exactly two FFNs (layers 0 and 1): the default keeps its last FFN separate.
    save_model(decilm_model([("gqa2", "full"), ("no_op", "full"), ("gqa2", "full")]), tmp_path / "child")
    assert puzzle_cli(["fuse-ffn", str(tmp_path / "child"), "--dry-run", "--no-calibration"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "nothing would be fused" in out and "--no-keep-last" in out
    assert puzzle_cli(["fuse-ffn", str(tmp_path / "child"), "--dry-run", "--no-calibration", "--no-keep-last"]) == 0
    assert "nothing would be fused" not in capsys.readouterr().out
