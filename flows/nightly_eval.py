"""Re-evaluation as its own flow (the nightly deployment in prefect.yaml):
optionally pull the latest models from the DVC remote, check the data, then
run the evaluation. Cached like every stage: with nothing new it costs seconds."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.stopping import stages_stop_first
from instructflow.config import load_params
from instructflow.registry import STAGES, stage_specs
from tasks.stages import run_stage_task, with_retries
from tasks.versioning import dvc_root, pull_stages


@flow(name="instructflow-evaluate", log_prints=True)
@stages_stop_first
def evaluate(params: str = "params.yaml", pull: bool = False) -> dict:
    config = load_params(params)
    names = [s.name for s in stage_specs(config)]
    if "eval" not in names:
        raise ValueError(f"{params}: this configuration has no evaluation stage: it needs {STAGES['eval'].requires}")
    root = dvc_root(params)
    if pull:
        if root is None:
            raise ValueError(f"pull=True needs the params.yaml of a DVC project, got {params}")
        n = with_retries(pull_stages, config)([x for x in names if x != "eval"], str(root), config.orchestrate.dvc_remote)
        get_run_logger().info("pulled %d file(s) from the DVC remote", n)
    run_stage_task("validate", params, config)
    return run_stage_task("eval", params, config)["metrics"]


if __name__ == "__main__":
    evaluate()
