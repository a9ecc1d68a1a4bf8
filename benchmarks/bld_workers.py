"""Does BLD of the demo library finish sooner with 2 local workers than with 1?

    python benchmarks/bld_workers.py              # the demo parent and its library (CPU, ~8 minutes)
    python benchmarks/bld_workers.py --repeats 1  # one run of each

Builds the demo library once, copies it into fresh run directories and runs `puzzle bld` there with 1 worker
(all CPU threads) and with 2 workers (half the threads each), alternating 1, 2, 2, 1, ... so that a drift in
the machine's speed hits both alike, and timing the wall clock of each. Every run must train every unit exactly
once, and the 2-worker runs must split the units between both workers. Writes
benchmarks/results/bld_workers.{json,md}. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from benchmarks.common import write_results  # noqa: E402
from puzzle.demo import DemoConfig, build_demo_parent  # noqa: E402
from puzzle.demo_search import demo_search_base, run_search  # noqa: E402
from puzzle.distill.bld import read_unit_result, unit_path  # noqa: E402
from puzzle.pipeline import run_bld  # noqa: E402
from puzzle.run import RunPaths  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each worker count")
    args = parser.parse_args()
    demo = DemoConfig()
    parent = build_demo_parent(demo)
    order = [w for i in range(args.repeats) for w in ((1, 2) if i % 2 == 0 else (2, 1))]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        search = run_search(base, parent=parent.path, base=demo_search_base(demo), stage="library")
        units = search.manifest().units
        results = {"units": len(units), "cpu_count": os.cpu_count(), "order": order, "runs": []}
        for i, workers in enumerate(order):
            run = Path(tmp) / f"run{i}"
            shutil.copytree(base, run)
            start = time.perf_counter()
            run_bld(run, workers=workers)
            seconds = time.perf_counter() - start
            owners = [read_unit_result(unit_path(RunPaths(run), u)).worker for u in units]
            assert len(owners) == len(units) and len(set(owners)) == workers, owners
            results["runs"].append({"workers": workers, "seconds": seconds,
                                    "units_per_worker": {w: owners.count(w) for w in sorted(set(owners))}})
            print(f"{workers} worker(s): {seconds:.1f} s", flush=True)
            shutil.rmtree(run)
    times = {w: [r["seconds"] for r in results["runs"] if r["workers"] == w] for w in (1, 2)}
    one, two = statistics.median(times[1]), statistics.median(times[2])
    results.update(median_seconds={1: one, 2: two}, speedup=one / two)
    runs = "\n".join(f"| {r['workers']} | {max(1, results['cpu_count'] // r['workers'])} | {r['seconds']:.1f} |"
                     for r in results["runs"])
    md = (f"BLD of the demo library ({results['units']} units, bld config of puzzle/configs/demo.yaml) on "
          f"{results['cpu_count']} CPU cores, runs in the order made.\n\n"
          f"| workers | threads each | wall time (s) |\n|---:|---:|---:|\n{runs}\n\n"
          f"Median: 1 worker {one:.1f} s, 2 workers {two:.1f} s; speed-up of 2 workers over 1: "
          f"{results['speedup']:.2f}x. The 2 workers share the parent's forward (each computes half of the "
          f"batches' activations into `progress/parent_activations`, `bld.parent_activations: auto`), are "
          f"forked from the launcher (no second interpreter start) and are bound to one core each; one worker "
          f"uses both cores through PyTorch's intra-op threads. On GPUs, one worker per GPU: see multigpu.md.")
    write_results("bld_workers", results, md)
    print(md)


if __name__ == "__main__":
    main()
