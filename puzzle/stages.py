"""The stages of `puzzle search` after BLD and scoring: profile, solve, realize, fuse, prune, distill, report.

Each is a function of the `Search` over one run directory (puzzle/pipeline.py chains them); each reads what
earlier stages wrote, writes its own results atomically and records itself with `search.mark_done`.
docs/architecture.md lists what every stage reads and writes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from puzzle.checkpoint import decilm_config, fingerprint, load_architecture, load_model, normalized_config
from puzzle.distill.gkd import GKDConfig, GKDResult, run_gkd
from puzzle.errors import InfeasibleError, NothingToFuse, StageError
from puzzle.files import read_json, write_json_atomic
from puzzle.fusion import fuse_ffn
from puzzle.jobs import shard_from_env
from puzzle.memory import free_bytes
from puzzle.mip.stage import ChildPlan, build_problem, solve_targets, sweep
from puzzle.nemotron_h_puzzle import VLLM_SUFFIX, write_nemotron_h_puzzle
from puzzle.profiling import Profile, measure_model, predicted_timing, profile_variants, resolve_device_dtype
from puzzle.progress import log, track
from puzzle.prune import prune
from puzzle.realize import realize
from puzzle.report import bld_table, measure, task_scores, write_report
from puzzle.rerank import rerank_plans
from puzzle.scoring import Scores

if TYPE_CHECKING:  # annotations only: pipeline.py imports this module
    from puzzle.pipeline import Search


def profile_stage(search: Search) -> None:
    """Cost of every variant in the library (and of the parent end to end) on this device."""
    manifest = search.manifest()
    arch = load_architecture(search.paths.parent)
    variants = []
    for c in manifest.candidates:
        if c.kind == "block":
            variants += [("attention", c.variant.attention), ("ffn", c.variant.ffn)]
        else:
            variants.append((c.kind, c.variant))
    for block in arch.blocks:  # layers outside the search space keep the parent's sub-blocks
        variants += [("attention", block.attention), ("ffn", block.ffn)]
    profile = profile_variants(decilm_config(normalized_config(search.paths.parent)), variants, search.cfg.profile)
    parent_timing = None
    if not search.cfg.profile.analytic and _whole_parent_fits(search, "profile"):
        device, dtype = resolve_device_dtype(search.cfg.profile)
        model = load_model(search.paths.parent, dtype=dtype, device=device)
        parent_timing = measure_model(model, search.cfg.profile)
        del model
    profile = replace(profile, parent_fingerprint=manifest.parent_fingerprint, parent_measured=parent_timing)
    profile.save(search.paths.profile)
    search.mark_done("profile")


def _whole_parent_fits(search: Search, stage: str) -> bool:
    """Whether the parent fits the profiling device whole, as whole-model timing needs; said when it does not."""
    device, dtype = resolve_device_dtype(search.cfg.profile)
    need = load_architecture(search.paths.parent).total_params() * dtype.itemsize
    if need <= free_bytes(device):
        return True
    log(f"{stage}: the parent ({need / 2**30:.1f} GiB) does not fit {device} whole, so no model is timed end to end: "
        "speed-ups are predicted from the profiled variants only")
    return False


def solve_stage(search: Search) -> None:
    manifest = search.manifest()
    profile = Profile.load(search.paths.profile)
    if profile.parent_fingerprint != manifest.parent_fingerprint:
        raise StageError(f"{search.paths.profile} was measured for another parent than the library's; rerun the profile stage")
    scores = Scores.load(search.paths.scores)
    if scores.parent_fingerprint != manifest.parent_fingerprint:
        raise StageError(f"{search.paths.scores} belongs to another parent than the library's; rerun the score stage")
    arch = load_architecture(search.paths.parent)
    problem = build_problem(manifest, scores, profile, arch, search.cfg.solve.objective)
    plans, failures = solve_targets(problem, profile, manifest, arch, search.cfg.solve)
    if search.cfg.solve.rerank > 1 and plans:
        score = search.cfg.score  # the tokens scoring measured on; the report's are after them
        batches = list(search.data().batches("held_out", score.batch_size, n_tokens=score.tokens, shuffle=False))
        with torch.no_grad():
            plans = rerank_plans(plans, problem, profile, manifest, arch, search.parent_model(), batches, search.paths,
                                 search.cfg.solve)
    search.paths.solutions.mkdir(parents=True, exist_ok=True)
    for plan in plans:
        plan.save(search.paths.solutions / f"{plan.name}.json")
    write_json_atomic(search.paths.solutions / "sweep.json", {"version": 1, "points": sweep(problem, profile, search.cfg.solve),
                                                              "infeasible": failures})
    if failures:
        raise InfeasibleError("; ".join(failures))
    search.mark_done("solve")


def plans_of(search: Search) -> list:
    return [ChildPlan.load(search.paths.solutions / f"{t.name}.json") for t in search.cfg.solve.targets
            if (search.paths.solutions / f"{t.name}.json").exists()]


def realize_stage(search: Search) -> list[Path]:
    manifest = search.manifest()
    arch = load_architecture(search.paths.parent)
    out = [realize(plan, arch, manifest, search.paths, search.dtype) for plan in plans_of(search)]
    for child in out:  # hybrids: also the layout vLLM's Nemotron-H model serves, where the child fits it
        if load_architecture(child).vllm_serving() == "nemotron_h":
            write_nemotron_h_puzzle(child, child.with_name(child.name + VLLM_SUFFIX))
    search.mark_done("realize")
    return out


DERIVED = ("", "-fused", "-pruned")  # children/{name}{suffix}: realized, then fused / pruned from it
DISTILLED = "-kd"  # children/{child}-kd: the distilled copy of a child; a stage never rewrites its input


def child_dirs(search: Search, distilled: bool = True) -> list[Path]:
    """Every child of the run: one per solved target, the fused / pruned variants made from it, and (with
    `distilled`) the distilled copies the last distill stage recorded."""
    record = search._record("distill")
    made = read_json(record).get("distilled", {}) if distilled and record.exists() else {}
    out = []
    for plan in plans_of(search):
        for suffix in DERIVED:
            child = search.paths.children / f"{plan.name}{suffix}"
            kd = child.with_name(child.name + DISTILLED)
            out += [child] if child.exists() else []
            out += [kd] if kd.name in made and kd.exists() else []
    return out


def fuse_stage(search: Search) -> None:
    """FFN Fusion of every solved child that has attention-free runs (config section `fuse`)."""

    if search.cfg.fuse is not None:
        cfg = replace(search.cfg.fuse, data=search.cfg.data, device=search.cfg.device,
                      parent_memory_gb=search.cfg.fuse.parent_memory_gb or search.cfg.parent_memory_gb)
        for plan in plans_of(search):
            child = search.paths.children / plan.name
            try:
                fuse_ffn(child, search.paths.children / f"{plan.name}-fused", cfg, overwrite=True,
                         info={"stage": "fuse", "child": plan.name})
            except NothingToFuse as why:  # a child without fusable runs is no error for the search
                log(f"fuse: {plan.name}: {str(why).removeprefix(str(child) + ': ')}")
    search.mark_done("fuse")


def prune_stage(search: Search) -> None:
    """Minitron pruning of every solved child (config section `prune`), before distillation."""

    if search.cfg.prune is not None:
        cfg = replace(search.cfg.prune, data=search.cfg.data, device=search.cfg.device, distill=None,
                      parent_memory_gb=search.cfg.prune.parent_memory_gb or search.cfg.parent_memory_gb)
        for plan in plans_of(search):
            prune(search.paths.children / plan.name, search.paths.children / f"{plan.name}-pruned", cfg,
                  overwrite=True, info={"stage": "prune", "child": plan.name})
    search.mark_done("prune")


def distill_stage(search: Search, keep_finished: bool = False) -> None:
    """Global distillation of every child from the parent (config section `gkd`) into children/{child}-kd.

    The child itself is never rewritten, so a rerun with another `gkd` config starts again from the
    un-distilled weights; the record lists which child each distilled one came from. With `keep_finished`
    (the Slurm distill job, requeued or submitted again) a child already distilled from the same weights with
    the same settings is kept, so a job whose time limit fits one child still gets through all of them.
    """
    made = {}
    main = shard_from_env().rank == 0  # in the Slurm distill job every rank runs this stage; rank 0 speaks for it
    if search.cfg.gkd is not None:
        cfg = search.cfg.gkd if search.cfg.device == "auto" else replace(search.cfg.gkd, device=search.cfg.device)
        for child in child_dirs(search, distilled=False):
            kept = read_json(child / "puzzle.json").get("prune", {}).get("kept_layers")
            # A depth-pruned child's layer i is the parent's layer kept[i] (for the hidden-state term).
            child_cfg = replace(cfg, layer_map=tuple(kept)) if kept and cfg.layer_map is None else cfg
            out = child.with_name(child.name + DISTILLED)
            student = fingerprint(child)
            if not (keep_finished and _distilled(out, student, child_cfg)):
                if main:
                    log(f"[bold]distill[/]: {child.name} from the parent ({cfg.tokens:,} tokens) -> {out}")
                run_gkd(child, search.paths.parent, search.cfg.data, out, child_cfg, overwrite=True,
                        info={"stage": "distill", "child": child.name, "student_fingerprint": student})
            made[out.name] = child.name
    if main:
        search.mark_done("distill", {"distilled": made})


def _distilled(out: Path, student: str, cfg: GKDConfig) -> bool:
    """Whether `out` holds the child whose content is `student`, distilled with `cfg` (gkd.json exists only in a
    finished folder: run_gkd writes it whole)."""
    if not (out / "gkd.json").is_file():
        return False
    return (read_json(out / "puzzle.json").get("student_fingerprint") == student
            and GKDResult.load(out / "gkd.json").config == cfg)


def report_stage(search: Search) -> Path:

    cfg = search.cfg.report
    manifest = search.manifest()
    arch = load_architecture(search.paths.parent)
    profile = Profile.load(search.paths.profile)
    scores = Scores.load(search.paths.scores)
    scores_init = Scores.load(search.paths.scores_init) if search.paths.scores_init.exists() else None
    parent = search.parent_model()
    # After the held-out tokens scoring used to choose the children: quality measured on what chose them is biased.
    batches = list(search.data().batches("held_out", cfg.batch_size, n_tokens=cfg.eval_tokens, shuffle=False,
                                         skip_tokens=search.cfg.score.tokens))
    held_out = {"scoring_positions": scores.tokens, "report_positions": sum(b.shape[0] * (b.shape[1] - 1) for b in batches)}
    profile_cfg = search.cfg.profile if cfg.measure_speed and not search.cfg.profile.analytic \
        and _whole_parent_fits(search, "report") else None
    device, dtype = resolve_device_dtype(search.cfg.profile)
    timed_parent = load_model(search.paths.parent, dtype=dtype, device=device) if profile_cfg else parent
    parent_report, parent_timing = measure("parent", search.paths.parent, timed_parent, parent, batches, profile_cfg,
                                           arch, search.cfg.profile.kv_dtype)
    parent_pred = predicted_timing(profile, list(arch.blocks))
    parent_report = replace(parent_report, predicted_decode_s=parent_pred.decode_time_s, measured_speedup=1.0 if parent_timing else None)
    children, plans = [], plans_of(search)
    plan_by_name = {p.name: p for p in plans}
    folders = child_dirs(search)
    with track(f"report: quality{' and speed' if profile_cfg else ''} of {len(folders)} children", len(folders)) as bar:
        for path in folders:
            children.append(_child_report(search, path, plan_by_name.get(path.name), parent, batches, profile_cfg,
                                          profile, parent_pred, parent_timing, device, dtype))
            bar.advance(1, child=path.name)
    failures = read_json(search.paths.solutions / "sweep.json").get("infeasible", [])
    sweep_points = read_json(search.paths.solutions / "sweep.json")["points"]
    rows = bld_table(manifest, search.paths, arch, scores, scores_init)
    tasks = None
    if cfg.tasks:
        tasks = task_scores({"parent": search.paths.parent, **{c.name: Path(c.path) for c in children}}, cfg.tasks, cfg,
                            search.cfg.device)
    path = write_report(search.paths, parent=parent_report, parent_arch=arch, tasks=tasks, children=children, plans=plans, bld_rows=rows,
                        sweep=sweep_points, profile=profile, failures=failures, held_out=held_out)
    search.mark_done("report")
    return path


def _child_report(search: Search, path: Path, plan, parent, batches, profile_cfg, profile, parent_pred, parent_timing,
                  device, dtype):
    """One child's row of the report: held-out quality against the parent, measured and predicted speed."""
    child_arch = load_architecture(path)
    child = load_model(path, dtype=parent.dtype, device=parent.device)
    report, _ = measure(path.name, path, child, parent, batches, None, child_arch, search.cfg.profile.kv_dtype)
    del child
    timing = measure_model(load_model(path, dtype=dtype, device=device), profile_cfg) if profile_cfg else None
    try:
        pred = predicted_timing(profile, list(child_arch.blocks))
    except StageError:  # a fused FFN is wider than any profiled variant: no prediction
        pred = None
    return replace(
        report, measured_noisy=bool(timing and (timing.noisy or parent_timing.noisy)),
        measured_decode_s=timing.decode_time_s if timing else None,
        measured_prefill_s=timing.prefill_time_s if timing else None,
        predicted_decode_s=pred.decode_time_s if pred else None,
        predicted_speedup=parent_pred.decode_time_s / pred.decode_time_s if pred else None,
        measured_speedup=parent_timing.decode_time_s / timing.decode_time_s if timing and parent_timing else None,
        summed_score=plan.solution.score if plan else None)
