"""The `realize` stage: assemble each solution's child from the parent and the trained library.

Every sub-block the MIP kept from the parent takes the parent's weights; every replaced one takes its BLD
unit (`library/{attn,ffn,block}/L{i}/{variant}.safetensors`); no-ops take nothing. Embeddings, final norm
and LM head are the parent's. The child is written to `children/{name}/` in the standard checkpoint format
with `puzzle.json` holding the target and the predicted metrics.

Realize never holds the parent or the child whole: tensors are read from the parent's shards one at a time
(`weights.LazyWeights`) and written into the child's shards as they come (`weights.ShardedWriter`), so its
memory is one shard of the child plus one tensor, whatever the parent's size (docs/run-directory.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from puzzle.arch import Architecture, BlockConfig
from puzzle.blocks.library import Manifest
from puzzle.blocks.space import Candidate
from puzzle.checkpoint import decilm_config, finish_checkpoint_dir, normalized_config
from puzzle.distill.bld import unit_path
from puzzle.errors import StageError
from puzzle.files import atomic_output_dir
from puzzle.mip.stage import ChildPlan
from puzzle.modeling.modeling_decilm import DeciLMForCausalLM
from puzzle.progress import log
from puzzle.run import RunPaths
from puzzle.weights import SHARD_BYTES, LazyWeights, ShardedWriter


def _find(manifest: Manifest, layer: int, kind: str, variant) -> Candidate:
    for c in manifest.candidates_of(layer, kind):
        if c.variant == variant:
            return c
    raise StageError(f"layer {layer}: {kind} variant {variant} is not in the library; rerun solve")


def child_tensors(parent: Mapping[str, torch.Tensor], arch: Architecture, blocks: tuple[BlockConfig, ...],
                  manifest: Manifest, paths: RunPaths) -> Iterator[tuple[str, torch.Tensor]]:
    """The child's tensors (checkpoint names), one at a time, from the parent's (a state dict, or `LazyWeights`
    that reads each when it is reached) and the library's units."""
    names = list(parent)
    for name in names:
        if not name.startswith("model.layers."):
            yield name, parent[name]
    for i, (parent_block, block) in enumerate(zip(arch.blocks, blocks)):
        prefix = f"model.layers.{i}."
        layer = [k for k in names if k.startswith(prefix)]
        coupled = manifest.candidates_of(i, "block")
        if coupled and block != parent_block:
            unit = _find(manifest, i, "block", block)
            if unit.trainable:  # a no-op + no-op layer has no weights and no unit file
                yield from load_file(unit_path(paths, unit)).items()
            continue
        for kind, mine, theirs, keys in (("attention", block.attention, parent_block.attention, ("self_attn.", "input_layernorm.")),
                                         ("ffn", block.ffn, parent_block.ffn, ("mlp.", "post_attention_layernorm."))):
            if mine.no_op:
                continue
            if mine == theirs:
                yield from ((k, parent[k]) for k in layer if k[len(prefix):].startswith(keys))
            else:
                yield from load_file(unit_path(paths, _find(manifest, i, kind, mine))).items()


def assemble(blocks: tuple[BlockConfig, ...], parent: DeciLMForCausalLM, arch: Architecture, manifest: Manifest,
             paths: RunPaths) -> DeciLMForCausalLM:
    """The child with these per-layer blocks, in memory, on the parent's device and in its dtype."""
    config = decilm_config(parent.config.to_dict(), Architecture(shape=arch.shape, blocks=blocks))
    with torch.device("meta"):
        child = DeciLMForCausalLM(config)
    state = dict(child_tensors(parent.state_dict(), arch, blocks, manifest, paths))
    dtype = next(parent.parameters()).dtype
    child.load_state_dict({k: v.to(dtype=dtype, device=parent.device) for k, v in state.items()},
                          strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        child.lm_head.weight = child.model.embed_tokens.weight
    child.model.rotary_emb = type(child.model.rotary_emb)(config).to(parent.device)
    return child.eval()


def realize(plan: ChildPlan, arch: Architecture, manifest: Manifest, paths: RunPaths, dtype: torch.dtype,
            overwrite: bool = True, max_shard_bytes: int = SHARD_BYTES) -> Path:
    """Build `children/{plan.name}/` in `dtype`, streaming the parent tensor by tensor (replacing an older child
    atomically)."""
    child_arch = Architecture(shape=arch.shape, blocks=plan.blocks)
    config = decilm_config(normalized_config(paths.parent), child_arch).to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    info = {"stage": "realize", "parent": str(paths.parent), "target": plan.target,
            "predicted": {"throughput": plan.solution.throughput, "speedup": plan.predicted_speedup,
                          "decode_time_s": plan.solution.decode_time_s, "latency_s": plan.solution.latency_s,
                          "memory_bytes": plan.solution.memory_bytes, "param_bytes": plan.solution.param_bytes,
                          "kv_bytes_per_token": plan.solution.kv_bytes_per_token, "score": plan.solution.score},
            **({"reranked": list(plan.reranked)} if plan.reranked else {})}
    out = paths.children / plan.name
    parent = LazyWeights(paths.parent)
    log(f"realize {plan.name}: streams the parent ({parent.nbytes() / 2**30:.2f} GiB stored) tensor by tensor, holding "
        f"at most one {max_shard_bytes / 2**30:.2f} GiB shard of the child")
    with atomic_output_dir(out, overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        for name, tensor in child_tensors(parent, arch, plan.blocks, manifest, paths):
            writer.add(name, tensor.to(dtype))
        writer.close()
        finish_checkpoint_dir(tmp, config, paths.parent, info)
    return out
