"""`puzzle search` on a tiny Nemotron-H: Mamba, attention, MLP and MoE layers each get the variants of their type,
go through every stage, and make a child that generates with a cache as it does without."""

import json

import torch
from factories import tiny_parent_with_tokenizer
from pipeline_fixtures import tiny_search_config, write_config

from puzzle.blocks.library import Manifest
from puzzle.checkpoint import load_architecture, load_model
from puzzle.nemotron_h_puzzle import write_nemotron_h_puzzle
from puzzle.pipeline import run_search

FAST = dict(profile={"batch_size": 4, "context_len": 96, "prompt_len": 32, "repeats": 3, "inner": 2, "warmup": 1,
                     "generate_tokens": 8},
            solve={"targets": [{"name": "small", "memory": "0.7x"}], "sweep": [1.2]},
            report={"eval_tokens": 512, "batch_size": 4})


def test_tiny_nemotron_h_search_builds_variants_of_each_layer_type(tmp_path):
    parent, corpus = tiny_parent_with_tokenizer(tmp_path / "inputs", layers=4, family="nemotron_h")
    space = {"attention": {"kv_heads": [2], "windows": [], "linear": False}, "mamba": {"heads": [0.5]},
             "ffn": {"fractions": [0.5], "multiple": 32, "linear": False}, "moe": {"experts": [0.5]}}
    config = tiny_search_config(corpus, space=space, **FAST)
    search = run_search(tmp_path / "run", parent=parent, config=write_config(tmp_path / "c.yaml", config))

    manifest = Manifest.load(search.paths.manifest)
    names = {(c.layer, c.kind): set() for c in manifest.candidates}
    for c in manifest.candidates:
        names[(c.layer, c.kind)].add(c.name)
    assert names[(0, "attention")] == {"mamba8", "mamba4", "no_op"}  # Mamba: half the heads (2 per group), no-op
    assert names[(1, "attention")] == {"kv4", "kv2", "no_op"}
    assert names[(2, "ffn")] == {"ffn128", "ffn64", "no_op"}  # the gate-less MLP, narrower (still gate-less)
    assert names[(3, "ffn")] == {"moe_k4_top2", "moe_k2_top2", "no_op"}  # one expert kept per group
    assert all(c.variant.gated is False for c in manifest.candidates if c.layer == 2 and c.kind == "ffn" and not c.variant.no_op)
    profile = json.loads((search.paths.root / "profile.json").read_text())
    state = {v["name"]: v["state_bytes"] for v in profile["variants"] if v["kind"] == "attention"}
    assert state["mamba4"] * 2 > state["mamba8"] > state["mamba4"] > 0 and state["kv2"] == 0

    child = search.paths.root / "children" / "small"
    arch, parent_arch = load_architecture(child), load_architecture(search.paths.parent)
    assert arch.total_params() < parent_arch.total_params()
    model = load_model(child)
    ids = torch.randint(0, arch.shape.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False)
        uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()
    report = json.loads((search.paths.root / "report.json").read_text())
    assert report["children"][0]["name"] == "small" and 0 <= report["children"][0]["kl"] < 10
    # vLLM's Nemotron-H layout beside it: one layer per sub-block that is not no-op, each of the shapes that
    # transformers' NemotronH layer of that layer's own config has (vLLM's model mirrors them).
    assert report["children"][0]["vllm_serving"] == "nemotron_h"
    _check_nemotron_h_folder(child.with_name("small-nemotron-h"), arch)
    # The parent itself in that layout: every layer type, the MoE one included.
    write_nemotron_h_puzzle(search.paths.parent, tmp_path / "parent-nemotron-h")
    _check_nemotron_h_folder(tmp_path / "parent-nemotron-h", parent_arch)


def _check_nemotron_h_folder(folder, arch):
    import sys

    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHBlock

    from puzzle.nemotron_h_puzzle import nemotron_h_layers
    from puzzle.weights import LazyWeights

    sys.path.insert(0, str(folder))
    try:
        from configuration_nemotron_h_puzzle import NemotronHPuzzleConfig
    finally:
        sys.path.remove(str(folder))
    config = NemotronHPuzzleConfig.from_pretrained(folder)
    layers = nemotron_h_layers(arch)
    assert config.hybrid_override_pattern == "".join(
        {"mamba": "M", "attention": "*", "mlp": "-", "moe": "E"}[b["block_type"]] for b in config.block_configs)
    assert len(config.block_configs) == len(layers) == sum(not s.no_op for b in arch.blocks for s in (b.attention, b.ffn))
    weights = LazyWeights(folder)
    shapes = {name: tuple(weights[name].shape) for name in weights}
    for j in range(len(layers)):
        expected = NemotronHBlock(config.get_nemotron_h_config_for_layer(j), j).state_dict()
        got = {k[len(f"backbone.layers.{j}."):]: v for k, v in shapes.items() if k.startswith(f"backbone.layers.{j}.")}
        for name, tensor in expected.items():
            if name.startswith("mixer.experts."):  # transformers stacks them (E, out, in); the files keep one per expert
                proj = name.removeprefix("mixer.experts.")
                assert [got.pop(f"mixer.experts.{e}.{proj}.weight") for e in range(tensor.shape[0])] == \
                    [tuple(tensor.shape[1:])] * tensor.shape[0], (j, name)
            else:
                assert got.pop(name) == tuple(tensor.shape), (j, name)
        assert not got, (j, sorted(got))
