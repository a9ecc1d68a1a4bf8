"""Checkpoint I/O: load, save and convert heterogeneous (DeciLM / "nemotron-nas") checkpoints.

docs/checkpoint-format.md. A puzzle checkpoint is an HF folder: config.json (`model_type: nemotron-nas`,
`block_configs`, `auto_map`), sharded safetensors with an index, the two modeling files copied from
`puzzle/modeling/`, the parent's tokenizer and generation config, and `puzzle.json` (provenance). It loads
with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` where puzzle is not installed.

Loading accepts puzzle checkpoints, NVIDIA's Llama-Nemotron checkpoints (`ffn_mult`, extra inert fields)
and the plain HF parents puzzle converts (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Mixtral, gpt-oss). All but
Mixtral and gpt-oss store their tensors under the DeciLM names, so their conversion is a new config.json plus the
parent's safetensors files; Mixtral's expert tensors are renamed (`WEIGHT_RENAMES`) on conversion and on loading;
gpt-oss's fused expert tensors are split into one Linear per expert (`split_gpt_oss_tensor`) on conversion and
on loading.
Every write goes to a temporary folder that is renamed into place only when complete.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import puzzle
from puzzle.arch import Architecture, BlockConfig
from puzzle.errors import ConfigError, InputError, OutputError, UnsupportedModelError
from puzzle.files import atomic_output_dir, read_json, write_json_atomic, write_text_atomic
from puzzle.modeling.configuration_decilm import DeciLMConfig
from puzzle.modeling.modeling_decilm import DeciLMForCausalLM
from puzzle.progress import track

MODELING_DIR = Path(__file__).parent / "modeling"
MODELING_FILES = ("configuration_decilm.py", "modeling_decilm.py")
AUTO_MAP = {
    "AutoConfig": "configuration_decilm.DeciLMConfig",
    "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
    "AutoModel": "modeling_decilm.DeciLMModel",  # vLLM's Transformers backend builds the base model through it
}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
DECILM_MODEL_TYPE = "nemotron-nas"
PARENT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gpt_oss", "nemotron_h")
# Parent tensor names that differ from DeciLM's (regex -> replacement, applied to every name). DeciLM's MoE layer
# uses the Qwen3-MoE names (`mlp.gate`, `mlp.experts.{e}.{gate,up,down}_proj`), which most HF MoE families share.
WEIGHT_RENAMES = {
    "mixtral": {
        r"\.block_sparse_moe\.gate\.": ".mlp.gate.",
        r"\.block_sparse_moe\.experts\.(\d+)\.w1\.": r".mlp.experts.\1.gate_proj.",
        r"\.block_sparse_moe\.experts\.(\d+)\.w3\.": r".mlp.experts.\1.up_proj.",
        r"\.block_sparse_moe\.experts\.(\d+)\.w2\.": r".mlp.experts.\1.down_proj.",
    },
    "gpt_oss": {r"\.mlp\.router\.": ".mlp.gate."},  # its fused experts are split too (split_gpt_oss_tensor)
}
# Families whose tensors need more than a rename (values re-laid out): converted in memory when loaded.
SPLIT_FAMILIES = ("gpt_oss",)
_GPT_OSS_EXPERTS = re.compile(r"^(.*\.mlp\.experts\.)(gate_up_proj|gate_up_proj_bias|down_proj|down_proj_bias)$")
SAFETENSORS_INDEX = "model.safetensors.index.json"


# ----------------------------------------------------------------------------------------------------------
# Configs


def read_config(path: Path) -> dict[str, Any]:
    """config.json of a model folder, with clear errors for a missing folder or file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such folder; give the path of a model folder (config.json + safetensors)")
    if not path.is_dir():
        raise InputError(f"{path}: not a folder; give the path of a model folder (config.json + safetensors)")
    config = read_json(path / "config.json", "config.json")
    if not isinstance(config, dict):
        raise InputError(f"{path / 'config.json'}: expected a JSON object")
    return config


def _hf_config_object(path: Path, config: dict):
    """The parent's config through transformers' own config class, so defaults match its modeling code."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**_decode_special_floats(config))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path / 'config.json'}: transformers cannot read it ({err})") from None


def _decode_special_floats(value: Any) -> Any:
    """JSON values with transformers' tags for floats JSON cannot hold ({"__float__": "Infinity"}, written by
    transformers >= 5.2x, e.g. Nemotron-H's time_step_limit) as floats, as its own config loading reads them."""
    if isinstance(value, dict):
        if set(value) == {"__float__"} and isinstance(value["__float__"], str):
            return float(value["__float__"])  # "Infinity", "-Infinity", "NaN"
        return {k: _decode_special_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_special_floats(v) for v in value]
    return value


def decilm_config_from_parent(path: Path, config: dict) -> dict[str, Any]:
    """A DeciLM config.json dict equal to a Llama / Mistral / Qwen2 / Qwen3 / Qwen3-MoE / Mixtral / gpt-oss /
    Nemotron-H parent, layer for layer."""
    family = config.get("model_type")
    if family not in PARENT_FAMILIES:
        raise UnsupportedModelError(
            f"{path / 'config.json'}: model_type {family!r} is not supported; puzzle converts "
            f"{', '.join(PARENT_FAMILIES)} models and reads {DECILM_MODEL_TYPE} (Llama-Nemotron) checkpoints"
        )
    quantization = config.get("quantization_config")
    if quantization is not None:  # e.g. gpt-oss as published: MXFP4 expert blocks and scales
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        raise UnsupportedModelError(
            f"{path / 'config.json'}: quantized weights ({method}) are not supported; load the model dequantized in "
            "transformers (for MXFP4: quantization_config=Mxfp4Config(dequantize=True)) and save_pretrained it"
        )
    hf = _hf_config_object(path, config)
    if family == "nemotron_h":
        return _nemotron_h_config(path, hf)
    layers, heads = hf.num_hidden_layers, hf.num_attention_heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or heads
    if family in ("mistral", "mixtral", "qwen3_moe"):  # one window for every layer (None: full attention)
        windows = [hf.sliding_window] * layers
    elif family in ("qwen2", "qwen3", "gpt_oss"):
        windows = [hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types]
    else:
        windows = [None] * layers
    attention_bias = bool(getattr(hf, "attention_bias", False))
    qkv_bias = {"qwen2": True, "mistral": False, "mixtral": False}.get(family, attention_bias)
    o_bias = {"qwen2": False, "mistral": False, "mixtral": False}.get(family, attention_bias)
    rope = dict(hf.rope_parameters)
    if rope.get("rope_type") == "dynamic":
        raise UnsupportedModelError(f"{path / 'config.json'}: dynamic RoPE scaling is not supported")
    sinks = {"attention_sinks": True} if family == "gpt_oss" else {}  # absent elsewhere: config.json unchanged
    return {
        "architectures": ["DeciLMForCausalLM"],
        "model_type": DECILM_MODEL_TYPE,
        "auto_map": dict(AUTO_MAP),
        "vocab_size": hf.vocab_size,
        "hidden_size": hf.hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": None,
        "intermediate_size": None,
        "head_dim": getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        "hidden_act": hf.hidden_act,
        "max_position_embeddings": hf.max_position_embeddings,
        "initializer_range": hf.initializer_range,
        "rms_norm_eps": hf.rms_norm_eps,
        "tie_word_embeddings": bool(hf.tie_word_embeddings),
        "rope_parameters": rope,
        "rope_theta": rope["rope_theta"],
        "attention_bias": o_bias,
        "qkv_bias": qkv_bias,
        "mlp_bias": bool(getattr(hf, "mlp_bias", False)),
        "qk_norm": family in ("qwen3", "qwen3_moe"),
        **sinks,
        "bos_token_id": hf.bos_token_id,
        "eos_token_id": hf.eos_token_id,
        "pad_token_id": hf.pad_token_id,
        "dtype": _dtype_name(getattr(hf, "dtype", None)),
        "block_configs": [
            {
                "attention": {"no_op": False, "replace_with_linear": False,
                              "n_heads_in_group": heads // kv_heads, "window_length": windows[i]},
                "ffn": _parent_ffn(family, hf, i),
            }
            for i in range(layers)
        ],
        "puzzle_parent_family": family,
    }


# Nemotron-H's layer types (its `hybrid_override_pattern`): Mamba-2, attention, relu2 MLP, mixture of experts.
NEMOTRON_H_LAYERS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}


def _nemotron_h_config(path: Path, hf) -> dict[str, Any]:
    """A Nemotron-H parent as DeciLM blocks: each layer's one mixer in the attention slot (Mamba, attention) or the
    FFN slot (MLP, experts), the other slot no-op (transformers' NemotronHBlock: pre-norm, mixer, residual)."""
    where = path / "config.json" if path is not None else "config.json"
    pattern = hf.hybrid_override_pattern
    if getattr(hf, "num_nextn_predict_layers", 0):
        raise UnsupportedModelError(f"{where}: multi-token-prediction layers (num_nextn_predict_layers) are not "
                                    "supported; save the model without them (num_nextn_predict_layers: 0)")
    if "E" in pattern and getattr(hf, "moe_latent_size", None) is not None:
        raise UnsupportedModelError(f"{where}: latent expert projections (moe_latent_size) are not supported")
    if hf.mlp_hidden_act != "relu2":
        raise UnsupportedModelError(f"{where}: mlp_hidden_act {hf.mlp_hidden_act!r} is not supported (only relu2)")
    heads, kv_heads = hf.num_attention_heads, hf.num_key_value_heads or hf.num_attention_heads
    no_op = {"no_op": True, "replace_with_linear": False}
    mamba = {"num_heads": hf.mamba_num_heads, "head_dim": hf.mamba_head_dim, "state_dim": hf.ssm_state_size,
             "num_groups": hf.n_groups, "conv_kernel": hf.conv_kernel}
    width = hf.intermediate_size
    widths = width if isinstance(width, list) else [width] * pattern.count("-")
    blocks, mlp = [], 0
    for kind in pattern:
        if kind == "M":
            blocks.append({"attention": {"no_op": False, "replace_with_linear": False, "mamba": dict(mamba)}, "ffn": no_op})
        elif kind == "*":
            blocks.append({"attention": {"no_op": False, "replace_with_linear": False,
                                         "n_heads_in_group": heads // kv_heads, "window_length": None}, "ffn": no_op})
        elif kind == "-":
            blocks.append({"attention": no_op, "ffn": {"no_op": False, "replace_with_linear": False,
                                                       "intermediate_size": widths[mlp], "gated": False}})
            mlp += 1
        else:
            moe = {"num_local_experts": hf.n_routed_experts, "num_experts_per_tok": hf.num_experts_per_tok,
                   "expert_intermediate_dim": hf.moe_intermediate_size, "norm_topk_prob": bool(hf.norm_topk_prob),
                   "routing": "sigmoid_group_topk", "expert_activation": "relu2", "n_group": hf.n_group,
                   "topk_group": hf.topk_group, "routed_scaling_factor": float(hf.routed_scaling_factor),
                   "shared_expert_intermediate_dim": hf.moe_shared_expert_intermediate_size * hf.n_shared_experts}
            blocks.append({"attention": no_op, "ffn": {"no_op": False, "replace_with_linear": False,
                                                       "intermediate_size": None, "moe": moe}})
    return {
        "architectures": ["DeciLMForCausalLM"],
        "model_type": DECILM_MODEL_TYPE,
        "auto_map": dict(AUTO_MAP),
        "vocab_size": hf.vocab_size,
        "hidden_size": hf.hidden_size,
        "num_hidden_layers": len(pattern),
        "num_attention_heads": heads,
        "num_key_value_heads": None,
        "intermediate_size": None,
        "head_dim": hf.head_dim,
        "hidden_act": hf.mlp_hidden_act,
        "max_position_embeddings": hf.max_position_embeddings,
        "initializer_range": hf.initializer_range,
        "rms_norm_eps": hf.layer_norm_epsilon,
        "tie_word_embeddings": bool(hf.tie_word_embeddings),
        "position_embedding_type": "none",  # Nemotron-H's attention has no RoPE: the Mamba layers carry order
        "attention_bias": False,  # NemotronHAttention's projections have no bias, whatever attention_bias says
        "mlp_bias": bool(hf.mlp_bias),
        "mamba_hidden_act": hf.mamba_hidden_act,
        "mamba_conv_bias": bool(hf.use_conv_bias),
        "mamba_proj_bias": bool(hf.use_bias),
        "mamba_chunk_size": hf.chunk_size,
        "mamba_dt_min": float(hf.time_step_min),  # transformers clamps dt at time_step_min in the chunked scan
        "bos_token_id": hf.bos_token_id,
        "eos_token_id": hf.eos_token_id,
        "pad_token_id": hf.pad_token_id,
        "dtype": _dtype_name(getattr(hf, "dtype", None)),
        "block_configs": blocks,
        "puzzle_parent_family": "nemotron_h",
    }


def _nemotron_h_renames(path: Path, config: dict) -> dict[str, str]:
    """Nemotron-H tensor names -> DeciLM's, layer by layer (a layer's `norm` is the norm of its one mixer)."""
    renames = {r"^backbone\.embeddings\.": "model.embed_tokens.", r"^backbone\.norm_f\.": "model.norm."}
    pattern = _hf_config_object(path, config).hybrid_override_pattern
    for i, kind in enumerate(pattern):
        at, to = rf"^backbone\.layers\.{i}\.", f"model.layers.{i}."
        norm = "input_layernorm." if kind in "M*" else "post_attention_layernorm."
        renames[at + r"norm\."] = to + norm
        if kind == "E":
            renames[at + r"mixer\.shared_experts\."] = to + "mlp.shared_expert."
        renames[at + r"mixer\."] = to + {"M": "self_attn.mamba_mixer.", "*": "self_attn.", "-": "mlp.", "E": "mlp."}[kind]
    return renames


def _parent_ffn(family: str, hf, layer: int) -> dict[str, Any]:
    """The `ffn` entry of a parent's layer: its dense SwiGLU, or its experts as transformers routes them."""
    dense = {"no_op": False, "replace_with_linear": False, "intermediate_size": hf.intermediate_size}
    if family == "mixtral":  # Mixtral always renormalises the top-k router probabilities
        width, renormalise = hf.intermediate_size, True
    elif family == "qwen3_moe":
        sparse = (layer not in hf.mlp_only_layers and hf.num_experts > 0
                  and (layer + 1) % hf.decoder_sparse_step == 0)  # Qwen3MoeDecoderLayer's rule
        if not sparse:
            return dense
        width, renormalise = hf.moe_intermediate_size, bool(hf.norm_topk_prob)
    elif family == "gpt_oss":
        width, renormalise = hf.intermediate_size, True
    else:
        return dense
    moe = {"num_local_experts": hf.num_local_experts, "num_experts_per_tok": hf.num_experts_per_tok,
           "expert_intermediate_dim": width, "norm_topk_prob": renormalise}
    if family == "gpt_oss":  # GptOssTopKRouter / GptOssExperts: biased router and experts, clamped SwiGLU
        moe |= {"routing": "topk_softmax", "router_bias": True, "expert_bias": True,
                "expert_activation": "clamped_swiglu", "swiglu_alpha": float(_gpt_oss_swiglu(hf, "swiglu_alpha", 1.702)),
                "swiglu_limit": float(_gpt_oss_swiglu(hf, "swiglu_limit", 7.0))}
    return {"no_op": False, "replace_with_linear": False, "intermediate_size": None, "moe": moe}


def _gpt_oss_swiglu(hf, name: str, hard_coded: float) -> float:
    # transformers releases before `swiglu_alpha` / `swiglu_limit` became config fields (5.17 has neither)
    # hard-code GptOssExperts.alpha = 1.702 and .limit = 7.0 (the values every published config.json states)
    return getattr(hf, name, hard_coded)


def _dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")


def normalized_config(path: Path) -> dict[str, Any]:
    """The DeciLM config.json dict for any model folder puzzle reads (puzzle, NVIDIA, or a parent family)."""
    path = Path(path)
    config = read_config(path)
    if config.get("model_type") != DECILM_MODEL_TYPE:
        return decilm_config_from_parent(path, config)
    arch = Architecture.from_config(config, str(path / "config.json"))
    config = dict(config)
    config["block_configs"] = arch.block_configs()  # NVIDIA's ffn_mult -> intermediate_size, inert fields dropped
    config["auto_map"] = dict(AUTO_MAP)
    config["architectures"] = ["DeciLMForCausalLM"]
    return config


def load_architecture(path: Path) -> Architecture:
    path = Path(path)
    return Architecture.from_config(normalized_config(path), str(path / "config.json"))


def decilm_config(config: dict[str, Any] | DeciLMConfig,
                  layers: Architecture | Sequence[BlockConfig] | None = None) -> DeciLMConfig:
    """A DeciLMConfig from a config.json dict (or another config), optionally with its layers replaced: by a
    whole `Architecture`, or by a list of blocks (one sub-block alone, stacked copies for timing)."""
    if isinstance(config, DeciLMConfig):
        config = config.to_dict()
    config = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "auto_map", "transformers_version")}
    if layers is not None:
        blocks = layers.blocks if isinstance(layers, Architecture) else tuple(layers)
        config["block_configs"] = [b.to_dict() for b in blocks]
        config["num_hidden_layers"] = len(blocks)
    cfg = DeciLMConfig(**config)
    cfg.auto_map = dict(AUTO_MAP)
    cfg.architectures = ["DeciLMForCausalLM"]
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Weights


def weight_renames(path: Path) -> dict[str, str]:
    """Regex renames from the folder's tensor names to DeciLM's (empty for DeciLM checkpoints and most parents)."""
    config = read_config(path)
    if config.get("model_type") == "nemotron_h":
        return _nemotron_h_renames(Path(path), config)
    return WEIGHT_RENAMES.get(config.get("model_type"), {})


def renamed(name: str, renames: dict[str, str]) -> str:
    for pattern, replacement in renames.items():
        name = re.sub(pattern, replacement, name)
    return name


def split_gpt_oss_tensor(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One gpt-oss tensor under DeciLM names: a fused expert tensor becomes one tensor per expert, others pass.

    gpt-oss computes x @ gate_up_proj[e] (E, C, 2I) with gate and up interleaved along the last axis (gate the
    even columns, up the odd ones, GptOssExperts._apply_gate), and x @ down_proj[e] (E, I, C); DeciLM's experts
    are Linear layers, weight (out, in), so the slices are transposed.
    """
    match = _GPT_OSS_EXPERTS.match(name)
    if match is None:
        return {name: tensor}
    prefix, kind = match.groups()
    out = {}
    for e in range(tensor.shape[0]):
        if kind == "gate_up_proj":  # (C, 2I)
            out[f"{prefix}{e}.gate_proj.weight"] = tensor[e, :, 0::2].T.contiguous()
            out[f"{prefix}{e}.up_proj.weight"] = tensor[e, :, 1::2].T.contiguous()
        elif kind == "gate_up_proj_bias":  # (2I,)
            out[f"{prefix}{e}.gate_proj.bias"] = tensor[e, 0::2].contiguous()
            out[f"{prefix}{e}.up_proj.bias"] = tensor[e, 1::2].contiguous()
        elif kind == "down_proj":  # (I, C)
            out[f"{prefix}{e}.down_proj.weight"] = tensor[e].T.contiguous()
        else:  # down_proj_bias (C,)
            out[f"{prefix}{e}.down_proj.bias"] = tensor[e].clone()
    return out


def decilm_tensors(path: Path) -> Callable[[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The folder's tensor (name, value) -> {DeciLM name: value}: a rename, plus the expert split for gpt-oss."""
    renames = weight_renames(path)
    split = read_config(path).get("model_type") in SPLIT_FAMILIES

    def convert(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        name = renamed(name, renames)
        return split_gpt_oss_tensor(name, tensor) if split else {name: tensor}

    return convert


def weight_files(path: Path) -> dict[str, list[str]]:
    """{safetensors file name: tensor names} of a model folder, checking every file's header."""
    path = Path(path)
    index = path / SAFETENSORS_INDEX
    if index.exists():
        weight_map = read_json(index, SAFETENSORS_INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError(f"{index}: missing 'weight_map'; regenerate the index")
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        bins = sorted(p.name for p in path.glob("*.bin"))
        hint = " (only .bin files found: re-save the model with safe_serialization=True)" if bins else ""
        raise InputError(f"{path}: no model.safetensors or {SAFETENSORS_INDEX}{hint}")
    names: dict[str, list[str]] = {}
    for name in files:
        names[name] = safetensors_keys(path / name)
    return names


def safetensors_keys(file: Path) -> list[str]:
    """Tensor names in one safetensors file; a missing, truncated or corrupt file is an InputError."""
    if not file.is_file():
        raise InputError(f"{file}: weight file listed in the index is missing")
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise ValueError("file is shorter than its header says")
        with safe_open(file, framework="pt") as st:
            return list(st.keys())
    except Exception as err:  # any parse failure means the file is unusable; say which file
        raise InputError(f"{file}: corrupt or truncated safetensors file ({err}); re-download or re-save it") from None


def expected_tensors(config: DeciLMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape a checkpoint of this config must hold (tied LM head excluded)."""
    with torch.device("meta"):
        model = DeciLMForCausalLM(config)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def check_weights(path: Path, config: DeciLMConfig) -> dict[str, list[str]]:
    """Check that the folder's tensors (under their DeciLM names) are exactly those of `config`, with the right
    shapes."""
    files = weight_files(path)
    expected = expected_tensors(config)
    to_decilm = decilm_tensors(path)
    found: dict[str, tuple[int, ...]] = {}
    for name, keys in files.items():
        with safe_open(Path(path) / name, framework="pt") as st:
            for key in keys:
                # Converted on the meta device: the names and shapes `convert` writes, without reading any values.
                meta = torch.empty(st.get_slice(key).get_shape(), device="meta")
                found |= {k: tuple(v.shape) for k, v in to_decilm(key, meta).items()}
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise InputError(f"{path}: weights missing for {', '.join(missing[:3])}{more}; the checkpoint is incomplete")
    for key, shape in expected.items():
        if found[key] != shape:
            raise InputError(f"{path}: tensor {key} has shape {list(found[key])}, config.json implies {list(shape)}")
    allowed_extra = {"lm_head.weight"} if config.tie_word_embeddings else set()
    extra = sorted(set(found) - set(expected) - allowed_extra)
    if any(name.endswith(("experts.gate_up_proj", "experts.down_proj")) for name in extra):
        raise InputError(f"{path}: experts are stored fused ({extra[0]}); puzzle reads one tensor per expert, as "
                         "transformers' save_pretrained writes them: re-save the model with save_pretrained")
    if extra:
        raise InputError(f"{path}: unexpected tensors {', '.join(extra[:3])}; config.json does not describe these weights")
    return files


def content_digests(path: Path) -> dict[str, str]:
    """{file name: SHA-256 of its bytes} for a model folder's config.json and weight files.

    Hashing a 140 GB parent takes minutes, so each weight file's digest is cached under
    `$PUZZLE_CACHE_DIR/fingerprints` (default ~/.cache/puzzle) by its path, size, mtime and inode: it is
    read once, and again only when it changes.
    """
    path = Path(path)
    digests = {"config.json": hashlib.sha256((path / "config.json").read_bytes()).hexdigest()}
    for file in sorted(path.glob("*.safetensors")):
        digests[file.name] = _file_digest(file)
    return digests


def fingerprint(path: Path) -> str:
    """Identity of a model folder's content (config.json and the bytes of every weight file)."""
    text = json.dumps(content_digests(path), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_change(before: dict[str, str], after: dict[str, str]) -> str:
    """What differs between two `content_digests`, in words: 'model.safetensors changed, a.safetensors added'."""
    changes = [f"{name} {'changed' if name in after else 'removed'}" for name in before if before[name] != after.get(name)]
    changes += [f"{name} added" for name in after if name not in before]
    return ", ".join(changes) or "nothing"


def _file_digest(file: Path) -> str:
    stat = file.stat()
    identity = f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}:{stat.st_dev}"
    base = os.environ.get("PUZZLE_CACHE_DIR")
    entry = (Path(base) if base else Path.home() / ".cache" / "puzzle") / "fingerprints" / \
        hashlib.sha256(identity.encode()).hexdigest()[:32]
    if entry.is_file():
        return entry.read_text().strip()
    digest = hashlib.sha256()
    chunk = 1 << 24
    with open(file, "rb") as f, track(f"hashing {file.name}", -(-stat.st_size // chunk)) as bar:
        while block := f.read(chunk):
            digest.update(block)
            bar.advance(1)
    try:  # a cache that cannot be written only costs the hash next time
        write_text_atomic(entry, digest.hexdigest())
    except (OSError, OutputError):
        pass
    return digest.hexdigest()


def remote_code_allowed(path: Path, trust_remote_code: bool = False) -> bool:
    """`trust_remote_code` for loading the folder with transformers' Auto classes: False when its config needs
    no code of its own; True when that code is puzzle's own modeling files (byte for byte) or the user opted
    in; otherwise an InputError that asks for the opt-in (`--trust-remote-code`), as transformers does."""
    path = Path(path)
    auto_map = read_config(path).get("auto_map")
    if not auto_map:
        return False
    if trust_remote_code:
        return True
    ours = set(auto_map.values()) <= set(AUTO_MAP.values()) and all(
        (path / name).is_file() and (path / name).read_bytes() == (MODELING_DIR / name).read_bytes()
        for name in MODELING_FILES)
    if not ours:
        raise InputError(f"{path}: config.json's auto_map runs code shipped in the folder that is not this puzzle "
                         "version's modeling code; pass --trust-remote-code if you trust it")
    return True


def load_model(path: Path, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu",
               max_bytes: int | None = None) -> DeciLMForCausalLM:
    """Load any model folder puzzle reads as a DeciLMForCausalLM (eval mode); `dtype=None` keeps the stored dtype.

    With `max_bytes`, a model whose weights take more than that on `device` keeps its first layers there and
    leaves the others in the folder's safetensors files: accelerate reads each of those layers onto `device` when
    it runs and drops it after (`offloaded_layers` counts them; `layer_weights` makes one resident for code that
    calls a layer's branches directly)."""
    path = Path(path)
    config = decilm_config(normalized_config(path))
    check_weights(path, config)
    if read_config(path).get("model_type") in SPLIT_FAMILIES:
        return _load_converted_in_memory(path, config, dtype).to(device).eval()
    device_map = offload_map(config, dtype, device, max_bytes) if max_bytes is not None else None
    model, info = DeciLMForCausalLM.from_pretrained(
        path, config=config, dtype=dtype if dtype is not None else "auto", output_loading_info=True,
        key_mapping=weight_renames(path) or None, device_map=device_map,
    )
    model.offloaded_layers = sum(v == "disk" for v in (device_map or {}).values())
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    problems = {
        kind: sorted(set(map(str, info.get(kind) or ())) - ignorable)
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if any(problems.values()):
        raise InputError(f"{path}: weights do not match config.json ({problems})")
    return (model if device_map else model.to(device)).eval()


def offload_map(config: DeciLMConfig, dtype: torch.dtype | None, device: str | torch.device, max_bytes: int) -> dict | None:
    """accelerate's device_map for a model of `config` in `max_bytes` on `device`: embeddings, final norm, LM head
    and as many first layers as fit stay there, the other layers on "disk" (read from the checkpoint's own
    safetensors files per forward); None when everything fits."""
    arch = Architecture.from_config(config.to_dict())
    itemsize = (dtype or torch.float32).itemsize
    device = str(torch.device(device))
    room = max_bytes - arch.embedding_params() * itemsize
    placed = {name: device for name in ("model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head")}
    if room >= sum(arch.layer_params(i) for i in range(arch.num_layers)) * itemsize:
        return None
    for i in range(arch.num_layers):
        room -= arch.layer_params(i) * itemsize
        placed[f"model.layers.{i}"] = device if room >= 0 else "disk"
    return placed


def _load_converted_in_memory(path: Path, config: DeciLMConfig, dtype: torch.dtype | None) -> DeciLMForCausalLM:
    """A folder whose tensors need re-laying out (gpt-oss), read as `convert` would write it: each file's tensors
    converted in memory, then assigned to a model built without weights (check_weights has matched the names)."""
    to_decilm = decilm_tensors(path)
    state = {}
    for name in weight_files(path):
        for key, tensor in load_file(Path(path) / name).items():
            state |= {k: v if dtype is None else v.to(dtype) for k, v in to_decilm(key, tensor).items()}
    with torch.device("meta"):
        model = DeciLMForCausalLM(config)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # one tensor under both names, as tied
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (the RoPE frequencies) are not in the files: compute them on a real device.
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model


def build_model(config: DeciLMConfig, dtype: torch.dtype = torch.float32) -> DeciLMForCausalLM:
    """A randomly initialised model of `config` (tests, demos, candidates before their weights are set)."""
    return DeciLMForCausalLM(config).to(dtype).eval()


def _write_converted(source: Path, dest: Path, to_decilm) -> list[str]:
    """One safetensors file with its tensors under the DeciLM names and layout (one shard in memory at a time);
    returns the names written."""
    tensors = {}
    for name, tensor in load_file(source).items():
        tensors |= to_decilm(name, tensor)
    save_file(tensors, dest, metadata={"format": "pt"})
    return list(tensors)


# ----------------------------------------------------------------------------------------------------------
# Saving


def provenance(**fields: Any) -> dict[str, Any]:
    """puzzle.json content: what made this checkpoint, with the package version and time."""
    return {
        "puzzle_version": puzzle.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **fields,
    }


def copy_tokenizer_files(source: Path, dest: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, Path(dest) / name)
            copied.append(name)
    return copied


def finish_checkpoint_dir(folder: Path, config: dict[str, Any], source: Path | None, info: dict[str, Any]) -> None:
    """Write config.json, the modeling files, tokenizer files and puzzle.json into a folder that has weights."""
    for name in MODELING_FILES:
        shutil.copy2(MODELING_DIR / name, folder / name)
    arch = Architecture.from_config(config, str(folder / "config.json"))
    config = dict(config)
    config["block_configs"] = arch.block_configs()  # every field explicit, as vLLM reads them
    config["auto_map"] = dict(AUTO_MAP)
    config["architectures"] = ["DeciLMForCausalLM"]
    config["model_type"] = DECILM_MODEL_TYPE
    write_json_atomic(folder / "config.json", config)
    if source is not None:
        copy_tokenizer_files(source, folder)
    info = dict(info)
    info.setdefault("architecture", arch.block_configs())
    info.setdefault("total_params", arch.total_params())
    info.setdefault("vllm_native", not arch.vllm_unsupported())
    info.setdefault("vllm_serving", arch.vllm_serving())
    write_json_atomic(folder / "puzzle.json", provenance(**info))


def save_model(
    model: DeciLMForCausalLM,
    out: Path,
    *,
    source: Path | None = None,
    info: dict[str, Any] | None = None,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
) -> Path:
    """Save `model` as a puzzle checkpoint at `out` (atomically); tokenizer files are copied from `source`."""
    out = Path(out)
    with atomic_output_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        config = json.loads((tmp / "config.json").read_text())
        finish_checkpoint_dir(tmp, config, source, info or {})
    return out


def convert(hf_dir: Path, out: Path, *, overwrite: bool = False, info: dict[str, Any] | None = None) -> Path:
    """Convert a Llama / Mistral / Qwen2 / Qwen3 / Qwen3-MoE / Mixtral / gpt-oss parent (or a Llama-Nemotron
    checkpoint) to puzzle's format.

    The weights are copied file by file, byte for byte where their names are already the DeciLM names (Mixtral's
    expert tensors are renamed, values untouched; gpt-oss's fused experts are split per expert, values untouched),
    so the converted model computes exactly what the parent computes.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    config = normalized_config(hf_dir)
    files = check_weights(hf_dir, decilm_config(config))
    rewrite = bool(weight_renames(hf_dir)) or config.get("puzzle_parent_family") in SPLIT_FAMILIES
    to_decilm = decilm_tensors(hf_dir)
    with atomic_output_dir(out, overwrite) as tmp:
        written = {}
        for name in files:
            if rewrite:
                written |= {key: name for key in _write_converted(hf_dir / name, tmp / name, to_decilm)}
            else:
                shutil.copy2(hf_dir / name, tmp / name)
        if (hf_dir / SAFETENSORS_INDEX).exists() and rewrite:
            index = read_json(hf_dir / SAFETENSORS_INDEX, SAFETENSORS_INDEX)
            index["weight_map"] = dict(sorted(written.items()))
            write_json_atomic(tmp / SAFETENSORS_INDEX, index)
        elif (hf_dir / SAFETENSORS_INDEX).exists():
            shutil.copy2(hf_dir / SAFETENSORS_INDEX, tmp / SAFETENSORS_INDEX)
        details = {"stage": "convert", "parent": str(hf_dir.resolve()), **(info or {})}
        finish_checkpoint_dir(tmp, config, hf_dir, details)
    return out
