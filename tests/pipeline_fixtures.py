"""A tiny search run (random tiny Llama + BPE tokenizer + stdlib text) shared by pipeline-level tests."""

from __future__ import annotations

from pathlib import Path

import yaml
from factories import tiny_parent_with_tokenizer


def tiny_search_config(corpus: Path, **sections) -> dict:
    config = {
        "data": {"paths": [str(corpus)], "seq_len": 64, "held_out_fraction": 0.2},
        "space": {"attention": {"windows": [16]}, "ffn": {"multiple": 32}},
        "calibration": {"tokens": 4096, "batch_size": 4},
        "bld": {"tokens_per_unit": 4096, "batch_size": 4, "eval_tokens": 1024, "checkpoint_every": 4},
        "score": {"tokens": 1024, "batch_size": 4},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_run_inputs(root: Path, layers: int = 4) -> tuple[Path, Path]:
    return tiny_parent_with_tokenizer(root, layers=layers)
