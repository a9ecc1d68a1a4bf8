"""Minitron pruning of mixture-of-experts parents (puzzle/prune/): the identity, experts kept and expert width
against transformers' own MoE models sliced by hand with rankings computed here, the hidden axis through routers,
experts and gpt-oss's sinks, experts no calibration token reached, and the one-line refusals."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from factories import FAMILIES, decilm_model, globals_for, hf_parent, randomize_, tiny_corpus, tiny_tokenizer
from transformers import AutoModelForCausalLM

from puzzle.checkpoint import load_architecture, load_model
from puzzle.cli import app as cli
from puzzle.cli.prune import prune_command
from puzzle.corpus import DataConfig
from puzzle.data import load_token_data, load_tokenizer
from puzzle.errors import ConfigError, InputError
from puzzle.prune import PruneConfig, PruneResult, prune
from puzzle.prune.importance import Needs, expert_weight_norms, measure_importance
from puzzle.prune.plan import LayerPlan, PrunePlan, top_k
from puzzle.prune.slicing import apply_plan

CALIBRATION = 512


@pytest.fixture(autouse=True)
def _token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PUZZLE_CACHE_DIR", str(tmp_path / "cache"))


def random_ids(n=3, t=12, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def moe_parent_with_tokenizer(root, family, seed=0, **overrides):
    """(parent folder, data config): a tiny transformers MoE model of `family` (tests/factories.py FAMILIES, 3
    layers) with a BPE tokenizer over stdlib text; `overrides` change its config."""
    corpus = tiny_corpus(root / "corpus", n_files=12)
    tokenizer = tiny_tokenizer(corpus)
    torch.manual_seed(seed)
    cls, config = FAMILIES[family]()
    for key, value in dict(vocab_size=len(tokenizer), **overrides).items():
        setattr(config, key, value)
    model = randomize_(cls(config).eval(), seed)
    model.save_pretrained(root / "parent")
    tokenizer.save_pretrained(root / "parent")
    return root / "parent", DataConfig(paths=(str(corpus),), seq_len=32, held_out_fraction=0.2)


def small(data, **targets) -> PruneConfig:
    return PruneConfig(data=data, calibration_tokens=CALIBRATION, eval_tokens=256, batch_size=4, **targets)


def calibration_batches(parent, data):
    """The train batches `prune` calibrates on (stage._importance's call)."""
    tokens = load_token_data(data, load_tokenizer(parent))
    return list(tokens.batches("train", 4, n_tokens=max(CALIBRATION, data.seq_len), seed=0))


# ---- the identity ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_zero_pruning_of_an_moe_parent_equals_the_parent(family, tmp_path):
    hf = hf_parent(family, tmp_path / "hf")
    moe = load_architecture(tmp_path / "hf").blocks[0].ffn.moe
    cfg = PruneConfig(hidden_size=64, heads=4, experts=moe.num_local_experts, expert_ffn_size=moe.expert_intermediate_dim)
    result = prune(tmp_path / "hf", tmp_path / "out", cfg)  # no data: nothing to rank
    assert result.calibration_tokens == 0 and result.after == result.before and result.output_format == "decilm"
    assert result.before.experts[:2] == ((4, 4) if family != "qwen3_moe" else (4, 0))  # Qwen3-MoE's layer 1 is dense
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "out")(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


# ---- experts and expert width against a hand-sliced transformers Mixtral ---------------------------------


@torch.no_grad()
def reference_rankings(hf, batches, ranking):
    """Per layer of a transformers Mixtral, computed here without puzzle: (expert scores (E,), per expert its neuron
    scores (I,)). Experts: `router_mass` the mean router probability, `contribution` the mean over all tokens of
    routing weight x ||expert output|| (0 where not routed). Neurons: the activation entering down_proj, |.| averaged
    over each sample's tokens routed to the expert, then the L2 norm over the samples."""
    inputs = {i: [] for i in range(len(hf.model.layers))}
    handles = [layer.mlp.register_forward_pre_hook(lambda m, args, i=i: inputs[i].append(args[0]))
               for i, layer in enumerate(hf.model.layers)]
    for ids in batches:
        hf(ids)
    for handle in handles:
        handle.remove()
    out = {}
    for i, xs in inputs.items():
        block = hf.model.layers[i].mlp
        experts, k = hf.config.num_local_experts, hf.config.num_experts_per_tok
        score, neurons, tokens = torch.zeros(experts, dtype=torch.float64), torch.zeros(experts, hf.config.intermediate_size), 0
        for x in xs:  # (B, T, C)
            probs = F.softmax(x @ block.gate.weight.T, dim=-1)  # (B, T, E)
            top, chosen = probs.topk(k, dim=-1)
            top = top / top.sum(-1, keepdim=True)  # Mixtral renormalises the top-k
            for e in range(experts):
                routed = (chosen == e).any(-1)  # (B, T)
                gate, up = F.linear(x, block.experts.gate_up_proj[e]).chunk(2, dim=-1)
                act = F.silu(gate) * up  # (B, T, I)
                if ranking == "router_mass":
                    score[e] += probs[..., e].sum()
                else:
                    norms = F.linear(act, block.experts.down_proj[e]).norm(dim=-1)  # (B, T)
                    score[e] += ((top * (chosen == e)).sum(-1) * norms).sum()
                for b in range(x.shape[0]):
                    if routed[b].any():
                        neurons[e] += act[b][routed[b]].abs().mean(0) ** 2
            tokens += x.shape[0] * x.shape[1]
        out[i] = (score / tokens, neurons.sqrt())
    return out


def sliced_mixtral(hf, keep: dict, neurons: dict):
    """transformers' Mixtral with layer i's experts keep[i] (router rows with them) and expert e's neurons neurons[i][e]."""
    width = len(neurons[0][0])
    config = copy.deepcopy(hf.config)
    config.num_local_experts, config.intermediate_size = len(keep[0]), width
    reference = type(hf)(config).eval()
    state = hf.state_dict()
    I = hf.config.intermediate_size  # noqa: E741
    for i in keep:
        p = f"model.layers.{i}.mlp."
        state[p + "gate.weight"] = state[p + "gate.weight"][list(keep[i])]
        state[p + "experts.gate_up_proj"] = torch.stack([state[p + "experts.gate_up_proj"][e][list(n) + [I + j for j in n]]
                                                         for e, n in zip(keep[i], neurons[i])])
        state[p + "experts.down_proj"] = torch.stack([state[p + "experts.down_proj"][e][:, list(n)]
                                                      for e, n in zip(keep[i], neurons[i])])
    reference.load_state_dict(state)
    return reference


@pytest.mark.parametrize("ranking", ["contribution", "router_mass"])
def test_experts_and_expert_width_equal_the_hand_sliced_mixtral(ranking, tmp_path):
    parent, data = moe_parent_with_tokenizer(tmp_path, "mixtral", intermediate_size=48, num_hidden_layers=2)
    result = prune(parent, tmp_path / "out", small(data, experts=3, expert_ffn_size=20, expert_ranking=ranking))
    hf = AutoModelForCausalLM.from_pretrained(parent).eval()
    scores = reference_rankings(hf, calibration_batches(parent, data), ranking)
    keep = {i: tuple(sorted(s.topk(3).indices.tolist())) for i, (s, _) in scores.items()}
    neurons = {i: [tuple(sorted(scores[i][1][e].topk(20).indices.tolist())) for e in keep[i]] for i in keep}
    assert result.kept_experts == (keep[0], keep[1])
    assert any(k != (0, 1, 2) for k in keep.values())  # a first-k slice would fail the test (seeded)
    assert all(n != tuple(range(20)) for ns in neurons.values() for n in ns)
    assert (result.after.experts, result.after.expert_ffn_sizes) == ((3, 3), (20, 20))
    ids = random_ids(vocab=hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "out")(ids).logits, sliced_mixtral(hf, keep, neurons)(ids).logits,
                                   atol=1e-5, rtol=1e-5)
    blocks = json.loads((tmp_path / "out" / "config.json").read_text())["block_configs"]
    assert [b["ffn"]["moe"]["num_local_experts"] for b in blocks] == [3, 3]
    assert [b["ffn"]["moe"]["expert_intermediate_dim"] for b in blocks] == [20, 20]
    info = json.loads((tmp_path / "out" / "puzzle.json").read_text())
    assert PruneResult.from_dict(info["prune"]) == result


# ---- the hidden axis and heads through MoE layers ----------------------------------------------------------


def hidden_sliced(hf, keep: torch.Tensor):
    """transformers' model of `hf`'s MoE family with hidden size len(keep), every tensor sliced here by name."""
    config = copy.deepcopy(hf.config)
    config.head_dim = getattr(hf.config, "head_dim", None) or hf.config.hidden_size // hf.config.num_attention_heads
    config.hidden_size = len(keep)
    reference = type(hf)(config).eval()
    gpt_oss = hf.config.model_type == "gpt_oss"  # fused experts stored (E, C, 2I) / (E, I, C), not (E, 2I, C) / (E, C, I)
    state = {}
    for name, w in hf.state_dict().items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight",
                          "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.gate.weight", "mlp.router.weight")):
            w = w[:, keep]  # reads the hidden state
        elif name.endswith(("o_proj.weight", "o_proj.bias", "mlp.down_proj.weight", "layernorm.weight")) or name == "model.norm.weight":
            w = w[keep]  # writes the hidden state / normalises it
        elif name.endswith("experts.gate_up_proj"):
            w = w[:, keep] if gpt_oss else w[:, :, keep]
        elif name.endswith("experts.down_proj"):
            w = w[:, :, keep] if gpt_oss else w[:, keep]
        elif name.endswith("experts.down_proj_bias"):
            w = w[:, keep]
        state[name] = w
    reference.load_state_dict(state)
    return reference


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_hidden_pruning_of_an_moe_parent_equals_the_hand_sliced_reference(family, tmp_path):
    hf = hf_parent(family, tmp_path / "hf")
    keep = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:40].sort().values
    model = load_model(tmp_path / "hf")
    layers = tuple(LayerPlan(source=i) for i in range(model.config.num_hidden_layers))
    child = apply_plan(model, PrunePlan(hidden=tuple(keep.tolist()), num_attention_heads=4, layers=layers))
    ids = random_ids(t=10)
    with torch.no_grad():
        torch.testing.assert_close(child(ids).logits, hidden_sliced(hf, keep)(ids).logits, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_pruned_heads_take_their_attention_sinks_along():
    """On a gpt-oss layer (sinks, q/k/v/o biases), removing query heads equals zeroing their o_proj columns."""
    blocks = [("gqa2", "gpt_oss_moe")] * 2
    model = decilm_model(blocks, attention_bias=True, **globals_for("gpt_oss_moe"))
    d = model.config.head_dim
    plan = PrunePlan(hidden=None, num_attention_heads=2, layers=(
        LayerPlan(source=0, kv_heads=(0, 1), q_heads=(1, 2)),  # 2 groups of 2 -> 2 groups of 1
        LayerPlan(source=1, kv_heads=(1,), q_heads=(2, 3)),  # one whole group
    ))
    child = apply_plan(model, plan)
    assert torch.equal(child.model.layers[0].self_attn.sinks, model.model.layers[0].self_attn.sinks[[1, 2]])
    reference = copy.deepcopy(model)
    for p in plan.layers:
        for h in set(range(4)) - set(p.q_heads):
            reference.model.layers[p.source].self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
    ids = random_ids()
    torch.testing.assert_close(child(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_hidden_heads_and_experts_of_a_gpt_oss_parent_load_and_run(tmp_path, puzzle_cli, capsys):
    """Every axis at once on gpt-oss through the CLI; layer 0's router bias keeps experts 2 and 3 unrouted, so
    their width is chosen by weight norm and the summary says which."""
    parent, data = moe_parent_with_tokenizer(tmp_path, "gpt_oss")
    hf = AutoModelForCausalLM.from_pretrained(parent)
    with torch.no_grad():
        hf.model.layers[0].mlp.router.bias.copy_(torch.tensor([20.0, 20.0, -20.0, -20.0]))
    hf.save_pretrained(parent)
    args = ["prune", str(parent), str(tmp_path / "out"), "--data", data.paths[0], "--hidden-size", "48", "--heads", "2",
            "--experts", "3", "--expert-ffn-size", "64", "--calibration-tokens", str(CALIBRATION), "--eval-tokens", "256",
            "--device", "cpu"]
    assert puzzle_cli(args) == 0, capsys.readouterr().err
    out = " ".join(capsys.readouterr().out.split())
    assert "experts / MoE layer │ 4 │ 3" in out and "expert width │ 96 │ 64" in out
    assert "(neurons kept by weight norm): L0.E2" in out
    info = json.loads((tmp_path / "out" / "puzzle.json").read_text())["prune"]
    # E3 scored 0 like E2 and was the expert dropped (ties: the lower index stays), so only E2 is reported
    assert info["kept_experts"][0] == [0, 1, 2] and "L0.E2" in info["unrouted_experts"]
    assert "L0.E3" not in info["unrouted_experts"]
    child = load_model(tmp_path / "out")
    arch = load_architecture(tmp_path / "out")
    assert arch.shape.hidden_size == 48 and child.model.layers[0].self_attn.sinks.shape == (2,)
    assert {(b.ffn.moe.num_local_experts, b.ffn.moe.expert_intermediate_dim, b.ffn.moe.router_bias) for b in arch.blocks} \
        == {(3, 64, True)}
    assert sum(p.numel() for p in child.parameters()) == info["after"]["params"] == arch.total_params()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    ids = random_ids(vocab=hf.config.vocab_size)
    with torch.no_grad():
        assert loaded(ids).logits.isfinite().all()
        torch.testing.assert_close(loaded(ids).logits, child(ids).logits, atol=1e-5, rtol=1e-5)
    # the unrouted kept expert's neurons are its 64 largest by weight norm (its up_proj bias is one entry per neuron)
    expert = load_model(parent).model.layers[0].mlp.experts[2]
    kept = list(top_k(expert_weight_norms(expert), 64))
    assert kept != list(range(64))
    torch.testing.assert_close(child.model.layers[0].mlp.experts[2].up_proj.bias, expert.up_proj.bias[kept])


@torch.no_grad()
def test_unrouted_experts_are_ranked_by_weight_norm():
    model = decilm_model([("full", "gpt_oss_moe")] * 2, **globals_for("gpt_oss_moe"))
    model.model.layers[1].mlp.gate.bias.copy_(torch.tensor([-20.0, 20.0, -20.0, 20.0]))  # experts 0, 2 never chosen
    imp = measure_importance(model, [random_ids()], Needs(expert_ffn=(1,)))
    assert imp.unrouted == ((1, 0), (1, 2))
    experts = model.model.layers[1].mlp.experts
    torch.testing.assert_close(imp.expert_ffn[1][0], expert_weight_norms(experts[0]))
    assert not torch.allclose(imp.expert_ffn[1][1], expert_weight_norms(experts[1]))  # routed: by activations


# ---- refusals ---------------------------------------------------------------------------------------------


@pytest.fixture
def puzzle_cli():
    """`puzzle` with prune registered (as puzzle/cli/app.py does once the command ships)."""
    if "prune" not in [c.name for c in cli.app.registered_commands]:
        cli.app.command("prune")(prune_command)
    return cli.run


def test_bad_moe_requests_are_one_line_errors(tmp_path, puzzle_cli, capsys):
    hf_parent("mixtral", tmp_path / "mixtral")
    hf_parent("llama", tmp_path / "llama")
    for parent, targets, error, match in [
        ("mixtral", dict(experts=1), ConfigError, r"experts 1 is fewer than layer 0's 2 experts per token.*--experts 2"),
        ("mixtral", dict(experts=5), InputError, "exceeds layer 0's 4 experts"),
        ("mixtral", dict(expert_ffn_size=97), InputError, "exceeds layer 0's expert width 96"),
        ("mixtral", dict(ffn_size=32), InputError, "--expert-ffn-size"),
        ("llama", dict(experts=2), InputError, "no layer has experts"),
    ]:
        with pytest.raises(error, match=match):
            prune(tmp_path / parent, tmp_path / "out", PruneConfig(**targets))
    with pytest.raises(ConfigError, match="expert_ranking"):
        PruneConfig(expert_ranking="random")
    assert puzzle_cli(["prune", str(tmp_path / "mixtral"), str(tmp_path / "out"), "--experts", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--experts 2" in lines[0]
    assert not (tmp_path / "out").exists()
