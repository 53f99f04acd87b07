"""One Prefect task per stage, keyed on what the stage reads.

The cache key is `pipeline.stage_key`: the content hashes of the stage's
inputs, its params sections and the code version. A rerun with nothing
changed finds every key and shows the stages as Cached; a changed PPO
parameter changes the keys of ppo, ppo_ptx and eval only. The persisted
result is the stage's small result.json record (paths, hashes, metrics),
never a tensor.

Prefect's cache knows keys, not files: if the outputs on disk are not the ones
the key produced (deleted, edited, or overwritten by a run with other
params), the task is called with refresh_cache=True so it runs again and
replaces the cached record.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.tasks import exponential_backoff

from instructflow.cli import run_stage
from instructflow.config import Params, load_params
from instructflow.pipeline import outputs_current, stage_key

from .faults import retry_if_transient


def _cache_key(context, parameters: dict) -> str:
    return f"instructflow-{parameters['stage']}-{parameters['key']}"


@task(cache_key_fn=_cache_key, persist_result=True, result_serializer="json",
      retry_condition_fn=retry_if_transient, log_prints=True)
def stage_task(stage: str, params_path: str, key: str) -> dict:
    """Run one stage in this process; return its result record (small JSON).
    `key` is the stage's pipeline.stage_key, computed by `stage()`: the cache key."""
    result = run_stage(stage, Path(params_path))
    return {k: result[k] for k in ("stage", "run_key", "metrics", "outputs", "timings_s")}


def with_retries(t, params: Params, **options):
    """Task `t` with the params' retries (exponential backoff, jittered) and timeout."""
    o = params.orchestrate
    return t.with_options(retries=o.retries, retry_delay_seconds=exponential_backoff(o.retry_delay_s)(o.retries),
                          retry_jitter_factor=0.5, timeout_seconds=o.stage_timeout_s, **options)


def stage(name: str, params_path: str, params: Params | None = None, **call_options):
    """Run `stage_task` named after the stage, with the params' retries and
    timeout, forced to run when the outputs on disk do not match the key.
    `call_options` go to the task call (e.g. return_state=True)."""
    params = params or load_params(params_path)
    key = stage_key(params, name)
    current = outputs_current(params, name, key)
    t = with_retries(stage_task, params, name=name, task_run_name=name, refresh_cache=not current)
    return t(name, params_path, key, **call_options)
