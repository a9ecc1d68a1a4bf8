"""vLLM's native DeciLMForCausalLM serves puzzle checkpoints with the same greedy tokens as transformers; children
with experts (which the native model cannot run) serve through vLLM's Transformers backend, with the same tokens.

Needs a vLLM install in its own virtual environment (see scripts/vllm_greedy.py); set PUZZLE_VLLM_PYTHON to
its python to run this test, e.g. PUZZLE_VLLM_PYTHON=/work/vllm-venv/bin/python make test-vllm.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from factories import decilm_model, randomize_
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from puzzle import checkpoint
from puzzle.arch import Architecture, MoEConfig
from puzzle.blocks.experts import keep_experts

VLLM_PYTHON = os.environ.get("PUZZLE_VLLM_PYTHON")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON, reason="set PUZZLE_VLLM_PYTHON to a python with vllm installed"),
]
SCRIPT = Path(__file__).parents[1] / "scripts" / "vllm_greedy.py"
HEAD_DIM_64 = dict(vocab_size=512, hidden_size=256, num_attention_heads=4, head_dim=64)


def _children(tmp_path: Path) -> list[Path]:
    # Every variant vLLM implements: full and reduced KV heads, no-op attention, narrowed and no-op FFN.
    child = decilm_model([("full", "full"), ("no_op", "narrow"), ("kv1", "no_op"), ("gqa2", "full")],
                         seed=7, **HEAD_DIM_64)
    assert Architecture.from_config(child.config.to_dict()).vllm_unsupported() == []
    checkpoint.save_model(child, tmp_path / "hetero")
    # A converted Qwen2 parent: q/k/v bias without o_proj bias, tied embeddings.
    torch.manual_seed(8)
    qwen = randomize_(Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=256, intermediate_size=512,
                                                   num_hidden_layers=2, num_attention_heads=4,
                                                   num_key_value_heads=2, tie_word_embeddings=True)).eval())
    qwen.save_pretrained(tmp_path / "qwen2")
    checkpoint.convert(tmp_path / "qwen2", tmp_path / "qwen2-decilm")
    return [tmp_path / "hetero", tmp_path / "qwen2-decilm"]


PROMPTS = [[3, 17, 42], [5, 9, 100, 200, 7], [11] * 9]


def _vllm_tokens_equal_transformers(folder: Path, tmp_path: Path, *options: str, reference: Path | None = None) -> dict:
    """Greedy tokens of `folder` from vLLM (scripts/vllm_greedy.py, float32) equal transformers' own `generate` (of
    the puzzle checkpoint `reference`, default `folder` itself); returns the script's result."""
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS))
    out = tmp_path / f"{folder.name}.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": ""}
    run = subprocess.run([VLLM_PYTHON, str(SCRIPT), "--model", str(folder), "--prompts-json",
                          str(tmp_path / "prompts.json"), "--max-tokens", "16", "--dtype", "float32",
                          "--ignore-eos", *options, "--out", str(out)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(out.read_text())
    model = checkpoint.load_model(reference or folder)
    for prompt, vllm_tokens in zip(PROMPTS, result["tokens"]):
        ids = torch.tensor([prompt])
        expected = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)[0, len(prompt):]
        assert vllm_tokens == expected.tolist(), folder.name
    return result


def test_vllm_greedy_tokens_equal_transformers(tmp_path):
    for folder in _children(tmp_path):
        result = _vllm_tokens_equal_transformers(folder, tmp_path)
        assert "nemotron_nas" in str(result["vllm_model_class"]), result  # native DeciLM, not a fallback


def _expert_pruned_mixtral_child(tmp_path: Path) -> Path:
    """A converted Mixtral (4 experts, top-2) whose layer 0 keeps experts 1 and 3 of 4; layer 1 keeps all 4."""
    torch.manual_seed(9)
    mixtral = randomize_(MixtralForCausalLM(MixtralConfig(
        vocab_size=512, hidden_size=256, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)).eval(), 9)
    mixtral.save_pretrained(tmp_path / "mixtral")
    parent_dir = checkpoint.convert(tmp_path / "mixtral", tmp_path / "mixtral-decilm")
    state = checkpoint.load_model(parent_dir).state_dict()
    config = checkpoint.read_config(parent_dir)
    moe = config["block_configs"][0]["ffn"]["moe"]
    moe["num_local_experts"] = 2
    layer0 = {name.removeprefix("model.layers.0."): t for name, t in state.items()
              if name.startswith("model.layers.0.mlp.")}
    kept = keep_experts(layer0, MoEConfig(**moe), score=torch.tensor([0.0, 3.0, 1.0, 2.0]))  # experts 1 and 3
    state = {name: t for name, t in state.items() if not name.startswith("model.layers.0.mlp.")}
    state |= {f"model.layers.0.{name}": t for name, t in kept.items()}
    child = checkpoint.build_model(checkpoint.decilm_config(config))
    child.load_state_dict(state, strict=True)
    folder = checkpoint.save_model(child, tmp_path / "experts-child")
    # vLLM's Transformers backend builds the decoder with AutoModel.from_config (vllm/model_executor/models/
    # transformers/base.py), which a remote-code model answers only through auto_map["AutoModel"].
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_decilm.DeciLMModel"
    return folder


def test_vllm_transformers_backend_serves_expert_pruned_child(tmp_path):
    folder = _expert_pruned_mixtral_child(tmp_path)
    assert [b.ffn.moe.num_local_experts for b in checkpoint.load_architecture(folder).blocks] == [2, 4]
    result = _vllm_tokens_equal_transformers(folder, tmp_path, "--model-impl", "transformers")
    # vLLM's Transformers backend running puzzle's own modeling_decilm.py, not its native DeciLM
    assert result["vllm_model_class"] == "vllm.model_executor.models.transformers.TransformersForCausalLM", result


def _nemotron_h_parent(tmp_path: Path, seed: int) -> tuple[Path, Path]:
    """(converted Nemotron-H parent with Mamba, attention and MLP layers and a tokenizer, its corpus). No MoE layer:
    vLLM's CPU build refuses Nemotron-H's gate-less experts ("is_act_and_mul=False is supported only for CUDA, XPU
    and ROCm")."""
    from factories import tiny_corpus, tiny_tokenizer
    from transformers import NemotronHConfig, NemotronHForCausalLM

    corpus = tiny_corpus(tmp_path / "corpus")
    torch.manual_seed(seed)
    hf = randomize_(NemotronHForCausalLM(NemotronHConfig(
        vocab_size=512, hidden_size=256, hybrid_override_pattern="M*-M*-", num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, intermediate_size=512, mamba_num_heads=8, mamba_head_dim=32, ssm_state_size=16, n_groups=2,
        chunk_size=8, max_position_embeddings=256)).eval())
    with torch.no_grad():  # sharper weights: every token depends on the context
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    hf.save_pretrained(tmp_path / "hf")
    tiny_tokenizer(corpus, vocab_size=512).save_pretrained(tmp_path / "hf")
    return checkpoint.convert(tmp_path / "hf", tmp_path / "parent"), corpus


def test_vllm_nemotron_h_model_serves_a_searched_hybrid(tmp_path):
    """`puzzle search` of a Nemotron-H parent with a vllm_native target: its child (fewer KV heads, a window,
    narrower or removed MLPs, Mamba layers kept or removed) is written in vLLM's layout beside it too, and vLLM
    serves that with transformers' greedy tokens."""
    from pipeline_fixtures import tiny_search_config, write_config

    from puzzle.pipeline import run_search

    parent, corpus = _nemotron_h_parent(tmp_path, seed=10)
    space = {"attention": {"kv_heads": [1], "windows": [16], "linear": False}, "mamba": {"heads": [0.5]},
             "ffn": {"fractions": [0.5], "multiple": 32, "linear": False}}
    config = tiny_search_config(corpus, space=space, solve={"targets": [{"name": "small", "memory": "0.8x",
                                                                         "vllm_native": True}], "sweep": [1.2]},
                                profile={"batch_size": 4, "context_len": 96, "prompt_len": 32, "repeats": 3, "inner": 2,
                                         "warmup": 1, "generate_tokens": 8},
                                report={"eval_tokens": 512, "batch_size": 4})
    search = run_search(tmp_path / "run", parent=parent, config=write_config(tmp_path / "c.yaml", config))
    child = search.paths.children / "small"
    arch = checkpoint.load_architecture(child)
    assert arch.total_params() < checkpoint.load_architecture(parent).total_params()
    assert arch.vllm_serving() == "nemotron_h"
    result = _vllm_tokens_equal_transformers(child.with_name("small-nemotron-h"), tmp_path, reference=child)
    assert result["vllm_architecture"] == "NemotronHPuzzleForCausalLM", result


def test_vllm_nemotron_h_model_serves_a_pruned_hybrid(tmp_path):
    """`puzzle prune` of a Nemotron-H parent (Mamba heads, MLP neurons and hidden channels) writes vLLM's layout
    beside the child; vLLM serves it with transformers' greedy tokens."""
    from puzzle.corpus import DataConfig
    from puzzle.prune import PruneConfig, prune

    parent, corpus = _nemotron_h_parent(tmp_path, seed=11)
    cfg = PruneConfig(mamba_heads=4, ffn_size=256, hidden_size=192, data=DataConfig(paths=(str(corpus),), seq_len=64),
                      calibration_tokens=2048, eval_tokens=0, batch_size=4)
    prune(parent, tmp_path / "pruned", cfg)
    folder = tmp_path / "pruned-nemotron-h"
    result = _vllm_tokens_equal_transformers(folder, tmp_path, reference=tmp_path / "pruned")
    assert result["vllm_architecture"] == "NemotronHPuzzleForCausalLM", result
