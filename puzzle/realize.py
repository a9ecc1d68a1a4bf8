"""The `realize` stage: assemble each solution's child from the parent and the trained library.

Every sub-block the MIP kept from the parent takes the parent's weights; every replaced one takes its BLD
unit (`library/{attn,ffn,block}/L{i}/{variant}.safetensors`); no-ops take nothing. Embeddings, final norm
and LM head are the parent's. The child is written to `children/{name}/` in the standard checkpoint format
with `puzzle.json` holding the target and the predicted metrics.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from puzzle.arch import Architecture, BlockConfig
from puzzle.blocks.library import Manifest
from puzzle.blocks.space import Candidate
from puzzle.checkpoint import decilm_config, save_model
from puzzle.distill.bld import unit_path
from puzzle.errors import StageError
from puzzle.mip.stage import ChildPlan
from puzzle.modeling.modeling_decilm import DeciLMForCausalLM
from puzzle.run import RunPaths


def _find(manifest: Manifest, layer: int, kind: str, variant) -> Candidate:
    for c in manifest.candidates_of(layer, kind):
        if c.variant == variant:
            return c
    raise StageError(f"layer {layer}: {kind} variant {variant} is not in the library; rerun solve")


def child_state(parent: DeciLMForCausalLM, arch: Architecture, blocks: tuple[BlockConfig, ...], manifest: Manifest,
                paths: RunPaths) -> dict[str, torch.Tensor]:
    """The child's state dict (checkpoint names) from parent weights and library units."""
    parent_state = parent.state_dict()
    state = {k: v for k, v in parent_state.items() if not k.startswith("model.layers.")}
    for i, (parent_block, block) in enumerate(zip(arch.blocks, blocks)):
        prefix = f"model.layers.{i}."
        layer = {k: v for k, v in parent_state.items() if k.startswith(prefix)}
        coupled = manifest.candidates_of(i, "block")
        if coupled and block != parent_block:
            unit = _find(manifest, i, "block", block)
            if unit.trainable:  # a no-op + no-op layer has no weights and no unit file
                state |= load_file(unit_path(paths, unit))
            continue
        for kind, mine, theirs, keys in (("attention", block.attention, parent_block.attention, ("self_attn.", "input_layernorm.")),
                                         ("ffn", block.ffn, parent_block.ffn, ("mlp.", "post_attention_layernorm."))):
            if mine.no_op:
                continue
            if mine == theirs:
                state |= {k: v for k, v in layer.items() if k[len(prefix):].startswith(keys)}
            else:
                state |= load_file(unit_path(paths, _find(manifest, i, kind, mine)))
    return state


def assemble(blocks: tuple[BlockConfig, ...], parent: DeciLMForCausalLM, arch: Architecture, manifest: Manifest,
             paths: RunPaths) -> DeciLMForCausalLM:
    """The child with these per-layer blocks, in memory, on the parent's device and in its dtype."""
    config = decilm_config(parent.config.to_dict(), Architecture(shape=arch.shape, blocks=blocks))
    with torch.device("meta"):
        child = DeciLMForCausalLM(config)
    state = child_state(parent, arch, blocks, manifest, paths)
    dtype = next(parent.parameters()).dtype
    child.load_state_dict({k: v.to(dtype=dtype, device=parent.device) for k, v in state.items()},
                          strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        child.lm_head.weight = child.model.embed_tokens.weight
    child.model.rotary_emb = type(child.model.rotary_emb)(config).to(parent.device)
    return child.eval()


def realize(plan: ChildPlan, parent: DeciLMForCausalLM, arch: Architecture, manifest: Manifest, paths: RunPaths,
            overwrite: bool = True) -> Path:
    """Build `children/{plan.name}/` (replacing an older one atomically)."""
    child = assemble(plan.blocks, parent, arch, manifest, paths)
    info = {"stage": "realize", "parent": str(paths.parent), "target": plan.target,
            "predicted": {"throughput": plan.solution.throughput, "speedup": plan.predicted_speedup,
                          "decode_time_s": plan.solution.decode_time_s, "latency_s": plan.solution.latency_s,
                          "memory_bytes": plan.solution.memory_bytes, "param_bytes": plan.solution.param_bytes,
                          "kv_bytes_per_token": plan.solution.kv_bytes_per_token, "score": plan.solution.score},
            **({"reranked": list(plan.reranked)} if plan.reranked else {})}
    return save_model(child, paths.children / plan.name, source=paths.parent, info=info, overwrite=overwrite)
