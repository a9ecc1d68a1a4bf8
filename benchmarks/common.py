"""Shared pieces of the benchmarks: Llama-3.1-8B-shaped configs, environment facts, result files.

Every benchmark writes `benchmarks/results/<name>.json` and `<name>.md` with the device, date and versions,
so numbers are never separated from where they were measured.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path
from typing import Any

import torch
import transformers

from puzzle.modeling.configuration_decilm import DeciLMConfig

RESULTS = Path(__file__).parent / "results"


# (hidden, query heads, KV heads, head_dim, FFN width, vocab, layers) of the Llama-3.x family
LLAMA_SHAPES = {"8b": (4096, 32, 8, 128, 14336, 128256, 32), "70b": (8192, 64, 8, 128, 28672, 128256, 80),
                "405b": (16384, 128, 8, 128, 53248, 128256, 126)}
SHAPE_NAMES = {"8b": "Llama-3.1-8B", "70b": "Llama-3.3-70B", "405b": "Llama-3.1-405B"}


def llama_8b_config(num_layers: int = 32, tiny: bool = False, shape: str = "8b") -> DeciLMConfig:
    """Llama-3.1-8B's shape (GQA 32/8 heads of 128, FFN 14336, vocab 128256, Llama-3 RoPE), or Llama-3.3-70B's /
    Llama-3.1-405B's (`shape` "70b" / "405b") cut to `num_layers`; `tiny` for CPU smoke runs."""
    if tiny:
        hidden, heads, kv, head_dim, ffn, vocab = 256, 4, 2, 64, 896, 1024
    else:
        hidden, heads, kv, head_dim, ffn, vocab, _ = LLAMA_SHAPES[shape]
    blocks = [{"attention": {"n_heads_in_group": heads // kv}, "ffn": {"intermediate_size": ffn}} for _ in range(num_layers)]
    return DeciLMConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads, head_dim=head_dim,
        max_position_embeddings=131072, rms_norm_eps=1e-5, block_configs=blocks, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )


def environment() -> dict[str, Any]:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": device, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda}


def write_results(name: str, data: dict[str, Any], markdown: str, out_dir: Path | None = None) -> tuple[Path, Path]:
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = data.setdefault("environment", environment())
    header = (f"# {name}\n\nDevice: {env['device']}  \nDate: {env['date']}  \n"
              f"torch {env['torch']}, transformers {env['transformers']}, CUDA {env['cuda']}, Python {env['python']}\n\n")
    (out_dir / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(header + markdown + "\n")
    return out_dir / f"{name}.json", out_dir / f"{name}.md"
