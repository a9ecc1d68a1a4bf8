"""`puzzle search` end to end on a tiny parent: every stage, resumption, and the errors between stages."""

import dataclasses
import json
import shutil

import pytest
import torch
from pipeline_fixtures import tiny_run_inputs, tiny_search_config, write_config

from puzzle import pipeline, stages
from puzzle.blocks.library import Manifest
from puzzle.checkpoint import load_architecture, load_model
from puzzle.cli import app as cli
from puzzle.distill.activations import logits_from_hidden, run_layers
from puzzle.distill.bld import load_unit, unit_path
from puzzle.errors import ConfigError, InfeasibleError, StageError
from puzzle.mip.stage import ChildPlan, parse_relative
from puzzle.pipeline import open_run, run_search, run_stage

FAST = dict(profile={"batch_size": 4, "context_len": 96, "prompt_len": 32, "repeats": 3, "inner": 2, "warmup": 1,
                     "generate_tokens": 8},
            solve={"targets": [{"name": "fast", "throughput": "1.3x"}, {"name": "small", "memory": "0.75x"}],
                   "sweep": [1.2, 1.5]},
            report={"eval_tokens": 512, "batch_size": 4})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    parent, corpus = tiny_run_inputs(root / "inputs", layers=3)
    config = write_config(root / "search.yaml", tiny_search_config(corpus, **FAST))
    search = run_search(root / "run", parent=parent, config=config)
    return search


def test_every_stage_writes_its_outputs(finished_run):
    paths = finished_run.paths
    for path in (paths.manifest, paths.scores, paths.profile, paths.solutions / "sweep.json",
                 paths.root / "report.md", paths.root / "report.json", paths.root / "pareto.png", paths.root / "layers.png"):
        assert path.exists(), path
    # the pre-BLD scoring pass runs only when asked for, and the report says what is missing and how to get it
    assert not paths.scores_init.exists()
    assert "KL init: not measured" in (paths.root / "report.md").read_text()
    report = json.loads((paths.root / "report.json").read_text())
    assert [c["name"] for c in report["children"]] == ["fast", "small"]
    fast = ChildPlan.load(paths.solutions / "fast.json")
    assert fast.predicted_speedup >= 1.3 - 1e-9
    info = json.loads((paths.children / "fast" / "puzzle.json").read_text())
    assert info["predicted"]["speedup"] == pytest.approx(fast.predicted_speedup)
    assert (paths.root / "config.yaml").read_text().startswith("# resolved config")


def test_report_quality_is_measured_on_held_out_tokens_scoring_did_not_see(finished_run):
    from puzzle.scoring import Scores

    paths, cfg = finished_run.paths, finished_run.cfg
    report = json.loads((paths.root / "report.json").read_text())
    scores = Scores.load(paths.scores)
    data = finished_run.data()
    scored = torch.cat(list(data.batches("held_out", cfg.score.batch_size, n_tokens=cfg.score.tokens, shuffle=False)))
    reported = torch.cat(list(data.batches("held_out", cfg.report.batch_size, n_tokens=cfg.report.eval_tokens,
                                           shuffle=False, skip_tokens=cfg.score.tokens)))
    assert report["held_out"] == {"scoring_positions": scores.tokens,
                                  "report_positions": reported.shape[0] * (reported.shape[1] - 1)}
    assert scored.shape[0] * (scored.shape[1] - 1) == scores.tokens
    assert not {tuple(r.tolist()) for r in scored} & {tuple(r.tolist()) for r in reported}  # disjoint windows
    text = (paths.root / "report.md").read_text()
    assert f"on {report['held_out']['report_positions']:,} held-out positions, disjoint from the {scores.tokens:,}" in text


def test_realized_child_computes_the_parent_with_its_chosen_units(finished_run):
    paths = finished_run.paths
    plan = ChildPlan.load(paths.solutions / "small.json")
    manifest = Manifest.load(paths.manifest)
    parent = load_model(paths.parent)
    arch = load_architecture(paths.parent)
    replace = {}
    for i, (mine, theirs) in enumerate(zip(plan.blocks, arch.blocks)):
        for kind, v, p in (("attention", mine.attention, theirs.attention), ("ffn", mine.ffn, theirs.ffn)):
            if v != p:
                c = next(c for c in manifest.candidates_of(i, kind) if c.variant == v)
                block = load_unit(unit_path(paths, c), c, parent.config) if c.trainable else \
                    __import__("puzzle.blocks.subblock", fromlist=["SubBlock"]).SubBlock(parent.config, kind, v)
                replace.setdefault(i, {})[kind] = block
    assert replace, "the memory target replaces something"
    ids = torch.randint(0, parent.config.vocab_size, (2, 40))
    hidden, _ = run_layers(parent, ids, replace=replace)
    child = load_model(paths.children / "small")
    torch.testing.assert_close(child(ids).logits, logits_from_hidden(parent, hidden), atol=1e-5, rtol=1e-5)


def _forbid_reruns(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for name in ("profile_stage", "solve_stage", "realize_stage", "report_stage"):
        monkeypatch.setattr(stages, name, boom)
    monkeypatch.setattr(pipeline, "_bld", boom)
    monkeypatch.setattr(pipeline.Search, "library", boom)
    monkeypatch.setattr(pipeline.Search, "score", boom)


def test_rerun_skips_finished_stages(finished_run, monkeypatch):
    _forbid_reruns(monkeypatch)
    run_search(finished_run.paths.root)


def test_changed_bld_config_is_an_error_not_a_silent_retrain(finished_run, tmp_path):
    with pytest.raises(StageError, match="bld stage ran with a different config"):
        run_search(finished_run.paths.root, overrides={"bld": {"lr": 0.1}}, stage="bld")
    # What the message advises: deleting the library rebuilds it (and retrains) with the new config.
    run = tmp_path / "copy"
    shutil.copytree(finished_run.paths.root, run)
    shutil.rmtree(run / "library")
    search = run_search(run, overrides={"bld": {"lr": 0.1}})
    assert not pipeline.pending_units(search.manifest(), search.paths) and (run / "report.md").exists()


def test_how_bld_runs_is_not_a_config_change(finished_run, monkeypatch):
    """Checkpoint interval and the parent-activation cache change how BLD works, not its units."""
    _forbid_reruns(monkeypatch)
    run_search(finished_run.paths.root,
               overrides={"bld": {"parent_activations": "disk", "checkpoint_every": 3, "activation_cache_gb": 1.0}})


def test_impossible_target_names_the_binding_constraint(finished_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(finished_run.paths.root, run)
    # Timing-independent: no child is smaller than its embeddings. (A throughput target could become
    # feasible when a loaded machine inflates the profiled layer times relative to the fixed part.)
    with pytest.raises(InfeasibleError, match="memory"):
        run_stage(run, "solve", {"solve": {"targets": [{"name": "tiny", "memory": 1000}]}})
    assert cli.run(["solve", str(run), "--max-memory", "1000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_profile_of_another_parent_is_refused(finished_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(finished_run.paths.root, run)
    profile = json.loads((run / "profile.json").read_text())
    profile["parent_fingerprint"] = "0000"
    (run / "profile.json").write_text(json.dumps(profile))
    with pytest.raises(StageError, match="another parent"):
        run_stage(run, "solve")


def test_solve_without_scores_says_which_stage_to_run(finished_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(finished_run.paths.root, run)
    (run / "scores.json").unlink()
    with pytest.raises(Exception, match="run the `score` stage first"):
        run_stage(run, "solve")


def test_relative_and_size_targets():
    assert parse_relative("2x", 100.0, "t") == 200.0
    assert parse_relative("40GiB", 1.0, "m", size=True) == 40 * 2**30
    assert parse_relative(123, 1.0, "m") == 123.0
    with pytest.raises(Exception, match="write e.g."):
        parse_relative("fast", 1.0, "target x: throughput")


def test_fuse_prune_and_distill_stages_make_and_improve_derived_children(tmp_path):
    parent, corpus = tiny_run_inputs(tmp_path / "inputs", layers=3)
    sections = {**FAST, "solve": {"targets": [{"name": "one-attention", "max_attention_layers": 1}], "sweep": [1.2]}}
    config = tiny_search_config(corpus, **sections)
    config["space"]["attention"]["linear"] = False  # removed attention must be no-op for FFN runs to form
    config["fuse"] = {"threshold": None, "eval_tokens": 256, "calibration_tokens": 256, "batch_size": 4}
    config["prune"] = {"drop_layers": 1, "calibration_tokens": 256, "eval_tokens": 256, "batch_size": 4}
    config["gkd"] = {"tokens": 2048, "batch_size": 4, "eval_tokens": 256, "checkpoint_every": 100, "lr": 1e-3}
    search = run_search(tmp_path / "run", parent=parent, config=write_config(tmp_path / "c.yaml", config))
    children = search.paths.children
    assert (children / "one-attention-fused" / "puzzle.json").exists()
    pruned = json.loads((children / "one-attention-pruned" / "puzzle.json").read_text())
    assert len(pruned["prune"]["kept_layers"]) == 2
    realized = load_model(children / "one-attention").state_dict()
    for name in ("one-attention", "one-attention-fused", "one-attention-pruned"):
        assert not (children / name / "gkd.json").exists(), "a stage never rewrites its input"
        gkd = json.loads((children / f"{name}-kd" / "gkd.json").read_text())
        assert gkd["after"]["kl"] < gkd["before"]["kl"], name
    report = json.loads((search.paths.root / "report.json").read_text())
    names = {c["name"] for c in report["children"]}
    assert {"one-attention-kd", "one-attention-fused-kd", "one-attention-pruned-kd"} <= names
    fused = next(c for c in report["children"] if c["name"] == "one-attention-fused")
    assert fused["summed_score"] is None and fused["measured_speedup"] is not None

    # Another GKD config re-derives from the un-distilled child: the same starting point, not the distilled one.
    before = json.loads((children / "one-attention-kd" / "gkd.json").read_text())["before"]
    config["gkd"]["lr"] = 5e-4
    run_search(search.paths.root, config=write_config(tmp_path / "c2.yaml", config), stage="distill")
    again = json.loads((children / "one-attention-kd" / "gkd.json").read_text())
    assert again["before"] == before and again["config"]["lr"] == 5e-4
    assert all(torch.equal(v, realized[k]) for k, v in load_model(children / "one-attention").state_dict().items())


def test_report_includes_lm_eval_scores_when_the_config_names_tasks(finished_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(finished_run.paths.root, run)
    task = tmp_path / "tasks"
    (task / "data").mkdir(parents=True)
    (task / "data" / "mc.jsonl").write_text("".join(json.dumps({"context": "def f(x):\n", "choices": ["    return x\n", "    x return\n"], "label": 0}) + "\n" for _ in range(3)))
    (task / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data/mc.jsonl\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n")
    run_stage(run, "report", {"report": {"tasks": [str(task)], "measure_speed": False}})
    report = json.loads((run / "report.json").read_text())
    assert set(report["tasks"]) == {"parent", "fast", "small"}
    assert 0.0 <= report["tasks"]["parent"]["tiny_mc (acc)"] <= 1.0
    assert "### lm-eval" in (run / "report.md").read_text()


def test_vllm_native_target_drops_exactly_the_variants_vllm_does_not_serve(finished_run, tmp_path):
    from puzzle.mip.stage import build_problem, vllm_native_problem
    from puzzle.profiling import Profile
    from puzzle.scoring import Scores

    paths = finished_run.paths
    manifest, arch = Manifest.load(paths.manifest), load_architecture(paths.parent)
    problem = build_problem(manifest, Scores.load(paths.scores), Profile.load(paths.profile), arch)
    native = vllm_native_problem(problem, manifest, arch, "t")
    for full, kept in zip(problem.layers, native.layers):
        assert [o.name for o in kept.attention] == [o.name for o in full.attention if o.name != "linear" and "_w" not in o.name]
        assert [o.name for o in kept.ffn] == [o.name for o in full.ffn if o.name != "linear"]
        assert any(o.name == "linear" for o in full.attention)  # the unrestricted space has them: not vacuous

    run = tmp_path / "copy"
    shutil.copytree(paths.root, run)
    assert cli.run(["solve", str(run), "--max-memory", "0.75x", "--vllm-native"]) == 0
    plan = ChildPlan.load(run / "solutions" / "memory0.75x-vllm.json")
    assert plan.target["vllm_native"] is True
    assert not dataclasses.replace(arch, blocks=plan.blocks).vllm_unsupported()
    assert cli.run(["solve", str(run), "--vllm-native"]) == 2  # a restriction without a target
    # parents whose every attention layer vLLM's DeciLM lacks are refused up front, naming the reason
    for field, reason in (("qk_norm", "q/k RMSNorm"), ("attention_sinks", "attention sinks")):
        other = dataclasses.replace(arch, shape=dataclasses.replace(arch.shape, **{field: True}))
        with pytest.raises(ConfigError, match=f"target t: vllm_native is impossible for this parent: {reason}"):
            vllm_native_problem(problem, manifest, other, "t")


def test_bf16_parent_runs_every_stage(tmp_path):
    """GPUs run the parent in bf16 while units keep fp32 weights: every stage must meet the parent's dtype."""
    parent, corpus = tiny_run_inputs(tmp_path / "inputs", layers=2)
    config = {**tiny_search_config(corpus, **{**FAST, "solve": {"targets": [{"name": "fast", "throughput": "1.3x"}],
                                                                "sweep": [1.2]}}), "dtype": "bfloat16"}
    search = run_search(tmp_path / "run", parent=parent, config=write_config(tmp_path / "c.yaml", config))
    report = json.loads((search.paths.root / "report.json").read_text())
    assert [c["name"] for c in report["children"]] == ["fast"]
    assert 0 <= report["children"][0]["kl"] < 1  # measured, finite


def test_coupled_search_runs_end_to_end_and_realizes_an_empty_layer(tmp_path):
    """Coupled mode trains whole (attention, FFN) pairs; a no-op + no-op layer has no unit and no weights."""
    from puzzle.arch import AttentionConfig, BlockConfig, FFNConfig
    from puzzle.blocks.subblock import SubBlock
    from puzzle.realize import realize

    parent_dir, corpus = tiny_run_inputs(tmp_path / "inputs", layers=2)
    space = {"mode": "coupled", "attention": {"kv_heads": [2], "windows": [], "linear": False},
             "ffn": {"fractions": [0.5], "multiple": 32, "linear": False}}
    config = tiny_search_config(corpus, space=space, **{**FAST, "solve": {"targets": [{"name": "fast", "throughput": "1.3x"}],
                                                                          "sweep": [1.2]}})
    search = run_search(tmp_path / "run", parent=parent_dir, config=write_config(tmp_path / "c.yaml", config))
    paths = search.paths
    manifest = Manifest.load(paths.manifest)
    assert {c.kind for c in manifest.candidates} == {"block"}
    assert len(manifest.units) == 2 * (3 * 3 - 2)  # per layer: 3 x 3 pairs less the parent's and no-op + no-op
    assert load_model(paths.children / "fast") is not None
    assert json.loads((paths.root / "report.json").read_text())["children"][0]["name"] == "fast"

    empty = BlockConfig(attention=AttentionConfig(no_op=True), ffn=FFNConfig(no_op=True))
    trained = next(c for c in manifest.candidates_of(1, "block") if c.trainable)
    plan = dataclasses.replace(ChildPlan.load(paths.solutions / "fast.json"), name="empty0", blocks=(empty, trained.variant))
    parent, arch = load_model(paths.parent), load_architecture(paths.parent)
    child_dir = realize(plan, arch, manifest, paths, torch.float32)
    child = load_model(child_dir)
    assert not any(k.startswith("model.layers.0.") for k in child.state_dict())
    replace = {0: {"block": SubBlock(parent.config, "block", empty)},
               1: {"block": load_unit(unit_path(paths, trained), trained, parent.config)}}
    ids = torch.randint(0, parent.config.vocab_size, (2, 40))
    with torch.no_grad():
        hidden, _ = run_layers(parent, ids, replace=replace)
        torch.testing.assert_close(child(ids).logits, logits_from_hidden(parent, hidden), atol=1e-5, rtol=1e-5)


def test_a_fine_tuned_parent_of_the_same_shape_is_not_mistaken_for_the_runs_parent(tmp_path):
    from safetensors.torch import load_file, save_file

    from puzzle.checkpoint import fingerprint

    parent_dir, corpus = tiny_run_inputs(tmp_path / "inputs", layers=2)
    config = write_config(tmp_path / "c.yaml", tiny_search_config(corpus))
    search = run_search(tmp_path / "run", parent=parent_dir, config=config, stage="library")
    run_search(search.paths.root, parent=parent_dir, stage="library")  # the same parent again: fine

    tuned = tmp_path / "tuned"
    shutil.copytree(parent_dir, tuned)
    weights = load_file(parent_dir / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"] + 1e-3  # same size
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    assert (tuned / "model.safetensors").stat().st_size == (parent_dir / "model.safetensors").stat().st_size
    assert fingerprint(tuned) != fingerprint(parent_dir)
    with pytest.raises(StageError, match=r"differs from the parent .* \(model.safetensors changed\)"):
        run_search(search.paths.root, parent=tuned, stage="library")

    # The run's own converted parent edited in place: the library no longer belongs to it.
    shutil.copy(tuned / "model.safetensors", search.paths.parent / "model.safetensors")
    with pytest.raises(StageError, match="built for another parent"):
        run_search(search.paths.root, stage="score")


def test_solve_adds_or_replaces_a_target_keeps_the_others_and_can_realize(finished_run, tmp_path, capsys):
    from puzzle.pipeline import load_run_config
    from puzzle.run import RunPaths

    run = tmp_path / "copy"
    shutil.copytree(finished_run.paths.root, run)
    capsys.readouterr()
    assert cli.run(["solve", str(run), "--target-throughput", "1.2x"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps at the terminal's width
    assert [t.name for t in load_run_config(RunPaths(run)).solve.targets] == ["fast", "small", "throughput1.2x"]
    assert "throughput1.2x: predicted" in out and "layer" in out and f"puzzle realize {run}" in out
    assert "fast: predicted" not in out  # only the new target is shown
    assert cli.run(["solve", str(run), "--name", "fast", "--target-throughput", "1.2x", "--realize"]) == 0
    assert ChildPlan.load(run / "solutions" / "fast.json").target["throughput"] == "1.2x"
    assert all((run / "children" / name / "config.json").exists() for name in ("fast", "small", "throughput1.2x"))
    assert cli.run(["solve", str(run), "--max-memory", "1000"]) == 2  # impossible: refused, and not kept
    assert [t.name for t in load_run_config(RunPaths(run)).solve.targets] == ["fast", "small", "throughput1.2x"]


def test_a_stage_asked_for_by_name_without_its_config_section_is_an_error(finished_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(finished_run.paths.root, run)
    for stage, section in (("fuse", "fuse"), ("prune", "prune"), ("distill", "gkd")):
        with pytest.raises(ConfigError, match=f"--stage {stage} needs a `{section}:` section"):
            run_search(run, stage=stage)


def test_noisy_timings_are_retried_then_flagged_in_the_report(finished_run, tmp_path, monkeypatch):
    from puzzle import profiling

    run = tmp_path / "copy"
    shutil.copytree(finished_run.paths.root, run)
    calls = []

    def noisy(fn, cfg, device):  # a loaded machine: samples 1x..4x apart
        fn()
        calls.append(1)
        return [0.001 * (1 + k % 4) for k in range(10)]

    monkeypatch.setattr(profiling, "time_samples", noisy)
    run_search(run, stage="report")
    report = json.loads((run / "report.json").read_text())
    assert all(c["measured_noisy"] for c in report["children"]) and report["parent"]["measured_noisy"]
    assert "~: not to be trusted" in (run / "report.md").read_text()
    assert len(calls) >= profiling.MEASURE_ATTEMPTS * (1 + len(report["children"]))  # decode retried per model
    assert profiling.spread([0.002] * 10) == 0.0 and profiling.spread([0.001 * (1 + k % 4) for k in range(10)]) > 1


def test_a_rerun_says_which_stages_are_done_and_where_it_continues(finished_run, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PUZZLE_QUIET", raising=False)
    run = tmp_path / "copy"
    shutil.copytree(finished_run.paths.root, run)
    capsys.readouterr()
    run_search(run)
    assert "every stage is done" in " ".join(capsys.readouterr().err.split())
    (run / "stages" / "score.json").unlink()
    run_search(run)
    err = " ".join(capsys.readouterr().err.split())
    assert "done library, bld" in err and "continuing from score" in err, err


def test_rerank_keeps_the_diverse_solution_whose_assembled_child_has_the_lowest_measured_kl(finished_run, tmp_path):
    from puzzle.checkpoint import load_model
    from puzzle.pipeline import run_solve
    from puzzle.scoring import model_quality

    run = tmp_path / "copy"
    shutil.copytree(finished_run.paths.root, run)
    plans = {p.name: p for p in run_solve(run, rerank=3, realize=True)}
    fast = ChildPlan.load(run / "solutions" / "fast.json")
    rows = fast.reranked
    assert 2 <= len(rows) <= 3 and [r["solution"] for r in rows] == list(range(len(rows)))
    assert sum(r["chosen"] for r in rows) == 1
    chosen = next(r for r in rows if r["chosen"])
    assert chosen["kl"] == min(r["kl"] for r in rows)
    assert all(r["predicted_speedup"] >= 1.3 - 1e-9 for r in rows)  # every alternative meets the target
    assert rows[0]["summed_score"] <= min(r["summed_score"] for r in rows) + 1e-12  # solution 0 is the MIP optimum
    assert fast.solution.score == pytest.approx(chosen["summed_score"]) and plans["fast"].reranked == rows
    # the recorded KL is the realized child's, on the tokens scoring used
    search = open_run(run)
    batches = list(search.data().batches("held_out", search.cfg.score.batch_size, n_tokens=search.cfg.score.tokens,
                                         shuffle=False))
    parent = search.parent_model()  # bf16 on a GPU: the child is measured as it runs
    child = load_model(run / "children" / "fast", dtype=parent.dtype, device=parent.device)
    with torch.no_grad():
        assert model_quality(parent, child, batches).kl == pytest.approx(chosen["kl"], rel=1e-4)
    run_search(run, stage="report")
    report = (run / "report.md").read_text()
    assert "## Re-ranking" in report and f"| fast | {len(rows)} |" in report
    with pytest.raises(ConfigError, match="solve.rerank must be a whole number"):
        run_solve(run, rerank=0)


def test_scoring_in_shards_then_merged_equals_scoring_in_one_pass(finished_run, tmp_path):
    from puzzle.pipeline import merge_score_parts
    from puzzle.scoring import Scores

    run = tmp_path / "copy"
    shutil.copytree(finished_run.paths.root, run)
    whole = Scores.load(run / "scores.json")
    search = open_run(run)
    world = 5  # more shards than the 3 layers: the last ones are empty
    parts = [search.score_shard(rank, world) for rank in reversed(range(world))]
    assert all(p.exists() for p in parts) and not any(Scores.load(p).entries == whole.entries for p in parts)
    assert sum(1 for p in parts if not Scores.load(p).entries) >= 2
    merge_score_parts(search, world)
    merged = Scores.load(run / "scores.json")
    assert merged == whole  # bitwise on CPU: every candidate scored the same way, parent loss included
    assert search.is_done("score") and not list((run / "score_parts").glob("*.json"))
    with pytest.raises(StageError, match="4 of 5 scoring shards are missing"):
        search.score_shard(0, world)
        merge_score_parts(search, world)


def test_a_search_as_local_jobs_names_the_failed_task_its_unit_and_log(tmp_path, capsys):
    """slurm.executor: local runs the --launcher slurm chain as local processes (no cluster): a task that fails
    stops the chain with its error line, the unit it was training and its log; `puzzle status` says the same."""
    parent, corpus = tiny_run_inputs(tmp_path / "inputs", layers=2)
    config = write_config(tmp_path / "c.yaml", tiny_search_config(corpus, slurm={"executor": "local", "cpus_per_task": 1}))
    search = run_search(tmp_path / "run", parent=parent, config=config, stage="library")
    for stats in search.paths.calibration.glob("L*.safetensors"):  # BLD cannot initialise its units
        stats.write_bytes(b"not a safetensors file")
    with pytest.raises(StageError) as err:
        run_search(tmp_path / "run", workers=2, launcher="slurm")
    message = str(err.value)
    assert message.startswith("bld task 0 failed: ") and "training attention/L0/kv1" in message and "_log.err" in message, message
    assert [j["stage"] for j in json.loads((tmp_path / "run" / "jobs.json").read_text())["jobs"]] == ["prepare", "bld"]
    assert cli.run(["status", str(tmp_path / "run")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "library │ done" in out and "0 of" in out and "units trained" in out, out


@pytest.mark.slow  # the whole chain as local processes, GKD as two gloo ranks: ~90 s on 2 cores
def test_local_jobs_distill_as_two_ranks_what_one_process_distills(tmp_path):
    """With a `gkd:` section the chain's distill job is one job of slurm.distill_tasks_per_node processes, the
    ranks of one torch.distributed run; slurm.executor: local starts them on this machine."""
    from safetensors.torch import load_file

    from puzzle.distill.gkd import GKDResult, run_gkd

    parent, corpus = tiny_run_inputs(tmp_path / "inputs", layers=2)
    config = write_config(tmp_path / "c.yaml", tiny_search_config(
        corpus, solve={"targets": [{"name": "2x", "throughput": "2x"}], "sweep": [1.5]},
        profile={"analytic": True, "batch_size": 4, "context_len": 96, "prompt_len": 32, "generate_tokens": 8},
        report={"eval_tokens": 512, "batch_size": 4},
        gkd={"tokens": 1024, "batch_size": 1, "lr": 1e-3, "eval_tokens": 256, "checkpoint_every": 4},
        slurm={"executor": "local", "cpus_per_task": 1, "distill_tasks_per_node": 2}))
    search = run_search(tmp_path / "run", parent=parent, config=config, workers=2, launcher="slurm")
    jobs = json.loads((tmp_path / "run" / "jobs.json").read_text())["jobs"]
    assert [(j["stage"], j["ranks"]) for j in jobs] == [("prepare", 1), ("bld", 1), ("score", 1), ("select", 1),
                                                        ("distill", 2), ("report", 1)]
    ranked = GKDResult.load(search.paths.children / "2x-kd" / "gkd.json")
    alone = run_gkd(search.paths.children / "2x", search.paths.parent, search.cfg.data, tmp_path / "alone",
                    dataclasses.replace(search.cfg.gkd, batch_size=2))  # both ranks' windows in one batch
    assert (ranked.world_size, ranked.global_batch, ranked.steps) == (2, alone.global_batch, alone.steps)
    a, b = load_file(search.paths.children / "2x-kd" / "model.safetensors"), load_file(tmp_path / "alone" / "model.safetensors")
    # DDP averages the ranks' gradients, one process the whole batch's: equal up to summation order (2e-6 measured)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)
    assert open_run(tmp_path / "run").is_done("report")
    # requeued or submitted again, the distill job keeps a child distilled from the same weights and settings
    weights = search.paths.children / "2x-kd" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    stages.distill_stage(open_run(tmp_path / "run"), keep_finished=True)
    assert weights.stat().st_mtime_ns == before and open_run(tmp_path / "run").is_done("distill")


def test_a_dry_run_writes_the_chain_as_sbatch_scripts_without_a_cluster(tmp_path, monkeypatch):
    import subprocess

    parent, corpus = tiny_run_inputs(tmp_path / "inputs", layers=2)
    config = write_config(tmp_path / "c.yaml", tiny_search_config(corpus, slurm={"partition": "gpu", "gpus_per_task": 1}))
    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch here: nothing is submitted
    search = run_search(tmp_path / "run", parent=parent, config=config, workers=3, launcher="slurm", dry_run=True)
    folder = search.scripts.parent
    assert sorted(p.name for p in folder.iterdir()) == ["1-prepare.sbatch", "2-bld.sbatch", "3-score.sbatch",
                                                         "4-finish.sbatch", "submit.sh"]
    bld = (folder / "2-bld.sbatch").read_text()
    assert "#SBATCH --array=0-2" in bld and "#SBATCH --partition=gpu" in bld and "#SBATCH --gpus-per-node=1" in bld
    assert "-m puzzle run-task" in bld and "bld --rank ${SLURM_ARRAY_TASK_ID} --world 3" in bld
    assert f"--parent {parent.resolve()}" in (folder / "1-prepare.sbatch").read_text()
    submit = (folder / "submit.sh").read_text()
    assert submit.count("--dependency=afterok:") == 3 and submit.count("--kill-on-invalid-dep=yes") == 3
    assert subprocess.run(["/bin/bash", "-n", str(folder / "submit.sh")]).returncode == 0
    assert not (tmp_path / "run" / "parent").exists() and not (tmp_path / "run" / "jobs.json").exists()
    with pytest.raises(ConfigError, match="--dry-run writes the Slurm scripts"):
        run_search(tmp_path / "run", dry_run=True)
