"""`puzzle inspect CKPT`: per-layer table of variants, parameters and KV bytes."""

from __future__ import annotations

import dataclasses
import json

from rich.table import Table

from puzzle.cli.options import JsonOutput, KvDtype, ModelDir
from puzzle.cli.output import console, human_bytes, human_count


def inspect_command(ckpt: ModelDir, kv_dtype: KvDtype = "bf16", as_json: JsonOutput = False) -> None:
    """Show each layer's attention and FFN variant, parameters and KV-cache bytes per token.

    Works on puzzle checkpoints, Llama-Nemotron checkpoints and plain HF parents.

    Example:  puzzle inspect ./runs/demo/children/2x --kv-dtype fp8
    """
    from puzzle.summary import summarize

    s = summarize(ckpt, kv_dtype)
    if as_json:
        console.print_json(json.dumps(dataclasses.asdict(s) | {"vllm_native": s.vllm_native, "vllm_serving": s.vllm_serving}))
        return
    table = Table(title=f"{s.path}  ({s.model_type})", show_footer=True)
    table.add_column("layer", "total", justify="right")
    table.add_column("attention")
    table.add_column("KV heads", justify="right")
    table.add_column("FFN")
    table.add_column("FFN width", justify="right")
    table.add_column("params", human_count(s.total_params), justify="right")
    table.add_column(f"KV bytes/token ({s.kv_dtype})", human_bytes(s.kv_bytes_per_token), justify="right")
    for row in s.layers:
        attention = row.attention if row.window is None else f"window {row.window}"
        table.add_row(
            str(row.layer), attention, str(row.kv_heads or "-"), row.ffn, str(row.ffn_width or "-"),
            human_count(row.attention_params + row.ffn_params), human_bytes(row.kv_bytes_per_token),
        )
    console.print(table)
    console.print(f"embeddings + LM head + final norm: {human_count(s.embedding_params)} parameters")
    if s.model_type != "nemotron-nas":  # a plain HF folder: vLLM serves it with its own class for the family
        converted = "vLLM-native there too" if s.vllm_native else "not vLLM-native there: " + "; ".join(s.vllm_unsupported)
        console.print(f"a plain {s.model_type} folder: vLLM serves it with its {s.model_type} model; in puzzle's "
                      f"format (`puzzle convert`) it is {converted}")
    elif s.vllm_serving == "nemotron_h":
        console.print("[green]vLLM serves it as NemotronHPuzzleForCausalLM[/] from its Nemotron-H-format folder (a "
                      "search writes children/NAME-nemotron-h beside each hybrid child; puzzle.nemotron_h_puzzle)")
    elif s.parent_family == "nemotron_h":
        console.print("[yellow]vLLM cannot serve it[/]: " + "; ".join(s.nemotron_h_unsupported)
                      + "; transformers loads it (trust_remote_code=True)")
    elif s.vllm_native:
        console.print("[green]vLLM-native[/]: every layer is one vLLM's DeciLMForCausalLM implements")
    else:
        console.print("[yellow]not vLLM-native[/]: " + "; ".join(s.vllm_unsupported))
        if s.vllm_serving == "transformers":
            console.print(f"[green]vLLM serves it through its Transformers backend[/]: LLM({s.path!r}, "
                          "model_impl='transformers', trust_remote_code=True, enforce_eager=True)")
        else:
            console.print("nor through vLLM's Transformers backend: " + "; ".join(s.vllm_transformers_unsupported)
                          + "; transformers loads it (trust_remote_code=True)")
