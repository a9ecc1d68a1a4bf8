"""Replace-one-block scores equal a naive evaluation of the whole modified model."""

import math

import torch
import torch.nn.functional as F
from pipeline_fixtures import tiny_run_inputs, tiny_search_config, write_config

from puzzle.checkpoint import build_model, decilm_config, load_architecture
from puzzle.distill.bld import load_unit, unit_path
from puzzle.distill.losses import kl_per_token
from puzzle.pipeline import run_bld, run_search
from puzzle.scoring import Scores


def test_scores_equal_the_modified_model_evaluated_whole(tmp_path):
    parent_dir, corpus = tiny_run_inputs(tmp_path / "inputs", layers=3)
    config = write_config(tmp_path / "c.yaml", tiny_search_config(corpus))
    search = run_search(tmp_path / "run", parent=parent_dir, config=config, stage="library")
    run_bld(search.paths.root)
    run_search(search.paths.root, stage="score")
    scores = Scores.load(search.paths.scores)
    parent = search.parent_model()
    arch = load_architecture(search.paths.parent)
    batches = list(search.data().batches("held_out", 4, n_tokens=1024, shuffle=False))
    manifest = search.manifest()
    for c in manifest.candidates:
        entry = scores.get(c.layer, c.kind, c.name)
        if c.is_parent:
            assert entry.kl == 0.0 and entry.top1 == 1.0
            continue
        if c.name not in ("kv1", "no_op", "linear", "ffn32") or c.layer != 1:
            continue
        # Naive reference: build the whole child model with this one sub-block replaced, then evaluate.
        child_arch = arch.with_block(c.layer, **{("attention" if c.kind == "attention" else "ffn"): c.variant})
        child = build_model(decilm_config(parent.config.to_dict(), child_arch))
        state = {k: v for k, v in parent.state_dict().items() if not k.startswith(f"model.layers.{c.layer}.")}
        state |= {k: v for k, v in parent.state_dict().items() if k.startswith(f"model.layers.{c.layer}.")
                  and (("self_attn" in k or "input_layernorm" in k) != (c.kind == "attention"))}
        if c.trainable:
            state |= load_unit(unit_path(search.paths, c), c, parent.config).checkpoint_state(c.layer)
        child.load_state_dict(state, strict=True)
        kl = nll = top1 = n = 0
        with torch.no_grad():
            for batch in batches:
                p, q = parent(batch).logits[:, :-1], child(batch).logits[:, :-1]
                kl += kl_per_token(p, q).sum().item()
                nll += F.cross_entropy(q.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
                top1 += (p.argmax(-1) == q.argmax(-1)).sum().item()
                n += p.shape[0] * p.shape[1]
        assert math.isclose(entry.kl, kl / n, rel_tol=1e-4, abs_tol=1e-7), c.unit_id
        assert math.isclose(entry.lm_loss, nll / n, rel_tol=1e-5), c.unit_id
        assert math.isclose(entry.top1, top1 / n), c.unit_id


def test_a_window_shorter_than_the_scored_sequences_costs_quality_and_a_longer_one_is_refused(tmp_path):
    """A window scores as free when the scored sequences fit in it (it is causal attention there), while the
    profile charges it as a window at the deployment context: the config refuses such windows."""
    import pytest

    from puzzle.arch import AttentionConfig
    from puzzle.blocks.space import Candidate
    from puzzle.blocks.subblock import SubBlock
    from puzzle.data import load_token_data, load_tokenizer
    from puzzle.errors import ConfigError
    from puzzle.pipeline import load_search_config
    from puzzle.scoring import ScoreConfig, score_candidates

    parent_dir, corpus = tiny_run_inputs(tmp_path / "inputs", layers=2)
    search = run_search(tmp_path / "run", parent=parent_dir, stage="convert",
                        config=write_config(tmp_path / "c.yaml", tiny_search_config(corpus)))
    parent = search.parent_model()  # random weights: every layer's attention reads distant tokens
    data = load_token_data(search.cfg.data, load_tokenizer(parent_dir))  # 64-token sequences
    candidates = [Candidate(layer=0, kind="attention", name=f"w{w}", variant=AttentionConfig(n_heads_in_group=1, window_length=w),
                            is_parent=False) for w in (8, 64)]

    def with_parent_weights(c):  # the window variant starts from the parent's own attention weights
        block = SubBlock(parent.config, "attention", c.variant)
        block.load_checkpoint_state(parent.state_dict(), 0)
        return block

    scores = score_candidates(parent, candidates, with_parent_weights, data, ScoreConfig(tokens=1024, batch_size=4), "fp")
    assert scores.get(0, "attention", "w8").kl > 1e-4
    assert scores.get(0, "attention", "w64").kl < 1e-10  # the window covers the whole sequence: no difference
    with pytest.raises(ConfigError, match=r"space.attention.windows: 64 not shorter than data.seq_len \(64\)"):
        load_search_config(None, tiny_search_config(corpus, space={"attention": {"windows": [8, 64]}}))


def test_one_parent_pass_gives_the_scores_of_running_the_parent_to_each_layer_bitwise(tmp_path, monkeypatch):
    """Scoring keeps the parent's hidden state entering each layer instead of running the parent again for every
    layer: the scores are exactly those of the per-layer recomputation (a direct reference), with the parent's
    log-probs cached for the run and recomputed per batch alike."""
    import puzzle.scoring as scoring
    from puzzle.blocks.subblock import SubBlock
    from puzzle.distill.activations import logits_from_hidden, run_layers
    from puzzle.metrics import QualitySums, Reference

    parent_dir, corpus = tiny_run_inputs(tmp_path / "inputs", layers=3)
    search = run_search(tmp_path / "run", parent=parent_dir, stage="library",
                        config=write_config(tmp_path / "c.yaml", tiny_search_config(corpus)))
    run_bld(search.paths.root)
    manifest, parent, data, cfg = search.manifest(), search.parent_model(), search.data(), search.cfg.score
    load = search._block_loader(manifest, "bld")
    candidates = [c for c in manifest.candidates if c.layer > 0 and c.name in ("kv1", "no_op", "linear", "ffn32")]
    batches = list(data.batches("held_out", cfg.batch_size, n_tokens=cfg.tokens, shuffle=False))
    expected = {}
    with torch.no_grad():
        for c in candidates:  # the reference: the parent run from the embedding to the layer, for every candidate
            block = load(c) or SubBlock(parent.config, c.kind, c.variant)
            sums = QualitySums()
            for batch in batches:
                final, io = run_layers(parent, batch, capture={c.layer})
                hidden, _ = run_layers(parent, hidden=io[c.layer].x, start=c.layer, replace={c.layer: {c.kind: block}})
                p, q = final[:, :-1].flatten(0, 1), hidden[:, :-1].flatten(0, 1)
                sums.add(Reference.from_logits(logits_from_hidden(parent, p), batch[:, 1:].flatten()), logits_from_hidden(parent, q))
            expected[c.unit_id] = sums.quality()
    for budget in (scoring.TARGET_CACHE_BYTES, 0):  # log-probs kept for the run / recomputed for each candidate
        monkeypatch.setattr(scoring, "TARGET_CACHE_BYTES", budget)
        scores = scoring.score_candidates(parent, candidates, load, data, cfg, manifest.parent_fingerprint)
        for c in candidates:
            entry, q = scores.get(c.layer, c.kind, c.name), expected[c.unit_id]
            assert (entry.kl, entry.lm_loss, entry.top1) == (q.kl, q.lm_loss, q.top1), (budget, c.unit_id)
