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
from pathlib import Path

import torch

from ..config import Params
from ..context import StageContext
from ..data.formats import Demonstration
from ..data.suite.judge import judge
from ..data.suite.labelers import Labeler
from ..io import read_jsonl
from ..lm.encoding import encode_pair, pad
from ..lm.generation import generate
from ..lm.losses import LMLoss
from ..lm.modeling import MAX_LEN_KEY, add_residual_dropout, load_causal_lm, merged, position_limit
from ..lm.training import autocast, fit, save_model_atomic, trainable

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


def run_sft(ctx: StageContext) -> dict | None:
    params, cfg, base = ctx.params, ctx.params.sft, ctx.input("base")
    lm, tok = load_causal_lm(base, params.model.dtype)
    n_hooks = add_residual_dropout(lm, cfg.residual_dropout)
    lm, counts = trainable(lm, cfg, "causal_lm", params.model.gradient_checkpointing)
    train = read_jsonl(ctx.input("sft_train"), Demonstration)
    val = read_jsonl(ctx.input("sft_val"), Demonstration)
    max_len = min(cfg.max_len, position_limit(lm))
    train_ex = [encode_demonstration(tok, d, max_len) for d in train]
    val_ex = [encode_demonstration(tok, d, max_len) for d in val]

    done = fit(ctx, LMLoss(lm), cfg, train_ex, lambda xs: sft_batch(xs, tok.pad_token_id), sft_loss,
               rebuild=lambda: LMLoss(trainable(load_causal_lm(base, params.model.dtype)[0], cfg, "causal_lm", False)[0]),
               val_fn=lambda m: {"val_loss": round(validation_loss(m, val_ex, tok.pad_token_id), 5)},
               count_fn=lambda b: int(b["attention_mask"].sum()), size_fn=lambda e: len(e[0]), throughput="tokens_per_s")
    if done.model is None:  # the main process judges and saves
        return None
    lm = merged(done.model.lm)
    metrics = {**done.metrics, "residual_dropout_branches": n_hooks, **counts}
    if params.data.source == "builtin" and cfg.eval_prompts:
        with ctx.phase("judge"), autocast(params.model.mixed_precision, done.accelerator.device):
            metrics.update(compare_with_base(params, base, lm, tok, val[: cfg.eval_prompts]))
    log.info("sft: %s", metrics)
    with ctx.phase("save"):
        save_model_atomic(lm, tok, ctx.output("model"), {MAX_LEN_KEY: max_len})
    return metrics


def compare_with_base(params: Params, base_dir: Path, sft_model, tok, prompts: list[Demonstration]) -> dict:
    """The held-out labeler rates greedy answers of the base and SFT models."""
    heldout = Labeler(next(lab for lab in params.data.labelers if lab.heldout))
    base, base_tok = load_causal_lm(base_dir, params.model.dtype)
    base.to(next(sft_model.parameters()).device)
    texts = [p.prompt for p in prompts]
    result = {}
    for name, m, t in (("base", base, base_tok), ("sft", sft_model, tok)):
        responses = [r[0] for r in generate(m, t, texts, max_new_tokens=params.sft.max_new_tokens, greedy=True)]
        j = judge(heldout, prompts, responses, seed=params.project.seed)
        result[f"likert_{name}"] = j["likert"]
        result[f"likert_by_category_{name}"] = j["likert_by_category"]
    return result
