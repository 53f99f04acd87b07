"""The `pretrain` stage: the base model.

With model.name_or_path = 'builtin:tiny-llama' it trains a BPE tokenizer on
the corpus (and the instruction data, so instruction words get tokens), builds
a tiny Llama and pretrains it on packed blocks of the corpus. Any other value
is loaded as a Hugging Face causal LM (path or hub id) and saved as the base
model (continued pretraining only with pretrain.train_external).
Output: artifacts/pretrain/model (save_pretrained, safetensors).
"""

from __future__ import annotations

import logging
import math

import torch

from ..context import StageContext
from ..data.formats import Demonstration, PretrainText
from ..io import read_jsonl
from ..lm.encoding import format_prompt, pack
from ..lm.losses import LMLoss
from ..lm.modeling import BUILTIN, build_tiny_llama, load_causal_lm, position_limit, train_tokenizer
from ..lm.training import autocast, fit, save_model_atomic

log = logging.getLogger(__name__)


@torch.no_grad()
def heldout_loss(model, blocks: list[torch.Tensor], batch_size: int = 32) -> float:
    """Token-weighted mean loss on held-out blocks (the alignment-tax measure)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_of = LMLoss(model)
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = torch.stack(blocks[i : i + batch_size]).to(device)
        loss = loss_of(input_ids=x, labels=x)
        n = x.numel() - x.size(0)
        total, count = total + float(loss) * n, count + n
    model.train(was)
    return total / max(count, 1)


def run_pretrain(ctx: StageContext) -> dict:
    params, cfg = ctx.params, ctx.params.pretrain
    texts = [r.text for r in read_jsonl(ctx.input("pretrain_train"), PretrainText)]
    heldout = [r.text for r in read_jsonl(ctx.input("pretrain_heldout"), PretrainText)]
    builtin = params.model.name_or_path == BUILTIN
    with ctx.phase("build"):
        if builtin:
            demos = read_jsonl(ctx.input("sft_train"), Demonstration)
            tok = train_tokenizer(texts + [f"{format_prompt(d.prompt)} {d.response}" for d in demos], params.model.tiny.vocab_size)
            model = build_tiny_llama(tok, params.model.tiny, params.project.seed)
        else:
            model, tok = load_causal_lm(params.model.name_or_path, params.model.dtype)
    n_params = sum(p.numel() for p in model.parameters())
    seq_len = min(cfg.seq_len, position_limit(model))
    blocks, held = pack(tok, texts, seq_len), pack(tok, heldout, seq_len)
    metrics: dict = {"params": n_params, "train_tokens": len(blocks) * seq_len, "builtin": builtin}
    if builtin or cfg.train_external:
        loss_fn = lambda m, b: (m(input_ids=b["input_ids"], labels=b["input_ids"]), {})  # noqa: E731
        done = fit(ctx, LMLoss(model), cfg, blocks, lambda xs: {"input_ids": torch.stack(xs)}, loss_fn,
                   rebuild=lambda: LMLoss(type(model)(model.config)), count_fn=lambda b: b["input_ids"].numel(),
                   throughput="tokens_per_s")
        if done.model is None:
            return None
        model = done.model.lm
        metrics.update({k: done.metrics[k] for k in ("steps", "train_loss", "tokens_per_s")})
    with ctx.phase("eval"), autocast(params.model.mixed_precision, next(model.parameters()).device):
        loss = heldout_loss(model, held)
    metrics.update(heldout_loss=round(loss, 5), heldout_ppl=round(math.exp(loss), 3))
    log.info("pretrain: %s", metrics)
    with ctx.phase("save"):
        save_model_atomic(model, tok, ctx.output("model"))
    return metrics
