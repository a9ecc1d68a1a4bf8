"""Hybrid children in vLLM's Nemotron-H Puzzle format (`NemotronHPuzzleForCausalLM`, vLLM >= 0.32).

A hybrid child (a Nemotron-H parent's, docs/checkpoint-format.md) is written in puzzle's DeciLM format, which
transformers loads with trust_remote_code. vLLM serves hybrids only through its own Nemotron-H model, which reads
another layout: one mixer per layer (`backbone.layers.{j}.norm` + `backbone.layers.{j}.mixer.*`, Nemotron-H's
tensor names) and per-layer settings in `block_configs` (configuration_nemotron_h_puzzle.py). This module writes
that layout beside the child, tensor by tensor: every sub-block that is not no-op becomes one Nemotron-H layer, in
order (a no-op layer disappears; a layer with attention and an MLP would become two). It applies where
`Architecture.nemotron_h_unsupported()` is empty (one Mamba shape for the whole model, no linear replacements,
gate-less MLPs, Nemotron-H's experts).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from puzzle.arch import Architecture
from puzzle.checkpoint import MODELING_DIR, copy_tokenizer_files, normalized_config, provenance
from puzzle.errors import UnsupportedModelError
from puzzle.files import atomic_output_dir, write_json_atomic
from puzzle.progress import log
from puzzle.weights import LazyWeights, ShardedWriter

CONFIG_FILE = "configuration_nemotron_h_puzzle.py"
MODEL_TYPE = "nemotron_h_puzzle"
VLLM_SUFFIX = "-nemotron-h"  # children/{name}-nemotron-h: the vLLM-format folder of children/{name}


def nemotron_h_layers(arch: Architecture) -> list[tuple[int, str]]:
    """(DeciLM layer, "attention" or "ffn") of each Nemotron-H layer, in order: the sub-blocks that are not no-op."""
    layers = []
    for i, block in enumerate(arch.blocks):
        layers += [(i, "attention")] if not block.attention.no_op else []
        layers += [(i, "ffn")] if not block.ffn.no_op else []
    return layers


def block_config(arch: Architecture, layer: int, slot: str) -> dict[str, Any]:
    """One entry of block_configs: the layer type and the settings of this layer that vLLM reads per layer."""
    block = arch.blocks[layer]
    if slot == "attention":
        attention = block.attention
        if attention.mamba is not None:
            return {"block_type": "mamba"}
        out = {"block_type": "attention", "num_key_value_heads": attention.num_kv_heads(arch.shape.num_attention_heads)}
        return out | ({"sliding_window": attention.window_length} if attention.window_length is not None else {})
    if block.ffn.moe is None:
        return {"block_type": "mlp", "intermediate_size": block.ffn.intermediate_size}
    moe = block.ffn.moe
    return {"block_type": "moe", "n_routed_experts": moe.num_local_experts, "num_experts_per_tok": moe.num_experts_per_tok,
            "moe_intermediate_size": moe.expert_intermediate_dim,
            "moe_shared_expert_intermediate_size": moe.shared_expert_intermediate_dim}


def nemotron_h_config(config: dict[str, Any], arch: Architecture) -> dict[str, Any]:
    """config.json of the vLLM-format folder from the child's DeciLM config.json (normalized)."""
    blocks = [block_config(arch, i, slot) for i, slot in nemotron_h_layers(arch)]
    mamba = next((b.attention.mamba for b in arch.blocks if b.attention.mamba is not None), None)
    moes = [b.ffn.moe for b in arch.blocks if b.ffn.moe is not None]
    first = lambda kind, key, default: next((b[key] for b in blocks if b["block_type"] == kind), default)  # noqa: E731
    out = {
        "architectures": ["NemotronHPuzzleForCausalLM"],
        "model_type": MODEL_TYPE,
        "auto_map": {"AutoConfig": f"{CONFIG_FILE.removesuffix('.py')}.NemotronHPuzzleConfig"},
        "block_configs": blocks,
        "vocab_size": config["vocab_size"], "hidden_size": config["hidden_size"],
        "num_attention_heads": config["num_attention_heads"], "head_dim": arch.shape.head_dim,
        "num_key_value_heads": first("attention", "num_key_value_heads", config["num_attention_heads"]),
        "intermediate_size": first("mlp", "intermediate_size", 1),
        "mlp_hidden_act": config.get("hidden_act", "relu2"), "mlp_bias": bool(config.get("mlp_bias", False)),
        "attention_bias": False, "layer_norm_epsilon": config.get("rms_norm_eps", 1e-5),
        "max_position_embeddings": config.get("max_position_embeddings", 4096),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "use_bias": arch.shape.mamba_proj_bias, "use_conv_bias": arch.shape.mamba_conv_bias,
        "mamba_hidden_act": config.get("mamba_hidden_act", "silu"), "chunk_size": config.get("mamba_chunk_size", 128),
        "time_step_min": config.get("mamba_dt_min", 0.001), "mamba_ssm_cache_dtype": "float32",
        "num_nextn_predict_layers": 0,
        **{k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "dtype") if config.get(k) is not None},
    }
    if mamba is not None:
        out |= {"mamba_num_heads": mamba.num_heads, "mamba_head_dim": mamba.head_dim, "ssm_state_size": mamba.state_dim,
                "n_groups": mamba.num_groups, "conv_kernel": mamba.conv_kernel}
    if moes:
        moe = moes[0]
        out |= {"n_routed_experts": max(m.num_local_experts for m in moes), "num_experts_per_tok": moe.num_experts_per_tok,
                "moe_intermediate_size": moe.expert_intermediate_dim,
                "moe_shared_expert_intermediate_size": moe.shared_expert_intermediate_dim,
                "n_shared_experts": 1 if moe.shared_expert_intermediate_dim else 0, "n_group": moe.n_group,
                "topk_group": moe.topk_group, "routed_scaling_factor": moe.routed_scaling_factor,
                "norm_topk_prob": moe.norm_topk_prob}
    return out


def nemotron_h_tensors(weights: Mapping[str, torch.Tensor], arch: Architecture) -> Iterator[tuple[str, torch.Tensor]]:
    """The child's tensors (DeciLM names, read one at a time) under Nemotron-H's names and layer numbers."""
    yield "backbone.embeddings.weight", weights["model.embed_tokens.weight"]
    by_layer: dict[int, list[str]] = {}  # DeciLM layer -> names inside it (one pass over the names)
    for name in weights:
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            by_layer.setdefault(int(layer), []).append(rest)
    for j, (i, slot) in enumerate(nemotron_h_layers(arch)):
        at, to = f"model.layers.{i}.", f"backbone.layers.{j}."
        norm, prefix = ("input_layernorm.", "self_attn.") if slot == "attention" else ("post_attention_layernorm.", "mlp.")
        for name in by_layer.get(i, []):
            if name.startswith(norm):
                yield to + "norm." + name[len(norm):], weights[at + name]
            elif name.startswith(prefix):
                rest = name[len(prefix):].removeprefix("mamba_mixer.")
                rest = "shared_experts." + rest.removeprefix("shared_expert.") if rest.startswith("shared_expert.") else rest
                yield to + "mixer." + rest, weights[at + name]
    yield "backbone.norm_f.weight", weights["model.norm.weight"]
    if not arch.shape.tie_word_embeddings:
        yield "lm_head.weight", weights["lm_head.weight"]


def write_nemotron_h_puzzle(child: Path, out: Path, *, overwrite: bool = True, info: dict[str, Any] | None = None) -> Path:
    """Write puzzle checkpoint `child` (a hybrid) in vLLM's Nemotron-H Puzzle format at `out`, tensor by tensor.
    Raises UnsupportedModelError, naming why, when vLLM's Nemotron-H model cannot represent it."""
    child, out = Path(child), Path(out)
    config = normalized_config(child)
    arch = Architecture.from_config(config, str(child / "config.json"))
    reasons = arch.nemotron_h_unsupported()
    if reasons:
        raise UnsupportedModelError(f"{child}: vLLM's Nemotron-H model cannot serve it ({'; '.join(reasons)}); serve "
                                    "the puzzle checkpoint with transformers (trust_remote_code) instead")
    weights = LazyWeights(child)
    with atomic_output_dir(out, overwrite) as tmp:
        writer = ShardedWriter(tmp)
        for name, tensor in nemotron_h_tensors(weights, arch):
            writer.add(name, tensor)
        writer.close()
        write_json_atomic(tmp / "config.json", nemotron_h_config(config, arch))
        shutil.copy2(MODELING_DIR / CONFIG_FILE, tmp / CONFIG_FILE)
        copy_tokenizer_files(child, tmp)
        write_json_atomic(tmp / "puzzle.json", provenance(stage="nemotron-h-puzzle", source=str(child.resolve()),
                                                          layers=[f"{i}.{slot}" for i, slot in nemotron_h_layers(arch)],
                                                          **(info or {})))
    log(f"{out}: vLLM's Nemotron-H format of {child.name} ({len(nemotron_h_layers(arch))} layers), "
        "served as NemotronHPuzzleForCausalLM")
    return out
