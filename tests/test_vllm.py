"""vLLM's native DeciLMForCausalLM serves puzzle checkpoints with the same greedy tokens as transformers.

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
from transformers import Qwen2Config, Qwen2ForCausalLM

from puzzle import checkpoint
from puzzle.arch import Architecture

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


def test_vllm_greedy_tokens_equal_transformers(tmp_path):
    prompts = [[3, 17, 42], [5, 9, 100, 200, 7], [11] * 9]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    for folder in _children(tmp_path):
        out = tmp_path / f"{folder.name}.json"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": ""}
        run = subprocess.run([VLLM_PYTHON, str(SCRIPT), "--model", str(folder), "--prompts-json",
                              str(tmp_path / "prompts.json"), "--max-tokens", "16", "--dtype", "float32",
                              "--ignore-eos", "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-4000:]
        result = json.loads(out.read_text())
        assert "nemotron_nas" in str(result["vllm_model_class"]), result  # native DeciLM, not a fallback
        model = checkpoint.load_model(folder)
        for prompt, vllm_tokens in zip(prompts, result["tokens"]):
            ids = torch.tensor([prompt])
            expected = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)[0, len(prompt):]
            assert vllm_tokens == expected.tolist(), folder.name
