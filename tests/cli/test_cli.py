"""The `puzzle` command line: convert / inspect end to end, and one-line errors with a non-zero exit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from factories import hf_parent

from puzzle.cli import app as cli

ROOT = Path(__file__).parents[2]


def puzzle(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "PUZZLE_DEBUG": ""}
    return subprocess.run([sys.executable, "-m", "puzzle", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_convert_then_inspect(tmp_path):
    hf_parent("llama", tmp_path / "parent")
    run = puzzle("convert", tmp_path / "parent", tmp_path / "child")
    assert run.returncode == 0, run.stderr
    info = json.loads((tmp_path / "child" / "puzzle.json").read_text())
    assert info["command"].startswith("puzzle convert")
    run = puzzle("inspect", tmp_path / "child")
    assert run.returncode == 0, run.stderr
    assert "vLLM-native" in run.stdout and "nemotron-nas" in run.stdout
    run = puzzle("inspect", tmp_path / "child", "--json", "--kv-dtype", "fp8")
    summary = json.loads(run.stdout)
    assert summary["vllm_native"] and len(summary["layers"]) == 3
    assert summary["kv_bytes_per_token"] == 3 * 2 * 2 * 32  # layers x (K,V) x KV heads x head_dim, 1 byte


def test_inspect_reads_a_plain_parent_and_flags_non_native_layers(tmp_path):
    hf_parent("qwen3", tmp_path / "parent")
    run = puzzle("inspect", tmp_path / "parent")
    assert run.returncode == 0, run.stderr
    assert "not vLLM-native" in run.stdout and "q/k RMSNorm" in run.stdout


def test_a_user_error_in_a_real_process_is_one_line_without_traceback(tmp_path):
    run = puzzle("convert", tmp_path / "missing", tmp_path / "out")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[0].startswith("error: ")


@pytest.mark.parametrize("case", ["missing", "no_weights", "corrupt", "unknown_type", "exists"])
def test_bad_input_is_one_line_and_nonzero(case, tmp_path, capsys):
    src, out = tmp_path / "parent", tmp_path / "out"
    if case != "missing":
        hf_parent("llama", src)
    if case == "no_weights":
        (src / "model.safetensors").unlink()
    elif case == "corrupt":
        (src / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    elif case == "unknown_type":
        (src / "config.json").write_text('{"model_type": "bert"}')
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    assert cli.run(["convert", str(src), str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("error: ")
    assert len(lines) == 1 and "PUZZLE_DEBUG=1 shows the traceback" in lines[0]  # one line, as the README says
    if case == "exists":
        assert "--overwrite" in lines[0] and (out / "keep.txt").read_text() == "precious"
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written folders


def test_help_lists_only_working_commands(capsys):
    assert cli.run(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("convert", "inspect", "demo"):
        assert command in out


@pytest.mark.parametrize("argv,message", [
    (["convert"], "Missing argument"),
    (["prune", "a", "b", "--drop-layers", "-1"], "'--drop-layers'"),
    (["bld", "run", "--workers", "0"], "'--workers'"),
    (["eval", "model"], "give a model folder and --tasks"),
    (["no-such-command"], "No such command"),
])
def test_a_usage_error_is_one_line_naming_the_help_to_read(argv, message, capsys):
    assert cli.run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0] and "--help" in err[0], err


def test_version_and_flags_without_type_placeholders(capsys):
    import puzzle

    assert cli.run(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"puzzle {puzzle.__version__}"
    assert cli.run(["solve", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--realize" in help_text and help_text.count("<bool>") == 1  # typer's own --help keeps its placeholder


def test_prune_does_not_run_a_folders_tokenizer_code_unless_asked(tmp_path):
    from factories import add_custom_tokenizer_code, tiny_parent_with_tokenizer

    parent, corpus = tiny_parent_with_tokenizer(tmp_path / "inputs", layers=2)
    marker = tmp_path / "code-ran"
    add_custom_tokenizer_code(parent, marker)
    run = puzzle("prune", parent, tmp_path / "pruned", "--data", corpus, "--drop-layers", "1")
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode != 0 and len(errors) == 1 and "--trust-remote-code" in errors[0], run.stderr
    assert "Traceback" not in run.stderr and not marker.exists()
    run = puzzle("prune", parent, tmp_path / "pruned", "--data", corpus, "--drop-layers", "1", "--trust-remote-code",
                 "--eval-tokens", "0", "--calibration-tokens", "512")
    assert run.returncode == 0, run.stderr
    assert marker.exists()


def test_eval_runs_puzzles_own_modeling_code_but_not_other_code_in_a_folder(tmp_path):
    from puzzle import checkpoint
    from puzzle.errors import InputError

    hf_parent("llama", tmp_path / "hf")
    checkpoint.convert(tmp_path / "hf", tmp_path / "ours")
    assert checkpoint.remote_code_allowed(tmp_path / "ours") is True  # this puzzle's own modeling files
    assert checkpoint.remote_code_allowed(tmp_path / "hf") is False  # no code of its own needed
    modeling = tmp_path / "ours" / "modeling_decilm.py"
    modeling.write_text(modeling.read_text() + "\nimport os  # edited\n")
    with pytest.raises(InputError, match="--trust-remote-code"):
        checkpoint.remote_code_allowed(tmp_path / "ours")
    assert checkpoint.remote_code_allowed(tmp_path / "ours", trust_remote_code=True) is True
    run = puzzle("eval", tmp_path / "ours", "--tasks", "puzzle_stdlib_ppl", "--limit", "2", "--no-write")
    assert run.returncode != 0 and "--trust-remote-code" in run.stderr and "Traceback" not in run.stderr


def test_an_output_location_that_cannot_be_created_is_one_line(tmp_path):
    hf_parent("llama", tmp_path / "parent")
    run = puzzle("convert", tmp_path / "parent", "/proc/puzzle-child/out")
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert len(errors) == 1 and "/proc/puzzle-child: cannot create this folder" in errors[0], run.stderr


def test_search_with_a_missing_parent_leaves_no_run_folder(tmp_path, capsys):
    assert cli.run(["search", str(tmp_path / "no-such-parent"), "--out", str(tmp_path / "run"),
                    "--data", str(tmp_path)]) == 2
    assert "no-such-parent: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_search_checks_its_inputs_before_writing_anything(tmp_path, capsys):
    """No tokenizer, a tokenizer larger than the model's vocabulary, no data, a missing data path: each is one
    line naming the fix, and no run folder is left behind."""
    import shutil

    from factories import tiny_parent_with_tokenizer, tiny_tokenizer

    parent, corpus = tiny_parent_with_tokenizer(tmp_path / "inputs", layers=1)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(parent / f, bare / f)
    big = tmp_path / "big"
    shutil.copytree(parent, big)
    tiny_tokenizer(corpus, vocab_size=2 * len(tiny_tokenizer(corpus))).save_pretrained(big)
    cases = [([str(bare), "--data", str(corpus)], "no usable tokenizer"),
             ([str(big), "--data", str(corpus)], "vocab_size"),
             ([str(parent)], "no data: give --data PATH"),
             ([str(parent), "--data", str(tmp_path / "nowhere")], "nowhere does not exist; fix --data")]
    for args, message in cases:
        capsys.readouterr()
        assert cli.run(["search", *args, "--out", str(tmp_path / "run")]) == 2, args
        err = capsys.readouterr().err
        assert message in " ".join(err.split()) and "Traceback" not in err, (args, err)
        assert not (tmp_path / "run").exists(), args


def test_eval_refuses_a_tokenizer_larger_than_the_models_vocabulary(tmp_path, capsys):
    import shutil

    from factories import tiny_parent_with_tokenizer, tiny_tokenizer

    parent, corpus = tiny_parent_with_tokenizer(tmp_path / "inputs", layers=1)
    big = tmp_path / "big"
    shutil.copytree(parent, big)
    tiny_tokenizer(corpus, vocab_size=2 * len(tiny_tokenizer(corpus))).save_pretrained(big)
    assert cli.run(["eval", str(big), "--tasks", "puzzle_stdlib_ppl", "--limit", "2", "--no-write"]) == 2
    assert "vocab_size" in capsys.readouterr().err


def test_a_model_folder_given_as_a_run_directory_gets_a_correct_hint(tmp_path, capsys):
    hf_parent("llama", tmp_path / "model")
    assert cli.run(["solve", str(tmp_path / "model"), "--target-throughput", "2x"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "is a model folder, not a puzzle run directory" in err and f"--out {tmp_path / 'model'}" not in err


def test_commands_show_no_third_party_progress_bars(tmp_path):
    from factories import tiny_parent_with_tokenizer

    parent, corpus = tiny_parent_with_tokenizer(tmp_path / "inputs", layers=2)
    run = puzzle("prune", parent, tmp_path / "pruned", "--data", corpus, "--drop-layers", "1", "--eval-tokens", "0",
                 "--calibration-tokens", "512")
    assert run.returncode == 0, run.stderr
    for noise in ("Loading weights", "Writing model shards", "it/s]", "Warning"):
        assert noise not in run.stderr + run.stdout, noise


def test_eval_help_names_every_shipped_task(capsys):
    from puzzle.cli.eval import SHIPPED

    shipped = {p.stem for p in (ROOT / "puzzle" / "tasks").glob("*.yaml")}
    assert set(SHIPPED) == shipped
    assert cli.run(["eval", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in shipped)


def test_help_examples_name_children_the_demo_makes():
    """Examples that point into runs/demo must name children the demo's search writes (one per target)."""
    import re

    import yaml

    demo = yaml.safe_load((ROOT / "puzzle" / "configs" / "demo.yaml").read_text())
    names = {t["name"] for t in demo["solve"]["targets"]}
    for path in list((ROOT / "puzzle").rglob("*.py")) + [ROOT / "README.md"]:
        for child in re.findall(r"runs/demo/children/([A-Za-z0-9._-]+)", path.read_text()):
            assert child.removesuffix("-fused").removesuffix("-kd") in names, (path, child)


def test_hints_that_used_to_mislead(tmp_path, capsys):
    """inspect on a plain HF folder does not claim vLLM's DeciLM model; a stage run by name without its config
    section says so instead of printing a check mark."""
    hf_parent("llama", tmp_path / "plain")
    assert cli.run(["inspect", str(tmp_path / "plain")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "a plain llama folder" in out and "DeciLMForCausalLM implements" not in out


def test_every_command_that_takes_data_takes_exclude(tmp_path, capsys):
    from factories import tiny_parent_with_tokenizer

    parent, corpus = tiny_parent_with_tokenizer(tmp_path / "inputs", layers=2)
    commands = {
        "prune": ["prune", str(parent), str(tmp_path / "p"), "--drop-layers", "1"],
        "distill": ["distill", str(parent), "--teacher", str(parent), "--out", str(tmp_path / "d")],
        "search": ["search", str(parent), "--out", str(tmp_path / "run")],
    }
    for name, argv in commands.items():
        capsys.readouterr()
        code = cli.run([*argv, "--data", str(corpus), "--exclude", "*.txt"])
        err = " ".join(capsys.readouterr().err.split())
        assert code == 2 and "outside the excluded *.txt" in err, (name, err)  # every file excluded: said so
    assert cli.run(["fuse-ffn", "--help"]) == 0 and "--exclude" in capsys.readouterr().out


def test_slurm_flags_set_the_jobs_resources(tmp_path, monkeypatch, capsys):
    from factories import tiny_parent_with_tokenizer

    parent, corpus = tiny_parent_with_tokenizer(tmp_path / "inputs", layers=2)
    monkeypatch.setenv("PATH", "/nonexistent")  # --dry-run submits nothing and needs no sbatch
    code = cli.run(["search", str(parent), "--out", str(tmp_path / "run"), "--data", str(corpus), "--workers", "2",
                    "--launcher", "slurm", "--dry-run", "--partition", "p1", "--account", "acct", "--time", "01:00:00",
                    "--gpus-per-task", "2", "--cpus-per-task", "4", "--mem", "64G", "--nodes", "2",
                    "--distill-tasks-per-node", "4"])
    assert code == 0, capsys.readouterr().err
    assert "submit.sh" in capsys.readouterr().out
    script = (tmp_path / "run" / "slurm-scripts" / "2-bld.sbatch").read_text()
    for line in ("--partition=p1", "--account=acct", "--time=60", "--gpus-per-node=2", "--cpus-per-task=4", "--mem=64G"):
        assert f"#SBATCH {line}" in script, line
    saved = (tmp_path / "run" / "config.yaml").read_text()  # the flags are the run's config from now on
    assert "slurm:" in saved and "nodes: 2" in saved and "distill_tasks_per_node: 4" in saved, saved
