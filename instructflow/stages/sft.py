"""The `sft` stage: supervised fine-tuning on demonstrations.

Loss on response tokens only (prompt tokens are masked with -100), residual
dropout on every attention and MLP branch (paper: 0.2), warmup + cosine decay,
validation loss each epoch. On the built-in suite the held-out labeler then
rates greedy answers of the base model and of the SFT model to validation
prompts, so every run shows whether SFT helped.
Output: artifacts/sft/model.
"""

from __future__ import annotations

import logging

import torch

from ..config import Params
from ..data.formats import Demonstration
from ..lm.encoding import encode_pair, pad
from ..lm.generation import generate
from ..io import StageTimer, helper_result, read_jsonl, write_result
from ..data.suite.judge import judge
from ..lm.losses import LMLoss
from ..lm.modeling import (
    MAX_LEN_KEY,
    add_residual_dropout,
    load_causal_lm,
    make_trainable,
    merged,
    position_limit,
    trainable_parameters,
)
from ..data.suite.labelers import Labeler
from ..lm.training import (
    autocast,
    enable_gradient_checkpointing,
    make_accelerator,
    processes_report,
    save_model_atomic,
    setup_runtime,
    train_loop,
    trained_model,
)

log = logging.getLogger(__name__)


def encode_demonstration(tokenizer, d: Demonstration, max_len: int) -> tuple[list[int], int]:
    """(token ids of prompt + response + EOS, number of prompt tokens)."""
    return encode_pair(tokenizer, d.prompt, d.response, max_len)


def sft_batch(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 on prompt tokens and padding."""
    ids, mask = pad([e[0] for e in examples], pad_id)
    labels = ids.clone()
    for i, (_, n_prompt) in enumerate(examples):
        labels[i, :n_prompt] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sft_loss(model: LMLoss, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token loss on the response tokens (`model` is the LM inside an LMLoss)."""
    return model(**batch), {}


@torch.no_grad()
def validation_loss(model: LMLoss, examples, pad_id: int, batch_size: int = 64) -> float:
    """Response-token-weighted mean loss."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = {k: v.to(device) for k, v in sft_batch(examples[i : i + batch_size], pad_id).items()}
        n = int((b["labels"][:, 1:] != -100).sum())
        total += float(sft_loss(model, b)[0]) * n
        count += n
    model.train(was)
    return total / max(count, 1)


def run_sft(params: Params, key: str = "") -> dict:
    setup_runtime(params.project)
    cfg, data_dir, out = params.sft, params.stage_dir("data"), params.stage_dir("sft")
    base_dir = params.stage_dir("pretrain") / "model"
    out.mkdir(parents=True, exist_ok=True)
    timer = StageTimer()
    lm, tok = load_causal_lm(base_dir, params.model.dtype)
    n_hooks = add_residual_dropout(lm, cfg.residual_dropout)
    if params.model.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    lm = make_trainable(lm, cfg.lora, "causal_lm", cfg.train_top_layers)
    trainable, total = trainable_parameters(lm)
    train = read_jsonl(data_dir / "sft_train.jsonl", Demonstration)
    val = read_jsonl(data_dir / "sft_val.jsonl", Demonstration)
    max_len = min(cfg.max_len, position_limit(lm))
    train_ex = [encode_demonstration(tok, d, max_len) for d in train]
    val_ex = [encode_demonstration(tok, d, max_len) for d in val]

    acc = make_accelerator(params.project, cfg.grad_accum, params.model.mixed_precision, out / "trackers", "sft")
    model = LMLoss(lm).to(acc.device)
    with timer.phase("train"):
        res = train_loop(
            name="sft", model=model, examples=train_ex, collate=lambda xs: sft_batch(xs, tok.pad_token_id),
            loss_fn=sft_loss, cfg=cfg, out_dir=out, accelerator=acc, seed=params.project.seed,
            val_fn=lambda m: {"val_loss": round(validation_loss(m, val_ex, tok.pad_token_id), 5)},
            count_fn=lambda b: int(b["attention_mask"].sum()), size_fn=lambda e: len(e[0]), run_key=key,
        )
    ran = processes_report(acc, timer)
    trained = trained_model(acc, model, lambda: LMLoss(make_trainable(load_causal_lm(base_dir, params.model.dtype)[0], cfg.lora,
                                                                      "causal_lm", cfg.train_top_layers)))
    if not acc.is_main_process:  # the main process judges and saves
        return helper_result("sft", timer)
    lm = merged(trained.lm)
    metrics = {**ran, "steps": res.steps, "train_loss": res.train_metrics.get("loss"), **res.val_metrics,
               "tokens_per_s": res.items_per_s, "residual_dropout_branches": n_hooks, "resumed_from_step": res.resumed_from_step,
               "trainable_parameters": trainable, "parameters": total}

    if params.data.source == "builtin" and cfg.eval_prompts:
        with timer.phase("judge"), autocast(params.model.mixed_precision, acc.device):
            metrics.update(compare_with_base(params, lm, tok, val[: cfg.eval_prompts]))
    log.info("sft: %s", metrics)
    with timer.phase("save"):
        save_model_atomic(lm, tok, out / "model", {MAX_LEN_KEY: max_len})
    inputs = {"base_model": base_dir, "train": data_dir / "sft_train.jsonl", "val": data_dir / "sft_val.jsonl"}
    return write_result(out, "sft", inputs, {"model": out / "model"}, metrics, timer, run_key=key)


def compare_with_base(params: Params, sft_model, tok, prompts: list[Demonstration]) -> dict:
    """The held-out labeler rates greedy answers of the base and SFT models."""
    heldout = Labeler(next(lab for lab in params.data.labelers if lab.heldout))
    base, base_tok = load_causal_lm(params.stage_dir("pretrain") / "model", params.model.dtype)
    base.to(next(sft_model.parameters()).device)
    texts = [p.prompt for p in prompts]
    result = {}
    for name, m, t in (("base", base, base_tok), ("sft", sft_model, tok)):
        responses = [r[0] for r in generate(m, t, texts, max_new_tokens=params.sft.max_new_tokens, greedy=True)]
        j = judge(heldout, prompts, responses, seed=params.project.seed)
        result[f"likert_{name}"] = j["likert"]
        result[f"likert_by_category_{name}"] = j["likert_by_category"]
    return result
