"""Prefect's retry condition: retry a task only for a transient fault
(instructflow.faults.is_transient: storage or network trouble, never bad data)."""

from __future__ import annotations

from instructflow.faults import is_transient


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry only transient faults."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we classify, not handle
        return is_transient(exc)
    return False
