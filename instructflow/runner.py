"""Running one stage: the context it gets, the records it leaves.

`run_stage(name, params)` computes the stage's run key once, hands the stage's
function a `StageContext` (its inputs and outputs by name, the timer, the
accelerator, the run key), and writes the stage's records from the metrics
the function returns:

    artifacts/<stage>/result.json    metrics (with peak memory), content hashes of what it read
                                     and wrote, timings, the run key, the host
    artifacts/<stage>/figures.json   its headline figures, flat: what `dvc metrics show` prints

A stage's function builds data, models and losses and returns its metrics; it
never decides where a file is (the registry does) and never writes a record.
In a multi-process run (accelerate launch) only the main process returns
metrics; the others return None and write nothing.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from .config import Params
from .context import StageContext
from .io import content_hash, gpu_memory, write_json
from .registry import RunKey, resolve, run_key, spec

RUN_KEY_ENV = "INSTRUCTFLOW_RUN_KEY"  # the run key an orchestrator computed, for the stage process it starts


def run_stage(name: str, params: Params, key: RunKey | None = None) -> dict:
    """Run one stage in this process and write its records; returns its result record.
    `key`: the stage's run key when the caller has computed it already (Prefect's cache key; a stage
    process started by the Prefect task finds it in $INSTRUCTFLOW_RUN_KEY)."""
    from .lm.training import setup_runtime

    s = spec(params, name)
    ctx = StageContext(params, s, key or _given_key(name) or run_key(params, name))
    setup_runtime(params.project)
    metrics = resolve(s.stage.fn)(ctx)
    if metrics is None or not ctx.main_process:
        return {"stage": name, "metrics": {}, "timings_s": {"total": ctx.timer.total}, "main_process": False}
    return write_records(ctx, metrics)


def _given_key(name: str) -> RunKey | None:
    given = json.loads(os.environ.get(RUN_KEY_ENV) or "{}")
    return RunKey(given["key"], given["input_hashes"]) if given.get("stage") == name else None


def write_records(ctx: StageContext, metrics: dict) -> dict:
    """result.json (written last: it is what says the stage is done) and figures.json."""
    s = ctx.spec
    memory = {"peak_rss_mb": ctx.timer.memory.stop(), **{k: v for k, v in gpu_memory().items() if k != "gpu"}}
    metrics = {**metrics, **memory}
    record = {
        "stage": s.name,
        "run_key": ctx.run_key,
        "metrics": metrics,
        "inputs": {n: {"path": p, "sha256": ctx.key.input_hashes.get(p)} for n, p in s.inputs.items() if Path(p).exists()},
        "outputs": {n: {"path": p, "sha256": content_hash(p)} for n, p in s.outputs.items() if Path(p).exists()},
        "timings_s": {"total": ctx.timer.total, **ctx.timer.phases},
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                 **gpu_memory()},
    }
    write_json(s.figures, figures(metrics, s.stage.headline))
    write_json(s.result, record)
    return record


def figures(metrics: dict, headline: tuple[str, ...]) -> dict:
    """The headline figures that are numbers (DVC's metrics: no paths, hashes or nested records)."""
    return {k: metrics[k] for k in headline
            if isinstance(metrics.get(k), (int, float, bool)) and not isinstance(metrics.get(k), str)}


def outputs_current(params: Params, name: str, key: str) -> bool:
    """True when the stage's outputs on disk were produced under `key` and are
    unchanged since (their hashes match the result.json that recorded them)."""
    s = spec(params, name)
    path = Path(s.result)
    if not path.exists():
        return False
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    if result.get("run_key") != key:
        return False
    for out in result.get("outputs", {}).values():
        p = Path(out["path"])
        if not p.exists() or content_hash(p) != out["sha256"]:
            return False
    return all(Path(o).exists() for o in s.outs)
