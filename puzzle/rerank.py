"""Re-ranking (`solve.rerank`): keep, per target, the diverse MIP solution whose assembled child is closest to the
parent as measured, not as the summed replace-one-block scores predict.

The MIP minimises the sum of per-block KLs, each measured with only that block replaced; in the assembled child
the errors interact, so the optimum of the sum is not always the best child (docs/methods.md, "Re-ranking").
Every candidate meets the same target (same predicted speed or memory), so the choice trades nothing for quality.
"""

from __future__ import annotations

from dataclasses import replace

from puzzle.arch import Architecture
from puzzle.blocks.library import Manifest
from puzzle.mip.problem import Problem
from puzzle.mip.stage import ChildPlan, SolveConfig, diverse_plans
from puzzle.profiling import Profile
from puzzle.progress import track
from puzzle.realize import assemble
from puzzle.run import RunPaths
from puzzle.scoring import model_quality


def rerank_plans(plans: list[ChildPlan], problem: Problem, profile: Profile, manifest: Manifest, arch: Architecture,
                 parent, batches, paths: RunPaths, cfg: SolveConfig) -> list[ChildPlan]:
    """Each target's plan replaced by the lowest-KL one of its diverse alternatives; each plan records them all."""
    candidates = {plan.name: diverse_plans(problem, profile, manifest, arch, plan, cfg) for plan in plans}
    out = []
    with track("solve: re-ranking", sum(len(c) for c in candidates.values())) as bar:
        for plan in plans:
            rows = []
            for k, alternative in enumerate(candidates[plan.name]):
                child = assemble(alternative.blocks, parent, arch, manifest, paths)
                quality = model_quality(parent, child, batches)
                del child
                rows.append({"solution": k, "summed_score": alternative.solution.score, "kl": quality.kl,
                             "top1": quality.top1, "predicted_speedup": alternative.predicted_speedup})
                bar.advance(1)
            best = min(range(len(rows)), key=lambda k: rows[k]["kl"])
            rows = [{**row, "chosen": k == best} for k, row in enumerate(rows)]
            out.append(replace(candidates[plan.name][best], reranked=tuple(rows)))
    return out
