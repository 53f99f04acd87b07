"""DVC for a Prefect run: write the dvc.yaml of each group of stages the run has
(instructflow/dvcfile.py says which file), record each finished stage in its
dvc.lock (`dvc commit`) and push its outputs to the DVC remote (`dvc push`), so
a fresh clone can `dvc pull` what this run made. Any params file inside the
DVC project is versioned, each configuration and group in its own dvc.yaml.
Pushes retry on transient storage faults."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from instructflow.config import Params
from instructflow.dvcfile import dvc_yaml_text, pipeline_file
from instructflow.io import atomic_path, crash_point

from .retries import retry_if_transient


def dvc_root(params_path: str | Path) -> Path | None:
    """The DVC project (the nearest folder above the params file holding .dvc/) that versions this run, or None."""
    path = Path(params_path).resolve()
    return next((d for d in path.parents if (d / ".dvc").is_dir()), None)


def dvc_files(params_path: str | Path, params: Params, groups: set[str]) -> dict[str, str]:
    """Write (when changed) the dvc.yaml of each group for this params file; group -> its path from the project root.
    Empty outside a DVC project."""
    root = dvc_root(params_path)
    if root is None:
        return {}
    rel = Path(params_path).resolve().relative_to(root).as_posix()
    files = {}
    for group in sorted(groups):
        target = root / pipeline_file(rel, group)
        text = dvc_yaml_text(params, rel, group, root=root)
        if not target.exists() or target.read_text() != text:
            with atomic_path(target) as tmp:
                tmp.write_text(text)
        files[group] = target.relative_to(root).as_posix()
    return files


@task(retry_condition_fn=retry_if_transient)
def version_stage(stage: str, root: str, dvc_file: str = "dvc.yaml", remote: str = "") -> dict:
    """dvc commit STAGE, then dvc push STAGE (the stage of `dvc_file`); returns how many files were pushed."""
    from dvc.repo import Repo

    target = f"{dvc_file}:{stage}"
    with Repo(root) as repo:
        repo.commit(target, force=True)
        crash_point("dvc_push")
        pushed = repo.push(targets=[target], remote=remote or None)
    lock = Path(dvc_file).with_suffix(".lock")
    get_run_logger().info("%s: recorded in %s, %s file(s) pushed to %s", stage, lock, pushed, remote or "the default remote")
    return {"stage": stage, "pushed": pushed}


@task(retry_condition_fn=retry_if_transient)
def pull_stages(stages: list[str], root: str, remote: str = "", dvc_file: str = "dvc.yaml") -> int:
    """dvc pull the outputs of STAGES of `dvc_file` (as recorded in its dvc.lock)."""
    from dvc.repo import Repo

    with Repo(root) as repo:
        stats = repo.pull(targets=[f"{dvc_file}:{s}" for s in stages], remote=remote or None, allow_missing=True)
    return int(stats.get("fetched", 0)) if isinstance(stats, dict) else 0
