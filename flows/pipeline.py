"""The whole pipeline as a Prefect flow: validate the data, then SFT, RM, PPO,
evaluation and export, each stage a cached, retryable task.

    python -m flows.pipeline [--params params.yaml] [--stages sft,reward]

With no PREFECT_API_URL it runs against a temporary local server; with one,
against that server (schedules need one: see prefect.yaml).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from prefect import flow, get_run_logger

from instructflow.config import ConfigError, Params, load_params
from instructflow.io import ArtifactsBusy, exclusive, write_json
from instructflow.registry import STAGES, StageSpec, resolve, stage_specs, stage_waves
from tasks.report import publish_report
from tasks.stages import stage, with_retries
from tasks.versioning import dvc_root, version_stage


@flow(name="instructflow-pipeline", log_prints=True)
def pipeline(params: str = "params.yaml", stages: list[str] | None = None) -> dict:
    """Run the stages in order (all of them by default), wave by wave: stages that do
    not read each other's outputs run side by side (orchestrate.concurrent_stages).
    A stage whose inputs, params and code are unchanged is not run again (Prefect
    shows it Cached)."""
    p = load_params(params)
    with exclusive(p.project.artifacts_dir, "flows.pipeline"):
        return _pipeline(params, p, stages)


def _pipeline(params: str, p: Params, stages: list[str] | None) -> dict:
    logger = get_run_logger()
    specs = [s for s in stage_specs(p) if not stages or s.name in stages]
    root = dvc_root(params) if p.orchestrate.version_with_dvc else None
    if p.orchestrate.version_with_dvc and root is None:
        logger.info("not versioning with DVC: dvc.yaml reads params.yaml beside it, this run reads %s", params)
    t0, rows = time.perf_counter(), []
    for w, wave in enumerate(stage_waves(specs)):
        outcomes = run_wave(wave, params, p)
        for s in wave:  # one DVC commit at a time, in stage order
            record, state_name, wall_s = outcomes[s.name]
            if root is not None:
                with_retries(version_stage, p)(s.name, str(root), p.orchestrate.dvc_remote)
            cached = state_name == "Cached"
            rows.append({"stage": s.name, "wave": w, "state": state_name, "wall_s": round(wall_s, 2),
                         "compute_s": 0.0 if cached else record["timings_s"]["total"], "metrics": record["metrics"]})
    wall = time.perf_counter() - t0
    # stages of a wave overlap: the compute on the run's critical path is each wave's longest stage
    compute = sum(max(r["compute_s"] for r in rows if r["wave"] == w) for w in {r["wave"] for r in rows})
    run = {"params": str(params), "wall_s": round(wall, 2), "stage_compute_s": round(compute, 2),
           "stage_compute_total_s": round(sum(r["compute_s"] for r in rows), 2),
           "overhead_s": round(wall - compute, 2), "overhead_share": round((wall - compute) / wall, 4) if wall else 0.0,
           "stages": rows}
    write_json(p.stage_dir("pipeline") / "run.json", run)
    publish_report(p, run)
    for r in rows:
        logger.info("%-9s %-22s wall %7.1f s  compute %7.1f s", r["stage"], r["state"], r["wall_s"], r["compute_s"])
    logger.info("pipeline: %.1f s wall, %.1f s in stages, orchestration overhead %.1f s (%.1f%%)",
                wall, compute, wall - compute, 100 * run["overhead_share"])
    return run


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), where the OS tells."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_wave(wave: list[StageSpec], params: str, p: Params) -> dict[str, tuple[dict, str, float]]:
    """Run one wave's stages; returns stage -> (result record, state name, wall seconds).

    With orchestrate.concurrent_stages, the wave's local stages run side by side, each in
    its own process with an equal share of the threads; the rest run here, one by one.
    A failed stage raises once every stage of the wave has ended: none is left running."""
    local = [s.name for s in wave if s.name not in p.orchestrate.gpu_stages]
    futures = {}
    t_wave = time.perf_counter()
    if p.orchestrate.concurrent_stages and len(local) > 1:
        threads = max(1, (p.project.threads or usable_cores()) // len(local))
        get_run_logger().info("%s: side by side, %d thread(s) each", ", ".join(local), threads)
        futures = {name: stage(name, params, p, threads=threads) for name in local}
    outcomes = {}
    try:
        for s in wave:
            if s.name in futures:
                continue
            t_stage = time.perf_counter()
            if s.name in p.orchestrate.gpu_stages:
                from flows.stage import run_on_gpu_pool

                record, state_name = run_on_gpu_pool(s.name, params, p), "Completed (GPU pool)"
            else:
                state = stage(s.name, params, p, return_state=True)
                record, state_name = state.result(), state.name  # raises if the stage failed: nothing later runs
            outcomes[s.name] = (record, state_name, time.perf_counter() - t_stage)
    finally:
        for f in futures.values():
            f.wait()
    for name, f in futures.items():
        outcomes[name] = (f.state.result(), f.state.name, time.perf_counter() - t_wave)
    return outcomes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--stages", default="", help="comma-separated subset (default: all)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    try:  # refuse before Prefect starts; the flow holds the lock itself while it runs
        with exclusive(load_params(args.params).project.artifacts_dir, "checking"):
            pass
    except (ArtifactsBusy, ConfigError) as err:
        raise SystemExit(f"error: {err}") from None
    run = pipeline(params=args.params, stages=[s for s in args.stages.split(",") if s] or None)
    p = load_params(args.params)
    for r in run["stages"]:
        if STAGES[r["stage"]].table:
            print(resolve(STAGES[r["stage"]].table)(r["metrics"]))
    print(f"\npipeline finished in {time.perf_counter() - t0:.1f} s (process, Prefect start-up included); "
          f"flow {run['wall_s']} s, stages {run['stage_compute_s']} s, overhead {run['overhead_s']} s "
          f"({100 * run['overhead_share']:.1f}%); details in {Path(p.stage_dir('pipeline')) / 'run.json'}")


if __name__ == "__main__":
    main()
