"""Blockwise local distillation: training lowers the loss, linear units are exact least squares,
a killed run resumes to identical tensors, and parallel workers split the units without overlap."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from pipeline_fixtures import tiny_run_inputs, tiny_search_config, write_config
from safetensors.torch import load_file

from puzzle.blocks.init import least_squares
from puzzle.checkpoint import load_architecture
from puzzle.distill.activations import run_layers
from puzzle.distill.bld import plan_parent_activations, read_unit_result, train_units, unit_path
from puzzle.distill.parent_cache import DiskActivations, RecomputedActivations
from puzzle.errors import ConfigError
from puzzle.pipeline import open_run, run_bld, run_search

ROOT = Path(__file__).parents[2]


def _library(tmp_path, name, **sections):
    parent, corpus = tiny_run_inputs(tmp_path / "inputs") if not (tmp_path / "inputs").exists() else \
        (tmp_path / "inputs" / "parent", tmp_path / "inputs" / "corpus")
    config = write_config(tmp_path / f"{name}.yaml", tiny_search_config(corpus, **sections))
    return run_search(tmp_path / name, parent=parent, config=config, stage="library")


def test_gradient_units_improve_and_linear_units_are_least_squares(tmp_path):
    search = _library(tmp_path, "run", bld={"tokens_per_unit": 8192})
    run_bld(search.paths.root)
    manifest = search.manifest()
    for unit in manifest.units:
        result = read_unit_result(unit_path(search.paths, unit))
        assert result.tokens == 8192 and result.worker == "0/1"
        if not unit.variant.replace_with_linear:
            assert result.loss_final < result.loss_init, unit.unit_id
    # A linear FFN unit holds the exact least-squares map over the same training batches.
    unit = next(u for u in manifest.units if u.kind == "ffn" and u.variant.replace_with_linear)
    parent, data, cfg = search.parent_model(), search.data(), search.cfg.bld
    xtx = xty = 0
    layer = parent.model.layers[unit.layer]
    for batch in data.batches("train", cfg.batch_size, n_tokens=8192, seed=cfg.seed):
        _, io = run_layers(parent, batch, stop=unit.layer + 1, capture={unit.layer})
        x = layer.post_attention_layernorm(io[unit.layer].h).flatten(0, 1).double()
        y = io[unit.layer].ffn.flatten(0, 1).double()
        xtx, xty = xtx + x.T @ x, xty + x.T @ y
    weights = load_file(unit_path(search.paths, unit))
    stored = weights[f"model.layers.{unit.layer}.mlp.linear_mlp.weight"]
    torch.testing.assert_close(stored, least_squares(xtx, xty).float(), atol=1e-5, rtol=1e-4)


def test_a_unit_that_bld_makes_worse_keeps_its_initialisation(tmp_path):
    from puzzle.blocks.init import init_candidate
    from puzzle.blocks.library import load_stats, to_device_stats

    search = _library(tmp_path, "run", bld={"tokens_per_unit": 2048, "lr": 10.0})  # a rate that wrecks units
    run_bld(search.paths.root)
    parent, arch = search.parent_model(), load_architecture(search.paths.parent)
    results = {u.unit_id: (u, read_unit_result(unit_path(search.paths, u))) for u in search.manifest().units}
    kept = [(u, r) for u, r in results.values() if r.kept == "init"]
    assert kept and all(r.loss_final > r.loss_init for _, r in kept)
    assert all(r.loss_final <= r.loss_init for _, r in results.values() if r.kept == "bld")
    for u, _ in kept:  # the file holds exactly the initialisation
        stats = to_device_stats(load_stats(search.paths, u.layer), torch.device("cpu"))
        init = init_candidate(u, parent, arch, stats, search.cfg.bld.linear_attention_init).checkpoint_state(u.layer)
        stored = load_file(unit_path(search.paths, u))
        assert stored.keys() == init.keys() and all(torch.equal(stored[k], init[k]) for k in init), u.unit_id


def _env(threads=1):
    return {**os.environ, "PYTHONPATH": str(ROOT), "PUZZLE_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
            "PUZZLE_QUIET": "1"}


def test_sigkilled_bld_resumes_and_matches_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    sections = {"bld": {"tokens_per_unit": 16384, "max_group_params": 30000, "checkpoint_every": 8}}
    reference = _library(tmp_path, "reference", **sections)
    run_bld(reference.paths.root)
    for attempt in range(3):  # on a loaded machine the worker can move on between the look and the kill: retry
        killed = _library(tmp_path, f"killed{attempt}", **sections)
        proc = subprocess.Popen([sys.executable, "-m", "puzzle", "bld", str(killed.paths.root)], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        units = killed.manifest().units
        deadline = time.time() + 300
        while time.time() < deadline:  # kill once some units are written and a later group has a checkpoint
            done = [u for u in units if unit_path(killed.paths, u).exists()]
            if done and list(killed.paths.progress.glob("*.pt")) and len(done) < len(units):
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = [u for u in units if unit_path(killed.paths, u).exists()]
        if 0 < len(done) < len(units) and list(killed.paths.progress.glob("*.pt")):
            break
    before = {u.unit_id: unit_path(killed.paths, u).stat().st_mtime_ns for u in done}
    assert 0 < len(before) < len(units) and list(killed.paths.progress.glob("*.pt"))
    monkeypatch.delenv("PUZZLE_QUIET", raising=False)
    capsys.readouterr()
    run_bld(killed.paths.root)
    said = " ".join(capsys.readouterr().err.split())  # the resumed stage says from where
    assert f"{len(before)} of {len(units)} units were trained before" in said and re.search(r"resuming at step \d+ of \d+", said), said
    for u in units:
        a, b = load_file(unit_path(reference.paths, u)), load_file(unit_path(killed.paths, u))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), u.unit_id
        ra, rb = read_unit_result(unit_path(reference.paths, u)), read_unit_result(unit_path(killed.paths, u))
        assert (ra.loss_init, ra.loss_final) == (rb.loss_init, rb.loss_final)
    for unit_id, mtime in before.items():  # finished units were not trained again
        u = next(x for x in units if x.unit_id == unit_id)
        assert unit_path(killed.paths, u).stat().st_mtime_ns == mtime
    assert not list(killed.paths.progress.glob("*.pt"))


def test_two_local_workers_split_the_units_without_overlap(tmp_path):
    search = _library(tmp_path, "run")
    run_bld(search.paths.root, workers=2)
    units = sorted(search.manifest().units, key=lambda u: (u.layer, u.kind, u.name))
    owners = [read_unit_result(unit_path(search.paths, u)).worker for u in units]
    assert set(owners) == {"0/2", "1/2"}, "each worker gets work"
    assert owners == sorted(owners), "each worker owns a contiguous run of layers"
    assert open_run(search.paths.root).is_done("bld")
    assert not (search.paths.progress / "parent_activations").exists(), "the shared activations are removed"


def _train_with(search, source_of, units):
    parent, data, cfg = search.parent_model(), search.data(), search.cfg.bld
    arch = load_architecture(search.paths.parent)
    train_units(units, parent, arch, search.paths, data, cfg, torch.device("cpu"), source=source_of(parent))
    return {u.unit_id: (load_file(unit_path(search.paths, u)), read_unit_result(unit_path(search.paths, u)))
            for u in units}


def test_units_trained_on_disk_activations_equal_units_trained_on_recomputed_ones(tmp_path):
    recomputed = _library(tmp_path, "recomputed")
    cached = _library(tmp_path, "cached")
    units = recomputed.manifest().units
    root = cached.paths.progress / "parent_activations"
    a = _train_with(recomputed, RecomputedActivations, units)
    b = _train_with(cached, lambda parent: DiskActivations(parent, root, max(u.layer for u in units) + 1), units)
    assert len(list(root.glob("train-*.safetensors"))) == cached.cfg.bld.tokens_per_unit // (4 * 64)
    for unit_id, (weights, result) in a.items():
        other, other_result = b[unit_id]
        assert all(torch.equal(weights[k], other[k]) for k in weights), unit_id
        assert (result.loss_init, result.loss_final) == (other_result.loss_init, other_result.loss_final)


def test_a_unit_trained_in_a_large_group_equals_the_unit_trained_alone(tmp_path):
    """The default group size follows the GPU's free memory, so grouping must not change any unit's result:
    every unit's optimiser state and loss are its own, the schedule and batches are the same."""
    from puzzle.distill.bld import plan_groups

    alone = _library(tmp_path, "alone", bld={"max_group_params": 1})
    together = _library(tmp_path, "together", bld={"max_group_params": 10**12})
    units = alone.manifest().units
    arch = load_architecture(alone.paths.parent)
    assert len(plan_groups(units, arch, 1)) == len(units) and len(plan_groups(units, arch, 10**12)) == 1
    a = _train_with(alone, RecomputedActivations, units)
    b = _train_with(together, RecomputedActivations, units)
    for unit_id, (weights, result) in a.items():
        other, other_result = b[unit_id]
        assert all(torch.equal(weights[k], other[k]) for k in weights), unit_id
        assert (result.loss_init, result.loss_final) == (other_result.loss_init, other_result.loss_final), unit_id


def test_a_missing_shard_is_computed_by_whoever_needs_it(tmp_path):
    """A worker that died before writing its shards delays nobody: the reader computes and writes them."""
    search = _library(tmp_path, "run")
    parent, data = search.parent_model(), search.data()
    cache = DiskActivations(parent, tmp_path / "cache", depth=3)
    batch = next(iter(data.batches("train", 4)))
    io = cache.layer_io("train", 5, batch, [1, 2])
    assert cache.path("train", 5).exists()
    _, expected = run_layers(parent, batch, stop=3, capture={1, 2})
    for i in (1, 2):
        for field in ("x", "attn", "h", "ffn", "y"):
            assert torch.equal(getattr(io[i], field), getattr(expected[i], field)), (i, field)
    again = cache.layer_io("train", 5, batch, [2])  # read back from the file
    assert torch.equal(again[2].y, expected[2].y)


def test_auto_caches_the_parent_only_when_its_forward_would_be_repeated(tmp_path, monkeypatch):
    search = _library(tmp_path, "run")
    manifest, parent, data = search.manifest(), search.parent_model(), search.data()
    arch = load_architecture(search.paths.parent)

    def plan(world_size, **bld):
        cfg = replace(search.cfg.bld, **bld)
        return plan_parent_activations(manifest.units, arch, parent, data, cfg, search.paths, world_size,
                                       manifest.parent_fingerprint)

    assert plan(1).mode == "recompute"
    assert plan(2).mode == "disk"
    assert plan(1, max_group_params=30000).mode == "disk", "several groups re-run the parent"
    assert plan(2, activation_cache_gb=0).mode == "recompute"
    assert plan(2, parent_activations="recompute").mode == "recompute"
    assert plan(1, parent_activations="disk").mode == "disk"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(ConfigError, match="parent_activations: recompute"):
        plan(2)  # no silent switch to recomputing: the workers must agree on the split


class _RunsCode:
    """A pickle that runs code when loaded: what a tampered progress checkpoint could hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def test_a_progress_checkpoint_is_read_as_tensors_only_never_unpickled_as_code(tmp_path):
    from puzzle.distill.bld import _group_key, group_budget, plan_groups

    search = _library(tmp_path, "run", bld={"tokens_per_unit": 4096})
    cfg, arch = search.cfg.bld, load_architecture(search.paths.parent)
    marker = tmp_path / "code-ran"
    search.paths.progress.mkdir(parents=True, exist_ok=True)
    for group in plan_groups(search.manifest().units, arch, group_budget(cfg, torch.device("cpu"))):
        torch.save({"step": 1, "payload": _RunsCode(marker)},
                   search.paths.progress / f"{_group_key(group, cfg, str(search.data().cache_path))}.pt")
    run_bld(search.paths.root)
    assert not marker.exists()
    assert all(unit_path(search.paths, u).exists() for u in search.manifest().units)
    assert list(search.paths.progress.glob("*.pt.unreadable"))  # set aside, not deleted


def test_truncated_or_foreign_unit_files_are_retrained_and_the_log_says_so(tmp_path, monkeypatch, capsys):
    from puzzle.distill.bld import pending_units

    search = _library(tmp_path, "run", bld={"tokens_per_unit": 4096})
    run_bld(search.paths.root)
    units = search.manifest().units
    # cloned: load_file maps the file, and the file is overwritten in place below
    reference = {u.unit_id: {k: v.clone() for k, v in load_file(unit_path(search.paths, u)).items()} for u in units}
    truncated, foreign, *kept = sorted(units, key=lambda u: u.unit_id)
    path = unit_path(search.paths, truncated)
    path.write_bytes(path.read_bytes()[:-100])  # a copy cut short
    other = next(u for u in kept if u.kind != foreign.kind or u.layer != foreign.layer)
    shutil.copy(unit_path(search.paths, other), unit_path(search.paths, foreign))  # another candidate's tensors
    mtimes = {u.unit_id: unit_path(search.paths, u).stat().st_mtime_ns for u in kept}
    monkeypatch.setenv("PUZZLE_QUIET", "0")
    assert {u.unit_id for u in pending_units(search.manifest(), search.paths)} == {truncated.unit_id, foreign.unit_id}
    run_bld(search.paths.root)
    log = capsys.readouterr().err
    assert f"{truncated.name}.safetensors" in log and "retrained" in log and "shorter than its header" in log
    assert "do not match the candidate" in log
    assert not pending_units(search.manifest(), search.paths)
    for u in (truncated, foreign):  # retrained to the same tensors (same seed, CPU)
        again = load_file(unit_path(search.paths, u))
        assert again.keys() == reference[u.unit_id].keys()
        assert all(torch.equal(again[k], reference[u.unit_id][k]) for k in again), u.unit_id
    assert {u.unit_id: unit_path(search.paths, u).stat().st_mtime_ns for u in kept} == mtimes
