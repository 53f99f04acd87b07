"""The whole pipeline as a Prefect flow: validate the data, then SFT, RM, PPO,
evaluation and export, each stage a cached, retryable task.

    python -m flows.pipeline [--params params.yaml] [--stages sft,reward]

With no PREFECT_API_URL it runs against a temporary local server; with one,
against that server (schedules need one: see prefect.yaml).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from prefect import flow, get_run_logger

from instructflow.cli import eval_table
from instructflow.config import load_params
from instructflow.io import write_json
from instructflow.pipeline import stage_specs
from tasks.report import publish_report
from tasks.stages import stage, with_retries
from tasks.versioning import dvc_root, version_stage


@flow(name="instructflow-pipeline", log_prints=True)
def pipeline(params: str = "params.yaml", stages: list[str] | None = None) -> dict:
    """Run the stages in order (all of them by default). A stage whose inputs,
    params and code are unchanged is not run again (Prefect shows it Cached)."""
    logger = get_run_logger()
    p = load_params(params)
    specs = [s for s in stage_specs(p) if not stages or s.name in stages]
    root = dvc_root(params) if p.orchestrate.version_with_dvc else None
    if p.orchestrate.version_with_dvc and root is None:
        logger.info("not versioning with DVC: dvc.yaml reads params.yaml beside it, this run reads %s", params)
    t0, rows = time.perf_counter(), []
    for s in specs:
        t_stage = time.perf_counter()
        if s.name in p.orchestrate.gpu_stages:
            from flows.stage import run_on_gpu_pool

            record, state_name = run_on_gpu_pool(s.name, params, p), "Completed (GPU pool)"
        else:
            state = stage(s.name, params, p, return_state=True)
            record, state_name = state.result(), state.name  # raises if the stage failed: nothing later runs
        if root is not None:
            with_retries(version_stage, p)(s.name, str(root), p.orchestrate.dvc_remote)
        cached = state_name == "Cached"
        rows.append({"stage": s.name, "state": state_name, "wall_s": round(time.perf_counter() - t_stage, 2),
                     "compute_s": 0.0 if cached else record["timings_s"]["total"], "metrics": record["metrics"]})
    wall = time.perf_counter() - t0
    compute = sum(r["compute_s"] for r in rows)
    run = {"params": str(params), "wall_s": round(wall, 2), "stage_compute_s": round(compute, 2),
           "overhead_s": round(wall - compute, 2), "overhead_share": round((wall - compute) / wall, 4) if wall else 0.0,
           "stages": rows}
    write_json(p.stage_dir("pipeline") / "run.json", run)
    publish_report(p, run)
    for r in rows:
        logger.info("%-9s %-22s wall %7.1f s  compute %7.1f s", r["stage"], r["state"], r["wall_s"], r["compute_s"])
    logger.info("pipeline: %.1f s wall, %.1f s in stages, orchestration overhead %.1f s (%.1f%%)",
                wall, compute, wall - compute, 100 * run["overhead_share"])
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--stages", default="", help="comma-separated subset (default: all)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    run = pipeline(params=args.params, stages=[s for s in args.stages.split(",") if s] or None)
    p = load_params(args.params)
    metrics = p.stage_dir("eval") / "metrics.json"
    if metrics.exists() and any(r["stage"] == "eval" for r in run["stages"]):
        print(eval_table(json.loads(metrics.read_text())))
    print(f"\npipeline finished in {time.perf_counter() - t0:.1f} s (process, Prefect start-up included); "
          f"flow {run['wall_s']} s, stages {run['stage_compute_s']} s, overhead {run['overhead_s']} s "
          f"({100 * run['overhead_share']:.1f}%); details in {Path(p.stage_dir('pipeline')) / 'run.json'}")


if __name__ == "__main__":
    main()
