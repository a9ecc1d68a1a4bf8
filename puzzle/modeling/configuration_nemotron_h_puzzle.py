"""vLLM's Nemotron-H Puzzle configuration ("nemotron_h_puzzle"): transformers' NemotronHConfig plus `block_configs`,
one entry per layer: {"block_type": "mamba" | "attention" | "mlp" | "moe", and the fields that differ in that layer}.

Copied by puzzle into the vLLM-format folder of a hybrid child (docs/checkpoint-format.md, "vLLM's Nemotron-H
format") and loaded through `auto_map` with trust_remote_code, so it imports only transformers. vLLM's
`NemotronHPuzzleForCausalLM` (model_executor/models/nemotron_h.py) takes each layer's type from
`hybrid_override_pattern` (derived here from block_configs) and its settings from
`get_nemotron_h_config_for_layer`: a copy of the global config with the block's fields set
(`num_key_value_heads`, `sliding_window`, `intermediate_size`, `n_routed_experts`, `moe_intermediate_size`, ...).
The Mamba dimensions are global.
"""

import copy

from transformers import NemotronHConfig

_PATTERN = {"mamba": "M", "attention": "*", "mlp": "-", "moe": "E"}


class NemotronHPuzzleConfig(NemotronHConfig):
    model_type = "nemotron_h_puzzle"
    block_configs: list | None = None

    def __post_init__(self, **kwargs):
        # The pattern follows block_configs, whatever a config.json also says (it says the same when written here).
        if self.block_configs:
            kwargs.pop("hybrid_override_pattern", None)
            self.layers_block_type = None
            kwargs["hybrid_override_pattern"] = "".join(_PATTERN[b["block_type"]] for b in self.block_configs)
        super().__post_init__(**kwargs)

    def get_nemotron_h_config_for_layer(self, layer_idx):
        """The global config with layer `layer_idx`'s own fields set (what vLLM builds that layer from)."""
        layer = copy.copy(self)
        for key, value in self.block_configs[layer_idx].items():
            if key != "block_type":
                setattr(layer, key, value)
        return layer
