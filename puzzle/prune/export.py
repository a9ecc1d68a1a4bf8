"""A child whose layers are all one plain Llama layer, written as `LlamaForCausalLM` (docs/checkpoint-format.md).

Such a folder loads in every tool without trust_remote_code. The weight names are already Llama's, so the
export is a LlamaConfig built from the DeciLM config plus the same tensors; the exported model is checked
to give the DeciLM model's logits on a probe before anything is written.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from puzzle.arch import Architecture
from puzzle.checkpoint import copy_tokenizer_files, provenance
from puzzle.files import atomic_output_dir, write_json_atomic
from puzzle.modeling.modeling_decilm import DeciLMForCausalLM


def plain_llama_blockers(config: dict[str, Any], arch: Architecture) -> list[str]:
    """Why the model cannot be written as a plain LlamaForCausalLM (empty: it can)."""
    reasons = []
    family = config.get("puzzle_parent_family")
    if family != "llama":
        reasons.append(f"its parent family is {family or 'not recorded (a puzzle or Llama-Nemotron checkpoint)'}, not llama")
    if config.get("qk_norm"):
        reasons.append("it has q/k RMSNorm")
    if bool(config.get("qkv_bias", config.get("attention_bias"))) != bool(config.get("attention_bias")):
        reasons.append("its q/k/v and o projections differ in bias")
    blocks = set(arch.blocks)
    if len(blocks) > 1:
        reasons.append(f"its layers differ ({len(blocks)} distinct blocks)")
    for block in blocks:
        if not block.attention.has_softmax or block.attention.window_length is not None:
            reasons.append(f"a layer has {block.attention.kind} attention")
        if not block.ffn.is_gated:
            reasons.append(f"a layer has a {block.ffn.kind} FFN")
    return reasons


def llama_config(config: dict[str, Any], arch: Architecture):
    """The LlamaConfig of a uniform DeciLM config dict (plain_llama_blockers must be empty)."""
    from transformers import LlamaConfig

    block = arch.blocks[0]
    keys = ("vocab_size", "hidden_size", "num_attention_heads", "head_dim", "hidden_act", "max_position_embeddings",
            "initializer_range", "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "attention_bias",
            "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id")
    return LlamaConfig(
        **{k: config[k] for k in keys if k in config},
        num_hidden_layers=arch.num_layers,
        num_key_value_heads=block.attention.num_kv_heads(arch.shape.num_attention_heads),
        intermediate_size=block.ffn.intermediate_size,
        dtype=config.get("dtype") or "float32",
    )


@torch.no_grad()
def save_plain_llama(model: DeciLMForCausalLM, out: Path, *, source: Path | None, info: dict[str, Any],
                     overwrite: bool = False, extra_files: Sequence[Path] = ()) -> Path:
    """Write `model` (uniform, Llama family) as a LlamaForCausalLM folder at `out`, atomically."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = model.config.to_dict()
    arch = Architecture.from_config(config)
    blockers = plain_llama_blockers(config, arch)
    assert not blockers, f"not a plain Llama: {'; '.join(blockers)}"
    llama_cfg = llama_config(config, arch)
    with torch.device("meta"):
        llama = LlamaForCausalLM(llama_cfg)
    llama.load_state_dict(model.state_dict(), strict=True, assign=True)
    llama.model.rotary_emb = LlamaRotaryEmbedding(llama_cfg).to(model.device)  # a non-persistent buffer
    if llama_cfg.tie_word_embeddings:
        llama.lm_head.weight = llama.model.embed_tokens.weight
    llama.eval()
    probe = torch.arange(16, device=model.device)[None] % llama_cfg.vocab_size  # (1, 16)
    expected, got = model(probe).logits.float(), llama(probe).logits.float()
    error = ((got - expected).norm() / expected.norm().clamp_min(1e-12)).item()
    assert error < 1e-3, f"the LlamaForCausalLM export differs from the DeciLM model (relative error {error:.2e})"
    with atomic_output_dir(out, overwrite) as tmp:
        llama.save_pretrained(tmp, safe_serialization=True)
        if source is not None:
            copy_tokenizer_files(source, tmp)
        for file in extra_files:
            shutil.copy2(file, tmp / Path(file).name)
        write_json_atomic(tmp / "puzzle.json", provenance(**info, total_params=arch.total_params(), format="llama"))
    return Path(out)
