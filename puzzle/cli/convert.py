"""`puzzle convert HF_DIR OUT`."""

from __future__ import annotations

import shlex
import sys

from puzzle.cli.options import ModelDir, OutDir, Overwrite
from puzzle.cli.output import done


def convert_command(hf_dir: ModelDir, out: OutDir, overwrite: Overwrite = False) -> None:
    """Convert an HF parent (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Mixtral, gpt-oss) or a Llama-Nemotron checkpoint to puzzle's format.

    The result computes exactly what the parent computes (same weights, every layer equal to the
    parent's) and loads with transformers (trust_remote_code=True), and in vLLM unless it has experts.

    Example:  puzzle convert ~/models/Llama-3.1-8B ./llama-8b-decilm
    """
    from puzzle.checkpoint import convert

    convert(hf_dir, out, overwrite=overwrite, info={"command": shlex.join(["puzzle", *sys.argv[1:]])})
    done(f"converted {hf_dir} -> {out}")
