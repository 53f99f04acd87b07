"""Shared by the RM diagnostics (rm_without_prompt.py, rm_context_check.py): run
the real reward stage in a scratch folder on given comparison files."""

from __future__ import annotations

from pathlib import Path

from instructflow.config import Params, load_params
from instructflow.reward import run_reward


def run_reward_on(params_path: Path, init_from: Path, train: Path, val: Path, work: Path) -> tuple[Params, dict]:
    """Train the reward stage (params.yaml's `reward` section) from `init_from` on
    `train`, validate on `val`, writing under `work`; return the params it ran
    with and the stage's metrics. The model lands in `work / "reward" / "model"`."""
    artifacts = Path(load_params(params_path).project.artifacts_dir)
    (work / "data").symlink_to((artifacts / "data").resolve())  # the demonstrations the stage centres its bias on
    p = load_params(params_path, {"project.artifacts_dir": str(work), "reward.init_from": str(Path(init_from).resolve()),
                                  "reward.comparisons_train": str(Path(train).resolve()),
                                  "reward.comparisons_val": str(Path(val).resolve())})
    return p, run_reward(p)["metrics"]
