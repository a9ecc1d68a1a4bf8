"""Minitron pruning (puzzle/prune/): selection rules, importance against naive references, exactness against
hand-sliced weights, planted important channels / neurons / heads / layers, the prune stage, the CLI."""

import copy
import json

import pytest
import torch
from factories import decilm_model, hf_parent, tiny_corpus, tiny_tokenizer
from pipeline_fixtures import tiny_run_inputs
from transformers import AutoModelForCausalLM

from puzzle.arch import Architecture
from puzzle.checkpoint import load_architecture, load_model, save_model
from puzzle.cli import app as cli
from puzzle.cli.prune import prune_command
from puzzle.corpus import DataConfig
from puzzle.distill.activations import logits_from_hidden, run_layers
from puzzle.errors import ConfigError, InputError, OutputExistsError
from puzzle.modeling.modeling_decilm import MaskProvider
from puzzle.prune import PruneConfig, PruneResult, minitron_kd, prune
from puzzle.prune.importance import Needs, channel_stat, head_stat, measure_importance
from puzzle.prune.plan import (
    LayerPlan,
    PrunePlan,
    drop_lowest,
    drop_window,
    head_targets,
    make_plan,
    pruned_architecture,
    select_heads,
    top_k,
)
from puzzle.prune.slicing import apply_plan

HETEROGENEOUS = [("full", "full"), ("gqa2", "narrow"), ("window", "linear"), ("linear", "no_op"), ("no_op", "full"),
                 ("kv1", "full")]


def identity_plan(model) -> PrunePlan:
    return PrunePlan(hidden=None, num_attention_heads=model.config.num_attention_heads,
                     layers=tuple(LayerPlan(source=i) for i in range(model.config.num_hidden_layers)))


def random_ids(n=3, t=12, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PUZZLE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(parent, data config): a random 4-layer Llama (4 heads, hidden 64, FFN 128) with a tokenizer and stdlib text."""
    parent, corpus = tiny_run_inputs(tmp_path_factory.mktemp("prune"))
    return parent, DataConfig(paths=(str(corpus),), seq_len=64, held_out_fraction=0.2)


def small(data, **targets) -> PruneConfig:
    return PruneConfig(data=data, calibration_tokens=512, eval_tokens=512, batch_size=4, **targets)


# ---- selection ------------------------------------------------------------------------------------------


def test_top_k_keeps_the_largest_in_their_order_and_breaks_ties_by_index():
    assert top_k(torch.tensor([0.1, 5.0, 3.0, 5.0, -1.0]), 3) == (1, 2, 3)
    assert top_k(torch.tensor([1.0, 1.0, 1.0]), 2) == (0, 1)


def test_select_heads_keeps_whole_groups_and_the_same_heads_per_group():
    scores = torch.tensor([1.0, 9.0, 0.5, 0.4, 3.0, 3.0, 0.1, 2.0])  # 8 heads, 4 KV groups of 2
    kv, q = select_heads(scores, kv_in=4, kv_out=2, per_group=1)
    assert kv == (0, 2) and q == (1, 4)  # group norms 9.06, 0.64, 4.24, 2.0; ties -> lower index
    kv, q = select_heads(scores, kv_in=4, kv_out=4, per_group=1)
    assert kv == (0, 1, 2, 3) and q == (1, 2, 4, 7)


def test_head_targets_keep_kv_heads_in_gqa_and_drop_groups_in_mha():
    arch = Architecture.from_config(hf_config_dict(heads=8, kv=4))
    assert head_targets(arch, 4, None) == (4, ((4, 1),) * 2)  # 4 groups of 2 -> 4 groups of 1
    assert head_targets(arch, 4, 2) == (4, ((2, 2),) * 2)
    assert head_targets(arch, 8, None) == (8, (None, None))  # the identity
    mha = Architecture.from_config(hf_config_dict(heads=8, kv=8))
    assert head_targets(mha, 2, None) == (2, ((2, 1),) * 2)  # groups of one head: drop groups
    with pytest.raises(InputError, match="larger groups"):
        head_targets(mha, 4, 2)  # 2 query heads per KV head would merge MHA groups
    with pytest.raises(InputError, match="does not divide"):
        head_targets(arch, 6, 4)
    with pytest.raises(InputError, match="exceeds"):
        head_targets(arch, 16, None)


def hf_config_dict(heads, kv, layers=2):
    return {"hidden_size": 64, "num_attention_heads": heads, "head_dim": 8, "vocab_size": 32,
            "block_configs": [{"attention": {"n_heads_in_group": heads // kv}, "ffn": {"intermediate_size": 32}}] * layers}


def test_layer_selection_drops_the_lowest_or_the_best_block():
    scores = torch.tensor([0.9, 0.1, 0.8, 0.05, 0.7])
    assert drop_lowest(scores, 2) == (0, 2, 4)
    assert drop_window(torch.tensor([0.5, 0.2, 0.3]), 3) == (0, 4)  # windows L0-2, L1-3, L2-4 over 5 layers


# ---- importance against naive references ----------------------------------------------------------------


def test_channel_and_head_stats_are_the_batch_l2_of_the_sequence_mean():
    x = torch.randn(3, 5, 4 * 2)  # (B, T, H * D) with H = 4 heads of D = 2
    naive = torch.zeros(8)
    heads = torch.zeros(4)
    for b in range(3):
        naive += torch.stack([x[b, :, c].abs().mean() for c in range(8)]) ** 2
        heads += torch.stack([torch.stack([x[b, t, 2 * h:2 * h + 2].norm() for t in range(5)]).mean() for h in range(4)]) ** 2
    torch.testing.assert_close(channel_stat(x), naive)
    torch.testing.assert_close(head_stat(x, 2), heads)


@torch.no_grad()
def test_measure_importance_equals_a_hook_free_reference():
    model = decilm_model([("full", "full"), ("gqa2", "narrow"), ("no_op", "full")], rms_norm_eps=1e-5)
    batches = [random_ids(seed=0), random_ids(seed=1)]
    imp = measure_importance(model, batches, Needs(hidden=True, heads=(0, 1), ffn=(1, 2), drop=2))
    hidden, heads, ffn, cos, blocks = 0, {0: 0, 1: 0}, {1: 0, 2: 0}, torch.zeros(3), torch.zeros(2)
    layers = model.model.layers
    for ids in batches:
        _, io = run_layers(model, ids, capture={0, 1, 2})
        sites = [layers[0].input_layernorm(io[0].x), layers[0].post_attention_layernorm(io[0].h),
                 layers[1].input_layernorm(io[1].x), layers[1].post_attention_layernorm(io[1].h),
                 layers[2].post_attention_layernorm(io[2].h), model.model.norm(io[2].y)]
        hidden = hidden + torch.stack([channel_stat(s) for s in sites])  # (sites, C)
        for i in (0, 1):
            heads_out = copy.deepcopy(layers[i].self_attn)  # the attention up to o_proj's input
            heads_out.o_proj = torch.nn.Identity()
            x = layers[i].input_layernorm(io[i].x)
            rope = model.model.rotary_emb(x, torch.arange(ids.shape[1])[None])
            heads[i] = heads[i] + head_stat(heads_out(x, rope, MaskProvider(None, 0, ids.shape[1], x.device)), 16)
        for i in (1, 2):
            n = layers[i].post_attention_layernorm(io[i].h)
            ffn[i] = ffn[i] + channel_stat(layers[i].mlp.act_fn(layers[i].mlp.gate_proj(n)) * layers[i].mlp.up_proj(n))
        states = [io[0].x, io[0].y, io[1].y, io[2].y]
        cos += torch.stack([(1 - torch.cosine_similarity(states[i], states[i + 1], dim=-1)).sum() for i in range(3)])
        blocks += torch.stack([(1 - torch.cosine_similarity(states[s], states[s + 2], dim=-1)).sum() for s in range(2)])
    tokens = sum(ids.numel() for ids in batches)
    torch.testing.assert_close(imp.hidden, hidden.sqrt().sum(0))
    for i in (0, 1):
        torch.testing.assert_close(imp.heads[i], heads[i].sqrt())
    for i in (1, 2):
        torch.testing.assert_close(imp.ffn[i], ffn[i].sqrt())
    torch.testing.assert_close(imp.layers.float(), cos / tokens)
    torch.testing.assert_close(imp.windows.float(), blocks / tokens)
    assert imp.tokens == tokens


def test_loss_metric_is_the_lm_loss_increase_when_a_layer_is_skipped():
    model = decilm_model([("full", "full")] * 3)
    ids = random_ids()
    imp = measure_importance(model, [ids], Needs(drop=1, metric="loss", contiguous=True))

    def loss(skip):
        x = model.model.embed_tokens(ids)
        for i in range(3):
            if i != skip:
                x = run_layers(model, hidden=x, start=i, stop=i + 1)[0]
        logits = logits_from_hidden(model, x)[:, :-1]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()

    expected = torch.tensor([loss(i) - loss(None) for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(imp.layers, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(imp.windows, expected, atol=1e-5, rtol=1e-4)  # a block of one layer is that layer


# ---- planted importance ---------------------------------------------------------------------------------


@torch.no_grad()
def test_planted_channel_neuron_and_heads_are_kept():
    model = decilm_model([("gqa2", "full")] * 2)  # 4 heads on 2 KV heads, FFN 96
    layers = model.model.layers
    model.model.embed_tokens.weight[:, 37] *= 30  # a loud residual channel: large in every norm's output
    layers[1].mlp.up_proj.weight[70] *= 30  # a loud FFN neuron in layer 1
    layers[0].self_attn.v_proj.weight[16:32] *= 30  # KV head 1 carries query heads 2 and 3 in layer 0
    arch = Architecture.from_config(model.config.to_dict())
    cfg = PruneConfig(hidden_size=4, ffn_size=2, heads=2, kv_heads=1, data=DataConfig(paths=("unused",)))
    imp = measure_importance(model, [random_ids()], Needs(hidden=True, heads=(0, 1), ffn=(0, 1)))
    plan = make_plan(arch, cfg, imp)
    assert 37 in plan.hidden and len(plan.hidden) == 4
    assert 70 in plan.layers[1].ffn and len(plan.layers[1].ffn) == 2
    assert plan.layers[0].kv_heads == (1,) and plan.layers[0].q_heads == (2, 3)


@torch.no_grad()
def test_depth_pruning_by_block_importance_drops_the_planted_layer(tiny, tmp_path):
    parent, data = tiny
    model = AutoModelForCausalLM.from_pretrained(parent)
    for name in ("self_attn.o_proj", "mlp.down_proj"):  # layer 2 barely changes its input: 1 - cos ~ 0
        model.model.layers[2].get_submodule(name).weight.mul_(1e-3)
    model.save_pretrained(tmp_path / "planted")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "planted" / f).write_bytes((parent / f).read_bytes())
    result = prune(tmp_path / "planted", tmp_path / "out", small(data, drop_layers=1))
    assert result.kept_layers == (0, 1, 3) and result.dropped_layers == (2,)
    assert min(range(4), key=lambda i: result.layer_scores[i]) == 2 and result.window_scores is None
    # The saved child (layers renumbered) is the parent with layer 2 skipped.
    teacher, child = load_model(tmp_path / "planted"), load_model(tmp_path / "out")
    ids = random_ids(vocab=300)
    x = teacher.model.embed_tokens(ids)
    for i in (0, 1, 3):
        x = run_layers(teacher, hidden=x, start=i, stop=i + 1)[0]
    torch.testing.assert_close(child(ids).logits, logits_from_hidden(teacher, x), atol=1e-5, rtol=1e-5)
    assert load_architecture(tmp_path / "out").num_layers == 3


def test_contiguous_drops_one_block_and_free_choice_any_layers():
    model = decilm_model([("full", "full")] * 5)
    with torch.no_grad():
        for i in (1, 3):
            model.model.layers[i].self_attn.o_proj.weight.mul_(1e-3)
            model.model.layers[i].mlp.down_proj.weight.mul_(1e-3)
    arch = Architecture.from_config(model.config.to_dict())
    imp = measure_importance(model, [random_ids()], Needs(drop=2))
    assert make_plan(arch, PruneConfig(drop_layers=2), imp).layers == tuple(LayerPlan(source=i) for i in (0, 2, 4))
    kept = [p.source for p in make_plan(arch, PruneConfig(drop_layers=2, contiguous=True), imp).layers]
    dropped = sorted(set(range(5)) - set(kept))
    assert len(kept) == 3 and dropped[1] == dropped[0] + 1
    assert dropped[0] == int(imp.windows.argmin())


# ---- exactness ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_full_size_plan_is_the_identity_on_a_heterogeneous_model(tie):
    model = decilm_model(HETEROGENEOUS, tie_word_embeddings=tie, attention_bias=True, mlp_bias=True, qk_norm=True)
    child = apply_plan(model, identity_plan(model))
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(child(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert (child.lm_head.weight is child.model.embed_tokens.weight) == tie


def hand_sliced(parent, keep: torch.Tensor):
    """The transformers model of `parent`'s family with hidden size len(keep), its weights sliced by hand."""
    config = copy.deepcopy(parent.config)
    config.head_dim = getattr(parent.config, "head_dim", None) or parent.config.hidden_size // parent.config.num_attention_heads
    config.hidden_size = len(keep)
    reference = type(parent)(config).eval()
    state = {}
    for name, w in parent.state_dict().items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")) or name.endswith(
                ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
            w = w[:, keep]  # reads the hidden state
        elif name.endswith(("o_proj.weight", "down_proj.weight", "o_proj.bias", "down_proj.bias")):
            w = w[keep]  # writes the hidden state
        elif name.endswith("layernorm.weight") or name == "model.norm.weight":
            w = w[keep]
        state[name] = w
    reference.load_state_dict(state)
    return reference


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])  # biases + llama3 RoPE; tied + q/k/v bias; q/k norm
def test_hidden_pruning_equals_the_hand_sliced_reference(family, tmp_path):
    parent = hf_parent(family, tmp_path / "parent")
    keep = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:40].sort().values
    plan = identity_plan(parent)
    child = apply_plan(load_model(tmp_path / "parent"), PrunePlan(hidden=tuple(keep.tolist()), num_attention_heads=4,
                                                                  layers=plan.layers))
    ids = random_ids(t=10)
    with torch.no_grad():
        torch.testing.assert_close(child(ids).logits, hand_sliced(parent, keep)(ids).logits, atol=2e-5, rtol=1e-4)
    assert (child.lm_head.weight is child.model.embed_tokens.weight) == parent.config.tie_word_embeddings


@torch.no_grad()
def test_pruned_heads_and_neurons_equal_zeroing_their_outputs():
    """Removing query heads (and whole KV groups) or FFN neurons is exactly zeroing their o_proj / down_proj columns."""
    model = decilm_model(HETEROGENEOUS, attention_bias=True, mlp_bias=True, qk_norm=True)
    d = model.config.head_dim
    plan = PrunePlan(hidden=None, num_attention_heads=2, layers=(
        LayerPlan(source=0, kv_heads=(1, 3), q_heads=(1, 3), ffn=(5, 6, 50, 90)),  # MHA: 4 -> 2 groups of 1
        LayerPlan(source=1, kv_heads=(1,), q_heads=(2, 3), ffn=tuple(range(0, 40, 3))),  # 2 groups of 2 -> 1 group
        LayerPlan(source=2, kv_heads=(0, 1), q_heads=(0, 3)),  # 2 groups of 2 -> 2 groups of 1 (window layer)
        LayerPlan(source=3), LayerPlan(source=4),
        LayerPlan(source=5, kv_heads=(0,), q_heads=(1, 2)),  # 1 group of 4 -> 1 group of 2
    ))
    child = apply_plan(model, plan)
    reference = copy.deepcopy(model)
    for p in plan.layers:
        layer = reference.model.layers[p.source]
        if p.q_heads is not None:
            dropped = [h for h in range(4) if h not in p.q_heads]
            for h in dropped:
                layer.self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
        if p.ffn is not None:
            mask = torch.ones(layer.mlp.down_proj.weight.shape[1], dtype=torch.bool)
            mask[list(p.ffn)] = False
            layer.mlp.down_proj.weight[:, mask] = 0
    ids = random_ids()
    torch.testing.assert_close(child(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    arch = Architecture.from_config(child.config.to_dict())
    assert [b.attention.n_heads_in_group for b in arch.blocks] == [1, 2, 1, None, None, 2]
    assert pruned_architecture(Architecture.from_config(model.config.to_dict()), plan) == arch
    # generation with the KV cache agrees with the full forward
    out = child.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert torch.equal(child(out).logits[:, 4:-1].argmax(-1), out[:, 5:])


# ---- the prune stage ------------------------------------------------------------------------------------


def test_prune_to_the_full_size_is_the_identity_and_needs_no_data(tiny, tmp_path):
    parent, _ = tiny
    cfg = PruneConfig(hidden_size=64, ffn_size=128, heads=4, kv_heads=4, output_format="decilm")
    result = prune(parent, tmp_path / "out", cfg)
    assert result.calibration_tokens == 0 and result.quality is None and result.after == result.before
    ids = random_ids(vocab=300)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "out")(ids).logits, load_model(parent)(ids).logits, atol=0, rtol=0)


def test_full_size_llama_is_written_as_a_plain_llama_equal_to_the_parent(tmp_path):
    parent = hf_parent("llama", tmp_path / "parent")  # llama3 RoPE, biases everywhere, head_dim != hidden / heads
    result = prune(tmp_path / "parent", tmp_path / "out", PruneConfig())
    assert result.output_format == "plain" and result.after == result.before
    child = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(child(ids).logits, parent(ids).logits, atol=1e-5, rtol=1e-5)


def test_uniform_llama_child_is_a_plain_llama_equal_to_its_decilm_form(tiny, tmp_path):
    parent, data = tiny
    targets = dict(hidden_size=48, ffn_size=64, heads=2, drop_layers=1)
    plain = prune(parent, tmp_path / "plain", small(data, **targets), info={"command": "test"})
    decilm = prune(parent, tmp_path / "decilm", small(data, **targets, output_format="decilm"))
    assert plain.output_format == "plain" and decilm.output_format == "decilm"
    assert plain.after == decilm.after and plain.kept_layers == decilm.kept_layers
    assert (plain.after.layers, plain.after.hidden_size, plain.after.kv_heads) == (3, 48, (2, 2, 2))
    assert plain.quality.kl > 0 and plain.quality.tokens > 0
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()  # no trust_remote_code
    assert type(llama).__name__ == "LlamaForCausalLM"
    ids = random_ids(vocab=300)
    with torch.no_grad():
        torch.testing.assert_close(llama(ids).logits, load_model(tmp_path / "decilm")(ids).logits, atol=1e-5, rtol=1e-5)
    info = json.loads((tmp_path / "plain" / "puzzle.json").read_text())
    assert PruneResult.from_dict(info["prune"]) == plain and info["command"] == "test"
    assert load_architecture(tmp_path / "plain").total_params() == plain.after.params


def test_heterogeneous_checkpoint_prunes_into_the_decilm_format(tmp_path):
    corpus = tiny_corpus(tmp_path / "corpus", n_files=10)
    tokenizer = tiny_tokenizer(corpus)
    model = decilm_model(HETEROGENEOUS, vocab_size=len(tokenizer))
    save_model(model, tmp_path / "child")
    tokenizer.save_pretrained(tmp_path / "child")
    data = DataConfig(paths=(str(corpus),), seq_len=32, held_out_fraction=0.2)
    result = prune(tmp_path / "child", tmp_path / "out", small(data, hidden_size=32, heads=2,
                                                               ffn_size=(48, 20, None, None, 64, 96)))
    assert result.output_format == "decilm"
    assert result.after.kv_heads == (2, 2, 2, 0, 0, 1) and result.after.ffn_sizes == (48, 20, 0, 0, 64, 96)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert loaded.config.hidden_size == 32 and loaded(random_ids(vocab=len(tokenizer))).logits.isfinite().all()


def test_distill_tokens_retrains_with_logits_only_kd(tiny, tmp_path):
    parent, data = tiny
    cfg = small(data, ffn_size=32, distill=minitron_kd(512, batch_size=4, eval_tokens=512))
    result = prune(parent, tmp_path / "out", cfg)
    assert result.distill_tokens == 512 and result.quality_distilled.tokens == result.quality.tokens
    gkd = json.loads((tmp_path / "out" / "gkd.json").read_text())
    assert gkd["config"]["cosine_weight"] == 0  # logits only, Minitron's choice
    assert gkd["before"]["kl"] == pytest.approx(result.quality.kl, rel=1e-4)  # the same held-out windows
    info = json.loads((tmp_path / "out" / "puzzle.json").read_text())
    assert info["gkd"]["tokens"] == 512 and info["prune"]["quality_distilled"]["kl"] == result.quality_distilled.kl
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama"  # uniform: plain
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the staging folders are gone


def test_bad_requests_are_typed_errors_and_nothing_is_written(tiny, tmp_path):
    parent, data = tiny
    for targets, error, match in [
        (dict(hidden_size=65), InputError, "exceeds the parent's 64"),
        (dict(ffn_size=129), InputError, "exceeds layer 0's FFN width 128"),
        (dict(ffn_size=(64, 64)), InputError, "lists 2 widths but the model has 4 layers"),
        (dict(heads=8), InputError, "exceeds the parent's 4 attention heads"),
        (dict(kv_heads=3), InputError, "kv_heads 3 does not divide heads 4"),
        (dict(drop_layers=4), InputError, "cannot drop 4 of the model's 4 layers"),
        (dict(drop_layers=1, data=None), ConfigError, "--data"),
        (dict(hidden_size=32, distill=minitron_kd(64, cosine_weight=1.0)), ConfigError, "cosine"),
    ]:
        with pytest.raises(error, match=match):
            prune(parent, tmp_path / "out", PruneConfig(**{"data": data, **targets}))
    hf_parent("qwen3", tmp_path / "qwen3")
    with pytest.raises(ConfigError, match="Llama parent"):
        prune(tmp_path / "qwen3", tmp_path / "out", PruneConfig(output_format="plain"))
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        prune(parent, tmp_path / "exists", PruneConfig())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["exists", "qwen3"]


def test_config_rejects_bad_values():
    for bad in (dict(hidden_size=0), dict(ffn_size=(64, -1)), dict(heads=4, kv_heads=3), dict(drop_layers=-1),
                dict(contiguous=True), dict(metric="l2"), dict(eval_tokens=-1), dict(output_format="gguf")):
        with pytest.raises(ConfigError):
            PruneConfig(**bad)
    assert PruneConfig(ffn_size=(64, None)).ffn_size == (64, None)


# ---- command line ---------------------------------------------------------------------------------------


@pytest.fixture
def puzzle_cli():
    """`puzzle` with prune registered (as puzzle/cli/app.py does once the command ships)."""
    if "prune" not in [c.name for c in cli.app.registered_commands]:
        cli.app.command("prune")(prune_command)
    return cli.run


def test_cli_prunes_and_prints_the_summary(tiny, tmp_path, puzzle_cli, capsys):
    parent, data = tiny
    args = ["prune", str(parent), str(tmp_path / "out"), "--data", data.paths[0], "--drop-layers", "2", "--contiguous",
            "--ffn-size", "64,-,64,64", "--calibration-tokens", "512", "--eval-tokens", "512", "--device", "cpu", "--decilm"]
    assert puzzle_cli(args) == 0, capsys.readouterr().err
    out = " ".join(capsys.readouterr().out.split())
    assert "parameters" in out and "dropped layers: L" in out and "KL to parent" in out and "DeciLM" in out
    assert "on the same tokens" in out  # the child's LM loss next to the parent's
    info = json.loads((tmp_path / "out" / "puzzle.json").read_text())
    assert info["command"].startswith("puzzle") and len(info["prune"]["window_scores"]) == 3
    dropped = [i for i in range(4) if i not in info["prune"]["kept_layers"]]
    assert len(dropped) == 2 and dropped[1] == dropped[0] + 1


def test_cli_one_line_errors_and_help(tiny, tmp_path, puzzle_cli, capsys):
    parent, _ = tiny
    assert puzzle_cli(["prune", str(parent), str(tmp_path / "out"), "--hidden-size", "999"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("error: ") and "exceeds" in lines[0] and len(lines) == 1
    assert puzzle_cli(["prune", str(parent), str(tmp_path / "out"), "--ffn-size", "6x"]) == 2
    assert not (tmp_path / "out").exists()
    assert puzzle_cli(["prune", "--help"]) == 0
    assert "Example" in capsys.readouterr().out
