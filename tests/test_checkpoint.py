"""Checkpoint I/O: convert exactness, save/load round trips without puzzle, NVIDIA checkpoints, bad input."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from factories import FAMILIES, VARIANT_COMBINATIONS, decilm_model, globals_for, hf_parent
from safetensors.torch import save_file

from puzzle import checkpoint
from puzzle.arch import Architecture
from puzzle.errors import InputError, OutputExistsError, UnsupportedModelError


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_convert_matches_transformers_to_1e5(family, tmp_path):
    parent = hf_parent(family, tmp_path / "parent")
    checkpoint.convert(tmp_path / "parent", tmp_path / "child")
    child = checkpoint.load_model(tmp_path / "child")
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))  # longer than the windows
    with torch.no_grad():
        torch.testing.assert_close(child(ids).logits, parent(ids).logits, atol=1e-5, rtol=0)
    prompt = ids[:, :4]
    assert child.generate(prompt, max_new_tokens=10, do_sample=False).tolist() == \
        parent.generate(prompt, max_new_tokens=10, do_sample=False).tolist()
    arch = checkpoint.load_architecture(tmp_path / "child")
    assert arch.total_params() == sum(p.numel() for p in parent.parameters())
    with torch.no_grad():  # the unconverted folder loads too (renamed or, for gpt-oss, split in memory); 1e-6:
        # expert matmuls may round differently with differently aligned weights (see the round-trip test)
        torch.testing.assert_close(checkpoint.load_model(tmp_path / "parent")(ids).logits, child(ids).logits,
                                   atol=1e-6, rtol=0)


def test_converted_folder_has_the_checkpoint_format(tmp_path):
    hf_parent("qwen2", tmp_path / "parent")
    (tmp_path / "parent" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    checkpoint.convert(tmp_path / "parent", tmp_path / "child", info={"command": "puzzle convert a b"})
    files = {p.name for p in (tmp_path / "child").iterdir()}
    assert {"config.json", "model.safetensors", "configuration_decilm.py", "modeling_decilm.py",
            "tokenizer_config.json", "generation_config.json", "puzzle.json"} <= files
    config = json.loads((tmp_path / "child" / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_decilm.DeciLMForCausalLM"
    assert "attention_sinks" not in config  # written only for gpt-oss
    info = json.loads((tmp_path / "child" / "puzzle.json").read_text())
    assert info["stage"] == "convert" and info["command"] == "puzzle convert a b" and info["vllm_native"] is False


_LOAD_WITHOUT_PUZZLE = textwrap.dedent("""
    import json, sys, torch
    sys.modules["puzzle"] = None  # puzzle must not be importable: the checkpoint carries its own code
    from transformers import AutoModelForCausalLM
    results = {}
    for folder in json.loads(sys.argv[1]):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
        assert model.__class__.__module__.startswith("transformers_modules"), model.__class__.__module__
        ids = torch.load(folder + "/ids.pt")
        with torch.no_grad():
            logits = model(ids).logits
        tokens = model.generate(ids[:, :4], max_new_tokens=6, do_sample=False).tolist()
        results[folder] = {"logits": logits.tolist(), "tokens": tokens}
    print(json.dumps(results))
""")


def test_every_variant_round_trips_through_a_process_without_puzzle(tmp_path):
    folders, expected = [], {}
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    for k, (attention, ffn) in enumerate(VARIANT_COMBINATIONS):
        model = decilm_model([(attention, ffn), ("gqa2", "full"), (attention, ffn)], seed=k, **globals_for(ffn))
        folder = tmp_path / f"{attention}-{ffn}"
        checkpoint.save_model(model, folder)
        torch.save(ids, folder / "ids.pt")
        with torch.no_grad():
            expected[str(folder)] = (model(ids).logits, model.generate(ids[:, :4], max_new_tokens=6, do_sample=False))
        folders.append(str(folder))
        reloaded = checkpoint.load_model(folder)  # and puzzle's own loader agrees
        # Bit for bit, except experts: their few-row matmuls take CPU kernels that depend on the weights' memory
        # alignment, and weights loaded from safetensors are less aligned than fresh ones (last-bit differences).
        atol = 1e-6 if ffn in ("moe", "gpt_oss_moe") else 0
        torch.testing.assert_close(reloaded(ids).logits, expected[str(folder)][0], atol=atol, rtol=0)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_PUZZLE, json.dumps(folders)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for folder, (logits, tokens) in expected.items():
        torch.testing.assert_close(torch.tensor(results[folder]["logits"]), logits, atol=1e-6, rtol=0)
        assert results[folder]["tokens"] == tokens.tolist()


def _nvidia_checkpoint(folder: Path) -> dict:
    """A tiny checkpoint in NVIDIA's Llama-Nemotron schema (ffn_mult, inert fields, null globals)."""
    def block(n_heads_in_group, ffn_mult, attn_no_op=False, ffn_no_op=False, linear=False):
        return {"attention": {"n_heads_in_group": n_heads_in_group, "no_op": attn_no_op, "num_sink_tokens": None,
                              "replace_with_linear": linear, "sparsify": None, "unshifted_sink": False,
                              "use_prefill_window_in_sink_attention": False, "window_length": None},
                "ffn": {"ffn_mult": ffn_mult, "no_op": ffn_no_op, "replace_with_linear": False, "sparsify": None}}
    config = {
        "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas",
        "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig",
                     "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"},
        "block_configs": [block(2, 1.5), block(None, 0.75, attn_no_op=True), block(None, 1.5, linear=True),
                          block(None, None, attn_no_op=True, ffn_no_op=True)],
        "hidden_size": 128, "num_attention_heads": 4, "num_hidden_layers": 4, "num_key_value_heads": None,
        "intermediate_size": None, "vocab_size": 128, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256, "tie_word_embeddings": False, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 64, "rope_type": "llama3"},
        "torch_dtype": "float32", "transformers_version": "4.45.1", "bos_token_id": 1, "eos_token_id": 2,
    }
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    normalized = checkpoint.decilm_config(checkpoint.normalized_config(folder))
    weights = {k: torch.randn(v) * 0.05 for k, v in checkpoint.expected_tensors(normalized).items()}
    save_file(weights, folder / "model.safetensors")
    return weights


def test_llama_nemotron_checkpoint_loads_and_converts(tmp_path):
    weights = _nvidia_checkpoint(tmp_path / "nvidia")
    arch = checkpoint.load_architecture(tmp_path / "nvidia")
    # ffn_mult 1.5 at hidden 128 -> 2/3*1.5*128 = 128 -> 256 (multiple of 256); 0.75 -> 64 -> 256.
    assert [b.ffn.intermediate_size for b in arch.blocks] == [256, 256, 256, None]
    assert [b.attention.kind for b in arch.blocks] == ["full", "no_op", "linear", "no_op"]
    model = checkpoint.load_model(tmp_path / "nvidia")
    assert torch.equal(model.model.layers[2].self_attn.linear_attn.weight, weights["model.layers.2.self_attn.linear_attn.weight"])
    checkpoint.convert(tmp_path / "nvidia", tmp_path / "normalized")
    config = json.loads((tmp_path / "normalized" / "config.json").read_text())
    assert config["block_configs"][0]["ffn"] == {"no_op": False, "replace_with_linear": False, "intermediate_size": 256}
    ids = torch.randint(0, 128, (1, 8))
    torch.testing.assert_close(checkpoint.load_model(tmp_path / "normalized")(ids).logits, model(ids).logits, atol=0, rtol=0)


# ---- bad input ------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        checkpoint.convert(tmp_path / "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_without_weights(tmp_path):
    hf_parent("llama", tmp_path / "parent")
    (tmp_path / "parent" / "model.safetensors").unlink()
    with pytest.raises(InputError, match="no model.safetensors"):
        checkpoint.convert(tmp_path / "parent", tmp_path / "out")
    assert list(tmp_path.iterdir()) == [tmp_path / "parent"]


def test_corrupt_safetensors(tmp_path):
    hf_parent("llama", tmp_path / "parent")
    weights = tmp_path / "parent" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(InputError, match="corrupt or truncated"):
        checkpoint.load_model(tmp_path / "parent")
    with pytest.raises(InputError, match="corrupt or truncated"):
        checkpoint.convert(tmp_path / "parent", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_model_type(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported; puzzle converts llama, mistral, qwen2, qwen3"):
        checkpoint.convert(tmp_path / "gpt2", tmp_path / "out")


def test_quantized_parent_is_refused_with_the_dequantizing_fix(tmp_path):
    (tmp_path / "mxfp4").mkdir()
    (tmp_path / "mxfp4" / "config.json").write_text('{"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}}')
    with pytest.raises(UnsupportedModelError, match=r"quantized weights \(mxfp4\).*Mxfp4Config\(dequantize=True\)"):
        checkpoint.convert(tmp_path / "mxfp4", tmp_path / "out")


def test_weights_that_do_not_match_the_config(tmp_path):
    hf_parent("llama", tmp_path / "parent")
    config = json.loads((tmp_path / "parent" / "config.json").read_text())
    config["intermediate_size"] = 80
    (tmp_path / "parent" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="has shape"):
        checkpoint.convert(tmp_path / "parent", tmp_path / "out")


def test_existing_output_needs_overwrite_and_survives_a_failed_write(tmp_path):
    hf_parent("llama", tmp_path / "parent")
    checkpoint.convert(tmp_path / "parent", tmp_path / "out")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    with pytest.raises(OutputExistsError, match="--overwrite"):
        checkpoint.convert(tmp_path / "parent", tmp_path / "out")
    with pytest.raises(RuntimeError, match="boom"):
        with checkpoint.atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("boom")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "parent"]  # no temporary folders left
    checkpoint.convert(tmp_path / "parent", tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before


def test_sharded_save_writes_an_index_and_loads(tmp_path):
    model = decilm_model([("gqa2", "full"), ("no_op", "narrow"), ("kv1", "full")])
    checkpoint.save_model(model, tmp_path / "c", max_shard_size="40KB")
    assert (tmp_path / "c" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "c").glob("model-*.safetensors"))) > 1
    ids = torch.randint(0, 128, (1, 6))
    torch.testing.assert_close(checkpoint.load_model(tmp_path / "c")(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert Architecture.from_config(json.loads((tmp_path / "c" / "config.json").read_text())).num_layers == 3
