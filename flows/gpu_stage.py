"""One stage as its own flow, for a GPU work pool (deployment `gpu-stage` in
prefect.yaml). The pipeline flow, running elsewhere, sends a stage here when
params.yaml lists it under orchestrate.gpu_stages:

    pipeline side                          GPU worker (stage_flow)
    put_tree(inputs + params) ──S3──►      get_tree(inputs), run the stage
    get_tree(outputs)         ◄──S3──      put_tree(outputs, result.json)

The exchange lives under orchestrate.exchange_uri/<stage>/<run key>/, so a
retried or repeated send finds the same place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.deployments import run_deployment

from flows.stopping import stages_stop_first
from instructflow.config import Params, load_params
from instructflow.registry import spec, stage_key
from instructflow.serving.storage import get_tree, put_tree
from tasks.retries import retry_if_transient
from tasks.stages import run_stage_task, with_retries


def _uris(config: Params, name: str, key: str) -> tuple[str, str]:
    base = f"{config.orchestrate.exchange_uri.rstrip('/')}/{name}/{key[:16]}"
    return f"{base}/inputs", f"{base}/outputs"


@task(retry_condition_fn=retry_if_transient)
def upload(paths: list[str], uri: str) -> int:
    return len(put_tree(paths, uri)["files"])


@task(retry_condition_fn=retry_if_transient)
def download(uri: str) -> int:
    return len(get_tree(uri)["files"])


@flow(name="instructflow-stage", log_prints=True)
@stages_stop_first
def stage_flow(stage_name: str, params: str, inputs_uri: str, outputs_uri: str) -> dict:
    """Fetch the stage's inputs, run it (cached like any stage), send its outputs back."""
    with_retries(download, Params())(inputs_uri)  # the params file comes with the inputs: default retries
    config = load_params(params)
    processes = config.orchestrate.gpu_processes or _visible_gpus()
    if processes > 1:  # every GPU of the pod, under accelerate launch (orchestrate.accelerate_config)
        threads = max(1, (os.cpu_count() or processes) // processes)
        record = run_stage_task(stage_name, params, config, threads=threads, processes=processes).result()
    else:
        record = run_stage_task(stage_name, params, config)
    with_retries(upload, config)([x for x in spec(config, stage_name).files() if Path(x).exists()], outputs_uri)
    return record


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def run_on_gpu_pool(name: str, params: str, config: Params) -> dict:
    """From the pipeline flow: run stage `name` through the GPU deployment and
    bring its outputs here. Returns the stage's result record."""
    inputs_uri, outputs_uri = _uris(config, name, stage_key(config, name))
    s = spec(config, name)
    with_retries(upload, config)([x for x in (params, *s.deps) if Path(x).exists()], inputs_uri)
    run = run_deployment(config.orchestrate.gpu_deployment, timeout=config.orchestrate.stage_timeout_s,
                         parameters={"stage_name": name, "params": params, "inputs_uri": inputs_uri, "outputs_uri": outputs_uri})
    if not run.state or not run.state.is_completed():
        raise RuntimeError(f"stage {name} on {config.orchestrate.gpu_deployment}: flow run {run.id} ended {run.state}")
    with_retries(download, config)(outputs_uri)
    get_run_logger().info("%s ran on %s; outputs fetched from %s", name, config.orchestrate.gpu_deployment, outputs_uri)
    return json.loads(Path(s.result).read_text())
