"""Sharded training on CPU: FSDP2 (torch's `fully_shard`) through accelerate, in 2 gloo processes.

The stages run through their real CLI under `accelerate launch --config_file
infra/accelerate/fsdp2.yaml` (and plain `torchrun` for the two-"node" run), and their
weights are compared with a reference run:

- SFT and the RM against ONE process with the same global batch (2 processes x grad_accum 1
  against 1 process x grad_accum 2: the same micro-batches in each optimizer step);
- PPO against DDP on 2 processes: PPO's rollouts are drawn per process (seeded by rank),
  so its one-process run samples other answers; DDP is the unsharded run with the same ones.

Tolerances: SFT and PPO differ from their reference only in the order fp32 gradients are
summed (reduce-scatter across processes against accumulation in one), about 1e-7 relative
per step; after these few Adam steps 1e-6 absolute bounds it (measured: 0 and 6e-8). The
sharded RM also computes each response joined to its prompt instead of on the prompt's KV
cache (reward.comparison_rewards), the same rewards to about 1e-6; over 7 Adam steps at
lr 1e-4 that moves weights by at most 2e-4 (measured: 4e-5). Residual dropout is off: each
process draws its own dropout masks, so with it on the runs would differ by design.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import free_port
from safetensors.torch import load_file
from test_stages import MICRO
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
FSDP2 = REPO / "infra/accelerate/fsdp2.yaml"
DDP = REPO / "infra/accelerate/ddp.yaml"
# what `accelerate launch --config_file infra/accelerate/fsdp2.yaml` puts in the environment,
# for launching with plain torchrun
FSDP2_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
             "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}
SETTINGS = {"sft": {"residual_dropout": 0.0, "eval_prompts": 4}, "reward": {}, "ppo": {"iterations": 2}}
KILL_TIMEOUT_S = 60  # a run with a dead rank must exit within this


def _params(root: Path, accum: int, **extra) -> Path:
    """The micro config with dropout off; grad_accum `accum` for SFT and the RM."""
    params = {**MICRO, "project": {"artifacts_dir": "artifacts", "threads": 1}}
    for section, values in SETTINGS.items():
        params[section] = {**MICRO[section], **values, **({"grad_accum": accum} if section != "ppo" else {})}
    for section, values in extra.items():
        params[section] = {**params.get(section, {}), **values}
    path = root / f"params-{accum}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _env(**extra) -> dict:
    return {**os.environ, "INSTRUCTFLOW_LOG": "WARNING", "OMP_NUM_THREADS": "1", **extra}


def _launch(config: Path, stage: str, params: Path, cwd: Path, check: bool = True, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port", str(port),
           "-m", "instructflow.cli", stage, "--params", params.name]
    proc = subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _cli(*args, cwd, params: Path):
    proc = subprocess.run([sys.executable, "-m", "instructflow.cli", *args, "--params", params.name], cwd=cwd,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _workdir(base: Path, dest: Path, stages: tuple[str, ...]) -> Path:
    for stage in stages:
        shutil.copytree(base / "artifacts" / stage, dest / "artifacts" / stage)
    return dest


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _metrics(workdir: Path, stage: str) -> dict:
    return json.loads((workdir / "artifacts" / stage / "result.json").read_text())["metrics"]


def _log(workdir: Path, stage: str, key: str) -> list[float]:
    return [json.loads(x)[key] for x in (workdir / "artifacts" / stage / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """data, pretrain, and the one-process references: SFT and the RM with grad_accum 2."""
    root = tmp_path_factory.mktemp("distributed")
    params = _params(root, accum=2)
    _cli("run", "--stages", "data,pretrain,sft,collect,reward", cwd=root, params=params)
    return root


def test_fsdp2_sft_ends_with_the_weights_of_one_process_with_the_same_global_batch(base, tmp_path):
    work = _workdir(base, tmp_path, ("data", "pretrain"))
    _launch(FSDP2, "sft", _params(work, accum=1), work)
    metrics = _metrics(work, "sft")
    assert metrics["processes"] == 2 and metrics["distributed"] == "fsdp"
    assert len(metrics["peak_rss_mb_per_process"]) == 2
    assert _max_diff(_weights(work / "artifacts/sft/model"), _weights(base / "artifacts/sft/model")) <= 1e-6
    assert _log(work, "sft", "loss") == pytest.approx(_log(base, "sft", "loss"), abs=1e-5)  # rows average both processes
    assert metrics["steps"] == _metrics(base, "sft")["steps"]
    # resumable state is sharded (torch.distributed.checkpoint: one file per process); the model is one plain folder
    ckpt = work / "artifacts/sft/checkpoint"
    assert len(list((ckpt / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    assert len(list((ckpt / "optimizer_0").glob("*.distcp"))) == 2
    assert AutoModelForCausalLM.from_pretrained(work / "artifacts/sft/model") is not None


def test_fsdp2_reward_model_ends_with_the_weights_of_one_process(base, tmp_path):
    work = _workdir(base, tmp_path, ("data", "sft", "collect"))
    _launch(FSDP2, "reward", _params(work, accum=1), work)
    assert _metrics(work, "reward")["distributed"] == "fsdp"
    assert _max_diff(_weights(work / "artifacts/reward/model"), _weights(base / "artifacts/reward/model")) <= 2e-4
    assert _log(work, "reward", "loss") == pytest.approx(_log(base, "reward", "loss"), abs=1e-4)
    assert AutoModelForSequenceClassification.from_pretrained(work / "artifacts/reward/model").config.num_labels == 1


def test_fsdp2_ppo_ends_with_the_weights_of_ddp_on_the_same_rollouts(base, tmp_path):
    runs = {}
    for name, config in (("fsdp", FSDP2), ("multi_cpu", DDP)):
        work = _workdir(base, tmp_path / name, ("data", "sft", "reward"))
        _launch(config, "ppo", _params(work, accum=1), work)
        assert _metrics(work, "ppo")["distributed"] == name
        runs[name] = work
    for model in ("model", "value_model"):
        a, b = (_weights(runs[n] / "artifacts/ppo" / model) for n in ("fsdp", "multi_cpu"))
        assert _max_diff(a, b) <= 1e-6, model
    for key in ("score", "kl", "pg_loss", "value_loss"):
        assert _log(runs["fsdp"], "ppo", key) == pytest.approx(_log(runs["multi_cpu"], "ppo", key), abs=1e-4)


def test_two_nodes_by_torchrun_c10d_rendezvous_run_sft_and_ppo(base, tmp_path):
    """Two torchrun agents of one process each, meeting at a c10d rendezvous: the code path of a
    two-node job (each 'node' here shares this machine's disk, as real nodes share the artifacts'
    volume). SFT on two nodes ends where one process with the same global batch ends."""
    work = _workdir(base, tmp_path, ("data", "pretrain", "reward"))
    params = _params(work, accum=1)
    for stage in ("sft", "ppo"):
        port = free_port()
        nodes = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test-{stage}",
             "-m", "instructflow.cli", stage, "--params", params.name],
            cwd=work, env=_env(**FSDP2_ENV), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
        outputs = [n.communicate(timeout=600)[0] for n in nodes]
        assert all(n.returncode == 0 for n in nodes), "\n".join(o[-3000:] for o in outputs)
        metrics = _metrics(work, stage)
        assert metrics["processes"] == 2 and metrics["distributed"] == "fsdp"
    assert _max_diff(_weights(work / "artifacts/sft/model"), _weights(base / "artifacts/sft/model")) <= 1e-6
    assert AutoModelForCausalLM.from_pretrained(work / "artifacts/ppo/model") is not None


def test_a_rank_killed_with_sigkill_fails_the_job_and_the_rerun_resumes_to_the_same_weights(base, tmp_path):
    longer = {"sft": {"batch_size": 4, "checkpoint_every": 3, "log_every": 1}}
    straight = _workdir(base, tmp_path / "straight", ("data", "pretrain"))
    _launch(FSDP2, "sft", _params(straight, accum=1, **longer), straight)

    killed = _workdir(base, tmp_path / "killed", ("data", "pretrain"))
    params = _params(killed, accum=1, **longer)
    t0 = time.monotonic()
    # rank 1 SIGKILLs itself at its 7th step, after the checkpoint of step 6; rank 0 is then
    # waiting in a collective, and the launcher must end it
    proc = _launch(FSDP2, "sft", params, killed, check=False, env=_env(INSTRUCTFLOW_CRASH_AT="step:sft#7@rank1"),
                   timeout=KILL_TIMEOUT_S + 60)
    assert time.monotonic() - t0 < KILL_TIMEOUT_S + 30  # launch and training take ~10 s of it
    assert proc.returncode != 0
    assert f"exitcode  : -{int(signal.SIGKILL)}" in proc.stderr  # the launcher names the killed rank
    assert not (killed / "artifacts/sft/result.json").exists()
    state = json.loads((killed / "artifacts/sft/checkpoint/trainer_state.json").read_text())
    assert state["step"] == 6

    _launch(FSDP2, "sft", params, killed)
    assert _metrics(killed, "sft")["resumed_from_step"] == 6
    assert _max_diff(_weights(killed / "artifacts/sft/model"), _weights(straight / "artifacts/sft/model")) == 0.0
    assert _log(killed, "sft", "loss") == _log(straight, "sft", "loss")


def test_a_stage_on_a_pod_with_several_devices_runs_under_accelerate_launch_on_all_of_them(base, tmp_path, monkeypatch):
    """What the GPU pool's stage flow does on a pod with 2 GPUs (flows/gpu_stage.py): the stage's
    Prefect task launches it with orchestrate.accelerate_config on 2 processes."""
    from instructflow.config import load_params
    from instructflow.registry import run_key
    from tasks.stages import stage_process_task

    work = _workdir(base, tmp_path, ("data", "pretrain"))
    params = _params(work, accum=1, orchestrate={"accelerate_config": str(FSDP2)})
    monkeypatch.chdir(work)
    config = load_params(params.name)
    record = stage_process_task.fn("sft", params.name, config, run_key(config, "sft"), threads=1, processes=2)
    assert record["metrics"]["processes"] == 2 and record["metrics"]["distributed"] == "fsdp"
    assert _max_diff(_weights(work / "artifacts/sft/model"), _weights(base / "artifacts/sft/model")) <= 1e-6
