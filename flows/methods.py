"""Every method against SFT, over seeds, as one Prefect flow (`make methods`).

    python -m flows.methods [--params params.yaml]

Replicate 0 is the configuration itself: its pipeline stages are those `make
pipeline` ran (Cached when it has), and it adds the methods' stages (RM
ensemble, DPO, best-of-n, PPO against the ensemble, compare,
overoptimization), versioned by DVC like the pipeline's. Replicates 1 ..
methods.seeds - 1 run every stage again with project.seed + i under
<artifacts_dir>/seeds/<seed>/ (cached by Prefect, not versioned by DVC:
dvc.yaml describes replicate 0). The replicates' waves run side by side. The
pooled figures (instructflow/replicates.py) go to <artifacts_dir>/methods/ and to
the run's markdown report in Prefect.
"""

from __future__ import annotations

import argparse
import contextlib
import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.pipeline import Run, checked_params, record_run, run_stages
from flows.stopping import stages_stop_first, stopped_cleanly
from instructflow.config import ConfigError, load_params
from instructflow.io import exclusive, write_json
from instructflow.registry import group_specs, stage_specs
from instructflow.replicates import summarize, summary_markdown, write_replicates, write_summary


@flow(name="instructflow-methods", log_prints=True)
@stages_stop_first
def methods(params: str = "params.yaml") -> dict:
    config = load_params(params)
    check_comparable(config, params)
    replicates = write_replicates(config, params)
    with contextlib.ExitStack() as held:  # every replicate's folder, as the pipeline holds its own
        for _, r in replicates:
            held.enter_context(exclusive(r.project.artifacts_dir, "flows.methods"))
        return _methods(config, replicates)


def check_comparable(config, params: str) -> None:
    """A ConfigError unless this configuration has the compare and overoptimization stages."""
    if not config.methods.enabled:
        raise ConfigError(f"{params}: methods.enabled is false: this configuration has no method-comparison stages")
    if not {"compare", "overoptimization"} <= {s.name for s in stage_specs(config)}:
        raise ConfigError(f"{params}: the comparison needs the compare and overoptimization stages, which need a judge "
                          "that trained nothing and 0 < ppo.snapshot_every < ppo.iterations")


def _methods(config, replicates) -> dict:
    logger = get_run_logger()
    runs = [Run(path, r, group_specs(r, "pipeline", "methods"), label=f"seed{r.project.seed}-" if i else "", versioned=i == 0)
            for i, (path, r) in enumerate(replicates)]
    t0 = time.perf_counter()
    rows = run_stages(runs)
    wall = time.perf_counter() - t0
    for r in runs:
        record_run(r.params_path, r.params, rows[r.params_path], wall, publish=False)
    summary = summarize([r.params for r in runs])
    out = write_summary(config, summary)
    md = summary_markdown(summary)
    ran = {r.label or f"seed{r.params.project.seed}-": sum(x["compute_s"] for x in rows[r.params_path]) for r in runs}
    write_json(out / "run.json", {"wall_s": round(wall, 2), "stage_compute_s_by_replicate": ran,
                                  "replicates": [r.params_path for r in runs]})
    create_markdown_artifact(markdown=md + f"\nFlow wall time {wall:.1f} s; charts: {out / 'figure1.png'}, "
                             f"{out / 'overoptimization.png'}\n", key="instructflow-methods-report",
                             description="Every method against SFT over seeds")
    logger.info("methods: %.1f s wall; summary in %s", wall, out)
    return {"wall_s": round(wall, 2), "summary": md}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    t0 = time.perf_counter()
    checked_params(args.params, check_comparable)
    with stopped_cleanly():
        result = methods(params=args.params)
    print(result["summary"])
    print(f"methods finished in {time.perf_counter() - t0:.1f} s (process, Prefect start-up included); flow {result['wall_s']} s")


if __name__ == "__main__":
    main()
