"""DVC for a Prefect run: record each finished stage in dvc.lock (`dvc commit`)
and push its outputs to the DVC remote (`dvc push`), so a fresh clone can
`dvc pull` what this run made. Pushes retry on transient storage faults."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from instructflow.io import crash_point

from .faults import retry_if_transient


def dvc_root(params_path: str | Path) -> Path | None:
    """The DVC project whose dvc.yaml reads this params file, or None."""
    path = Path(params_path).resolve()
    root = path.parent
    if path.name == "params.yaml" and (root / "dvc.yaml").exists() and (root / ".dvc").is_dir():
        return root
    return None


@task(retry_condition_fn=retry_if_transient)
def version_stage(stage: str, root: str, remote: str = "") -> dict:
    """dvc commit STAGE, then dvc push STAGE; returns how many files were pushed."""
    from dvc.repo import Repo

    with Repo(root) as repo:
        repo.commit(stage, force=True)
        crash_point("dvc_push")
        pushed = repo.push(targets=[stage], remote=remote or None)
    get_run_logger().info("%s: recorded in dvc.lock, %s file(s) pushed to %s", stage, pushed, remote or "the default remote")
    return {"stage": stage, "pushed": pushed}


@task(retry_condition_fn=retry_if_transient)
def pull_stages(stages: list[str], root: str, remote: str = "") -> int:
    """dvc pull the outputs of STAGES (as recorded in dvc.lock)."""
    from dvc.repo import Repo

    with Repo(root) as repo:
        stats = repo.pull(targets=stages, remote=remote or None, allow_missing=True)
    return int(stats.get("fetched", 0)) if isinstance(stats, dict) else 0
