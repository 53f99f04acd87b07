"""Stages on a micro config, through the real CLI, and the saved models through
plain transformers Auto classes."""
import gzip
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from instructflow.data.formats import Demonstration
from instructflow.io import read_jsonl

pytestmark = pytest.mark.slow

MICRO = {
    "model": {"tiny": {"vocab_size": 400, "hidden_size": 48, "intermediate_size": 96, "num_layers": 2, "num_heads": 2,
                       "max_position_embeddings": 160}},
    "data": {"sft_prompts": 160, "rm_prompts": 60, "ppo_prompts": 20, "eval_prompts": 40, "pretrain_docs": 400},
    "pretrain": {"epochs": 1, "batch_size": 16, "seq_len": 64, "log_every": 5},
    "sft": {"epochs": 1, "batch_size": 16, "eval_prompts": 16, "max_new_tokens": 12, "log_every": 5, "checkpoint_every": 4},
    "collect": {"k": 4, "candidates": 5, "max_new_tokens": 12, "agreement_prompts": 10},
    "reward": {"epochs": 1, "batch_size": 4, "log_every": 5},
    "ppo": {"iterations": 3, "batch_size": 8, "minibatch_size": 4, "max_new_tokens": 8, "ptx_batch_size": 2,
            "checkpoint_every": 1, "log_every": 1, "snapshot_every": 1},
    "eval": {"max_new_tokens": 8, "few_shot": 2, "bootstrap": 200},
    "best_of_n": {"n": 4},
    "methods": {"enabled": False, "overopt_prompts": 20},  # tests that run the methods' stages enable them
    "rounds": {"enabled": False, "prompts": 16},            # and the rounds'
}


def _cli(*args, cwd):
    env = {**os.environ, "INSTRUCTFLOW_LOG": "WARNING"}
    proc = subprocess.run([sys.executable, "-m", "instructflow.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro")
    params = {**MICRO, "project": {"artifacts_dir": str(root / "artifacts"), "threads": 2},
              "methods": {**MICRO["methods"], "enabled": True}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    out = _cli("run", "--params", "params.yaml", cwd=root)
    return root, out


def test_pipeline_writes_every_stage_with_a_result_record(micro_run):
    root, out = micro_run
    for stage in ("data", "pretrain", "sft", "collect", "reward", "export", "ppo", "ppo_ptx", "eval"):
        rec = json.loads((root / "artifacts" / stage / "result.json").read_text())
        assert rec["stage"] == stage and rec["timings_s"]["total"] > 0
        assert all(len(v["sha256"]) == 64 for v in {**rec["inputs"], **rec["outputs"]}.values())
        assert stage in out
    sft = json.loads((root / "artifacts/sft/result.json").read_text())["metrics"]
    assert {"val_loss", "likert_base", "likert_sft"} <= sft.keys() and sft["residual_dropout_branches"] == 4
    coll = json.loads((root / "artifacts/collect/result.json").read_text())["metrics"]
    assert 0 < coll["labeler_agreement"] <= 1  # 10 prompts of a micro model: a share, not a figure
    rm = json.loads((root / "artifacts/reward/result.json").read_text())["metrics"]
    assert {"val_accuracy", "heldout_labeler_accuracy", "reward_bias"} <= rm.keys()
    log = [json.loads(x) for x in (root / "artifacts/sft/train_log.jsonl").read_text().splitlines()]
    assert log and all("loss" in row and "lr" in row for row in log)
    for stage, ptx in (("ppo", 0.0), ("ppo_ptx", 1.0)):
        rows = [json.loads(x) for x in (root / "artifacts" / stage / "train_log.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in rows] == [1, 2, 3]
        assert {"score", "kl", "entropy", "clipfrac", "approx_kl", "value_loss", "ptx_loss", "response_length",
                "eos_rate", "beta"} <= rows[0].keys()
        assert (rows[-1]["ptx_loss"] > 0) == (ptx > 0)
    ev = json.loads((root / "artifacts/eval/metrics.json").read_text())
    for name in ("base_fewshot", "ppo", "ppo_ptx"):
        lo, hi = ev[f"win_rate_{name}_vs_sft_ci95_low"], ev[f"win_rate_{name}_vs_sft_ci95_high"]
        assert 0 <= lo <= ev[f"win_rate_{name}_vs_sft"] <= hi <= 1
    assert {"rm_val_accuracy", "labeler_agreement", "alignment_tax_ppo", "alignment_tax_ppo_ptx"} <= ev.keys()
    assert ev["models"]["sft"]["kl_to_sft"] == 0 and ev["alignment_tax_sft"] == 0
    for f in ("winrate.png", "ppo_curves.png", "samples.md"):
        assert (root / "artifacts/eval" / f).stat().st_size > 0
    assert "win rate vs SFT" in out  # the evaluation table


METHODS = ("reward_ensemble", "dpo", "best_of_n", "ppo_ensemble", "compare", "overoptimization")


def test_the_methods_stages_compare_every_method_with_the_judge(micro_run):
    root, out = micro_run
    assert not any((root / "artifacts" / m).exists() for m in METHODS)  # `instructflow run` runs the pipeline's
    assert sorted(p.name for p in (root / "artifacts/ppo/snapshots").iterdir()) == ["iteration_0001", "iteration_0002"]
    out = _cli("run", "--params", "params.yaml", "--stages", ",".join(METHODS), cwd=root)
    art = root / "artifacts"
    members = json.loads((art / "reward_ensemble/members.json").read_text())["members"]
    assert members == [str(art / "reward/model"), *(str(art / f"reward_ensemble/member_{i}/model") for i in (1, 2))]
    ens = json.loads((art / "reward_ensemble/result.json").read_text())["metrics"]
    assert len(ens["member_val_accuracies"]) == 3 and 0 <= ens["val_accuracy"] <= 1
    assert AutoModelForCausalLM.from_pretrained(art / "dpo/model").config.vocab_size == 400
    dpo_log = [json.loads(x) for x in (art / "dpo/train_log.jsonl").read_text().splitlines()]
    assert dpo_log and {"loss", "accuracy", "margin"} <= dpo_log[0].keys()
    samples = [json.loads(x) for x in (art / "best_of_n/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 40 and all(len(r["answers"]) == len(r["rm_scores"]) == 4 for r in samples)
    rows = [json.loads(x) for x in (art / "ppo_ensemble/train_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3] and all(r["reward_std"] > 0 for r in rows)
    cmp = json.loads((art / "compare/metrics.json").read_text())
    assert list(cmp["models"]) == ["base_fewshot", "sft", "best_of_n", "dpo", "ppo", "ppo_ptx", "ppo_ensemble"]
    ev = json.loads((art / "eval/metrics.json").read_text())
    assert cmp["models"]["ppo"] == ev["models"]["ppo"]  # eval's models keep their answers and figures
    for name in ("best_of_n", "dpo", "ppo_ensemble"):
        lo, hi = cmp["models"][name]["vs_sft"]["ci95"]
        assert 0 <= lo <= cmp[f"win_rate_{name}_vs_sft"] <= hi <= 1
    assert cmp["models"]["best_of_n"]["kl_to_sft"] == pytest.approx(math.log(4) - 0.75, abs=1e-4)
    over = json.loads((art / "overoptimization/metrics.json").read_text())
    assert [p["iteration"] for p in over["curves"]["ppo"]] == [0, 1, 2, 3] == [p["iteration"] for p in over["curves"]["ppo_ensemble"]]
    assert [p["n"] for p in over["curves"]["best_of_n"]] == [1, 2, 4] and over["curves"]["ppo"][0]["kl"] == 0
    assert {"peak_kl_ppo", "peak_win_rate_ppo_ensemble", "proxy_rose_after_peak_best_of_n"} <= over.keys()
    for f in ("compare/figure1.png", "overoptimization/overoptimization.png"):
        assert (art / f).stat().st_size > 1000
    assert "ppo_ensemble" in out and "best_of_n" in out


def test_saved_models_load_with_plain_transformers(micro_run):
    root, _ = micro_run
    tok = AutoTokenizer.from_pretrained(root / "artifacts/sft/model")
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    for stage in ("pretrain", "sft"):
        lm = AutoModelForCausalLM.from_pretrained(root / "artifacts" / stage / "model")
        assert lm(input_ids=torch.tensor([[5, 6, 7]])).logits.shape[-1] == len(tok)
    rm = AutoModelForSequenceClassification.from_pretrained(root / "artifacts/reward/model")
    assert rm.config.num_labels == 1 and isinstance(rm.config.reward_bias, float)
    # the saved bias centres the demonstrations: plain logits + config.reward_bias average to 0
    from instructflow.lm.encoding import encode_prompt, encode_response
    demos = read_jsonl(root / "artifacts/data/sft_train.jsonl", Demonstration)
    scores = []
    with torch.no_grad():
        for d in demos:
            ids = encode_prompt(tok, d.prompt) + encode_response(tok, d.response)
            scores.append(float(rm(input_ids=torch.tensor([ids[-160:]])).logits) + rm.config.reward_bias)
    assert abs(sum(scores) / len(scores)) < 1e-4


def test_bad_params_fail_with_the_key_named(micro_run, tmp_path):
    (tmp_path / "params.yaml").write_text("sft: {epochz: 3}\n")
    proc = subprocess.run([sys.executable, "-m", "instructflow.cli", "sft", "--params", "params.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown key 'sft.epochz'" in proc.stderr


def test_a_stage_whose_input_model_is_missing_names_the_folder(tmp_path):
    (tmp_path / "params.yaml").write_text("project: {artifacts_dir: artifacts}\n")
    proc = subprocess.run([sys.executable, "-m", "instructflow.cli", "ppo", "--params", "params.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "artifacts/sft/model: model folder not found (run the stage that writes it" in proc.stderr


def test_empty_comparisons_file_is_a_clear_error(tmp_path):
    (tmp_path / "c.jsonl").write_text("")
    (tmp_path / "params.yaml").write_text("data: {source: files, comparisons: c.jsonl}\n")
    proc = subprocess.run([sys.executable, "-m", "instructflow.cli", "data", "build", "--params", "params.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "c.jsonl: fails 'file has at least one record'" in proc.stderr and "no records" in proc.stderr
    assert not (tmp_path / "artifacts" / "data" / "sft_train.jsonl").exists()


def test_hh_rlhf_import_and_reward_training_end_to_end(shared_data, tmp_path):
    """Real data nobody here shaped: import, then pretrain -> SFT -> RM on a slice."""
    rows = [line for line, _ in zip(gzip.open(shared_data / "hh-rlhf-harmless-base-test.jsonl.gz", "rt"), range(240))]
    (tmp_path / "hh.jsonl").write_text("".join(rows))
    _cli("data", "import", "hh-rlhf", "hh.jsonl", "comparisons.jsonl", cwd=tmp_path)
    params = {**MICRO, "project": {"artifacts_dir": "artifacts"},
              "data": {"source": "files", "comparisons": "comparisons.jsonl"},
              "sft": {**MICRO["sft"], "max_len": 160}, "reward": {"epochs": 1, "batch_size": 8, "max_len": 160}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = _cli("run", "--params", "params.yaml", cwd=tmp_path)
    assert "collect" not in out
    rm = json.loads((tmp_path / "artifacts/reward/result.json").read_text())["metrics"]
    assert 0 <= rm["val_accuracy"] <= 1 and rm["train_comparisons"] > 150


def _ppo_workdir(micro_run, tmp_path, ppo_overrides: dict):
    """A fresh folder holding the micro run's data, SFT and RM, to run PPO in."""
    import shutil

    root, _ = micro_run
    for stage in ("data", "sft", "reward"):
        shutil.copytree(root / "artifacts" / stage, tmp_path / "artifacts" / stage)
    params = {**MICRO, "project": {"artifacts_dir": "artifacts", "threads": 1},
              "ppo": {**MICRO["ppo"], **ppo_overrides}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def _ppo_log(workdir, stage):
    rows = [json.loads(x) for x in (workdir / "artifacts" / stage / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_ppo_killed_with_sigkill_resumes_to_the_same_result(micro_run, tmp_path):
    import signal
    import time

    from safetensors.torch import load_file

    settings = {"iterations": 40, "checkpoint_every": 5, "ema_decay": 0.9}
    straight = _ppo_workdir(micro_run, tmp_path / "straight", settings)
    _cli("ppo-ptx", "--params", "params.yaml", cwd=straight)

    killed = _ppo_workdir(micro_run, tmp_path / "killed", settings)
    env = {**os.environ, "INSTRUCTFLOW_LOG": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "instructflow.cli", "ppo-ptx", "--params", "params.yaml"], cwd=killed,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "artifacts/ppo_ptx/checkpoint/trainer_state.json"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "artifacts/ppo_ptx/result.json").exists()
    at = json.loads(state.read_text())["iteration"]
    assert 0 < at < 40

    _cli("ppo-ptx", "--params", "params.yaml", cwd=killed)
    resumed = json.loads((killed / "artifacts/ppo_ptx/result.json").read_text())["metrics"]
    assert resumed["resumed_from_iteration"] >= at
    assert _ppo_log(killed, "ppo_ptx") == _ppo_log(straight, "ppo_ptx")
    a = load_file(straight / "artifacts/ppo_ptx/model/model.safetensors")
    b = load_file(killed / "artifacts/ppo_ptx/model/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ppo_runs_under_accelerate_with_two_processes(micro_run, tmp_path):
    work = _ppo_workdir(micro_run, tmp_path, {"iterations": 2, "batch_size": 8, "minibatch_size": 2})
    env = {**os.environ, "INSTRUCTFLOW_LOG": "WARNING", "OMP_NUM_THREADS": "1"}
    # accelerate 1.15 runs `--cpu --num_processes 2` as ONE process unless mpirun is set up; its torchrun
    # launcher (--multi_gpu) starts two, and on a host without a GPU they form a gloo group on CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "instructflow.cli", "ppo-ptx", "--params", "params.yaml"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((work / "artifacts/ppo_ptx/result.json").read_text())["metrics"]
    assert metrics["processes"] == 2 and metrics["rollouts"] == 16
    assert len(_ppo_log(work, "ppo_ptx")) == 2
    assert AutoModelForCausalLM.from_pretrained(work / "artifacts/ppo_ptx/model") is not None
