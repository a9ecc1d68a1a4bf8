"""A child whose layers are all one plain Llama layer, written as `LlamaForCausalLM` (docs/checkpoint-format.md).

Such a folder loads in every tool without trust_remote_code. The weight names are already Llama's, so the
export is a LlamaConfig built from the DeciLM config plus the same tensors, written as they come; the translation
is checked first, on a one-layer model of the same config, to give the DeciLM model's logits on a probe.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from puzzle.arch import Architecture
from puzzle.checkpoint import build_model, copy_tokenizer_files, decilm_config, provenance
from puzzle.files import write_json_atomic
from puzzle.weights import SHARD_BYTES, write_model_config, write_tensors


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
        if not block.ffn.is_dense:
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
def check_llama_export(config: dict[str, Any]) -> None:
    """Trust but verify the LlamaConfig translation: a one-layer, small-vocabulary model of `config` (uniform, Llama
    family) must give the same logits as DeciLM and as LlamaForCausalLM, on random weights (the child itself is
    written tensor by tensor and never held whole)."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    arch = Architecture.from_config(config)
    blockers = plain_llama_blockers(config, arch)
    assert not blockers, f"not a plain Llama: {'; '.join(blockers)}"
    small = {**config, "num_hidden_layers": 1, "block_configs": config["block_configs"][:1],
             "vocab_size": min(config["vocab_size"], 256)}
    small_arch = Architecture.from_config(small)
    decilm = build_model(decilm_config(small, small_arch))
    with torch.device("meta"):
        llama = LlamaForCausalLM(llama_config(small, small_arch))
    llama.load_state_dict(decilm.state_dict(), strict=True, assign=True)
    llama.model.rotary_emb = LlamaRotaryEmbedding(llama.config)  # a non-persistent buffer
    if llama.config.tie_word_embeddings:
        llama.lm_head.weight = llama.model.embed_tokens.weight
    probe = torch.arange(16)[None] % small["vocab_size"]  # (1, 16)
    expected, got = decilm(probe).logits.float(), llama.eval()(probe).logits.float()
    error = ((got - expected).norm() / expected.norm().clamp_min(1e-12)).item()
    assert error < 1e-3, f"the LlamaForCausalLM export differs from the DeciLM model (relative error {error:.2e})"


def write_plain_llama(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], config: dict[str, Any], *,
                      source: Path | None, info: dict[str, Any], extra_files: Sequence[Path] = (),
                      max_shard_bytes: int = SHARD_BYTES) -> int:
    """A uniform Llama-family model as a LlamaForCausalLM folder, written into `folder` (inside atomic_output_dir)
    tensor by tensor, with the files `save_pretrained` writes; returns the number of elements written. The DeciLM
    tensor names are Llama's already."""
    arch = Architecture.from_config(config)
    check_llama_export(config)
    dtype, numel = write_tensors(folder, tensors, max_shard_bytes)
    write_model_config(folder, llama_config(config, arch), "LlamaForCausalLM", dtype)
    if source is not None:
        copy_tokenizer_files(source, folder)
    for file in extra_files:
        shutil.copy2(file, folder / Path(file).name)
    write_json_atomic(folder / "puzzle.json", provenance(**info, total_params=arch.total_params(), format="llama"))
    return numel
