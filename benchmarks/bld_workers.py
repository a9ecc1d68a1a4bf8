"""Issue 4: does BLD of the demo library finish sooner with 2 local workers than with 1?

    python benchmarks/bld_workers.py            # the demo parent and its library (CPU, a few minutes)

Builds the demo library once, copies it into two run directories and runs `bld` there with 1 worker
(all CPU threads) and with 2 workers (half the threads each), timing the wall clock of each. Both runs
must train every unit exactly once; their unit files are compared too. Writes
benchmarks/results/bld_workers.{json,md}. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from benchmarks.common import write_results  # noqa: E402
from puzzle.demo import DemoConfig  # noqa: E402
from puzzle.demo_search import demo_search_base, run_search  # noqa: E402
from puzzle.demo import build_demo_parent  # noqa: E402
from puzzle.distill.bld import read_unit_result, unit_path  # noqa: E402
from puzzle.pipeline import run_bld  # noqa: E402


def main() -> None:
    demo = DemoConfig()
    parent = build_demo_parent(demo)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        search = run_search(base, parent=parent.path, base=demo_search_base(demo), stage="library")
        units = search.manifest().units
        results = {"units": len(units), "cpu_count": os.cpu_count(), "runs": {}}
        for workers in (1, 2):
            run = Path(tmp) / f"w{workers}"
            shutil.copytree(base, run)
            start = time.perf_counter()
            run_bld(run, workers=workers)
            seconds = time.perf_counter() - start
            owners = {read_unit_result(unit_path(search.paths.__class__(run), u)).worker for u in units}
            results["runs"][workers] = {"seconds": seconds, "workers_seen": sorted(owners)}
            print(f"{workers} worker(s): {seconds:.1f} s", flush=True)
    one, two = results["runs"][1]["seconds"], results["runs"][2]["seconds"]
    results["speedup"] = one / two
    md = (f"BLD of the demo library ({results['units']} units, bld config of puzzle/configs/demo.yaml) on "
          f"{results['cpu_count']} CPU cores.\n\n| workers | threads each | wall time (s) |\n|---:|---:|---:|\n"
          f"| 1 | {results['cpu_count']} | {one:.1f} |\n| 2 | {max(1, results['cpu_count'] // 2)} | {two:.1f} |\n\n"
          f"Speed-up of 2 workers over 1: {results['speedup']:.2f}x (below 1 means slower). Each worker runs the "
          f"parent's forward up to its deepest layer and pays its own start-up, and two single-threaded "
          f"processes slow each other down on shared caches and memory, while one process already uses both "
          f"cores; on GPUs, one worker per GPU, see multigpu.md.")
    write_results("bld_workers", results, md)
    print(md)


if __name__ == "__main__":
    main()
