"""Global distillation: the loss against a naive reference, KD lowering a narrowed student's KL, SIGKILL and
resume ending with the same weights, the output format, and one-line errors for bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from factories import decilm_model, tiny_parent_with_tokenizer
from safetensors.torch import load_file
from typer.testing import CliRunner

from puzzle.arch import Architecture, AttentionConfig, FFNConfig
from puzzle.checkpoint import build_model, decilm_config, load_model, normalized_config, save_model
from puzzle.corpus import DataConfig
from puzzle.distill.gkd import Distilled, GKDConfig, GKDResult, layer_pairs, load_gkd_settings, run_gkd
from puzzle.distill.gkd_loss import GKDLoss
from puzzle.distill.gkd_state import STATE_DIR
from puzzle.errors import ConfigError, InputError, OutputExistsError, StageError

ROOT = Path(__file__).parents[2]
SMALL = dict(tokens=16384, batch_size=4, lr=1e-3, eval_tokens=1024, checkpoint_every=4)


def narrowed_student(parent: Path, out: Path) -> Path:
    """The parent without attention in layer 1 and with layer 2's FFN cut to its first 48 of 128 channels."""
    config = normalized_config(parent)
    arch = Architecture.from_config(config)
    arch = arch.with_block(1, attention=AttentionConfig(no_op=True)).with_block(2, ffn=FFNConfig(intermediate_size=48))
    student, weights = build_model(decilm_config(config, arch)), load_model(parent).state_dict()
    student.load_state_dict({k: weights[k][tuple(slice(0, n) for n in v.shape)] for k, v in student.state_dict().items()})
    return save_model(student, out, source=parent)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(parent, student, data config): a random tiny Llama with a BPE tokenizer, its narrowed child, stdlib text."""
    root = tmp_path_factory.mktemp("gkd")
    parent, corpus = tiny_parent_with_tokenizer(root / "inputs")
    student = narrowed_student(parent, root / "student")
    return parent, student, DataConfig(paths=(str(corpus),), seq_len=64, held_out_fraction=0.2)


# ---- the loss -------------------------------------------------------------------------------------------


def naive_gkd_loss(s_logits, t_logits, s_states, t_states, pairs, temperature, kl_weight, cosine_weight):
    """Position by position, layer by layer, from the definitions."""
    kls = []
    for b in range(s_logits.shape[0]):
        for t in range(s_logits.shape[1] - 1):  # predicting positions
            p = (t_logits[b, t].double() / temperature).softmax(-1)
            q = (s_logits[b, t].double() / temperature).softmax(-1)
            kls.append(float((p * (p.log() - q.log())).sum()))
    cosine = 0.0
    for i, j in pairs:
        a, c = s_states[i + 1].double(), t_states[j + 1].double()
        dists = [1 - float(a[b, t] @ c[b, t] / (a[b, t].norm() * c[b, t].norm()))
                 for b in range(a.shape[0]) for t in range(a.shape[1])]
        cosine += sum(dists) / len(dists)
    kl = sum(kls) / len(kls)
    return kl_weight * temperature**2 * kl + cosine_weight * cosine, kl, cosine


@pytest.mark.parametrize("chunk", [5, 4096])
def test_gkd_loss_matches_a_naive_reference_on_real_models(chunk):
    teacher = decilm_model([("full", "full")] * 3, seed=0)
    student = decilm_model([("no_op", "narrow"), ("gqa2", "full"), ("full", "no_op")], seed=1)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    pairs = ((0, 0), (2, 1))  # a depth-mapped alignment, not just the identity
    loss_fn = GKDLoss(temperature=2.0, kl_weight=0.7, cosine_weight=0.3, layer_pairs=pairs, logits_chunk=chunk)
    distilled = Distilled(student, loss_fn, teacher.lm_head)
    with torch.no_grad():
        t, t_final = teacher(ids, output_hidden_states=True), teacher.model(ids).last_hidden_state
    loss, kl, cosine = distilled(ids, t.hidden_states, t_final)
    with torch.no_grad():
        s = student(ids, output_hidden_states=True)
    ref_loss, ref_kl, ref_cos = naive_gkd_loss(s.logits, t.logits, s.hidden_states, t.hidden_states, pairs, 2.0, 0.7, 0.3)
    assert abs(loss.item() - ref_loss) < 1e-5 and abs(kl.item() - ref_kl) < 1e-5 and abs(cosine.item() - ref_cos) < 1e-5
    loss.backward()  # through the checkpointed logits chunks
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_held_out_metrics_match_a_naive_reference():
    teacher, student = decilm_model([("full", "full")] * 2, seed=0), decilm_model([("kv1", "narrow")] * 2, seed=1)
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(1))
    distilled = Distilled(student, GKDLoss(temperature=1.0, kl_weight=1.0, cosine_weight=0.0, layer_pairs=(),
                                           logits_chunk=4), teacher.lm_head)
    with torch.no_grad():
        sums = distilled(ids, None, teacher.model(ids).last_hidden_state, evaluate=True)
        z_s, z_t = student(ids).logits[:, :-1].flatten(0, 1), teacher(ids).logits[:, :-1].flatten(0, 1)
    y = ids[:, 1:].flatten()
    p, log_q = z_t.softmax(-1), z_s.log_softmax(-1)
    naive = [(p * (p.log() - log_q)).sum(), F.cross_entropy(z_s, y, reduction="sum"), (z_s.argmax(-1) == z_t.argmax(-1)).sum(),
             F.cross_entropy(z_t, y, reduction="sum"), y.numel()]
    torch.testing.assert_close(sums, torch.tensor([float(v) for v in naive], dtype=torch.float64), atol=1e-4, rtol=1e-5)


def test_layer_pairs_identity_mapping_and_errors():
    assert layer_pairs(None, 3, 3) == ((0, 0), (1, 1), (2, 2))
    assert layer_pairs((1, -1, 3), 3, 4) == ((0, 1), (2, 3))
    with pytest.raises(ConfigError, match="layer_map"):
        layer_pairs(None, 2, 4)
    with pytest.raises(ConfigError, match="2 entries"):
        layer_pairs((0, 1), 3, 4)
    with pytest.raises(ConfigError, match="lacks"):
        layer_pairs((0, 4), 2, 4)


# ---- whole runs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cosine_weight", [1.0, 0.0])
def test_gkd_lowers_held_out_kl_of_a_narrowed_student(inputs, tmp_path, cosine_weight):
    parent, student, data = inputs
    out = tmp_path / "out"
    result = run_gkd(student, parent, data, out, GKDConfig(**SMALL, cosine_weight=cosine_weight))
    assert result.after.kl < 0.7 * result.before.kl
    assert result.after.top1 > result.before.top1
    assert result.tokens == result.steps * 4 * 64 == 16384 and result.tokens_per_s > 0
    assert result.before.teacher_lm_loss == result.after.teacher_lm_loss
    # A standard checkpoint of the student's architecture, with the tokenizer, gkd.json and no state left.
    assert not (out / STATE_DIR).exists() and (out / "tokenizer.json").is_file()
    assert GKDResult.load(out / "gkd.json") == result
    assert json.loads((out / "puzzle.json").read_text())["gkd"]["after"]["kl"] == result.after.kl
    model = load_model(out)
    assert normalized_config(out)["block_configs"] == normalized_config(student)["block_configs"]
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    assert not torch.equal(model(ids).logits, load_model(student)(ids).logits)


def _kd_process(student, parent, data, out, cfg, tmp_path, launcher=()) -> subprocess.Popen:
    """`run_gkd` in another process (or several, under `launcher`), one CPU thread each."""
    script = tmp_path / "kd.py"
    script.write_text(
        "import torch; torch.set_num_threads(1)\n"
        "from puzzle.corpus import DataConfig\nfrom puzzle.distill.gkd import GKDConfig, run_gkd\n"
        f"run_gkd({str(student)!r}, {str(parent)!r}, DataConfig.from_dict({data.to_dict()!r}), {str(out)!r}, GKDConfig(**{cfg!r}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PUZZLE_QUIET": "1"}
    return subprocess.Popen([sys.executable, *launcher, str(script)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def test_sigkilled_gkd_resumes_and_matches_an_uninterrupted_run(inputs, tmp_path):
    parent, student, data = inputs
    cfg = dict(SMALL, tokens=8192, checkpoint_every=8)  # 32 steps
    reference = run_gkd(student, parent, data, tmp_path / "reference", GKDConfig(**cfg))
    killed = tmp_path / "killed"
    proc = _kd_process(student, parent, data, killed, cfg, tmp_path)
    latest = killed / STATE_DIR / "latest.json"
    deadline = time.time() + 300
    while not latest.exists():  # kill just after the first checkpoint
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads(latest.read_text())["step"]
    assert 0 < step < reference.steps and not (killed / "config.json").exists()
    with pytest.raises(StageError, match="other inputs or settings"):  # another run never resumes this state
        run_gkd(student, parent, data, killed, GKDConfig(**dict(cfg, lr=5e-4)))
    resumed = run_gkd(student, parent, data, killed, GKDConfig(**cfg))
    assert resumed.resumed_from_step >= step
    a, b = load_file(tmp_path / "reference" / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (resumed.before, resumed.after) == (reference.before, reference.after)
    assert not (killed / STATE_DIR).exists()


@pytest.mark.slow  # two processes start torch: ~30 s on two busy cores
def test_two_ddp_processes_match_one_process_with_the_same_global_batch(inputs, tmp_path):
    parent, student, data = inputs
    cfg = dict(SMALL, tokens=4096)
    single = run_gkd(student, parent, data, tmp_path / "single", GKDConfig(**cfg))
    launcher = ("-m", "torch.distributed.run", "--nproc-per-node", "2")
    # One window per process and micro-step, two micro-steps (no_sync on the first): the same 4 windows a step.
    proc = _kd_process(student, parent, data, tmp_path / "ddp", dict(cfg, batch_size=1, grad_accum=2), tmp_path, launcher)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]
    ddp = GKDResult.load(tmp_path / "ddp" / "gkd.json")
    assert (ddp.world_size, ddp.global_batch, ddp.steps) == (2, single.global_batch, single.steps)
    a, b = load_file(tmp_path / "single" / "model.safetensors"), load_file(tmp_path / "ddp" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # the same updates, up to summation order
    assert abs(ddp.after.kl - single.after.kl) < 1e-6 * max(1.0, single.after.kl)


# ---- bad input and settings ------------------------------------------------------------------------------


def test_gkd_bad_inputs_fail_with_one_line_errors(inputs, tmp_path):
    parent, student, data = inputs
    cfg = GKDConfig(**SMALL)
    with pytest.raises(InputError, match="teacher .*no such folder"):
        run_gkd(student, tmp_path / "missing", data, tmp_path / "out", cfg)
    other_vocab = tmp_path / "other_vocab"
    save_model(decilm_model([("full", "full")] * 4), other_vocab)
    with pytest.raises(InputError, match="vocab_size 128 differs"):
        run_gkd(other_vocab, parent, data, tmp_path / "out", cfg)
    config = normalized_config(parent)
    arch = Architecture.from_config(config)
    shallow = Architecture(shape=arch.shape, blocks=arch.blocks[:2])  # depth-pruned: needs a layer_map
    save_model(build_model(decilm_config(config, shallow)), tmp_path / "shallow", source=parent)
    with pytest.raises(ConfigError, match="cosine_weight: 0"):
        run_gkd(tmp_path / "shallow", parent, data, tmp_path / "out", cfg)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_gkd(student, parent, data, tmp_path / "taken", cfg)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"
    with pytest.raises(OutputExistsError, match="teacher"):
        run_gkd(student, parent, data, parent, cfg, overwrite=True)
    assert not (tmp_path / "out").exists()


def test_gkd_settings_from_yaml_and_flags(tmp_path):
    path = tmp_path / "gkd.yaml"
    path.write_text(yaml.safe_dump({"gkd": {"tokens": 1000, "lr": 3e-4, "layer_map": [0, -1, 2]},
                                    "data": {"paths": ["a"], "seq_len": 128}}))
    cfg, data = load_gkd_settings(path, {"lr": 1e-3, "tokens": None}, {"paths": ["b", "c"]})
    assert (cfg.tokens, cfg.lr, cfg.layer_map) == (1000, 1e-3, (0, -1, 2))
    assert data.paths == ("b", "c") and data.seq_len == 128
    path.write_text(yaml.safe_dump({"gkd": {"temprature": 2}}))
    with pytest.raises(ConfigError, match="unknown key 'temprature'"):
        load_gkd_settings(path, {}, {"paths": ["a"]})
    with pytest.raises(ConfigError, match="--data"):
        load_gkd_settings(None, {}, {"paths": None})
    with pytest.raises(ConfigError, match="nothing to train on"):
        GKDConfig(kl_weight=0, cosine_weight=0)
    with pytest.raises(ConfigError, match="gkd.batch_size"):
        GKDConfig(batch_size=0)


def test_distill_command_runs_and_prints_the_metrics(inputs, tmp_path):
    import typer

    from puzzle.cli.distill import distill_command

    parent, student, data = inputs
    app = typer.Typer()
    app.command("distill")(distill_command)
    app.command("other")(lambda: None)  # two commands, so `distill` is a subcommand as in `puzzle`
    config = tmp_path / "gkd.yaml"
    config.write_text(yaml.safe_dump({"data": {"seq_len": 64, "held_out_fraction": 0.2}, "gkd": {"eval_tokens": 1024}}))
    args = ["distill", str(student), "--teacher", str(parent), "--data", data.paths[0], "--out", str(tmp_path / "out"),
            "--tokens", "2048", "--batch-size", "4", "--cosine-weight", "0", "--config", str(config)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "KL to teacher" in result.output and "distilled" in result.output
    saved = GKDResult.load(tmp_path / "out" / "gkd.json")
    assert saved.config.cosine_weight == 0 and saved.tokens == 2048
    assert json.loads((tmp_path / "out" / "puzzle.json").read_text())["command"].startswith("puzzle ")


def test_the_student_is_sharded_by_itself_only_when_replicas_would_not_fit(monkeypatch):
    from puzzle.distill import gkd
    from puzzle.distill.gkd import gkd_sharding

    said = []
    monkeypatch.setattr(gkd, "log", said.append)

    gib = 2**30
    # 1B student (16 GiB of training state) + 2 GiB teacher on 80 GiB GPUs: replicas fit, DDP as asked
    assert gkd_sharding(False, 10**9, 2 * gib, 80 * gib, world=8) is False
    # 8B student (119 GiB) + 16 GiB teacher: replicas do not fit, 8 shards do -> FSDP2, said in the log
    assert gkd_sharding(False, 8 * 10**9, 16 * gib, 80 * gib, world=8) is True
    assert said[-1].startswith("gkd: the replicated student would not fit: sharding it with FSDP2")
    assert "119.2 GiB + teacher 16.0 GiB; 80.0 GiB free per GPU, 8 process(es): FSDP2" in said[-2]
    assert gkd_sharding(True, 10**9, 2 * gib, 80 * gib, world=8) is True  # asked for: kept
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node N"):  # one GPU cannot hold it, more can
        gkd_sharding(False, 8 * 10**9, 16 * gib, 80 * gib, world=1)
    with pytest.raises(ConfigError, match="the teacher alone"):
        gkd_sharding(False, 10**9, 100 * gib, 80 * gib, world=8)


def test_a_teacher_over_its_memory_budget_teaches_exactly_the_same(inputs, tmp_path):
    """gkd.teacher_memory_gb below the teacher: its other layers are read from its files per forward, and the
    distilled student is bitwise the one a teacher held whole gives."""
    parent, student, data = inputs
    cfg = dict(SMALL, tokens=2048)
    whole = run_gkd(student, parent, data, tmp_path / "whole", GKDConfig(**cfg))
    offloaded = run_gkd(student, parent, data, tmp_path / "offloaded", GKDConfig(**cfg, teacher_memory_gb=0.0002))
    assert offloaded.after == whole.after
    a, b = load_model(tmp_path / "whole").state_dict(), load_model(tmp_path / "offloaded").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="teacher_memory_gb"):
        GKDConfig(teacher_memory_gb=0)
