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
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger

from flows.stopping import stages_stop_first, stopped_cleanly
from instructflow.config import ConfigError, Params, load_params
from instructflow.io import ArtifactsBusy, exclusive, write_json
from instructflow.registry import STAGES, StageSpec, pipeline_specs, resolve, stage_specs, stage_waves
from tasks.artifacts import publish_report
from tasks.stages import run_stage_task, with_retries
from tasks.versioning import dvc_files, dvc_root, version_stage


@flow(name="instructflow-pipeline", log_prints=True)
@stages_stop_first
def pipeline(params: str = "params.yaml", stages: list[str] | None = None) -> dict:
    """Run the stages in order (all of them by default), wave by wave: stages that do
    not read each other's outputs run side by side (orchestrate.concurrent_stages).
    A stage whose inputs, params and code are unchanged is not run again (Prefect
    shows it Cached)."""
    config = load_params(params)
    with exclusive(config.project.artifacts_dir, "flows.pipeline"):
        return _pipeline(params, config, stages)


def _pipeline(params: str, config: Params, stages: list[str] | None) -> dict:
    specs = [s for s in stage_specs(config) if s.name in stages] if stages else pipeline_specs(config)
    t0 = time.perf_counter()
    rows = run_stages([Run(params, config, specs)])[params]
    return record_run(params, config, rows, time.perf_counter() - t0)


@dataclass
class Run:
    """One configuration's stages: `make pipeline` runs one, `make methods` one per seed."""

    params_path: str
    params: Params
    specs: list[StageSpec]
    label: str = ""                            # shown in task names when several runs share a flow
    versioned: bool = True                     # recorded by DVC (when orchestrate.version_with_dvc and in a DVC project)


def run_stages(runs: list[Run]) -> dict[str, list[dict]]:
    """Run each run's stages wave by wave; the runs' waves of the same index run side by side.
    Returns params path -> one row per stage (state, wall and compute seconds, metrics).
    A versioned run inside a DVC project records each stage in its group's dvc.lock as it ends."""
    roots, files = {}, {}
    for r in runs:
        versioned = r.versioned and r.params.orchestrate.version_with_dvc
        roots[r.params_path] = dvc_root(r.params_path) if versioned else None
        files[r.params_path] = dvc_files(r.params_path, r.params, {s.stage.group for s in r.specs}) if versioned else {}
        if versioned and roots[r.params_path] is None:
            get_run_logger().warning("not versioning with DVC: %s is not inside a DVC project (no .dvc/ above it)",
                                     r.params_path)
    waves = {r.params_path: stage_waves(r.specs) for r in runs}
    rows: dict[str, list[dict]] = {r.params_path: [] for r in runs}
    for w in range(max((len(v) for v in waves.values()), default=0)):
        jobs = [(s, r) for r in runs if w < len(waves[r.params_path]) for s in waves[r.params_path][w]]
        outcomes = run_wave(jobs)
        for s, r in jobs:  # one DVC commit at a time, in stage order
            record, state_name, wall_s = outcomes[(r.params_path, s.name)]
            if roots[r.params_path] is not None:
                with_retries(version_stage, r.params)(s.name, str(roots[r.params_path]),
                                                      files[r.params_path][s.stage.group], r.params.orchestrate.dvc_remote)
            cached = state_name == "Cached"
            rows[r.params_path].append({"stage": s.name, "wave": w, "state": state_name, "wall_s": round(wall_s, 2),
                                        "compute_s": 0.0 if cached else record["timings_s"]["total"],
                                        "metrics": record["metrics"]})
    return rows


def record_run(params: str, config: Params, rows: list[dict], wall: float, publish: bool = True) -> dict:
    """artifacts/pipeline/run.json and (with `publish`) the Prefect report of one run's rows."""
    logger = get_run_logger()
    # stages of a wave overlap: the compute on the run's critical path is each wave's longest stage
    compute = sum(max(r["compute_s"] for r in rows if r["wave"] == w) for w in {r["wave"] for r in rows})
    run = {"params": str(params), "wall_s": round(wall, 2), "stage_compute_s": round(compute, 2),
           "stage_compute_total_s": round(sum(r["compute_s"] for r in rows), 2),
           "overhead_s": round(wall - compute, 2), "overhead_share": round((wall - compute) / wall, 4) if wall else 0.0,
           "stages": rows}
    write_json(config.stage_dir("pipeline") / "run.json", run)
    if publish:
        publish_report(config, run)
    for r in rows:
        logger.info("%-9s %-22s wall %7.1f s  compute %7.1f s", r["stage"], r["state"], r["wall_s"], r["compute_s"])
    logger.info("pipeline: %.1f s wall, %.1f s in stages, orchestration overhead %.1f s (%.1f%%)",
                wall, compute, wall - compute, 100 * run["overhead_share"])
    return run


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), where the OS tells."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_wave(jobs: list[tuple[StageSpec, Run]]) -> dict[tuple[str, str], tuple[dict, str, float]]:
    """Run one wave's stages (of one run or several); returns (params path, stage) -> (result
    record, state name, wall seconds).

    With orchestrate.concurrent_stages, the wave's local stages run side by side, each in
    its own process with an equal share of the threads; the rest run here, one by one.
    A failed stage raises once every stage of the wave has ended: none is left running."""
    local = [(s, r) for s, r in jobs if s.name not in r.params.orchestrate.gpu_stages]
    futures = {}
    t_wave = time.perf_counter()
    if len(local) > 1 and all(r.params.orchestrate.concurrent_stages for _, r in local):
        threads = max(1, (local[0][1].params.project.threads or usable_cores()) // len(local))
        get_run_logger().info("%s: side by side, %d thread(s) each", ", ".join(r.label + s.name for s, r in local), threads)
        futures = {(r.params_path, s.name): run_stage_task(s.name, r.params_path, r.params, threads=threads, label=r.label)
                   for s, r in local}
    outcomes = {}
    try:
        for s, r in jobs:
            if (r.params_path, s.name) in futures:
                continue
            t_stage = time.perf_counter()
            if s.name in r.params.orchestrate.gpu_stages:
                from flows.gpu_stage import run_on_gpu_pool

                record, state_name = run_on_gpu_pool(s.name, r.params_path, r.params), "Completed (GPU pool)"
            else:
                state = run_stage_task(s.name, r.params_path, r.params, return_state=True, label=r.label)
                record, state_name = state.result(), state.name  # raises if the stage failed: nothing later runs
            outcomes[(r.params_path, s.name)] = (record, state_name, time.perf_counter() - t_stage)
    finally:
        for f in futures.values():
            f.wait()
    for k, f in futures.items():
        outcomes[k] = (f.state.result(), f.state.name, time.perf_counter() - t_wave)
    return outcomes


def checked_params(path: str, check=None) -> Params:
    """The params file, refused in one line before Prefect starts (an invalid file, one `check(params, path)`
    refuses with a ConfigError, or an artifacts folder another run holds); the flow then holds the lock itself."""
    try:
        config = load_params(path)
        if check is not None:
            check(config, path)
        with exclusive(config.project.artifacts_dir, "checking"):
            pass
    except (ArtifactsBusy, ConfigError) as err:
        raise SystemExit(f"error: {err}") from None
    return config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--stages", default="", help="comma-separated subset (default: all)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    checked_params(args.params)
    with stopped_cleanly():
        run = pipeline(params=args.params, stages=[s for s in args.stages.split(",") if s] or None)
    config = load_params(args.params)
    for r in run["stages"]:
        if STAGES[r["stage"]].table:
            print(resolve(STAGES[r["stage"]].table)(r["metrics"]))
    print(f"\npipeline finished in {time.perf_counter() - t0:.1f} s (process, Prefect start-up included); "
          f"flow {run['wall_s']} s, stages {run['stage_compute_s']} s, overhead {run['overhead_s']} s "
          f"({100 * run['overhead_share']:.1f}%); details in {Path(config.stage_dir('pipeline')) / 'run.json'}")


if __name__ == "__main__":
    main()
