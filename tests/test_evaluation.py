"""`puzzle eval`: lm-eval on tiny models with tiny local tasks, the shipped tasks, the task generator, bad input."""

import json
from pathlib import Path

import pytest
import yaml
from pipeline_fixtures import tiny_run_inputs

from puzzle.arch import AttentionConfig, FFNConfig
from puzzle.checkpoint import (
    build_model,
    convert,
    decilm_config,
    load_architecture,
    load_model,
    normalized_config,
    save_model,
)
from puzzle.cli import app as cli
from puzzle.cli.eval import eval_command
from puzzle.demo import DemoConfig
from puzzle.errors import InputError
from puzzle.eval_tasks import (
    MANIFEST,
    NEXT_LINE_TASK,
    PPL_TASK,
    SHIPPED_TASKS_DIR,
    WORD_ORDER_TASK,
    TaskGenConfig,
    make_tasks,
)
from puzzle.evaluation import (
    EvalConfig,
    EvalResult,
    evaluate,
    evaluate_many,
    load_results,
    load_tasks,
    resolve_tasks,
    shipped_tasks,
)

if not any(c.name == "eval" for c in cli.app.registered_commands):  # until puzzle/cli/app.py registers it
    cli.app.command("eval")(eval_command)

FAST = EvalConfig(batch_size=4, device="cpu", bootstrap_iters=0)


def tiny_task_folder(root: Path) -> Path:
    """Two tasks reading JSONL through paths relative to their YAML: 4 multiple-choice items, 2 documents."""
    (root / "data").mkdir(parents=True)
    items = [{"context": f"def f{i}(x):\n", "choices": [f"    return x + {i}\n", "import os\n", "class A:\n"], "label": 0}
             for i in range(4)]
    (root / "data" / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    docs = [{"text": "import json\n\nprint(json.dumps({'a': 1}))\n"}, {"text": "x = [i * i for i in range(10)]\n"}]
    (root / "data" / "ppl.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    shipped = SHIPPED_TASKS_DIR
    for name, source in (("tiny_mc", f"{NEXT_LINE_TASK}.yaml"), ("tiny_ppl", f"{PPL_TASK}.yaml")):
        config = yaml.safe_load((shipped / source).read_text())
        config["task"] = name
        config["dataset_kwargs"]["data_files"]["test"] = f"data/{name.removeprefix('tiny_')}.jsonl"
        (root / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(plain HF parent, its DeciLM conversion, a child with no-op sub-blocks, task folder)."""
    root = tmp_path_factory.mktemp("eval")
    parent, _ = tiny_run_inputs(root, layers=2)
    convert(parent, root / "decilm")
    model = load_model(parent)
    arch = load_architecture(parent).with_block(0, attention=AttentionConfig(no_op=True)).with_block(1, ffn=FFNConfig(no_op=True))
    child = build_model(decilm_config(normalized_config(parent), arch))
    missing, _ = child.load_state_dict(model.state_dict(), strict=False)  # the removed sub-blocks' weights are dropped
    assert not missing
    save_model(child, root / "child", source=parent)
    return parent, root / "decilm", root / "child", tiny_task_folder(root / "tasks")


def test_evaluate_many_gives_the_same_scores_to_a_parent_and_its_decilm_conversion(tiny, tmp_path, monkeypatch):
    parent, decilm, child, tasks = tiny
    monkeypatch.chdir(tmp_path)  # data paths are relative to the YAML, not to the working directory
    results = evaluate_many({"parent": parent, "decilm": decilm, "child": child}, tasks, FAST)
    a, b = results["parent"].tasks, results["decilm"].tasks
    assert set(a) == {"tiny_mc", "tiny_ppl"} and a["tiny_mc"].samples == 4 and a["tiny_ppl"].samples == 2
    for task in a:
        for metric, value in a[task].metrics.items():
            assert b[task].metrics[metric] == pytest.approx(value, rel=1e-4), (task, metric)
    assert 0 <= a["tiny_mc"].metrics["acc"] <= 1 and a["tiny_ppl"].metrics["byte_perplexity"] > 1
    assert results["child"].tasks["tiny_ppl"].metrics["byte_perplexity"] != a["tiny_ppl"].metrics["byte_perplexity"]
    assert load_results(decilm).tasks["tiny_mc"].metrics == b["tiny_mc"].metrics


def test_eval_cli_prints_a_table_and_writes_results(tiny, capsys):
    parent, _, _, tasks = tiny
    out = parent.parent / "cli-results.json"
    code = cli.run(["eval", str(parent), "--tasks", f"{tasks / 'tiny_mc.yaml'},{tasks / 'tiny_ppl.yaml'}", "--limit",
                    "2", "--device", "cpu", "--batch-size", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = capsys.readouterr().out.splitlines()
    assert any("tiny_mc" in r for r in rows)
    assert [r.split("│")[2].strip() for r in rows if "◀" in r and "│" in r] == ["acc ↑ ◀", "bits_per_byte ↓ ◀"]
    saved = EvalResult.from_dict(json.loads(out.read_text()))
    assert saved.tasks["tiny_mc"].samples == 2 and saved.config.limit == 2


def test_results_of_the_same_weights_accumulate_across_runs(tiny, tmp_path):
    parent, _, _, tasks = tiny
    out = tmp_path / "results.json"
    evaluate(parent, tasks / "tiny_mc.yaml", FAST, out=out)
    evaluate(parent, tasks / "tiny_ppl.yaml", FAST, out=out)
    saved = EvalResult.from_dict(json.loads(out.read_text()))
    assert set(saved.tasks) == {"tiny_mc", "tiny_ppl"}
    assert saved.score("tiny_mc") == saved.tasks["tiny_mc"].metrics["acc"]


def test_shipped_tasks_parse_and_their_data_files_exist():
    manifest = json.loads((SHIPPED_TASKS_DIR / MANIFEST).read_text())
    assert set(shipped_tasks()) == {NEXT_LINE_TASK, PPL_TASK, WORD_ORDER_TASK} == set(manifest["tasks"])
    taskset = load_tasks(f"{NEXT_LINE_TASK},{PPL_TASK},{WORD_ORDER_TASK}")
    for spec in taskset.specs:
        assert Path(spec.config["dataset_kwargs"]["data_files"]["test"]).is_file()
        assert len(taskset.loaded["tasks"][spec.name].eval_docs) == manifest["tasks"][spec.name]
    doc = taskset.loaded["tasks"][NEXT_LINE_TASK].eval_docs[0]
    assert len(doc["choices"]) == 4 and doc["context"].endswith("\n")


def fake_stdlib(root: Path) -> Path:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("json/decoder.py", "json/encoder.py", "email/utils.py", "textwrap.py", "shlex.py", "glob.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text((stdlib / name).read_text())
    return root


def test_make_tasks_is_deterministic_and_its_answers_are_the_true_next_lines(tmp_path):
    stdlib = fake_stdlib(tmp_path / "stdlib")
    cfg = TaskGenConfig(next_line_items=30, ppl_documents=5, word_order_items=20,
                        demo=DemoConfig(stdlib_dir=str(stdlib), held_out_fraction=0.5))
    first, second = make_tasks(tmp_path / "a", cfg), make_tasks(tmp_path / "b", cfg)
    assert first.files == second.files and first.tasks == {NEXT_LINE_TASK: 30, PPL_TASK: 5, WORD_ORDER_TASK: 20}
    items = [json.loads(line) for line in (tmp_path / "a" / "data" / f"{NEXT_LINE_TASK}.jsonl").read_text().splitlines()]
    for item in items:
        assert item["source"].split(":")[0] in first.held_out_files
        file, line = item["source"].rsplit(":", 1)
        source = [s.rstrip() + "\n" for s in (stdlib / file).read_text().splitlines()]
        assert item["choices"][item["label"]] == source[int(line) - 1]
        assert source[int(line) - 1 - item["context"].count("\n"): int(line) - 1] == item["context"].splitlines(keepends=True)
        assert len(set(item["choices"])) == 4
    for item in (json.loads(line) for line in (tmp_path / "a" / "data" / f"{WORD_ORDER_TASK}.jsonl").read_text().splitlines()):
        true = item["choices"][item["label"]]
        assert len(set(item["choices"])) == 4 and all(sorted(c.split()) == sorted(true.split()) for c in item["choices"])
    assert {spec.name for spec in resolve_tasks(tmp_path / "a")} == {NEXT_LINE_TASK, PPL_TASK, WORD_ORDER_TASK}


def test_an_unknown_task_name_lists_the_shipped_tasks():
    with pytest.raises(InputError, match=f"unknown task 'hellaswag'.*{NEXT_LINE_TASK}"):
        resolve_tasks("hellaswag")


def test_a_missing_data_file_is_named(tiny, tmp_path):
    folder = tiny_task_folder(tmp_path / "tasks")
    (folder / "data" / "ppl.jsonl").unlink()
    with pytest.raises(InputError, match=r"tiny_ppl.yaml: dataset_kwargs.data_files: data file .*data/ppl.jsonl not found"):
        resolve_tasks(folder)


@pytest.mark.parametrize("case", ["unknown", "missing_path", "missing_model", "no_tasks", "empty_folder"])
def test_bad_input_is_one_line_and_nonzero(case, tiny, tmp_path, capsys):
    parent, _, _, tasks = tiny
    (tmp_path / "empty").mkdir()
    args = {
        "unknown": [parent, "--tasks", "nope"],
        "missing_path": [parent, "--tasks", tmp_path / "absent/"],
        "missing_model": [tmp_path / "no-model", "--tasks", tasks],
        "no_tasks": [parent],
        "empty_folder": [parent, "--tasks", tmp_path / "empty"],
    }[case]
    code = cli.run(["eval", *map(str, args)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[0].startswith("error: ")


def test_eval_config_rejects_bad_values():
    from puzzle.errors import ConfigError

    for bad in ({"limit": 0}, {"limit": 1.5}, {"batch_size": 0}, {"dtype": "int8"}, {"device": "tpu"}):
        with pytest.raises(ConfigError):
            EvalConfig(**bad)


def test_a_user_task_with_an_include_reads_data_relative_to_its_own_yaml(tmp_path, monkeypatch):
    folder = tiny_task_folder(tmp_path / "tasks")
    base = yaml.safe_load((folder / "tiny_mc.yaml").read_text())
    del base["task"]
    (folder / "_mc_template").write_text(yaml.safe_dump(base))  # no .yaml suffix: not indexed as a task itself
    (folder / "sub").mkdir()
    (folder / "sub" / "data").mkdir()
    (folder / "sub" / "data" / "mc.jsonl").write_text((folder / "data" / "mc.jsonl").read_text())
    (folder / "sub" / "mine.yaml").write_text("include: ../_mc_template\ntask: mine\n")
    monkeypatch.chdir(tmp_path)
    spec = next(s for s in resolve_tasks("tasks/sub/mine.yaml") if s.name == "mine")
    assert spec.config["output_type"] == "multiple_choice"
    assert spec.config["dataset_kwargs"]["data_files"]["test"] == str((folder / "sub" / "data" / "mc.jsonl").resolve())
