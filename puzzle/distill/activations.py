"""Run a DeciLM model layer by layer, capturing what each sub-block receives and adds.

Blockwise local distillation and replace-one-block scoring both need the parent's hidden state entering a
layer and its sub-blocks' outputs; running the layers here (through the layers' own `attention_branch` /
`ffn_branch`) gives them without hooks and lets a run stop early or start from a cached hidden state.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from puzzle.memory import return_freed_memory
from puzzle.modeling.modeling_decilm import DeciLMForCausalLM, MaskProvider


@dataclass
class LayerIO:
    """One layer of a full-sequence forward: x -> h = x + attn -> y = h + ffn."""

    x: torch.Tensor  # (B, T, C) hidden state entering the layer
    attn: torch.Tensor | None  # attention branch output (None: no-op)
    h: torch.Tensor  # FFN sub-block input
    ffn: torch.Tensor | None  # FFN branch output (None: no-op)

    @property
    def y(self) -> torch.Tensor:
        return self.h if self.ffn is None else self.h + self.ffn


@contextmanager
def layer_weights(layer: nn.Module) -> Iterator[nn.Module]:
    """`layer` with its weights on its execution device while inside. A no-op for a model held whole; for a layer
    accelerate left in the checkpoint's files (`load_model(max_bytes=...)`), its hook reads the weights in and drops
    them after, as it does around the layer's own forward, which run_layers bypasses (it calls the branches).
    Re-entrant: inside an outer `layer_weights` of the same layer nothing is read again (`run_many` keeps a
    layer resident over many hidden states that way)."""
    depth = getattr(layer, "_puzzle_resident", 0)
    hooked = [] if depth else [(m, m._hf_hook) for m in layer.modules() if getattr(m, "_hf_hook", None) is not None]
    for module, hook in hooked:  # one per module that holds tensors of its own (attach_align_device_hook)
        hook.pre_forward(module)
    # a hook reads its module's weights in on every forward while `offload` is set: off while they are resident
    reading = [hook for _, hook in hooked if hook.offload]
    for hook in reading:
        hook.offload = False
    layer._puzzle_resident = depth + 1
    try:
        yield layer
    finally:
        layer._puzzle_resident = depth
        for hook in reading:
            hook.offload = True
        for module, hook in hooked:
            hook.post_forward(module, None)
        if hooked and offloaded(layer):
            return_freed_memory()  # the layer's weights were just dropped: do not let the heap keep them


def offloaded(layer: nn.Module) -> bool:
    """Whether accelerate reads some of `layer`'s weights in from the checkpoint per forward (and drops them after)."""
    return any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in layer.modules())


def embed(model: DeciLMForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    return model.model.embed_tokens(ids.to(model.device))


def run_layers(
    model: DeciLMForCausalLM,
    ids: torch.Tensor | None = None,
    *,
    hidden: torch.Tensor | None = None,
    start: int = 0,
    stop: int | None = None,
    capture: Container[int] = (),
    replace: Mapping[int, Mapping[str, nn.Module]] | None = None,
) -> tuple[torch.Tensor, dict[int, LayerIO]]:
    """Layers start..stop-1 on full sequences (no cache); returns the last hidden state and captures.

    Give `ids` (embedded here) or `hidden` (the state entering layer `start`). `replace[i]` may hold an
    "attention", "ffn" or "block" module (e.g. a puzzle.blocks.subblock.SubBlock) that computes that
    branch instead of the model's own, as in replace-one-block scoring.
    """
    m = model.model
    x = embed(model, ids) if hidden is None else hidden
    t = x.shape[1]
    positions = torch.arange(t, device=x.device)[None]
    position_embeddings = m.rotary_emb(x, positions)
    masks = MaskProvider(None, 0, t, x.device)
    replace = replace or {}
    captured: dict[int, LayerIO] = {}
    stop = len(m.layers) if stop is None else stop
    for i in range(start, stop):
        layer, swap = m.layers[i], replace.get(i, {})
        if "block" in swap:
            branch = swap["block"](x, position_embeddings)
            io = LayerIO(x=x, attn=None, h=x, ffn=branch)
        else:
            with layer_weights(layer):
                attn = swap["attention"](x, position_embeddings) if "attention" in swap else \
                    layer.attention_branch(x, position_embeddings, masks)
                h = x if attn is None else x + attn
                ffn = swap["ffn"](h) if "ffn" in swap else layer.ffn_branch(h)
            io = LayerIO(x=x, attn=attn, h=h, ffn=ffn)
        if i in capture:
            captured[i] = io
        x = io.y
    return x, captured


def run_many(model: DeciLMForCausalLM, hiddens: list[torch.Tensor], *, start: int, stop: int | None = None,
             store: torch.device | None = None, capture: Container[int] = (),
             on_layer: Callable[[int, list[LayerIO]], None] | None = None) -> list[torch.Tensor]:
    """`run_layers(hidden=h, start, stop)` for every h in `hiddens`, layer-major: each layer is made resident once
    and applied to all of them, so a parent read from its files (`offloaded`) reads each layer once rather than
    once per hidden state. Same results as running them one by one. The states live on `store` (default: where
    they are) between layers; `on_layer(i, ios)` sees layer i's LayerIO of every state when i is in `capture`."""
    stop = len(model.model.layers) if stop is None else stop
    states = list(hiddens)
    for i in range(start, stop):
        with layer_weights(model.model.layers[i]):
            ios = []
            for k, x in enumerate(states):
                y, io = run_layers(model, hidden=x.to(model.device), start=i, stop=i + 1, capture=capture)
                states[k] = y if store is None else y.to(store)
                ios.append(io.get(i))
        if on_layer is not None and i in capture:
            on_layer(i, ios)
    return states


def logits_from_hidden(model: DeciLMForCausalLM, hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.model.norm(hidden))
