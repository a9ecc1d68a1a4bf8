"""What `puzzle inspect` shows: per-layer variants and costs of any checkpoint puzzle reads.

Pure description of a model folder (no weights loaded): attention and FFN variant per layer, parameters,
KV-cache bytes per token, and whether vLLM's native DeciLM model can serve it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from puzzle.arch import Architecture, attention_params, ffn_params
from puzzle.checkpoint import normalized_config
from puzzle.files import read_json


@dataclass(frozen=True, kw_only=True)
class LayerSummary:
    layer: int
    attention: str  # full / window / linear / no_op
    kv_heads: int
    window: int | None
    ffn: str  # gated / linear / no_op
    ffn_width: int | None
    attention_params: int
    ffn_params: int
    kv_bytes_per_token: int


@dataclass(frozen=True, kw_only=True)
class ModelSummary:
    path: str
    model_type: str
    parent_family: str | None
    kv_dtype: str
    layers: tuple[LayerSummary, ...]
    embedding_params: int
    total_params: int
    kv_bytes_per_token: int
    vllm_unsupported: tuple[str, ...]
    vllm_transformers_unsupported: tuple[str, ...]  # why vLLM's Transformers backend cannot serve it either
    nemotron_h_unsupported: tuple[str, ...]  # why vLLM's Nemotron-H model cannot serve it (hybrids)
    vllm_serving: str  # Architecture.vllm_serving: native, nemotron_h, transformers or none
    provenance: dict[str, Any] | None

    @property
    def vllm_native(self) -> bool:
        return not self.vllm_unsupported


def summarize(path: Path, kv_dtype: str = "bf16") -> ModelSummary:
    path = Path(path)
    raw = read_json(path / "config.json", "config.json") if (path / "config.json").exists() else {}
    config = normalized_config(path)
    arch = Architecture.from_config(config, str(path / "config.json"))
    shape = arch.shape
    layers = []
    for i, block in enumerate(arch.blocks):
        att, ffn = block.attention, block.ffn
        layers.append(
            LayerSummary(
                layer=i,
                attention=att.kind,
                kv_heads=att.num_kv_heads(shape.num_attention_heads),
                window=att.window_length,
                ffn=ffn.kind,
                ffn_width=ffn.intermediate_size,
                attention_params=attention_params(shape, att),
                ffn_params=ffn_params(shape, ffn),
                kv_bytes_per_token=arch.layer_kv_bytes_per_token(i, kv_dtype),
            )
        )
    info = read_json(path / "puzzle.json", "puzzle.json") if (path / "puzzle.json").exists() else None
    return ModelSummary(
        path=str(path),
        model_type=raw.get("model_type", "?"),
        parent_family=config.get("puzzle_parent_family"),
        kv_dtype=kv_dtype,
        layers=tuple(layers),
        embedding_params=arch.embedding_params(),
        total_params=arch.total_params(),
        kv_bytes_per_token=arch.kv_bytes_per_token(kv_dtype),
        vllm_unsupported=tuple(arch.vllm_unsupported()),
        vllm_transformers_unsupported=tuple(arch.vllm_transformers_unsupported()),
        nemotron_h_unsupported=tuple(arch.nemotron_h_unsupported()),
        vllm_serving=arch.vllm_serving(),
        provenance=info,
    )
