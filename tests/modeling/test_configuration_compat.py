"""The config class of our checkpoints reads the way vLLM reads it, with every transformers it may meet.

vLLM loads `configuration_decilm.py` through `auto_map` with its own transformers, older than puzzle's (from
4.56 on). `make test-oldest` sets PUZZLE_CONFIG_COMPAT_PYTHON to a python with transformers 4.56 and no torch
and no puzzle; without it the check runs with the installed transformers only.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from factories import decilm_model

from puzzle import checkpoint

_READ_AS_VLLM_DOES = textwrap.dedent("""
    import json, sys
    sys.modules["puzzle"] = None  # the checkpoint's own code, not the package
    import transformers
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
    blocks = []
    for block in config.block_configs:  # vLLM's nemotron_nas.py reads attributes, and hasattr(ffn, "ffn_mult")
        blocks.append({"attention_no_op": block.attention.no_op, "n_heads_in_group": getattr(block.attention, "n_heads_in_group", None),
                       "linear": block.attention.replace_with_linear, "ffn_no_op": block.ffn.no_op,
                       "has_ffn_mult": hasattr(block.ffn, "ffn_mult"),
                       "intermediate_size": getattr(block.ffn, "intermediate_size", None),
                       "experts": getattr(getattr(block.ffn, "moe", None), "num_local_experts", None),
                       "routing": getattr(getattr(block.ffn, "moe", None), "routing", None)})
    major = int(transformers.__version__.split(".")[0])
    rope_theta = config.rope_parameters["rope_theta"] if major >= 5 else config.rope_theta
    print(json.dumps({"transformers": transformers.__version__, "blocks": blocks, "rope_theta": rope_theta,
                      "head_dim": config.head_dim, "to_dict": config.to_dict()["block_configs"],
                      "attention_sinks": getattr(config, "attention_sinks", None)}))
""")

PYTHONS = [sys.executable] + ([os.environ["PUZZLE_CONFIG_COMPAT_PYTHON"]] if os.environ.get("PUZZLE_CONFIG_COMPAT_PYTHON") else [])


@pytest.mark.parametrize("python", PYTHONS)
def test_config_reads_as_vllm_reads_it(python, tmp_path):
    model = decilm_model([("gqa2", "narrow"), ("no_op", "full"), ("linear", "no_op"), ("window", "linear"),
                          ("gqa2", "moe"), ("window", "gpt_oss_moe")], attention_sinks=True)
    checkpoint.save_model(model, tmp_path / "child")
    written = json.loads((tmp_path / "child" / "config.json").read_text())
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": ""}
    out = subprocess.run([python, "-c", _READ_AS_VLLM_DOES, str(tmp_path / "child")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    read = json.loads(out.stdout.strip().splitlines()[-1])
    # gpt-oss's extra MoE field is there only where written; the others read as absent
    assert [b.pop("routing") for b in read["blocks"]][-2:] == [None, "topk_softmax"]
    assert read["blocks"] == [
        {"attention_no_op": False, "n_heads_in_group": 2, "linear": False, "ffn_no_op": False, "has_ffn_mult": False,
         "intermediate_size": 40, "experts": None},
        {"attention_no_op": True, "n_heads_in_group": None, "linear": False, "ffn_no_op": False, "has_ffn_mult": False,
         "intermediate_size": 96, "experts": None},
        {"attention_no_op": False, "n_heads_in_group": None, "linear": True, "ffn_no_op": True, "has_ffn_mult": False,
         "intermediate_size": None, "experts": None},
        {"attention_no_op": False, "n_heads_in_group": 2, "linear": False, "ffn_no_op": False, "has_ffn_mult": False,
         "intermediate_size": None, "experts": None},
        {"attention_no_op": False, "n_heads_in_group": 2, "linear": False, "ffn_no_op": False, "has_ffn_mult": False,
         "intermediate_size": None, "experts": 4},
        {"attention_no_op": False, "n_heads_in_group": 2, "linear": False, "ffn_no_op": False, "has_ffn_mult": False,
         "intermediate_size": None, "experts": 4},
    ]
    assert read["attention_sinks"] is True and written["attention_sinks"] is True
    assert read["to_dict"] == written["block_configs"]
    # transformers 5 writes only `rope_parameters`; 4.x must still find its `rope_theta` there
    assert read["rope_theta"] == written["rope_parameters"]["rope_theta"] and read["head_dim"] == 16
