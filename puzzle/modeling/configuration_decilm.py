"""DeciLM ("nemotron-nas") configuration: a Llama-family config plus `block_configs`, one entry per layer.

This file is copied into every puzzle checkpoint and loaded through `auto_map`, so it imports only
transformers. It must work with every transformers release from 4.56 to the newest, because vLLM reads it
(native `DeciLMForCausalLM` support) with older releases than puzzle itself uses.

vLLM reads each block as attributes (`block.attention.no_op`, `block.attention.n_heads_in_group`,
`block.ffn.no_op`, `block.ffn.intermediate_size`) and tests `hasattr(block.ffn, "ffn_mult")` to pick the
FFN width, so blocks become attribute objects whose unset fields stay absent, and `to_dict()` writes plain
dicts back. Field names follow NVIDIA's Llama-Nemotron checkpoints; puzzle adds `window_length` (used),
`qk_norm` (Qwen3), `attention_sinks` (gpt-oss; written only when true) and the mixture-of-experts `ffn.moe`
(NVIDIA's MoEConfig names plus gpt-oss's routing / bias / activation fields, read as `block.ffn.moe.*`; absent on
dense layers) and never changes the meaning of an existing field.
"""

import transformers
from transformers import PretrainedConfig

# transformers 5 keeps RoPE settings in `rope_parameters`; 4.x in `rope_theta` + `rope_scaling`.
_ROPE_PARAMETERS_API = int(transformers.__version__.split(".")[0]) >= 5


class _Fields:
    """A JSON object read as attributes; keys that were not given stay absent (not None)."""

    def __init__(self, **fields):
        for key, value in fields.items():
            setattr(self, key, _Fields(**value) if isinstance(value, dict) else value)

    def to_dict(self):
        return {k: (v.to_dict() if isinstance(v, _Fields) else v) for k, v in self.__dict__.items()}

    def __eq__(self, other):
        return isinstance(other, _Fields) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"{type(self).__name__}({self.to_dict()})"


class BlockConfig(_Fields):
    """One layer: `attention` and `ffn` sub-block settings (and any extra per-layer fields, e.g. `moe`)."""

    def __init__(self, attention=None, ffn=None, **extra):
        # `no_op` and `replace_with_linear` are always present in the DeciLM schema (vLLM reads them directly).
        attention = {"no_op": False, "replace_with_linear": False, **_as_dict(attention or {})}
        ffn = {"no_op": False, "replace_with_linear": False, **_as_dict(ffn or {})}
        super().__init__(attention=attention, ffn=ffn, **extra)


def _as_dict(block):
    return block.to_dict() if isinstance(block, _Fields) else dict(block)


def _standard_rope(rope_parameters, rope_scaling, rope_theta):
    """One RoPE dict ({"rope_type", "rope_theta", ...scaling fields}) from either naming convention."""
    rope = dict(rope_parameters or rope_scaling or {})
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", rope_theta)
    return rope


class DeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        intermediate_size=None,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=None,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_scaling=None,
        rope_parameters=None,
        attention_bias=False,
        qkv_bias=None,
        attention_dropout=0.0,
        mlp_bias=False,
        qk_norm=False,
        attention_sinks=False,
        block_configs=None,
        **kwargs,
    ):
        if block_configs is None:
            # No per-layer description: every layer is the plain Llama layer given by the global fields.
            n_kv = num_key_value_heads or num_attention_heads
            block_configs = [
                {
                    "attention": {"no_op": False, "replace_with_linear": False,
                                  "n_heads_in_group": num_attention_heads // n_kv, "window_length": None},
                    "ffn": {"no_op": False, "replace_with_linear": False,
                            "intermediate_size": intermediate_size or 4 * hidden_size},
                }
                for _ in range(num_hidden_layers)
            ]
        elif len(block_configs) != num_hidden_layers:
            raise ValueError(
                f"config.json: num_hidden_layers is {num_hidden_layers} but block_configs has "
                f"{len(block_configs)} entries; they must be equal"
            )
        self.block_configs = [BlockConfig(**_as_dict(block)) for block in block_configs]

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        # Per-layer values live in block_configs; the globals are kept only as NVIDIA's checkpoints keep them.
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_bias = attention_bias
        if qkv_bias is not None:  # vLLM reads `qkv_bias` only when present (Qwen2: q/k/v bias, no o_proj bias)
            self.qkv_bias = qkv_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm
        if attention_sinks:  # only gpt-oss children carry the field, so other config.json files stay as they were
            self.attention_sinks = True
        self.pretraining_tp = 1

        rope = _standard_rope(rope_parameters, rope_scaling, rope_theta)
        if _ROPE_PARAMETERS_API:
            self.rope_parameters = rope
        else:
            self.rope_theta = rope["rope_theta"]
            self.rope_scaling = None if rope["rope_type"] == "default" else {
                k: v for k, v in rope.items() if k != "rope_theta"
            }

        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def to_dict(self):
        output = super().to_dict()
        output["block_configs"] = [block.to_dict() for block in self.block_configs]
        return output
