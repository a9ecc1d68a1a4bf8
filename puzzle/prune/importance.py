"""Importance of hidden channels, FFN neurons, attention heads and layers, from activations on calibration data.

Minitron (Muralidharan et al. 2024, section 2), docs/methods.md "Minitron pruning":
  heads     the norm of each head's attention output (the input of o_proj, per head, over head_dim);
  Mamba heads  the same of each Mamba-2 head's output (the gated-normed scan output entering out_proj);
  Mamba channels  that output per channel (as FFN neurons);
  neurons   the FFN activation (the input of down_proj);
  channels  the RMSNorm outputs, at every norm site (each layer's input_layernorm and
            post_attention_layernorm, and the final norm), one score per site, summed over the sites;
  experts   ExpertStats' ranking (puzzle/blocks/experts.py: router mass or weighted output norm);
  expert neurons  the activation entering each expert's down_proj, on the tokens routed to it (the mean over a
            sample's routed tokens stands for the mean over the sequence; samples that sent it none add 0);
each aggregated as the paper's best choice: |value|, mean over the sequence, then L2 over the batch
(sqrt of the sum over samples of the squared per-sample means; Model-Optimizer's L2NormHook does the same).
Layers: block importance 1 - cos(input, output), averaged over tokens (ShortGPT), or the increase of the
LM loss when the layer is skipped. A block of n consecutive layers is scored as a whole: 1 - cos between
the block's input and output (Gromov et al. 2024's angular distance), or the loss with the block skipped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from puzzle.blocks.experts import ExpertStats
from puzzle.distill.activations import embed, layer_weights, logits_from_hidden, run_layers
from puzzle.modeling.modeling_decilm import DeciLMForCausalLM, DeciLMSparseMoE, route_tokens
from puzzle.progress import track


def channel_stat(x: torch.Tensor) -> torch.Tensor:
    """(B, T, N) -> (N,): sum over samples of (mean over the sequence of |x|)^2; sqrt of a sum of these is the L2."""
    return x.float().abs().mean(dim=1).pow(2).sum(dim=0)


def head_stat(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, H * D) -> (H,): channel_stat of each head's output norm ||o_h||_2 over head_dim."""
    per_head = x.float().unflatten(-1, (-1, head_dim)).norm(dim=-1)  # (B, T, H)
    return channel_stat(per_head)


@dataclass
class Importance:
    """Scores, larger = more important; only what the targets asked for is filled in."""

    hidden: torch.Tensor | None = None  # (C,) summed over norm sites
    heads: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (H,) per query head
    mamba_heads: dict[int, torch.Tensor] = field(default_factory=dict)  # Mamba layer -> (H,) per Mamba head
    mamba_channels: dict[int, torch.Tensor] = field(default_factory=dict)  # Mamba layer -> (H * P,) per channel
    ffn: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (I,) per neuron
    layers: torch.Tensor | None = None  # (L,) each layer removed alone
    windows: torch.Tensor | None = None  # (L - n + 1,) layers s .. s+n-1 removed together
    experts: dict[int, torch.Tensor] = field(default_factory=dict)  # MoE layer -> (E,) per expert
    expert_ffn: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # MoE layer -> per expert (I,)
    unrouted: tuple[tuple[int, int], ...] = ()  # (layer, expert) that got no token: neurons scored by weight norm
    tokens: int = 0


@dataclass(frozen=True, kw_only=True)
class Needs:
    """What to measure: the axes a PruneConfig prunes."""

    hidden: bool = False
    heads: tuple[int, ...] = ()  # layers whose heads are pruned
    mamba_heads: tuple[int, ...] = ()  # Mamba layers whose heads are pruned
    mamba_channels: tuple[int, ...] = ()  # Mamba layers whose heads' channels are pruned
    ffn: tuple[int, ...] = ()  # layers whose FFN is pruned
    experts: tuple[int, ...] = ()  # MoE layers whose experts are ranked
    expert_ffn: tuple[int, ...] = ()  # MoE layers whose experts' neurons are scored
    expert_ranking: str = "contribution"
    drop: int = 0  # layers dropped (0: no layer scores)
    metric: str = "cos"
    contiguous: bool = False


class _Sums:
    """Running sums of channel_stat / head_stat per named site, filled by forward hooks."""

    def __init__(self) -> None:
        self.sums: dict[tuple, torch.Tensor] = {}
        self.experts: dict[int, ExpertStats] = {}  # MoE layer -> its expert ranking

    def add(self, key: tuple, stat: torch.Tensor) -> None:
        self.sums[key] = self.sums[key] + stat if key in self.sums else stat

    def l2(self, key: tuple) -> torch.Tensor:
        return self.sums[key].sqrt()


class _Routed:
    """Which sample each token an MoE layer routes to each expert comes from: a pre-hook on the layer routes the
    input as its forward will (the same call on the same tensor), so the pre-hooks on the experts' down_proj
    can give channel_stat's per-sample means over the tokens each expert actually sees."""

    def __init__(self) -> None:
        self.samples: dict[int, torch.Tensor] = {}  # expert -> (n,) sample of each routed token, in forward order
        self.batch = 0

    def route(self, module: DeciLMSparseMoE, args) -> None:
        x = args[0]  # (B, T, C)
        _, chosen = route_tokens(module.gate(x.reshape(-1, x.shape[-1])), module.top_k, module.norm_topk_prob,
                                 module.routing, module.moe, getattr(module.gate, "e_score_correction_bias", None))
        self.batch = x.shape[0]
        self.samples = {e: torch.where(chosen == e)[0] // x.shape[1] for e in torch.unique(chosen).tolist()}

    def stat(self, expert: int, act: torch.Tensor) -> torch.Tensor:
        """(n, I) activations of one expert's routed tokens -> (I,): sum over samples of (mean |act|)^2."""
        sample = self.samples[expert]
        sums = act.new_zeros(self.batch, act.shape[-1], dtype=torch.float).index_add_(0, sample, act.float().abs())
        counts = torch.bincount(sample, minlength=self.batch)  # (B,)
        seen = counts > 0
        return (sums[seen] / counts[seen, None]).pow(2).sum(0)


def expert_weight_norms(expert: torch.nn.Module) -> torch.Tensor:
    """(I,) the L2 norm of each neuron's weights (its gate and up rows, its down column): the ranking of the
    neurons of an expert no calibration token reached."""
    gate = expert.gate_proj.weight.float().pow(2).sum(1) if hasattr(expert, "gate_proj") else 0  # relu2: no gate
    return (gate + expert.up_proj.weight.float().pow(2).sum(1) + expert.down_proj.weight.float().pow(2).sum(0)).sqrt()


@contextmanager
def _hooks(model: DeciLMForCausalLM, needs: Needs, sums: _Sums):
    """Forward hooks on the norms, o_proj inputs and down_proj inputs the needs ask for; removed on exit."""
    handles = []
    head_dim = model.config.head_dim
    layers = model.model.layers

    def on_output(key):
        return lambda module, args, out: sums.add(key, channel_stat(out))

    def on_input(key, stat):
        return lambda module, args: sums.add(key, stat(args[0]))

    try:
        if needs.hidden:
            handles.append(model.model.norm.register_forward_hook(on_output(("norm", -1))))
            for i, layer in enumerate(layers):
                for name in ("input_layernorm", "post_attention_layernorm"):
                    if getattr(layer, name) is not None:
                        handles.append(getattr(layer, name).register_forward_hook(on_output((name, i))))
        for i in needs.heads:
            o_proj = layers[i].self_attn.o_proj
            handles.append(o_proj.register_forward_pre_hook(on_input(("heads", i), lambda x: head_stat(x, head_dim))))
        for i in needs.mamba_heads:
            mixer = layers[i].self_attn.mamba_mixer
            handles.append(mixer.out_proj.register_forward_pre_hook(
                on_input(("mamba_heads", i), lambda x, d=mixer.head_dim: head_stat(x, d))))
        for i in needs.mamba_channels:
            out_proj = layers[i].self_attn.mamba_mixer.out_proj
            handles.append(out_proj.register_forward_pre_hook(on_input(("mamba_channels", i), channel_stat)))
        for i in needs.ffn:
            handles.append(layers[i].mlp.down_proj.register_forward_pre_hook(on_input(("ffn", i), channel_stat)))
        for i in needs.experts:
            sums.experts[i] = ExpertStats(needs.expert_ranking)
            handles.append(layers[i].mlp.register_forward_hook(sums.experts[i]))
        for i in needs.expert_ffn:
            routed = _Routed()
            handles.append(layers[i].mlp.register_forward_pre_hook(lambda module, args, r=routed: r.route(module, args)))
            for e, expert in enumerate(layers[i].mlp.experts):
                handles.append(expert.down_proj.register_forward_pre_hook(
                    on_input(("expert_ffn", i, e), lambda x, r=routed, e=e: r.stat(e, x))))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def measure_importance(model: DeciLMForCausalLM, batches: Iterable[torch.Tensor], needs: Needs) -> Importance:
    """Run the calibration batches (B, T) once (again for the loss metric) and score what `needs` asks for."""
    batches = list(batches)
    n = needs.drop
    importance = Importance(tokens=sum(ids.numel() for ids in batches))
    if (needs.hidden or needs.heads or needs.mamba_heads or needs.mamba_channels or needs.ffn or needs.experts or needs.expert_ffn
            or (n and needs.metric == "cos")):
        sums = _Sums()
        with _hooks(model, needs, sums):
            layers, windows = _activation_pass(model, batches, n)
        if needs.hidden:
            importance.hidden = sum(sums.l2(key) for key in sums.sums
                                    if key[0] not in ("heads", "mamba_heads", "mamba_channels", "ffn", "expert_ffn"))
        importance.heads = {i: sums.l2(("heads", i)) for i in needs.heads}
        importance.mamba_heads = {i: sums.l2(("mamba_heads", i)) for i in needs.mamba_heads}
        importance.mamba_channels = {i: sums.l2(("mamba_channels", i)) for i in needs.mamba_channels}
        importance.ffn = {i: sums.l2(("ffn", i)) for i in needs.ffn}
        importance.experts = {i: stats.score() for i, stats in sums.experts.items()}
        _expert_neurons(model, needs, sums, importance)
        if n and needs.metric == "cos":
            importance.layers, importance.windows = layers / importance.tokens, windows / importance.tokens
    if n and needs.metric == "loss":
        importance.layers, importance.windows = loss_importance(model, batches, n, windows=needs.contiguous)
    return importance


def _expert_neurons(model: DeciLMForCausalLM, needs: Needs, sums: _Sums, importance: Importance) -> None:
    """Each expert's neuron scores; an expert that no calibration token reached is ranked by weight norm."""
    unrouted = []
    for i in needs.expert_ffn:
        scores = []
        with layer_weights(model.model.layers[i]):  # a layer left in the files: its weights read in for the norms
            for e, expert in enumerate(model.model.layers[i].mlp.experts):
                if ("expert_ffn", i, e) in sums.sums:
                    scores.append(sums.l2(("expert_ffn", i, e)))
                else:
                    scores.append(expert_weight_norms(expert))
                    unrouted.append((i, e))
        importance.expert_ffn[i] = scores
    importance.unrouted = tuple(unrouted)


def _activation_pass(model: DeciLMForCausalLM, batches: list[torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward every batch layer by layer (the hooks collect activations); returns the summed cosine distances
    of each layer's output to its input, and of each block of n layers' output to the block's input."""
    n_layers = len(model.model.layers)
    layers = torch.zeros(n_layers, dtype=torch.float64)
    windows = torch.zeros(n_layers - n + 1 if n else 0, dtype=torch.float64)
    with track("prune: importance", len(batches)) as bar:
        for ids in batches:
            x = embed(model, ids)  # (B, T, C)
            recent = deque([x], maxlen=n + 1)  # the input of the last n layers' block, ..., the current state
            for i in range(n_layers):
                y, _ = run_layers(model, hidden=x, start=i, stop=i + 1)
                layers[i] += _cos_distance_sum(x, y)
                recent.append(y)
                if n and i >= n - 1:
                    windows[i - n + 1] += _cos_distance_sum(recent[0], y)
                x = y
            model.model.norm(x)  # the final norm site (its output feeds the LM head)
            bar.advance(1)
    return layers, windows


def _cos_distance_sum(x: torch.Tensor, y: torch.Tensor) -> float:
    """Sum over tokens of 1 - cos(x_t, y_t); x, y: (B, T, C)."""
    return (1 - F.cosine_similarity(x.float(), y.float(), dim=-1)).sum().item()


@torch.no_grad()
def loss_importance(model: DeciLMForCausalLM, batches: list[torch.Tensor], n: int, *, windows: bool = True,
                    chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per layer, per block of n or None) mean LM-loss increase, nats/token, when skipped on the batches.

    Costs about L^2 / 2 layer forwards per batch (twice that with `windows`): the states entering every
    layer are kept and each skip runs the rest of the model from there.
    """
    n_layers = len(model.model.layers)
    layers = torch.zeros(n_layers, dtype=torch.float64)
    blocks = torch.zeros(n_layers - n + 1 if windows else 0, dtype=torch.float64)
    positions = 0
    with track("prune: loss of each removal", len(batches)) as bar:
        for ids in batches:
            states = [embed(model, ids)]  # states[i]: the input of layer i; states[-1]: the last output
            for i in range(n_layers):
                states.append(run_layers(model, hidden=states[i], start=i, stop=i + 1)[0])
            base = _lm_loss_sum(model, states[-1], ids, chunk)
            for i in range(n_layers):
                skipped = run_layers(model, hidden=states[i], start=i + 1)[0]
                layers[i] += _lm_loss_sum(model, skipped, ids, chunk) - base
            for s in range(blocks.numel()):
                skipped = run_layers(model, hidden=states[s], start=s + n)[0]
                blocks[s] += _lm_loss_sum(model, skipped, ids, chunk) - base
            positions += ids[:, 1:].numel()
            bar.advance(1)
    return layers / positions, blocks / positions if windows else None


def _lm_loss_sum(model: DeciLMForCausalLM, hidden: torch.Tensor, ids: torch.Tensor, chunk: int) -> float:
    """Summed next-token cross-entropy of final hidden states (B, T, C), `chunk` positions at a time."""
    h, y = hidden[:, :-1].flatten(0, 1), ids[:, 1:].flatten().to(hidden.device)  # (N, C), (N,)
    return sum(F.cross_entropy(logits_from_hidden(model, h[s:s + chunk]).float(), y[s:s + chunk], reduction="sum").item()
               for s in range(0, h.shape[0], chunk))
