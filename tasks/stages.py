"""One Prefect task per stage, keyed on what the stage reads.

The cache key is the stage's run key (`registry.run_key`): the content hashes
of the stage's inputs, its params sections and the code the stage runs,
computed once per stage run and handed to the stage. A rerun with nothing
changed finds every key and shows the stages as Cached; a changed PPO
parameter changes the keys of ppo, ppo_ptx and eval only. The persisted
result is the stage's small result.json record (paths, hashes, metrics),
never a tensor.

Prefect's cache knows keys, not files: if the outputs on disk are not the ones
the key produced (deleted, edited, or overwritten by a run with other
params), the task is called with refresh_cache=True so it runs again and
replaces the cached record.

Stages of one wave (instructflow.registry.stage_waves) run side by side, each in
a process of its own (`stage_process_task`), sharing the cache keys.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path

from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError
from prefect.tasks import exponential_backoff

from instructflow.config import Params
from instructflow.labeling.projects import LabelingPending
from instructflow.registry import RunKey, run_key, spec
from instructflow.runner import RUN_KEY_ENV, outputs_current, run_stage

from .retries import retry_if_transient


def summary(result: dict) -> dict:
    """The part of a stage's result.json record that Prefect persists."""
    return {k: result[k] for k in ("stage", "run_key", "metrics", "outputs", "timings_s")}


def _cache_key(context, parameters: dict) -> str:
    return f"instructflow-{parameters['stage']}-{parameters['key'].key}"


@task(cache_key_fn=_cache_key, persist_result=True, result_serializer="json",
      retry_condition_fn=retry_if_transient, log_prints=True)
def stage_task(stage: str, params: Params, key: RunKey) -> dict:
    """Run one stage in this process; return its result record (small JSON).
    `key` is the stage's run key, computed by `run_stage_task`: the cache key."""
    return summary(run_stage(stage, params, key))


@task(cache_key_fn=_cache_key, persist_result=True, result_serializer="json",
      retry_condition_fn=retry_if_transient, log_prints=True)
def stage_process_task(stage: str, params_path: str, params: Params, key: RunKey, threads: int,
                       processes: int = 1) -> dict:
    """Run one stage in a process of its own with `threads` CPU threads, so that the
    stages of a wave run side by side (torch's seeds and thread pool are per process);
    with `processes` > 1, in that many processes started by `accelerate launch` with
    orchestrate.accelerate_config (one per GPU on a GPU pod; FSDP2 by default).
    The process gets the run key computed here. Its log goes to artifacts/<stage>/stage.log;
    a failure raises with the log's end."""
    s = spec(params, stage)
    log_path = Path(s.folder) / "stage.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "instructflow.cli", *s.stage.command, "--params", params_path]
    if processes > 1:
        argv[1:1] = ["-m", "accelerate.commands.launch", "--config_file", params.orchestrate.accelerate_config,
                     "--num_processes", str(processes), "--num_machines", "1", "--main_process_port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1",
           RUN_KEY_ENV: json.dumps({"stage": stage, **asdict(key)})}
    print(f"{stage}: own process{'es' if processes > 1 else ''} ({processes}), {threads} thread(s) each, log {log_path}")
    proc = run_logged(argv, env, log_path, params.orchestrate.stage_timeout_s)
    if proc.returncode == LabelingPending.EXIT_CODE:  # the stage waits for people: not a failure to retry
        raise LabelingPending(log_path.read_text().strip().splitlines()[-1])
    if proc.returncode:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}); the end of {log_path}:\n{tail}")
    return summary(json.loads(Path(s.result).read_text()))


PROGRESS = re.compile(r" INFO instructflow\S*: .* \(\d+%, ")  # LoopLog.say's line: "sft step 50/510 (9%, ..."


def run_logged(argv: list[str], env: dict, log_path: Path, timeout_s: float) -> subprocess.CompletedProcess:
    """Run a stage process with its output in `log_path`; its progress lines (steps done, seconds per step,
    time left) go to the Prefect run's log too, so the run shows how far a long stage is."""
    try:
        logger = get_run_logger()
    except MissingContextError:  # called outside a flow (a test, a script): the progress goes to instructflow's log
        logger = logging.getLogger("instructflow")
    with log_path.open("w") as fh, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                                    text=True, errors="replace") as proc:
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            for line in proc.stdout:
                fh.write(line)
                if PROGRESS.search(line):
                    logger.info(line.split(": ", 1)[-1].rstrip())
        finally:
            timer.cancel()
        proc.wait()
    return subprocess.CompletedProcess(argv, proc.returncode)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_retries(t, params: Params, **options):
    """Task `t` with the params' retries (exponential backoff, jittered) and timeout."""
    o = params.orchestrate
    return t.with_options(retries=o.retries, retry_delay_seconds=exponential_backoff(o.retry_delay_s)(o.retries),
                          retry_jitter_factor=0.5, timeout_seconds=o.stage_timeout_s, **options)


def run_stage_task(name: str, params_path: str, params: Params, *, threads: int = 0, processes: int = 1,
                   label: str = "", **call_options):
    """Run stage `name` as a Prefect task named after it, with the params' retries and
    timeout, forced to run when the outputs on disk do not match the key (computed here, once).
    `call_options` go to the task call (e.g. return_state=True); `label` prefixes the task run's
    name (the seed of a `make methods` replicate).

    With `threads`, the stage runs in its own process (`stage_process_task`), or in
    `processes` of them, and this returns a future at once: the caller waits on it."""
    key = run_key(params, name)
    current = outputs_current(params, name, key.key)
    if threads:
        t = with_retries(stage_process_task, params, name=name, task_run_name=label + name, refresh_cache=not current)
        return t.submit(name, params_path, params, key, threads, processes)
    t = with_retries(stage_task, params, name=name, task_run_name=label + name, refresh_cache=not current)
    return t(name, params, key, **call_options)
