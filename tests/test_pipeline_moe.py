"""`puzzle search` on a tiny Mixtral: expert-pruned candidates go through every stage into a realized child."""

import json

from factories import tiny_parent_with_tokenizer
from pipeline_fixtures import tiny_search_config, write_config

from puzzle.blocks.library import Manifest
from puzzle.checkpoint import load_architecture, load_model
from puzzle.pipeline import run_search

FAST = dict(profile={"batch_size": 4, "context_len": 96, "prompt_len": 32, "repeats": 3, "inner": 2, "warmup": 1,
                     "generate_tokens": 8},
            solve={"targets": [{"name": "small", "memory": "0.6x"},
                               {"name": "served", "memory": "0.75x", "vllm_transformers": True}], "sweep": [1.2]},
            report={"eval_tokens": 512, "batch_size": 4})


def test_tiny_mixtral_search_prunes_experts(tmp_path):
    parent, corpus = tiny_parent_with_tokenizer(tmp_path / "inputs", layers=2, family="mixtral")
    space = {"attention": {"kv_heads": [2], "windows": [16], "linear": False},
             "ffn": {"linear": False, "no_op": False}, "moe": {"experts": [0.5]}}
    config = tiny_search_config(corpus, space=space, **FAST)
    search = run_search(tmp_path / "run", parent=parent, config=write_config(tmp_path / "c.yaml", config))

    manifest = Manifest.load(search.paths.manifest)
    ffn_names = {c.name for c in manifest.candidates if c.kind == "ffn"}
    assert ffn_names == {"moe_k4_top2", "moe_k2_top2"}
    profile = json.loads((search.paths.root / "profile.json").read_text())
    assert "moe_k2_top2" in json.dumps(profile)
    child = search.paths.root / "children" / "small"
    arch = load_architecture(child)
    # At 0.6x the parent's memory, only pruned experts fit (the attention variants save little).
    assert [b.ffn.moe.num_local_experts for b in arch.blocks] == [2, 2]
    assert arch.vllm_unsupported() and not json.loads((child / "puzzle.json").read_text())["vllm_native"]
    load_model(child)  # its weights are exactly what its config describes
    # A target for vLLM's Transformers backend keeps the parent's attention everywhere and prunes experts only.
    served = load_architecture(search.paths.root / "children" / "served")
    parent_arch = load_architecture(search.paths.parent)
    assert [b.attention for b in served.blocks] == [b.attention for b in parent_arch.blocks]
    assert served.vllm_serving() == "transformers" and arch.vllm_serving() == "none"
    assert any(b.ffn.moe.num_local_experts < 4 for b in served.blocks)
    report = json.loads((search.paths.root / "report.json").read_text())
    assert [c["name"] for c in report["children"]] == ["small", "served"] and 0 <= report["children"][0]["kl"] < 10
    assert [c["vllm_serving"] for c in report["children"]] == ["none", "transformers"]
    # CPU timings of experts say so; KV bytes at the deployment dtype unless profile.kv_dtype says otherwise
    assert {v["method"] for v in profile["variants"]} == {"cpu"} and profile["config"]["kv_dtype"] == "bf16"
    assert report["profile"]["eager_variants"] == [] and report["profile"]["kv_dtype"] == "bf16"
