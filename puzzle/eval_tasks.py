"""The shipped lm-eval tasks of the demo, generated from held-out Python standard library files.

The demo parent (puzzle/demo.py) is trained on the standard library's own source files; `puzzle.data`
holds a fixed set of files out by a hash of their path. These tasks are cut from those held-out files only, so
the parent never trained on them:

- `puzzle_stdlib_next_line` (multiple choice, acc / acc_norm): given up to 12 lines of code, pick the true
  next line among itself and 3 other lines of the same file, of about its length and re-indented like it, so
  that neither length nor indentation alone gives the answer away. Chance is 25 %.
- `puzzle_stdlib_ppl` (loglikelihood_rolling: word / byte perplexity, bits per byte): short chunks of the
  held-out files, cut at line boundaries.
- `puzzle_stdlib_word_order` (multiple choice): pick the true next line among 3 copies of it with its words
  shuffled. Same tokens, wrong order: it measures the local syntax a small model learns first. The demo
  parent (trained a few CPU-minutes) is at chance on `next_line` but far above it here, so this is the task
  that separates the demo parent from its children. Chance is 25 %.

    make_tasks(Path("my_tasks"))     # = `puzzle eval --make-tasks my_tasks`; writes YAMLs, data/*.jsonl, manifest

Everything is deterministic given `TaskGenConfig` (seed 0 by default) and the interpreter's standard library:
files are read in path order and every random choice comes from one `random.Random(seed)`, and items are taken
from the files in turn, so `--limit N` still samples every file. The files shipped in `puzzle/tasks/` were made
from CPython 3.11.7's library (its `manifest.json` lists the files); another Python version gives other text
from the same held-out paths.
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from puzzle.config import check_int
from puzzle.corpus import iter_documents
from puzzle.demo import DemoConfig, demo_data_config
from puzzle.errors import ConfigError, InputError
from puzzle.files import write_json_atomic, write_text_atomic

SHIPPED_TASKS_DIR = Path(__file__).parent / "tasks"
NEXT_LINE_TASK = "puzzle_stdlib_next_line"
PPL_TASK = "puzzle_stdlib_ppl"
WORD_ORDER_TASK = "puzzle_stdlib_word_order"
MANIFEST = "manifest.json"
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class TaskGenConfig:
    """Every choice behind the generated tasks; the defaults made the shipped files."""

    seed: int = 0  # one random.Random(seed) picks items, distractors, choice order and documents
    # Multiple choice.
    next_line_items: int = 400
    choices: int = 4  # the true line + 3 distractors: chance is 1/4
    context_lines: int = 12
    # ~170 tokens of the demo tokenizer, so context + answer stay inside the parent's 256-token training windows.
    context_chars: int = 600
    # Distractors take the true line's indentation, so the answer needs the code, not just the block depth.
    reindent: bool = True
    distractor_pool: int = 4  # distractors are drawn from the pool * (choices - 1) lines closest in length
    # Shorter lines (`else:`, `return x`) are guessable from syntax alone or appear many times in a file.
    min_line_chars: int = 12
    max_line_chars: int = 80
    # Word order.
    word_order_items: int = 400
    min_words: int = 3  # fewer words have too few distinct shuffles
    # Perplexity.
    ppl_documents: int = 24
    ppl_chars: int = 800  # ~230 tokens: one window of the demo parent's training length
    # Codec tables (hundreds of near-identical `'\x00'  #  0x00 -> NULL` lines) and the build's own config
    # script (this machine's install paths): nothing to understand, nothing that should ship.
    exclude_prefixes: tuple[str, ...] = ("encodings/", "config-")
    demo: DemoConfig = DemoConfig()  # which files are held out (stdlib_dir, exclude, held_out_fraction, split_seed)

    def __post_init__(self) -> None:
        for name in ("next_line_items", "context_lines", "context_chars", "distractor_pool", "min_line_chars",
                     "ppl_documents", "ppl_chars", "word_order_items", "min_words"):
            check_int(f"TaskGenConfig.{name}", getattr(self, name))
        check_int("TaskGenConfig.choices", self.choices, minimum=2)
        if self.max_line_chars < self.min_line_chars:
            raise ConfigError("TaskGenConfig.max_line_chars must be >= min_line_chars")


@dataclass(frozen=True, kw_only=True)
class TaskManifest:
    """What `make_tasks` wrote, saved as `manifest.json` next to the task YAMLs (provenance, not read by lm-eval)."""

    tasks: dict[str, int]  # task name -> number of documents
    files: dict[str, str]  # relative path -> sha256 of the content
    held_out_files: list[str]  # identities of the standard library files the tasks come from
    python: str
    config: dict[str, Any]
    version: int = 1


# ----------------------------------------------------------------------------------------------------------
# Items


def _answerable(line: str, cfg: TaskGenConfig) -> bool:
    text = line.strip()
    return cfg.min_line_chars <= len(text) <= cfg.max_line_chars and not text.startswith("#")


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _context(lines: list[str], i: int, cfg: TaskGenConfig) -> str | None:
    """Up to `context_lines` lines before line i, dropping the oldest until under `context_chars`."""
    window = lines[max(0, i - cfg.context_lines): i]
    while window and sum(len(w) + 1 for w in window) > cfg.context_chars:
        window = window[1:]
    if len(window) < 2 or not any(w.strip() for w in window):
        return None
    return "\n".join(window) + "\n"


def next_line_items(identity: str, text: str, rng: random.Random, cfg: TaskGenConfig) -> list[dict[str, Any]]:
    """Every multiple-choice item of one file, in random order: context, choices, label, source."""
    lines = [line.rstrip() for line in text.splitlines()]
    as_written: dict[str, str] = {}  # stripped text -> its first line as written, for distractors not re-indented
    for line in lines:
        if _answerable(line, cfg):
            as_written.setdefault(line.strip(), line)
    items = []
    for i, line in enumerate(lines):
        if not _answerable(line, cfg) or (context := _context(lines, i, cfg)) is None:
            continue
        others = [text for text in as_written if text != line.strip()]
        if len(others) < cfg.choices - 1:
            continue
        # Distractors of about the true line's length: otherwise the shortest line wins on total log-likelihood.
        others.sort(key=lambda t: abs(len(t) - len(line.strip())))
        picked = rng.sample(others[: cfg.distractor_pool * (cfg.choices - 1)], cfg.choices - 1)
        choices = [line] + [_indent(line) + t if cfg.reindent else as_written[t] for t in picked]
        order = list(range(cfg.choices))
        rng.shuffle(order)
        items.append({
            "context": context,
            "choices": [choices[k] + "\n" for k in order],
            "label": order.index(0),
            "source": f"{identity}:{i + 1}",
        })
    rng.shuffle(items)
    return items


def word_order_items(identity: str, text: str, rng: random.Random, cfg: TaskGenConfig) -> list[dict[str, Any]]:
    """Items whose distractors are the true next line with its words shuffled (single-spaced like the answer)."""
    lines = [line.rstrip() for line in text.splitlines()]
    items = []
    for i, line in enumerate(lines):
        words = line.split()
        if len(words) < cfg.min_words or not _answerable(line, cfg) or (context := _context(lines, i, cfg)) is None:
            continue
        true = _indent(line) + " ".join(words)
        shuffles: list[str] = []
        for _ in range(20 * cfg.choices):
            order = words[:]
            rng.shuffle(order)
            candidate = _indent(line) + " ".join(order)
            if candidate != true and candidate not in shuffles:
                shuffles.append(candidate)
            if len(shuffles) == cfg.choices - 1:
                break
        if len(shuffles) < cfg.choices - 1:
            continue
        choices = [true, *shuffles]
        order = list(range(cfg.choices))
        rng.shuffle(order)
        items.append({"context": context, "choices": [choices[k] + "\n" for k in order], "label": order.index(0),
                      "source": f"{identity}:{i + 1}"})
    rng.shuffle(items)
    return items


def ppl_documents(identity: str, text: str, rng: random.Random, cfg: TaskGenConfig) -> list[dict[str, Any]]:
    """The file cut into chunks of at most `ppl_chars` at line boundaries (shorter than half dropped), shuffled."""
    chunks, current, start = [], [], 0
    for i, line in enumerate(line.rstrip() for line in text.splitlines()):
        if current and sum(len(c) + 1 for c in current) + len(line) + 1 > cfg.ppl_chars:
            chunks.append((start, current))
            current = []
        if not current:
            start = i
        current.append(line[: cfg.ppl_chars - 1])
    if current:
        chunks.append((start, current))
    documents = [
        {"text": "\n".join(chunk) + "\n", "source": f"{identity}:{start + 1}"}
        for start, chunk in chunks
        if sum(len(c) + 1 for c in chunk) >= cfg.ppl_chars // 2 and any(c.strip() for c in chunk)
    ]
    rng.shuffle(documents)
    return documents


def _round_robin(groups: list[list[T]], n: int) -> list[T]:
    """Take one item from each group in turn until n are taken: every file contributes, none dominates."""
    taken: list[T] = []
    depth = 0
    while len(taken) < n and any(depth < len(g) for g in groups):
        taken.extend(g[depth] for g in groups if depth < len(g))
        depth += 1
    return taken[:n]


# ----------------------------------------------------------------------------------------------------------
# Files


def _jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)


_NEXT_LINE_YAML = """\
# puzzle eval CKPT --tasks {task}
# Generated by `puzzle eval --make-tasks` (puzzle/eval_tasks.py): pick the true next line of held-out Python
# standard library code among {choices} lines of the same file. Chance: {chance:.0%}.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/{task}.jsonl  # relative to this file: puzzle eval resolves it
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""  # the context ends with a newline; the choices carry their own indentation
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_WORD_ORDER_YAML = _NEXT_LINE_YAML.replace(
    "pick the true next line of held-out Python\n# standard library code among {choices} lines of the same file.",
    "pick the true next line of held-out Python\n# standard library code among itself and {distractors} copies with its words shuffled.",
)

_PPL_YAML = """\
# puzzle eval CKPT --tasks {task}
# Generated by `puzzle eval --make-tasks` (puzzle/eval_tasks.py): perplexity of held-out Python standard library
# code, chunks of at most {chars} characters.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/{task}.jsonl  # relative to this file: puzzle eval resolves it
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""


def held_out_sources(cfg: TaskGenConfig) -> list[tuple[str, str]]:
    """(identity, text) of the demo's held-out standard library files the tasks may use, in path order."""
    sources = [
        (doc.identity, doc.text)
        for doc in iter_documents(demo_data_config(cfg.demo))
        if doc.split == "held_out" and not doc.identity.startswith(cfg.exclude_prefixes)
    ]
    if not sources:
        raise InputError(
            f"no held-out standard library file left after excluding {', '.join(cfg.exclude_prefixes)}; "
            "raise demo.held_out_fraction or point demo.stdlib_dir at a fuller library"
        )
    return sources


def make_tasks(out: Path, cfg: TaskGenConfig = TaskGenConfig()) -> TaskManifest:
    """Write the demo tasks (two YAMLs, data/*.jsonl, manifest.json) into `out`, each file atomically."""
    out = Path(out)
    sources = held_out_sources(cfg)
    rng = random.Random(cfg.seed)
    mc = _round_robin([next_line_items(i, t, rng, cfg) for i, t in sources], cfg.next_line_items)
    ppl = _round_robin([ppl_documents(i, t, rng, cfg) for i, t in sources], cfg.ppl_documents)
    order = _round_robin([word_order_items(i, t, rng, cfg) for i, t in sources], cfg.word_order_items)  # drawn last:
    # the other tasks' files stay byte-identical to those made before this task existed
    files = {
        f"{NEXT_LINE_TASK}.yaml": _NEXT_LINE_YAML.format(task=NEXT_LINE_TASK, choices=cfg.choices,
                                                         chance=1 / cfg.choices),
        f"{PPL_TASK}.yaml": _PPL_YAML.format(task=PPL_TASK, chars=cfg.ppl_chars),
        f"data/{NEXT_LINE_TASK}.jsonl": _jsonl(mc),
        f"data/{PPL_TASK}.jsonl": _jsonl(ppl),
        f"{WORD_ORDER_TASK}.yaml": _WORD_ORDER_YAML.format(task=WORD_ORDER_TASK, choices=cfg.choices,
                                                           distractors=cfg.choices - 1, chance=1 / cfg.choices),
        f"data/{WORD_ORDER_TASK}.jsonl": _jsonl(order),
    }
    try:
        (out / "data").mkdir(parents=True, exist_ok=True)
        for rel, text in files.items():
            write_text_atomic(out / rel, text)
    except OSError as err:
        raise InputError(f"{out}: cannot write the tasks there ({err.strerror}); choose another folder") from None
    manifest = TaskManifest(
        tasks={NEXT_LINE_TASK: len(mc), PPL_TASK: len(ppl), WORD_ORDER_TASK: len(order)},
        files={rel: hashlib.sha256(text.encode()).hexdigest() for rel, text in files.items()},
        held_out_files=[identity for identity, _ in sources],
        python=f"{platform.python_implementation()} {platform.python_version()}",
        config=_config_dict(cfg),
    )
    write_json_atomic(out / MANIFEST, asdict(manifest))
    return manifest


def _config_dict(cfg: TaskGenConfig) -> dict[str, Any]:
    data = asdict(cfg)
    data["demo"] = {k: data["demo"][k] for k in ("stdlib_dir", "exclude", "held_out_fraction", "split_seed")}
    return json.loads(json.dumps(data))  # tuples -> lists
