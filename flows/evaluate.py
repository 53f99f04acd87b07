"""Re-evaluation as its own flow (the nightly deployment in prefect.yaml):
optionally pull the latest models from the DVC remote, check the data, then
run the evaluation. Cached like every stage: with nothing new it costs seconds."""

from __future__ import annotations

from prefect import flow, get_run_logger

from instructflow.config import load_params
from instructflow.registry import STAGES, stage_specs
from tasks.stages import stage, with_retries
from tasks.versioning import dvc_root, pull_stages


@flow(name="instructflow-evaluate", log_prints=True)
def evaluate(params: str = "params.yaml", pull: bool = False) -> dict:
    p = load_params(params)
    names = [s.name for s in stage_specs(p)]
    if "eval" not in names:
        raise ValueError(f"{params}: this configuration has no evaluation stage: it needs {STAGES['eval'].requires}")
    root = dvc_root(params)
    if pull:
        if root is None:
            raise ValueError(f"pull=True needs the params.yaml of a DVC project, got {params}")
        n = with_retries(pull_stages, p)([x for x in names if x != "eval"], str(root), p.orchestrate.dvc_remote)
        get_run_logger().info("pulled %d file(s) from the DVC remote", n)
    stage("validate", params, p)
    return stage("eval", params, p)["metrics"]


if __name__ == "__main__":
    evaluate()
