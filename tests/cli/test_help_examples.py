"""Every `puzzle ... --help` example runs as written, in order, in one small world: the user's HF models at
~/models/Llama-3.1-8B (and a mixture-of-experts one at ~/models/Mixtral-8x7B) and text at ~/data/fineweb, the demo's run at runs/demo, and search.yaml in the working
folder (a random Llama small enough for CPU but as wide as the demo's parent, so the examples' sizes apply).

The examples build on each other (search makes runs/llama8b, make-tasks makes ./my_tasks), so they run in the
order of EXAMPLE_ORDER (search.yaml's `slurm: {executor: local}` runs the `--launcher slurm` example's jobs as
local processes); `puzzle demo`'s example trains the real demo parent and runs the whole demo in a folder
of its own, so it is marked slow.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from factories import tiny_parent_with_tokenizer
from pipeline_fixtures import tiny_search_config, write_config

from puzzle.cli import app as cli
from puzzle.pipeline import run_search

ROOT = Path(__file__).parents[2]
# commands whose examples need what earlier ones made come later
THIRD_PARTY_NOISE = ("it/s]", "s/it]", "Loading weights", "Writing model shards", "Generating test split")
EXAMPLE_ORDER = ["convert", "search", "bld", "score", "profile", "solve", "realize", "status", "inspect", "fuse-ffn",
                 "prune", "distill", "eval", "demo"]


def help_examples() -> list[tuple[str, str]]:
    """(command, example line) for every line of a command's help that starts with `puzzle `."""
    found = []
    for command in cli.app.registered_commands:
        for line in (command.callback.__doc__ or "").splitlines():
            line = line.strip().removeprefix("Example:").strip()
            if line.startswith("puzzle "):
                found.append((command.name, line))
    assert {name for name, _ in found} == set(EXAMPLE_ORDER), "every command shows an example, and only these"
    return sorted(found, key=lambda e: (EXAMPLE_ORDER.index(e[0]), "--make-tasks" not in e[1]))


def _marks(command: str) -> list:
    return [pytest.mark.slow] if command == "demo" else []


EXAMPLES = [pytest.param(line, id=line.removeprefix("puzzle "), marks=_marks(name)) for name, line in help_examples()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    home, work = root / "home", root / "work"
    parent, corpus = tiny_parent_with_tokenizer(root / "inputs", layers=4, hidden_size=256, intermediate_size=768,
                                     max_position_embeddings=1024)
    _like_a_trained_llm(parent, quiet_attention=(1, 2, 3))
    shutil.copytree(parent, home / "models" / "Llama-3.1-8B")
    moe_parent, _ = tiny_parent_with_tokenizer(root / "inputs-moe", layers=2, intermediate_size=256, family="mixtral",
                                               experts=8)
    shutil.copytree(moe_parent, home / "models" / "Mixtral-8x7B")  # 8 experts of width 256, as the MoE demo's
    shutil.copytree(corpus, home / "data" / "fineweb")
    demo = yaml.safe_load((ROOT / "puzzle" / "configs" / "demo.yaml").read_text())
    config = tiny_search_config(
        home / "data" / "fineweb", space={"ffn": {"fractions": [1.0, 0.75, 0.5, 0.25], "multiple": 64}},
        # analytic: the examples that build on the search's children (fuse-ffn) must not hinge on CPU timing noise
        profile={"batch_size": 4, "context_len": 96, "prompt_len": 32, "repeats": 3, "inner": 2, "warmup": 1,
                 "generate_tokens": 8, "analytic": True},
        solve={"targets": demo["solve"]["targets"]}, report={"eval_tokens": 512, "batch_size": 4},
        slurm={"executor": "local", "cpus_per_task": 1})  # --launcher slurm runs the same jobs here as local processes
    work.mkdir()
    write_config(work / "search.yaml", config)
    run_search(work / "runs" / "demo", parent=home / "models" / "Llama-3.1-8B", config=work / "search.yaml")
    return home, work


def _like_a_trained_llm(parent: Path, quiet_attention: tuple[int, ...]) -> None:
    """Give the random parent two traits of the trained LLMs FFN Fusion studies: each layer adds little to the
    residual stream (so consecutive FFNs barely depend on each other), and some attention layers barely matter
    (so the search removes them and its children have attention-free FFN runs to fuse)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(parent / "model.safetensors")
    for name in weights:
        if name.endswith("mlp.down_proj.weight"):
            weights[name] *= 0.1
    for layer in quiet_attention:
        weights[f"model.layers.{layer}.self_attn.o_proj.weight"] *= 1e-3
    save_file(weights, parent / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("example", EXAMPLES)
def test_help_example_runs(example, world, monkeypatch, capsys):
    home, work = world
    monkeypatch.setenv("HOME", str(home))
    if example.startswith("puzzle demo"):  # the demo makes its own runs/demo: not over the world's stand-in
        work = work / "fresh"
        work.mkdir(exist_ok=True)
    monkeypatch.chdir(work)
    argv = [os.path.expanduser(arg) for arg in shlex.split(example)[1:]]  # as a shell would expand ~
    code = cli.run(argv)
    out = capsys.readouterr()
    assert code == 0, f"{example}\n{out.err[-3000:]}"
    noise = [line for line in (out.out + out.err).splitlines()
             if any(bar in line for bar in THIRD_PARTY_NOISE)]
    assert not noise, noise[:3]  # transformers' / lm-eval's / datasets' own bars are silenced in our commands
