"""Parents larger than one device (or one host's memory): stages that stream the parent tensor by tensor keep
their peak memory far below its size, and write what the in-memory path writes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from factories import decilm_dict

from puzzle.arch import Architecture, AttentionConfig, BlockConfig, FFNConfig
from puzzle.blocks.library import Manifest
from puzzle.blocks.space import Candidate
from puzzle.blocks.subblock import SubBlock
from puzzle.checkpoint import decilm_config, expected_tensors, finish_checkpoint_dir, load_architecture, load_model
from puzzle.distill.bld import UnitResult, unit_path, write_unit
from puzzle.mip.problem import Targets
from puzzle.mip.solution import Solution
from puzzle.mip.stage import ChildPlan
from puzzle.run import RunPaths
from puzzle.weights import LazyWeights, ShardedWriter

LAYERS = 34  # hidden 1024, FFN 4096, fp32: 67 MB per layer, ~2.35 GB in all


def _write_parent(folder: Path) -> dict:
    """A random DeciLM parent of ~2 GB written tensor by tensor (never whole in this process's memory)."""
    config = decilm_dict([("full", "full")] * LAYERS, vocab_size=8192, hidden_size=1024, num_attention_heads=8,
                         head_dim=128, max_position_embeddings=512)
    for block in config["block_configs"]:
        block["ffn"]["intermediate_size"] = 4096
    folder.mkdir(parents=True)
    writer, gen = ShardedWriter(folder, max_shard_bytes=400 * 2**20), torch.Generator().manual_seed(0)
    for name, shape in expected_tensors(decilm_config(config)).items():
        writer.add(name, torch.randn(shape, generator=gen) * 0.02)
    writer.close()
    finish_checkpoint_dir(folder, config, None, {})
    return config


def _plan(paths: RunPaths, config: dict, width: int) -> tuple[ChildPlan, Manifest]:
    """A child with no-op sub-blocks in layers 3 and 5 and, in layer 7, an FFN of `width` from a (random) unit."""
    arch = Architecture.from_config(config)
    narrow = FFNConfig(intermediate_size=width)
    unit = Candidate(layer=7, kind="ffn", name=f"ffn{width}", variant=narrow, is_parent=False)
    torch.manual_seed(1)
    write_unit(unit_path(paths, unit), SubBlock(decilm_config(config), "ffn", narrow), 7,
               UnitResult(unit_id=unit.unit_id, loss_init=1.0, loss_final=0.5, tokens=0, steps=0, seconds=0.0))
    blocks = list(arch.blocks)
    blocks[3] = dataclasses.replace(blocks[3], ffn=FFNConfig(no_op=True))
    blocks[5] = dataclasses.replace(blocks[5], attention=AttentionConfig(no_op=True))
    blocks[7] = BlockConfig(attention=blocks[7].attention, ffn=narrow)
    n = len(blocks)
    solution = Solution(attention=(0,) * n, ffn=(0,) * n, attention_names=("x",) * n, ffn_names=("x",) * n, score=0.0,
                        decode_time_s=1.0, prefill_time_s=1.0, throughput=1.0, latency_s=None, memory_bytes=None,
                        param_bytes=0, kv_bytes_per_token=0, attention_layers=n, targets=Targets(min_throughput=1.0), solver="test",
                        solve_time_s=0.0)
    plan = ChildPlan(name="streamed", target={"name": "streamed"}, solution=solution, blocks=tuple(blocks),
                     parent_throughput=1.0)
    return plan, Manifest(parent_fingerprint="synthetic", num_layers=n, space={}, candidates=(unit,))


# Peak RSS from VmHWM: the process's own high-water mark (ru_maxrss would carry over the forking pytest process's
# at exec, Linux's signal->maxrss).
_PEAK_KIB = textwrap.dedent("""
    def peak_kib():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
""")


def _peak(script: str, *args: Path) -> dict:
    """Run `script` (which prints a JSON line with its peaks last) in a fresh process; returns that line."""
    run = subprocess.run([sys.executable, "-c", _PEAK_KIB + script, *map(str, args)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


REALIZE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from puzzle.blocks.library import Manifest
    from puzzle.checkpoint import load_architecture
    from puzzle.mip.stage import ChildPlan
    from puzzle.realize import realize
    from puzzle.run import RunPaths

    paths = RunPaths(Path(sys.argv[1]))
    plan, manifest = ChildPlan.load(paths.root / "plan.json"), Manifest.load(paths.root / "manifest.json")
    before = peak_kib()
    realize(plan, load_architecture(paths.parent), manifest, paths, torch.float32, max_shard_bytes=128 * 2**20)
    print(json.dumps({"after_imports_kib": before, "peak_kib": peak_kib()}))
""")


def test_realize_streams_a_2gb_parent_in_a_third_of_its_size(tmp_path):
    paths = RunPaths(tmp_path / "run")
    config = _write_parent(paths.parent)
    parent_bytes = LazyWeights(paths.parent).nbytes()
    assert 2.0e9 < parent_bytes < 2.6e9
    plan, manifest = _plan(paths, config, 1024)
    plan.save(paths.root / "plan.json")
    manifest.save(paths.root / "manifest.json")
    rss = _peak(REALIZE, paths.root)
    print(f"realize of a {parent_bytes / 1e9:.2f} GB parent: peak RSS {rss['peak_kib'] / 2**20:.2f} GiB "
          f"({rss['after_imports_kib'] / 2**20:.2f} GiB after imports)")
    assert rss["peak_kib"] * 1024 < 0.35 * parent_bytes
    child = paths.children / "streamed"
    assert load_architecture(child).blocks == plan.blocks
    assert len(list(child.glob("model-*-of-*.safetensors"))) > 1  # sharded as it went
    parent, written = LazyWeights(paths.parent), LazyWeights(child)
    assert not any(k.startswith(("model.layers.3.mlp.", "model.layers.5.self_attn.")) for k in written)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.33.mlp.down_proj.weight"):
        assert torch.equal(written[name], parent[name])
    assert written["model.layers.7.mlp.down_proj.weight"].shape == (1024, 1024)


PIPELINE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from puzzle.pipeline import run_search

    root, parent, config, stage = *map(Path, sys.argv[1:4]), sys.argv[4]
    before = peak_kib()
    run_search(root, parent=parent, config=config, stage=stage)
    print(json.dumps({"after_imports_kib": before, "peak_kib": peak_kib()}))
""")


def test_calibration_bld_and_scoring_of_a_2gb_parent_hold_a_third_of_it(tmp_path):
    """parent_memory_gb far below the parent: each stage reads the layers it runs from the parent's files one at a
    time, in its own process, and peaks below 35% of the parent's size."""
    from factories import tiny_corpus, tiny_tokenizer
    from pipeline_fixtures import tiny_search_config, write_config

    corpus = tiny_corpus(tmp_path / "corpus")
    _write_parent(tmp_path / "parent")
    tiny_tokenizer(corpus).save_pretrained(tmp_path / "parent")
    parent_bytes = LazyWeights(tmp_path / "parent").nbytes()
    config = tiny_search_config(corpus) | {"parent_memory_gb": 0.1}
    config |= {"data": {**config["data"], "seq_len": 64},
               "space": {"layers": [LAYERS - 2], "attention": {"kv_heads": [2], "windows": [], "linear": False, "no_op": False},
                         "ffn": {"fractions": [0.25], "multiple": 64, "linear": False, "no_op": False}},
               "calibration": {"tokens": 256, "batch_size": 2},
               "bld": {"tokens_per_unit": 512, "batch_size": 2, "eval_tokens": 128, "checkpoint_every": 100},
               "score": {"tokens": 128, "batch_size": 2}}
    write_config(tmp_path / "c.yaml", config)
    peaks = {}
    for stage in ("library", "bld", "score"):
        peaks[stage] = _peak(PIPELINE, tmp_path / "run", tmp_path / "parent", tmp_path / "c.yaml", stage)
    print("; ".join(f"{stage}: peak {p['peak_kib'] / 2**20:.2f} GiB ({p['after_imports_kib'] / 2**20:.2f} after imports)"
                    for stage, p in peaks.items()) + f" of a {parent_bytes / 1e9:.2f} GB parent")
    assert all(p["peak_kib"] * 1024 < 0.35 * parent_bytes for p in peaks.values()), peaks
    scores = json.loads((tmp_path / "run" / "scores.json").read_text())
    assert {e["name"] for e in scores["entries"]} >= {"kv2", "ffn1024"}


def test_streamed_realize_writes_what_the_in_memory_child_holds(tmp_path):
    """The streaming path against `assemble` (the child built in memory from the loaded parent), bitwise."""
    from puzzle.checkpoint import build_model, save_model
    from puzzle.realize import assemble, realize

    paths = RunPaths(tmp_path / "run")
    config = decilm_dict([("gqa2", "full")] * 10, hidden_size=64, head_dim=16)
    torch.manual_seed(0)
    save_model(build_model(decilm_config(config)), paths.parent)
    plan, manifest = _plan(paths, config, 32)
    arch = load_architecture(paths.parent)
    child = load_model(realize(plan, arch, manifest, paths, torch.float32, max_shard_bytes=2**16))
    expected = assemble(plan.blocks, load_model(paths.parent), arch, manifest, paths).state_dict()
    assert child.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in child.state_dict().items())
    assert len(list((paths.children / "streamed").glob("model-*-of-*.safetensors"))) > 1


def test_a_parent_over_its_memory_budget_runs_from_its_files_with_the_same_results(tmp_path):
    """parent_memory_gb below the parent's size: the layers beyond it stay in the safetensors files and are read
    in per forward; calibration, BLD and scoring give bitwise the results of the parent held whole."""
    from pipeline_fixtures import tiny_run_inputs, tiny_search_config, write_config
    from safetensors.torch import load_file

    from puzzle.pipeline import run_search
    from puzzle.scoring import Scores

    parent, corpus = tiny_run_inputs(tmp_path / "inputs")
    runs = {}
    # auto with the parent in its files: the shared shards, produced layer by layer; boundary: one layer boundary
    for name, budget, activations in (("whole", None, "auto"), ("offloaded", 0.0005, "auto"),
                                      ("boundary", 0.0005, "boundary")):
        config = tiny_search_config(corpus, bld={"parent_activations": activations})
        path = write_config(tmp_path / f"{name}.yaml", config | ({"parent_memory_gb": budget} if budget else {}))
        for stage in ("library", "bld", "score"):
            runs[name] = run_search(tmp_path / name, parent=parent, config=path, stage=stage)
    whole = runs["whole"]
    for name in ("offloaded", "boundary"):
        run = runs[name]
        assert run.parent_model().offloaded_layers > 0
        for unit in whole.manifest().units:
            a, b = load_file(unit_path(whole.paths, unit)), load_file(unit_path(run.paths, unit))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (name, unit.unit_id)
        assert Scores.load(whole.paths.scores).entries == Scores.load(run.paths.scores).entries, name
    assert not list((runs["boundary"].paths.progress / "parent_boundaries").rglob("*.safetensors"))  # removed after


def _count_reads(model) -> dict[int, int]:
    """layer index -> how many times its weights are read in from the checkpoint (one hooked module per layer)."""
    reads = {}
    for i, layer in enumerate(model.model.layers):
        hooked = next((m for m in layer.modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)), None)
        if hooked is None:
            continue
        reads[i], hook = 0, hooked._hf_hook
        read = hook.pre_forward

        def counting(module, *args, i=i, hook=hook, read=read, **kwargs):
            reads[i] += hook.offload  # a resident layer's hooks have `offload` off (layer_weights)
            return read(module, *args, **kwargs)
        hook.pre_forward = counting
    return reads


def test_scoring_an_offloaded_parent_reads_each_layer_once_per_scored_layer(tmp_path):
    """Layer-major scoring: the parent's and the candidates' passes go layer by layer over all batches, so a layer
    left in the files is read once per pass, whatever the number of candidates and batches (batch-major, a deep
    layer would be read once per candidate and batch of every layer above it)."""
    from pipeline_fixtures import tiny_run_inputs, tiny_search_config, write_config

    from puzzle.pipeline import run_search
    from puzzle.scoring import ScoreConfig, score_candidates

    parent_dir, corpus = tiny_run_inputs(tmp_path / "inputs", layers=5)
    search = run_search(tmp_path / "run", parent=parent_dir, stage="library",
                        config=write_config(tmp_path / "c.yaml", tiny_search_config(corpus)))
    candidates = [c for c in search.manifest().candidates if c.layer in (1, 3) and not c.trainable]
    assert sum(not c.is_parent for c in candidates if c.layer == 1) >= 2  # several candidates per scored layer
    cfg = ScoreConfig(tokens=512, batch_size=2)  # 4 batches
    whole = score_candidates(load_model(parent_dir), candidates, lambda c: None, search.data(), cfg, "p")
    model = load_model(parent_dir, max_bytes=1 << 18)
    reads = _count_reads(model)
    assert set(reads) == {0, 1, 2, 3, 4}, "every layer in the files"
    offloaded = score_candidates(model, candidates, lambda c: None, search.data(), cfg, "p")
    assert offloaded.entries == whole.entries
    # the parent pass + advancing to layer 3 (layers 0-2) + each scored layer at or above it (1: layers 1-4; 3: 3-4)
    assert reads == {0: 1 + 1 + 0, 1: 1 + 1 + 1, 2: 1 + 1 + 1, 3: 1 + 0 + 2, 4: 1 + 0 + 2}


def test_bld_from_a_layer_boundary_reads_each_parent_layer_once(tmp_path):
    """bld.parent_activations: boundary with the parent in its files: the worker moves one layer boundary down to
    each group's first layer over all batches at once and holds the group's layers while it trains, so a layer is
    read once to move the boundary past it and once more if it is trained, whatever the number of steps."""
    from pipeline_fixtures import tiny_run_inputs, tiny_search_config, write_config

    from puzzle.pipeline import run_search

    parent, corpus = tiny_run_inputs(tmp_path / "inputs", layers=5)
    config = tiny_search_config(corpus, bld={"parent_activations": "boundary"},
                                space={"layers": [1, 3], "attention": {"windows": []}}) | {"parent_memory_gb": 0.00001}
    search = run_search(tmp_path / "run", parent=parent, config=write_config(tmp_path / "c.yaml", config), stage="library")
    reads = _count_reads(search.parent_model())
    assert set(reads) == {0, 1, 2, 3, 4}
    search.bld_worker()
    assert {u.layer for u in search.manifest().units} == {1, 3}  # two groups (one per layer), 16 steps each
    assert reads == {0: 1, 1: 1 + 1, 2: 1, 3: 1, 4: 0}  # layer 1: trained, then the boundary moved past it
    assert not search.manifest().units or not list((search.paths.progress / "parent_boundaries").rglob("*.safetensors"))


def test_a_killed_boundary_worker_resumes_from_its_deepest_complete_boundary(tmp_path):
    """The boundary files are written atomically and a boundary is complete once marked: a worker restarted after
    moving its boundary reads it rather than running the parent's layers above it again."""
    from pipeline_fixtures import tiny_run_inputs

    from puzzle.distill.activations import run_layers
    from puzzle.distill.parent_cache import BoundaryActivations

    parent_dir, _ = tiny_run_inputs(tmp_path / "inputs", layers=5)
    model = load_model(parent_dir, max_bytes=1 << 18)
    gen = torch.Generator().manual_seed(0)
    batches = [("train", k, torch.randint(0, model.config.vocab_size, (2, 16), generator=gen)) for k in range(3)]
    cache = BoundaryActivations(model, tmp_path / "b", batches)
    with cache.holding([2]):
        io = cache.layer_io("train", 1, batches[1][2], [2])
    _, expected = run_layers(load_model(parent_dir), batches[1][2], stop=3, capture={2})
    assert torch.equal(io[2].x, expected[2].x) and torch.equal(io[2].ffn, expected[2].ffn)
    assert (tmp_path / "b" / "L0002" / "complete.json").exists()
    restarted = BoundaryActivations(model, tmp_path / "b", batches)
    reads = _count_reads(model)
    restarted.advance(4)  # from layer 2's boundary: layers 2 and 3 only
    assert reads == {0: 0, 1: 0, 2: 1, 3: 1, 4: 0}
    assert not (tmp_path / "b" / "L0002").exists() and (tmp_path / "b" / "L0004" / "complete.json").exists()


def _written(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _same_files(a: Path, b: Path) -> None:
    """Same tensors bitwise, same config / generation config, same puzzle.json but for its time stamp."""
    ta, tb = _written(a), _written(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) and ta[k].dtype == tb[k].dtype for k in ta)
    for name in ("config.json", "generation_config.json"):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name
    info_a, info_b = (json.loads((f / "puzzle.json").read_text()) for f in (a, b))
    assert {**info_a, "created": None} == {**info_b, "created": None}
    assert sorted(p.name for p in a.iterdir() if p.suffix != ".safetensors") == \
        sorted(p.name for p in b.iterdir() if p.suffix != ".safetensors" and p.name != "model.safetensors.index.json")


FUSED_GROUPS = ((2, 3, 4), (6, 7))  # layers 3-4 and 7 have no attention (_no_attention)


def _no_attention(config: dict) -> dict:
    for i in (3, 4, 7):
        config["block_configs"][i]["attention"] = {"no_op": True}
    return config


def test_streamed_fusion_writes_what_the_in_memory_fusion_wrote(tmp_path):
    """write_fused (tensor by tensor from the files) against fuse_layers_ on the model held whole + save_model."""
    from puzzle.checkpoint import build_model, save_model
    from puzzle.files import atomic_output_dir
    from puzzle.fusion.stage import write_fused
    from puzzle.fusion.weights import fuse_layers_

    config = _no_attention(decilm_dict([("gqa2", "full")] * 9, hidden_size=64, head_dim=16, mlp_bias=True))
    torch.manual_seed(0)
    save_model(build_model(decilm_config(config), torch.bfloat16), tmp_path / "parent")
    info = {"stage": "fuse-ffn", "parent": "p", "fusion": {"groups": [list(g) for g in FUSED_GROUPS]}}
    old = fuse_layers_(load_model(tmp_path / "parent", dtype=None), FUSED_GROUPS)
    save_model(old, tmp_path / "old", source=tmp_path / "parent", info=info)
    with atomic_output_dir(tmp_path / "new") as tmp:
        write_fused(tmp_path / "parent", tmp, FUSED_GROUPS, info, max_shard_bytes=2**14)
    assert len(list((tmp_path / "new").glob("model-*-of-*.safetensors"))) > 1
    _same_files(tmp_path / "old", tmp_path / "new")


def test_streamed_pruning_writes_what_the_in_memory_child_held(tmp_path, monkeypatch):
    """`prune` (the child sliced from the parent's files as they are read) against apply_plan on the parent held
    whole, with the same plan, in both output formats."""
    from pipeline_fixtures import tiny_run_inputs

    from puzzle.checkpoint import save_model
    from puzzle.corpus import DataConfig
    from puzzle.prune import PruneConfig, prune
    from puzzle.prune import stage as prune_stage
    from puzzle.prune.slicing import apply_plan

    monkeypatch.setenv("PUZZLE_CACHE_DIR", str(tmp_path / "cache"))
    parent, corpus = tiny_run_inputs(tmp_path / "inputs", layers=5)
    plans = []
    make_plan = prune_stage.make_plan
    monkeypatch.setattr(prune_stage, "make_plan", lambda *a: plans.append(make_plan(*a)) or plans[-1])
    data = DataConfig(paths=(str(corpus),), seq_len=64, held_out_fraction=0.2)
    for fmt in ("decilm", "plain"):
        cfg = PruneConfig(hidden_size=48, ffn_size=96, drop_layers=1, data=data, calibration_tokens=256,
                          eval_tokens=128, batch_size=2, output_format=fmt, parent_memory_gb=0.0002)
        result = prune(parent, tmp_path / fmt, cfg)
        assert result.quality is not None and result.after.layers == 4
        expected = apply_plan(load_model(parent, dtype=None), plans[-1])
        written = _written(tmp_path / fmt)
        state = {k: v for k, v in expected.state_dict().items() if k in written or k != "lm_head.weight"}
        assert written.keys() == state.keys() and all(torch.equal(written[k], state[k]) for k in state), fmt
        if fmt == "decilm":  # against save_model's files
            info = json.loads((tmp_path / fmt / "puzzle.json").read_text())
            save_model(expected, tmp_path / "old", source=parent, info={k: v for k, v in info.items() if k not in (
                "puzzle_version", "created", "architecture", "total_params", "vllm_native", "vllm_serving")})
            _same_files(tmp_path / "old", tmp_path / fmt)
        assert load_model(tmp_path / fmt).config.num_hidden_layers == 4


FUSE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from puzzle.corpus import DataConfig
    from puzzle.fusion import FusionConfig, fuse_ffn

    parent, out, corpus = map(Path, sys.argv[1:4])
    data = DataConfig(paths=(str(corpus),), seq_len=64, held_out_fraction=0.2)
    before = peak_kib()
    report = fuse_ffn(parent, out, FusionConfig(threshold=10.0, keep_last=False, data=data, calibration_tokens=128,
                                                eval_tokens=128, batch_size=2, parent_memory_gb=0.1))
    print(json.dumps({"after_imports_kib": before, "peak_kib": peak_kib(), "groups": report.fused_groups,
                      "kl": report.quality.kl}))
""")

PRUNE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from puzzle.corpus import DataConfig
    from puzzle.prune import PruneConfig, prune

    parent, out, corpus = map(Path, sys.argv[1:4])
    data = DataConfig(paths=(str(corpus),), seq_len=64, held_out_fraction=0.2)
    before = peak_kib()
    result = prune(parent, out, PruneConfig(hidden_size=768, ffn_size=2048, drop_layers=2, data=data,
                                            calibration_tokens=128, eval_tokens=128, batch_size=2, parent_memory_gb=0.1))
    print(json.dumps({"after_imports_kib": before, "peak_kib": peak_kib(), "kept": result.kept_layers,
                      "kl": result.quality.kl}))
""")


def test_fusing_a_2gb_model_holds_its_fused_group_not_the_model(tmp_path):
    """fuse-ffn with calibration and the quality check, the model over its memory budget: the dependency and the
    check run it from its files, the fused model is written tensor by tensor and read back the same way. Fusion
    holds one group's FFNs and their fused copy at once (and checks them on a probe), so what it holds beyond the
    imports grows with the largest fused group (here 3 x 50 MB), not with the model (2.3 GB)."""
    from factories import tiny_corpus, tiny_tokenizer

    corpus = tiny_corpus(tmp_path / "corpus")
    _write_parent(tmp_path / "parent")
    config = json.loads((tmp_path / "parent" / "config.json").read_text())
    for i in (11, 12):  # one run of three FFNs: fusion holds its FFNs and the fused one (2 x 50 MB x 3)
        config["block_configs"][i]["attention"] = {"no_op": True}
    (tmp_path / "parent" / "config.json").write_text(json.dumps(config))
    _drop_attention(tmp_path / "parent", (11, 12))
    tiny_tokenizer(corpus).save_pretrained(tmp_path / "parent")
    parent_bytes = LazyWeights(tmp_path / "parent").nbytes()
    rss = _peak(FUSE, tmp_path / "parent", tmp_path / "fused", corpus)
    print(f"fuse-ffn of a {parent_bytes / 1e9:.2f} GB model: peak RSS {rss['peak_kib'] / 2**20:.2f} GiB "
          f"({rss['after_imports_kib'] / 2**20:.2f} GiB after imports)")
    group_bytes = 3 * 3 * 1024 * 4096 * 4  # three FFNs of gate / up / down, fp32
    assert (rss["peak_kib"] - rss["after_imports_kib"]) * 1024 < 4 * group_bytes
    assert rss["peak_kib"] * 1024 < 0.4 * parent_bytes
    assert [tuple(g) for g in rss["groups"]] == [(10, 11, 12)]
    fused = load_architecture(tmp_path / "fused")
    assert fused.blocks[10].ffn.intermediate_size == 3 * 4096 and all(fused.blocks[i].ffn.no_op for i in (11, 12))
    written = LazyWeights(tmp_path / "fused")
    assert written["model.layers.10.mlp.down_proj.weight"].shape == (1024, 3 * 4096)
    assert torch.equal(written["model.layers.33.mlp.up_proj.weight"], LazyWeights(tmp_path / "parent")["model.layers.33.mlp.up_proj.weight"])


def test_pruning_a_2gb_parent_holds_a_third_of_it(tmp_path):
    """prune (hidden size, FFN width, depth) with importance and the quality check, the parent over its memory
    budget: importance runs it from its files, the child is sliced tensor by tensor from them."""
    from factories import tiny_corpus, tiny_tokenizer

    corpus = tiny_corpus(tmp_path / "corpus")
    _write_parent(tmp_path / "parent")
    tiny_tokenizer(corpus).save_pretrained(tmp_path / "parent")
    parent_bytes = LazyWeights(tmp_path / "parent").nbytes()
    rss = _peak(PRUNE, tmp_path / "parent", tmp_path / "pruned", corpus)
    print(f"prune of a {parent_bytes / 1e9:.2f} GB parent: peak RSS {rss['peak_kib'] / 2**20:.2f} GiB "
          f"({rss['after_imports_kib'] / 2**20:.2f} GiB after imports)")
    assert rss["peak_kib"] * 1024 < 0.35 * parent_bytes
    child = load_architecture(tmp_path / "pruned")
    assert child.num_layers == LAYERS - 2 and child.shape.hidden_size == 768
    assert {b.ffn.intermediate_size for b in child.blocks} == {2048}
    assert len(list((tmp_path / "pruned").glob("model-*-of-*.safetensors"))) > 1  # shards within the budget


def _drop_attention(folder: Path, layers) -> None:
    """Rewrite a written model folder without the attention tensors of `layers` (their attention is no-op)."""
    from safetensors.torch import load_file, save_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    prefixes = tuple(f"model.layers.{i}.{k}" for i in layers for k in ("self_attn.", "input_layernorm."))
    for file in sorted(set(index["weight_map"].values())):
        tensors = load_file(folder / file)
        if any(k.startswith(prefixes) for k in tensors):
            save_file({k: v for k, v in tensors.items() if not k.startswith(prefixes)}, folder / file, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith(prefixes)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
