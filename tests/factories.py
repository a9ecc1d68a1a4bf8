"""Tiny random-initialised models of real HF architectures, for tests (no hub downloads)."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from transformers import (
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    NemotronHConfig,
    NemotronHForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from puzzle.checkpoint import build_model, decilm_config

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

FAMILIES = {
    # Llama-3 RoPE scaling, biases everywhere, explicit head_dim != hidden/heads.
    "llama": lambda: (LlamaForCausalLM, LlamaConfig(**COMMON, head_dim=32, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    # Sliding window shorter than the test sequences.
    "mistral": lambda: (MistralForCausalLM, MistralConfig(**COMMON, sliding_window=6)),
    # q/k/v bias, tied embeddings, sliding window on the upper layers only.
    "qwen2": lambda: (Qwen2ForCausalLM, Qwen2Config(**COMMON, tie_word_embeddings=True, use_sliding_window=True,
                                                    sliding_window=5, max_window_layers=1)),
    # per-head q/k RMSNorm.
    "qwen3": lambda: (Qwen3ForCausalLM, Qwen3Config(**COMMON, head_dim=32)),
    # 4 experts of width 48, 2 per token, top-k renormalised; a sliding window shorter than the test sequences.
    "mixtral": lambda: (MixtralForCausalLM, MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2,
                                                          sliding_window=6)),
    # q/k norm, 4 experts of width 32 with the top-2 probabilities left unnormalised, and one dense layer (1).
    "qwen3_moe": lambda: (Qwen3MoeForCausalLM, Qwen3MoeConfig(**COMMON, head_dim=32, num_experts=4,
                                                              num_experts_per_tok=2, moe_intermediate_size=32,
                                                              norm_topk_prob=False, mlp_only_layers=[1])),
    # Attention sinks, q/k/v/o biases, sliding (window 6) and full layers alternating, YaRN RoPE; 4 biased experts
    # of width 96, top-2 of a biased router; a SwiGLU limit low enough that the clamps cut (|gate_up| reaches ~0.5).
    "gpt_oss": lambda: (GptOssForCausalLM, GptOssConfig(**COMMON, head_dim=32, num_local_experts=4,
                                                        num_experts_per_tok=2, sliding_window=6, **_gpt_oss_limit(),
                                                        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0,
                                                                         "factor": 4.0, "beta_fast": 32.0,
                                                                         "beta_slow": 1.0, "truncate": False,
                                                                         "original_max_position_embeddings": 64})),
    # Hybrid Mamba-2 / MoE / attention (no RoPE) / relu2 MLP layers; Mamba chunks of 8 (shorter than the test
    # sequences, so the scan carries state across chunks); 4 experts in 2 groups, top-2 from the best group, and a
    # shared expert.
    "nemotron_h": lambda: (NemotronHForCausalLM, NemotronHConfig(
        vocab_size=VOCAB, hidden_size=64, hybrid_override_pattern="ME*-M*E", num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=96, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2,
        conv_kernel=4, chunk_size=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48, n_group=2, topk_group=1, max_position_embeddings=256)),
}
MOE_FAMILIES = ("mixtral", "qwen3_moe", "gpt_oss")


def _gpt_oss_limit() -> dict:
    """A SwiGLU limit the test's activations reach, where transformers reads it from the config; releases before
    5.2x hard-code 7.0 (which every published gpt-oss config.json also says), so there the default is kept."""
    return {"swiglu_limit": 0.2} if hasattr(GptOssConfig(), "swiglu_limit") else {}


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb norms and biases too (HF initialises them to 1 / 0, which would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("bias", "sinks", "A_log", ".D")):  # A_log / D: Mamba's per-head decay, skip
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # Nemotron-H's router: changes which experts win
                b.add_(0.1 * torch.randn(b.shape, generator=gen))
    return model


def hf_parent(family: str, out: Path | None = None, seed: int = 0):
    """A tiny transformers model of `family` (eval mode), saved to `out` when given."""
    torch.manual_seed(seed)
    cls, config = FAMILIES[family]()
    model = randomize_(cls(config).eval(), seed)
    if out is not None:
        model.save_pretrained(out)
    return model


ATTENTION_VARIANTS = {
    "full": {"n_heads_in_group": 1},
    "gqa2": {"n_heads_in_group": 2},
    "kv1": {"n_heads_in_group": 4},
    "window": {"n_heads_in_group": 2, "window_length": 4},
    "linear": {"replace_with_linear": True},
    "no_op": {"no_op": True},
    # Nemotron-H's Mamba-2 mixer: 8 heads of 16 channels, state 8, B/C in 2 groups.
    "mamba": {"mamba": {"num_heads": 8, "head_dim": 16, "state_dim": 8, "num_groups": 2, "conv_kernel": 4}},
}
MOE = {"num_local_experts": 4, "num_experts_per_tok": 2, "expert_intermediate_dim": 24, "norm_topk_prob": True}
# gpt-oss experts: top-k then softmax, biased router and experts, clamped SwiGLU (a limit the random weights reach).
GPT_OSS_MOE = {**MOE, "routing": "topk_softmax", "router_bias": True, "expert_bias": True,
               "expert_activation": "clamped_swiglu", "swiglu_alpha": 1.702, "swiglu_limit": 0.2}
# Nemotron-H experts: grouped sigmoid routing (2 groups, the best one used), relu2 experts without a gate, a
# shared expert, scaled routing weights.
NEMOTRON_H_MOE = {**MOE, "routing": "sigmoid_group_topk", "expert_activation": "relu2", "n_group": 2, "topk_group": 1,
                  "routed_scaling_factor": 2.5, "shared_expert_intermediate_dim": 32}
FFN_VARIANTS = {
    "full": {"intermediate_size": 96},
    "ungated": {"intermediate_size": 64, "gated": False},
    "nemotron_h_moe": {"moe": NEMOTRON_H_MOE},
    "narrow": {"intermediate_size": 40},
    "moe": {"moe": MOE},
    "gpt_oss_moe": {"moe": GPT_OSS_MOE},
    "linear": {"replace_with_linear": True},
    "no_op": {"no_op": True},
}
VARIANT_COMBINATIONS = list(itertools.product(ATTENTION_VARIANTS, FFN_VARIANTS))


def globals_for(ffn: str) -> dict:
    """Global config fields a variant's family implies: gpt-oss experts come with attention sinks in every layer."""
    return {"attention_sinks": True} if ffn == "gpt_oss_moe" else {}


def decilm_dict(blocks: list[tuple[str, str]], **overrides) -> dict:
    """A DeciLM config.json dict with one (attention, ffn) variant name pair per layer."""
    config = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=256,
                  num_hidden_layers=len(blocks), bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  block_configs=[{"attention": dict(ATTENTION_VARIANTS[a]), "ffn": dict(FFN_VARIANTS[f])} for a, f in blocks])
    config.update(overrides)
    return config


def decilm_model(blocks: list[tuple[str, str]], seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return randomize_(build_model(decilm_config(decilm_dict(blocks, **overrides))), seed)


# ---- a tiny parent with a tokenizer and a text corpus, for pipeline tests ----------------------------------

def tiny_corpus(root: Path, n_files: int = 40) -> Path:
    """Text files cut from the Python standard library (present on every machine), deterministic."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted((stdlib / "json").glob("*.py")) + sorted((stdlib / "email").glob("*.py"))
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n_files):
        text = sources[k % len(sources)].read_text(errors="replace")
        (root / f"doc{k:03d}.txt").write_text(text[(k // len(sources)) * 2000:][:6000])
    return root


def tiny_tokenizer(corpus: Path, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(p) for p in sorted(corpus.glob("*.txt"))], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def tiny_parent_with_tokenizer(root: Path, layers: int = 4, seed: int = 0, hidden_size: int = 64,
                               intermediate_size: int = 128, max_position_embeddings: int = 256,
                               family: str = "llama", experts: int = 4) -> tuple[Path, Path]:
    """(parent folder, corpus folder): a random tiny Llama (4 heads, 4 KV heads) with a BPE tokenizer; or, with
    family="mixtral", a tiny Mixtral of the same shape with `experts` experts of that width, 2 per token; or, with
    family="nemotron_h", a hybrid of Mamba, attention, MLP and MoE layers in turn (`experts` in 2 groups)."""
    corpus = tiny_corpus(root / "corpus")
    tokenizer = tiny_tokenizer(corpus)
    torch.manual_seed(seed)
    if family == "nemotron_h":
        config = NemotronHConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, hybrid_override_pattern=("M*-E" * layers)[:layers],
            num_attention_heads=4, num_key_value_heads=4, head_dim=hidden_size // 4, intermediate_size=intermediate_size,
            mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=16, n_routed_experts=experts,
            num_experts_per_tok=2, moe_intermediate_size=intermediate_size // 2, moe_shared_expert_intermediate_size=32,
            n_group=2, topk_group=2, max_position_embeddings=max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        randomize_(NemotronHForCausalLM(config).eval(), seed).save_pretrained(root / "parent")
        tokenizer.save_pretrained(root / "parent")
        return root / "parent", corpus
    cls, config_cls, extra = {"llama": (LlamaForCausalLM, LlamaConfig, {}),
                              "mixtral": (MixtralForCausalLM, MixtralConfig,
                                          {"num_local_experts": experts, "num_experts_per_tok": 2})}[family]
    config = config_cls(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                        max_position_embeddings=max_position_embeddings,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra)
    model = randomize_(cls(config).eval(), seed)
    model.save_pretrained(root / "parent")
    tokenizer.save_pretrained(root / "parent")
    return root / "parent", corpus


def add_custom_tokenizer_code(folder: Path, marker: Path) -> Path:
    """Make `folder`'s tokenizer one that runs code shipped in the folder (`auto_map`), as hub repositories with
    custom tokenizers do; importing that code creates `marker`, so a test sees whether it ran."""
    import json

    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]}
    config["tokenizer_class"] = "CustomTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tokenization_custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\nclass CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    return folder
