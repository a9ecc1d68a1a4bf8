"""Options shared by several commands, written once (huggingface_hub CLI style)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Overwrite = Annotated[bool, typer.Option("--overwrite", metavar="", help="Replace OUT if it exists (it is swapped out only once the new one is complete).")]
KvDtype = Annotated[str, typer.Option("--kv-dtype", help="KV-cache dtype for byte counts: bf16, fp16, fp8, fp32.")]
JsonOutput = Annotated[bool, typer.Option("--json", metavar="", help="Print machine-readable JSON instead of a table.")]
ModelDir = Annotated[Path, typer.Argument(help="Model folder: a puzzle checkpoint, a Llama-Nemotron checkpoint, or a Llama/Mistral/Qwen2/Qwen3/Qwen3-MoE/Mixtral/gpt-oss HF folder.", show_default=False)]
OutDir = Annotated[Path, typer.Argument(help="Output folder (must not exist unless --overwrite).", show_default=False)]
Workers = Annotated[int, typer.Option("--workers", min=1, help="Parallel workers for BLD (processes, GPUs or Slurm tasks).")]
Launcher = Annotated[str, typer.Option("--launcher", help="How workers start: local, torchrun or slurm.")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", metavar="", help="Run code shipped in the model folder (a custom tokenizer or model class), as transformers' trust_remote_code; only for folders you trust.")]
Exclude = Annotated[Optional[list[str]], typer.Option("--exclude", help="With --data: skip files matching this glob (repeatable); without / it matches any path component (tests, *.min.js), with / the whole relative path.", show_default=False)]
Device = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, or auto (default: cuda when available).")]
ParentMemory = Annotated[Optional[float], typer.Option("--parent-memory-gb", min=0.001, help="Most GiB of the input model's weights held on the device; its other layers are read from its files when they run (default: half the free memory).", show_default=False)]
