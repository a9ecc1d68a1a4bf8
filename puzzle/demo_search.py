"""`puzzle demo`: the embedded demo parent and a small `puzzle search` on it, end to end on a CPU.

The demo parent (puzzle/demo.py) is trained once and cached; the search uses `puzzle/configs/demo.yaml`
with the parent's own train/held-out split of the Python standard library as its data.
"""

from __future__ import annotations

from pathlib import Path

from puzzle.config import read_yaml, to_mapping
from puzzle.demo import DemoConfig, build_demo_parent, demo_data_config, demo_dir, moe_demo_config
from puzzle.pipeline import Search, run_search

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
MOE_DEMO_CONFIG = Path(__file__).parent / "configs" / "demo_moe.yaml"


def demo_search_base(demo: DemoConfig, config: Path = DEMO_CONFIG) -> dict:
    """The demo's search config as data: the shipped YAML plus the demo parent's data split."""
    base = read_yaml(config)
    base["data"] = to_mapping(demo_data_config(demo))
    return base


def run_demo(out: Path, workers: int = 1, demo: DemoConfig | None = None) -> Search:
    demo = demo or DemoConfig()
    parent = build_demo_parent(demo)
    return run_search(out, parent=parent.path, base=demo_search_base(demo), workers=workers)


def moe_demo_parent(force: bool = False):
    """The MoE demo parent (a small Mixtral), cached next to the dense one."""
    return build_demo_parent(moe_demo_config(), force=force, out=demo_dir() / "parent-moe")


def run_moe_demo(out: Path, workers: int = 1) -> Search:
    """`puzzle demo --moe`: the MoE parent searched with expert pruning, fewer experts per token and windows."""
    parent = moe_demo_parent()
    return run_search(out, parent=parent.path, base=demo_search_base(parent.config, MOE_DEMO_CONFIG), workers=workers)
