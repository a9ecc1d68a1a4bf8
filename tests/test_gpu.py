"""CUDA checks (run on the GPU machine: pytest -m gpu): bf16 modeling, graphs-based profiling, BLD."""

import pytest
import torch
from factories import decilm_model, globals_for

from puzzle.arch import Architecture, AttentionConfig
from puzzle.checkpoint import build_model, decilm_config
from puzzle.grouped_moe import grouped_experts
from puzzle.profiling import ProfileConfig, eager_variants, measure_model, predicted_timing, profile_variants

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
BLOCKS = [("gqa2", "full"), ("no_op", "narrow"), ("window", "full"), ("linear", "linear"), ("kv1", "no_op")]


def test_bf16_on_cuda_agrees_with_fp32_on_cpu():
    model = decilm_model(BLOCKS, seed=1, hidden_size=256, head_dim=64)
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        ref = model(ids).logits
        out = model.to("cuda", torch.bfloat16)(ids.cuda()).logits.float().cpu()
    assert (out - ref).norm() / ref.norm() < 3e-2
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_generate_on_cuda_with_cache_equals_recomputation():
    model = decilm_model(BLOCKS, seed=2, hidden_size=256, head_dim=64).cuda()
    prompt = torch.randint(0, 128, (2, 6), device="cuda")
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert cached.tolist() == model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False).tolist()


def test_cuda_graph_profile_predicts_a_whole_model():
    config = decilm_model([("gqa2", "full")] * 8, hidden_size=1024, head_dim=128, num_attention_heads=8).config
    cfg = ProfileConfig(batch_size=32, context_len=1024, prompt_len=512, repeats=10)
    arch = Architecture.from_config(config.to_dict())
    variants = [("attention", arch.blocks[0].attention), ("ffn", arch.blocks[0].ffn), ("attention", AttentionConfig(no_op=True))]
    profile = profile_variants(config, variants, cfg)
    assert profile.method == "cuda_graphs"
    model = build_model(config, torch.bfloat16).cuda()
    measured = measure_model(model, cfg)
    predicted = predicted_timing(profile, list(arch.blocks))
    assert 0.6 < predicted.decode_time_s / measured.decode_time_s < 1.5
    child = build_model(decilm_config(config.to_dict(), arch.with_block(3, attention=AttentionConfig(no_op=True))), torch.bfloat16).cuda()
    assert measure_model(child, cfg).decode_time_s < measured.decode_time_s



def test_moe_layers_on_cuda_agree_with_cpu():
    model = decilm_model([("gqa2", "moe"), ("kv1", "moe")], seed=3, hidden_size=256, head_dim=64)
    ids = torch.randint(0, 128, (4, 40))  # 160 tokens: every expert gets some
    with torch.no_grad():
        ref = model(ids).logits
        out = model.cuda()(ids.cuda()).logits.cpu()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_moe_variants_are_timed_in_cuda_graphs_and_predict_a_whole_moe_model():
    """Experts are timed in their grouped-GEMM form (puzzle.grouped_moe), captured like every other layer, and the
    sum of the variants predicts the whole MoE model timed the same way."""
    config = decilm_model([("gqa2", "moe")] * 4, hidden_size=1024, head_dim=128, num_attention_heads=8).config
    cfg = ProfileConfig(batch_size=32, context_len=1024, prompt_len=512, repeats=10)
    arch = Architecture.from_config(config.to_dict())
    attention, moe = arch.blocks[0].attention, arch.blocks[0].ffn
    profile = profile_variants(config, [("attention", attention), ("ffn", moe)], cfg)
    assert profile.method == "cuda_graphs" and {v.method for v in profile.variants} == {"cuda_graphs"}
    assert eager_variants(profile) == []
    measured = measure_model(build_model(config, torch.bfloat16).cuda(), cfg)
    predicted = predicted_timing(profile, list(arch.blocks))
    assert 0.6 < predicted.decode_time_s / measured.decode_time_s < 1.5


@pytest.mark.parametrize("ffn", ["moe", "gpt_oss_moe"])
def test_grouped_experts_on_cuda_agree_with_the_per_expert_layer_in_a_graph(ffn):
    model = decilm_model([("gqa2", ffn), ("kv1", ffn)], seed=5, hidden_size=256, head_dim=64, **globals_for(ffn))
    model = model.to("cuda", torch.bfloat16)
    ids = torch.randint(0, 128, (4, 40), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits.float()
        with grouped_experts(model):
            graph = torch.cuda.CUDAGraph()
            model(ids)  # warm-up outside the capture
            with torch.cuda.graph(graph):
                static = model(ids).logits
            graph.replay()
    assert (static.float() - ref).norm() / ref.norm() < 2e-2  # bf16: same routing, summation order differs


def test_bld_on_cuda_trains_with_autocast(tmp_path):
    from pipeline_fixtures import tiny_run_inputs, tiny_search_config, write_config

    from puzzle.distill.bld import read_unit_result, unit_path
    from puzzle.pipeline import run_search

    parent, corpus = tiny_run_inputs(tmp_path / "inputs", layers=2)
    config = write_config(tmp_path / "c.yaml", {**tiny_search_config(corpus, bld={"tokens_per_unit": 8192}), "device": "cuda"})
    run_search(tmp_path / "run", parent=parent, config=config, stage="library")
    search = run_search(tmp_path / "run", stage="bld")
    for unit in search.manifest().units:
        result = read_unit_result(unit_path(search.paths, unit))
        if not unit.variant.replace_with_linear:
            assert result.loss_final < result.loss_init, unit.unit_id


def test_a_parent_over_its_gpu_budget_reads_its_other_layers_per_forward(tmp_path):
    """parent_memory_gb below the parent: layers beyond it are read onto the GPU per forward; scores match the
    parent held whole (same kernels; bf16 autocast in BLD, so close rather than bitwise)."""
    from pipeline_fixtures import tiny_run_inputs, tiny_search_config, write_config

    from puzzle.pipeline import run_search
    from puzzle.scoring import Scores
    from puzzle.weights import LazyWeights

    parent, corpus = tiny_run_inputs(tmp_path / "inputs")
    budget_gb = LazyWeights(parent).nbytes() / 4 / 2**30  # stored in fp32, held in bf16: half of it
    scores = {}
    for name, extra in (("whole", {}), ("offloaded", {"parent_memory_gb": budget_gb})):
        config = write_config(tmp_path / f"{name}.yaml", {**tiny_search_config(corpus), "device": "cuda", **extra})
        for stage in ("library", "bld", "score"):
            search = run_search(tmp_path / name, parent=parent, config=config, stage=stage)
        assert (search.parent_model().offloaded_layers > 0) == bool(extra)
        scores[name] = {(e.layer, e.kind, e.name): e.kl for e in Scores.load(search.paths.scores).entries}
    assert scores["whole"].keys() == scores["offloaded"].keys()
    for key, kl in scores["whole"].items():
        assert abs(scores["offloaded"][key] - kl) <= 0.02 * kl + 1e-4, key


def test_gkd_on_cuda_chooses_its_sharding_and_lowers_the_kl(tmp_path):
    """The CUDA branch of GKD's set-up (the student's and teacher's sizes against the GPU's free memory, logged)
    and a short run on a perturbed copy of the parent."""
    from factories import tiny_parent_with_tokenizer

    from puzzle.checkpoint import convert, load_model, save_model
    from puzzle.corpus import DataConfig
    from puzzle.distill.gkd import GKDConfig, run_gkd

    parent, corpus = tiny_parent_with_tokenizer(tmp_path / "inputs")
    model = load_model(convert(parent, tmp_path / "copy"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student = save_model(model, tmp_path / "student", source=parent)
    result = run_gkd(student, parent, DataConfig(paths=(str(corpus),), seq_len=64, held_out_fraction=0.2),
                     tmp_path / "out", GKDConfig(tokens=16384, batch_size=4, lr=1e-3, eval_tokens=1024, device="cuda"))
    assert result.device.startswith("cuda") and result.after.kl < result.before.kl


def test_bld_on_cuda_reads_parent_activations_from_disk(tmp_path):
    """The disk cache on a GPU: bf16 shards written from and read back to the device train the same units."""
    from pipeline_fixtures import tiny_run_inputs, tiny_search_config, write_config
    from safetensors.torch import load_file

    from puzzle.distill.bld import unit_path
    from puzzle.pipeline import run_search

    parent, corpus = tiny_run_inputs(tmp_path / "inputs", layers=2)
    weights = {}
    for mode in ("recompute", "disk"):
        bld = {"tokens_per_unit": 8192, "parent_activations": mode}
        config = write_config(tmp_path / f"{mode}.yaml", {**tiny_search_config(corpus, bld=bld), "device": "cuda"})
        run_search(tmp_path / mode, parent=parent, config=config, stage="library")
        search = run_search(tmp_path / mode, stage="bld")
        weights[mode] = {u.unit_id: load_file(unit_path(search.paths, u)) for u in search.manifest().units}
    for unit_id, tensors in weights["recompute"].items():
        for name, tensor in tensors.items():
            torch.testing.assert_close(weights["disk"][unit_id][name], tensor, atol=1e-4, rtol=1e-3)
