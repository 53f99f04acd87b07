"""The memory model (instructflow/lm/memory.py): architecture counts against real models, each part
against hand-computed values, and `instructflow plan` through its CLI. Its predictions against
measured peaks are bench/distributed.py's job (docs/results.md)."""
import subprocess
import sys

import pytest
import torch
from tiny import tiny_lm
from transformers import AutoModelForCausalLM, LlamaConfig

from instructflow.config import LoraConfig
from instructflow.lm.memory import MB, PRESETS, Shape, Workload, predict, trained_parameters
from instructflow.lm.modeling import add_lora, trainable_parameters


def _meta_count(config) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_architecture_counts_match_the_instantiated_models(name):
    config = LlamaConfig(**PRESETS[name])
    shape = Shape.of(config)
    assert shape.params == _meta_count(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert shape.layer_params == sum(p.numel() for p in model.model.layers[0].parameters())


def test_published_sizes():
    sizes = {name: Shape.preset(name).params for name in PRESETS}
    assert sizes["smollm2-135m"] == 134_515_008
    assert round(sizes["llama-3.2-1b"] / 1e9, 2) == 1.24
    assert round(sizes["llama-3.1-8b"] / 1e9, 2) == 8.03
    assert round(sizes["llama-3.1-70b"] / 1e9, 1) == 70.6


def test_lora_parameter_count_equals_peft():
    model, _ = tiny_lm()
    shape = Shape.of(model.config)
    peft_model = add_lora(model, LoraConfig(r=4), "causal_lm")
    assert trained_parameters(shape, Workload(stage="sft", lora_r=4)) == trainable_parameters(peft_model)[0]


SHAPE = Shape(params=1000 * MB // 4, layer_params=10 * MB // 4, embed_params=100 * MB // 4, layers=20, hidden=64,
              intermediate=128, kv_dim=32, vocab=1000)  # 1,000 MB of fp32 weights, 10 MB a layer, 100 MB embedding


def test_each_part_by_hand():
    w = Workload(stage="sft", batch=2, seq_len=8)
    layer_act = 16 * (8 * 64 + 3 * 32 + 4 * 128) * 4 / MB  # tokens x floats per token x 4 bytes
    logits = 3 * 16 * 1000 * 4 / MB
    trained = trained_parameters(SHAPE, w) * 4 / MB
    ddp = predict(SHAPE, w, "ddp", devices=4, runtime_mb=300)
    assert ddp["weights"] == pytest.approx(1000, abs=0.1)
    assert ddp["gradients"] == ddp["ddp_buckets"] == pytest.approx(trained, abs=0.1)
    assert ddp["optimizer"] == pytest.approx(2 * trained, abs=0.1)
    assert ddp["activations"] == pytest.approx(21 * layer_act, abs=0.1)  # 20 layers + the backward's working layer
    assert ddp["logits"] == pytest.approx(logits, abs=0.1)
    # activations and gradients peak at different moments of the backward pass: the larger counts
    assert ddp["embedding_gradient"] == pytest.approx(1000 * 64 * 4 / MB, abs=0.05)
    persistent = ddp["weights"] + ddp["ddp_buckets"] + ddp["optimizer"] + ddp["embedding_gradient"] + 300
    assert ddp["total"] == pytest.approx(persistent + max(ddp["gradients"], ddp["activations"] + ddp["logits"]), abs=0.2)

    fsdp = predict(SHAPE, w, "fsdp2", devices=4, runtime_mb=300)
    assert fsdp["weights"] == pytest.approx(250, abs=0.1)
    assert fsdp["gathered"] == pytest.approx(2 * 10 + 100, abs=0.1)  # two layers and the embedding group
    assert fsdp["optimizer"] == pytest.approx(2 * trained / 4, abs=0.1) and "ddp_buckets" not in fsdp
    offload = predict(SHAPE, w, "fsdp2-offload", devices=4, runtime_mb=300)
    assert offload["weights"] == offload["gradients"] == offload["optimizer"] == 0
    assert offload["total"] < fsdp["total"] < ddp["total"]
    one = predict(SHAPE, w, "ddp", devices=1)
    assert "ddp_buckets" not in one


def test_gradient_checkpointing_keeps_one_hidden_vector_per_layer():
    w = Workload(stage="sft", batch=2, seq_len=8, gradient_checkpointing=True)
    layer_act = 16 * (8 * 64 + 3 * 32 + 4 * 128) * 4 / MB
    got = predict(SHAPE, w)["activations"]
    assert got == pytest.approx(20 * 16 * 64 * 4 / MB + 2 * layer_act, abs=0.1)


def test_reward_rows_are_responses_on_their_prompts_cache_or_joined_to_their_prompt():
    layer = (8 * 64 + 3 * 32 + 4 * 128) * 4 / MB  # per token
    cached = predict(SHAPE, Workload(stage="reward", batch=2, seq_len=8, responses=4), "ddp")["activations"]
    assert cached == pytest.approx(21 * 2 * (1 + 4) * 8 * layer, abs=0.1)  # 2 prompts + 8 responses of <= 8 tokens
    joined = predict(SHAPE, Workload(stage="reward", batch=2, seq_len=8, responses=4), "fsdp2", devices=2)["activations"]
    assert joined == pytest.approx(21 * 2 * 4 * 16 * layer, abs=0.1)  # 8 rows of prompt + response


def test_ppo_holds_two_trained_and_two_frozen_models_and_lora_drops_the_reference():
    w = Workload(stage="ppo", batch=2, seq_len=16, prompt_len=8, rollout_batch=4)
    full = predict(SHAPE, w, "fsdp2", devices=2)
    assert full["weights"] == pytest.approx(2 * 1000 / 2, abs=0.5) and full["frozen"] == pytest.approx(2000, abs=0.1)
    assert full["kv_cache"] == pytest.approx(4 * 16 * 2 * 20 * 32 * 4 / MB, abs=0.05)  # parts are rounded to 0.1 MB
    lora = predict(SHAPE, Workload(stage="ppo", batch=2, seq_len=16, prompt_len=8, lora_r=8), "fsdp2", devices=2)
    assert lora["frozen"] == pytest.approx(1000, abs=0.1)  # the reference is the policy with its adapters off


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "instructflow.cli", "plan", *args], capture_output=True, text=True, timeout=120)


def test_plan_command(tmp_path):
    out = _plan("--params", "params.yaml", "--devices", "2")
    assert out.returncode == 0, out.stderr
    assert "ppo" in out.stdout and "fsdp2-offload" in out.stdout and "GB per device" in out.stdout
    big = _plan("--model", "llama-3.1-70b", "--devices", "16")
    assert big.returncode == 0 and "70.554B parameters" in big.stdout
    table = _plan("--params", "params.yaml", "--table")
    assert table.returncode == 0 and table.stdout.count("llama-3.1-70b") == 12 and "(no)" in table.stdout
    bad = _plan("--model", str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: plan:") and "Traceback" not in bad.stderr
