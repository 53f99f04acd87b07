"""Stages on a micro config, through the real CLI, and the saved models through
plain transformers Auto classes."""
import gzip
import json
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
}


def _cli(*args, cwd):
    env = {**os.environ, "INSTRUCTFLOW_LOG": "WARNING"}
    proc = subprocess.run([sys.executable, "-m", "instructflow.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro")
    params = {**MICRO, "project": {"artifacts_dir": str(root / "artifacts"), "threads": 2}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    out = _cli("pipeline", "--params", "params.yaml", cwd=root)
    return root, out


def test_pipeline_writes_every_stage_with_a_result_record(micro_run):
    root, out = micro_run
    for stage in ("data", "pretrain", "sft", "collect", "reward"):
        rec = json.loads((root / "artifacts" / stage / "result.json").read_text())
        assert rec["stage"] == stage and rec["timings_s"]["total"] > 0
        assert all(len(v["sha256"]) == 64 for v in {**rec["inputs"], **rec["outputs"]}.values())
        assert stage in out
    sft = json.loads((root / "artifacts/sft/result.json").read_text())["metrics"]
    assert {"val_loss", "likert_base", "likert_sft"} <= sft.keys() and sft["residual_dropout_branches"] == 4
    coll = json.loads((root / "artifacts/collect/result.json").read_text())["metrics"]
    assert 0.5 <= coll["labeler_agreement"] <= 1
    rm = json.loads((root / "artifacts/reward/result.json").read_text())["metrics"]
    assert {"val_accuracy", "heldout_labeler_accuracy", "reward_bias"} <= rm.keys()
    log = [json.loads(x) for x in (root / "artifacts/sft/train_log.jsonl").read_text().splitlines()]
    assert log and all("loss" in row and "lr" in row for row in log)


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
    from instructflow.modeling import encode_prompt, encode_response
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


def test_empty_comparisons_file_is_a_clear_error(tmp_path):
    (tmp_path / "c.jsonl").write_text("")
    (tmp_path / "params.yaml").write_text("data: {source: files, comparisons: c.jsonl}\n")
    proc = subprocess.run([sys.executable, "-m", "instructflow.cli", "data", "build", "--params", "params.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "c.jsonl: no comparison records" in proc.stderr
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
    out = _cli("pipeline", "--params", "params.yaml", cwd=tmp_path)
    assert "collect" not in out
    rm = json.loads((tmp_path / "artifacts/reward/result.json").read_text())["metrics"]
    assert 0 <= rm["val_accuracy"] <= 1 and rm["train_comparisons"] > 150
