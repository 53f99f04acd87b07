"""Any Hugging Face causal LM through every stage: tiny random Llama, Qwen2 (with a ChatML
chat template and pad = EOS, as SmolLM2 and Qwen ship), Mistral, GPT-2 (learned positions,
no pad token) and GPT-NeoX, each built locally from its config, through SFT, collect, the
RM, export with its parity check, a PPO iteration, and the endpoint over HTTP."""
import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest
import torch
import yaml
from conftest import free_port, stop, wait_http
from test_stages import MICRO
from tiny import CHATML
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from instructflow.config import load_params
from instructflow.data.formats import PretrainText
from instructflow.io import read_jsonl
from instructflow.lm.modeling import load_reward_model, train_tokenizer
from instructflow.runner import run_stage

pytestmark = pytest.mark.slow
SHAPE = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 96,
         "max_position_embeddings": 160}


def _tokenizer(texts, kind: str):
    if kind == "gpt2":  # one special token that is EOS, BOS and unknown at once, and no pad token
        raw = Tokenizer(models.BPE())
        raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                       unk_token="<|endoftext|>")
    tok = train_tokenizer(texts, 400)
    if kind == "chatml":
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.eos_token, tok.pad_token, tok.unk_token = "<|im_end|>", "<|im_end|>", "<|endoftext|>"
        tok.chat_template = CHATML
    return tok


def _config(arch: str, tok):
    ids = {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    if arch == "gpt2":
        return GPT2Config(n_embd=48, n_layer=2, n_head=2, n_inner=96, n_positions=160, **ids)
    if arch == "gpt_neox":
        return GPTNeoXConfig(**SHAPE, rotary_pct=0.5, **ids)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    return cls(**SHAPE, num_key_value_heads=1, tie_word_embeddings=True, pad_token_id=tok.pad_token_id, **ids)


@pytest.fixture(scope="module")
def micro_data(tmp_path_factory):
    """The built-in suite's micro datasets, built and validated once."""
    root = tmp_path_factory.mktemp("arch-data")
    (root / "params.yaml").write_text(yaml.safe_dump({**MICRO, "project": {"artifacts_dir": str(root / "artifacts")}}))
    p = load_params(root / "params.yaml")
    for stage in ("data", "validate"):
        run_stage(stage, p)
    texts = [r.text for r in read_jsonl(root / "artifacts/data/pretrain_train.jsonl", PretrainText)]
    return root / "artifacts", texts


@pytest.mark.parametrize("arch, tokenizer", [("llama", "plain"), ("qwen2", "chatml"), ("mistral", "plain"),
                                             ("gpt2", "gpt2"), ("gpt_neox", "plain")])
def test_every_stage_runs_on_the_architecture(arch, tokenizer, micro_data, tmp_path, monkeypatch):
    data_dir, texts = micro_data
    monkeypatch.chdir(tmp_path)
    tok = _tokenizer(texts, tokenizer)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config(arch, tok)).save_pretrained("base")
    tok.save_pretrained("base")
    for stage in ("data", "validate"):
        shutil.copytree(data_dir / stage, tmp_path / "artifacts" / stage)
    params = {**MICRO, "project": {"artifacts_dir": "artifacts", "threads": 2}, "model": {"name_or_path": str(tmp_path / "base")},
              "sft": {**MICRO["sft"], "lr": 1e-3}, "reward": {**MICRO["reward"], "lr": 1e-3},
              "ppo": {**MICRO["ppo"], "iterations": 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    p = load_params("params.yaml")
    results = {s: run_stage(s, p)["metrics"] for s in ("pretrain", "sft", "collect", "reward", "export", "ppo")}
    assert results["export"]["parity_max_abs_diff"] < 1e-4
    assert results["reward"]["train_comparisons"] > 0 and results["ppo"]["iterations"] == 1
    saved = PreTrainedTokenizerFast.from_pretrained("artifacts/sft/model")
    assert saved.pad_token_id not in (None, saved.eos_token_id)
    if tokenizer == "chatml":  # the answers end with the template's end of turn
        assert saved.chat_template and saved.pad_token == "<|endoftext|>"

    # the export, served: a score over HTTP equals the torch RM's
    port = free_port()
    env = {**os.environ, "INSTRUCTFLOW_LOG": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "instructflow.cli", "serve", "--model", "artifacts/export", "--port", str(port),
                             "--insecure-no-auth"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", 60, proc)
        item = {"prompt": "Name a fruit.", "response": "An apple."}
        got = httpx.post(f"http://127.0.0.1:{port}/v1/score", json={"items": [item]}, timeout=30).json()["scores"][0]
    finally:
        stop(proc)
    from instructflow.stages.reward import score_texts

    rm, rm_tok = load_reward_model("artifacts/reward/model")
    want = float(score_texts(rm, rm_tok, [item["prompt"]], [item["response"]], 160)[0])
    assert got == pytest.approx(want, abs=1e-4)
    assert json.loads((tmp_path / "artifacts/export/rm/manifest.json").read_text())["max_length"] == 160
