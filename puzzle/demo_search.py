"""`puzzle demo`: the embedded demo parent and a small `puzzle search` on it, end to end on a CPU.

The demo parent (puzzle/demo.py) is trained once and cached; the search uses `puzzle/configs/demo.yaml`
with the parent's own train/held-out split of the Python standard library as its data.
"""

from __future__ import annotations

from pathlib import Path

from puzzle.config import read_yaml, to_mapping
from puzzle.demo import DemoConfig, build_demo_parent, demo_data_config
from puzzle.pipeline import Search, run_search

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def demo_search_base(demo: DemoConfig) -> dict:
    """The demo's search config as data: the shipped YAML plus the demo parent's data split."""
    base = read_yaml(DEMO_CONFIG)
    base["data"] = to_mapping(demo_data_config(demo))
    return base


def run_demo(out: Path, workers: int = 1, demo: DemoConfig | None = None) -> Search:
    demo = demo or DemoConfig()
    parent = build_demo_parent(demo)
    return run_search(out, parent=parent.path, base=demo_search_base(demo), workers=workers)
