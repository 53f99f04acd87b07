"""The `dpo` stage: direct preference optimization (Rafailov et al. 2023) from SFT,
on the comparisons the RM trains on; no reward model, no sampling.

The policy's implicit reward of a response is r(x, y) = beta * (log pi(y|x) - log pi_SFT(y|x)).
For a prompt whose K responses are ranked, the Plackett-Luce loss (the DPO
paper's eq. 18; `losses.plackett_luce_loss`) is

    loss(x) = -sum_{k<K} [ r(x, y_k) - log sum_{j>=k} exp r(x, y_j) ]

over the ranking y_1 > ... > y_K, one term per prompt; dpo.loss: pairwise takes
instead the RM's form, the mean over ranked pairs of -log sigmoid(r_w - r_l).
For K = 2 both are the DPO loss of the paper's eq. 7. The batch loss is the
mean over prompts.

log pi_SFT is computed once, before training, with the frozen SFT model; the
policy then runs every response of a batch joined to its prompt, with SFT's
encoding (prompt tokens masked), and dropout off (as in PPO).
Output: artifacts/dpo/model, a plain causal LM.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from ..context import StageContext
from ..data.formats import Comparison
from ..io import read_jsonl
from ..lm.encoding import encode_pair
from ..lm.losses import LMLoss, kwise_loss, plackett_luce_loss
from ..lm.modeling import MAX_LEN_KEY, disable_dropout, load_causal_lm, merged, position_limit
from ..lm.training import fit, save_model_atomic, trainable
from .reward import ranking_accuracy
from .sft import sft_batch

log = logging.getLogger(__name__)


@dataclass
class DPOExample:
    sequences: list[tuple[list[int], int]]  # per response: (prompt + response + EOS ids, prompt tokens)
    levels: list[int]                       # per response: its rank, 0 best (ties share one)
    pairs: list[tuple[int, int]]            # (winner, loser) indices
    ref_logps: list[float]                  # per response: log pi_SFT(y|x)


def rank_levels(c: Comparison) -> list[int]:
    """Each response's rank, 0 best: its place in `ranking`, or, with scores, the number of
    distinct higher scores (equal scores share a level)."""
    if c.ranking is not None:
        levels = [0] * c.k
        for place, i in enumerate(c.ranking):
            levels[i] = place
        return levels
    distinct = sorted(set(c.scores), reverse=True)
    return [distinct.index(s) for s in c.scores]


def collate_dpo(batch: list[DPOExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Every response of B comparisons as one right-padded SFT batch, plus owner, level,
    reference log-prob and pair tensors (pair_weight as in the RM: mean over prompts of the
    mean over each prompt's pairs)."""
    seqs, owner, levels, ref, win, lose, weight = [], [], [], [], [], [], []
    for b, ex in enumerate(batch):
        offset = len(seqs)
        seqs.extend(ex.sequences)
        owner.extend([b] * len(ex.sequences))
        levels.extend(ex.levels)
        ref.extend(ex.ref_logps)
        for w, l in ex.pairs:
            win.append(offset + w)
            lose.append(offset + l)
            weight.append(1.0 / (len(ex.pairs) * len(batch)))
    return {**sft_batch(seqs, pad_id), "owner": torch.tensor(owner), "levels": torch.tensor(levels),
            "ref_logps": torch.tensor(ref, dtype=torch.float32), "winners": torch.tensor(win, dtype=torch.long),
            "losers": torch.tensor(lose, dtype=torch.long), "pair_weight": torch.tensor(weight, dtype=torch.float32),
            "n_comparisons": torch.tensor(len(batch))}


def implicit_rewards(model: LMLoss, batch: dict[str, torch.Tensor], beta: float) -> torch.Tensor:
    """beta * (log pi(y|x) - log pi_SFT(y|x)) per response of a collated batch; (N,)."""
    logp = -model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], per_row=True)
    return beta * (logp.float() - batch["ref_logps"])


def dpo_loss(model: LMLoss, batch: dict[str, torch.Tensor], beta: float, kind: str) -> tuple[torch.Tensor, dict[str, float]]:
    r = implicit_rewards(model, batch, beta)
    if kind == "plackett_luce":
        loss = plackett_luce_loss(r, batch["owner"], batch["levels"], int(batch["n_comparisons"]))
    else:
        loss = kwise_loss(r, batch["winners"], batch["losers"], batch["pair_weight"])
    with torch.no_grad():
        margin = r[batch["winners"]] - r[batch["losers"]]
    return loss, {"accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean())}


@torch.no_grad()
def response_logps(model: LMLoss, examples: list[tuple[list[int], int]], pad_id: int, batch_size: int = 64) -> list[float]:
    """log p(response + EOS | prompt) of each encoded pair; batches of similar length."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    out = [0.0] * len(examples)
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        b = {k: v.to(device) for k, v in sft_batch([examples[j] for j in rows], pad_id).items()}
        for j, v in zip(rows, (-model(**b, per_row=True)).float().cpu().tolist(), strict=True):
            out[j] = v
    model.train(was)
    return out


def encode_comparisons(ref: LMLoss, tok, comparisons: list[Comparison], max_len: int) -> list[DPOExample]:
    """Each comparison's responses encoded as SFT encodes a demonstration, with SFT's log-probs."""
    seqs = [[encode_pair(tok, c.prompt, r, max_len) for r in c.responses] for c in comparisons]
    flat = [s for group in seqs for s in group]
    logps = response_logps(ref, flat, tok.pad_token_id)
    out, at = [], 0
    for c, group in zip(comparisons, seqs, strict=True):
        out.append(DPOExample(group, rank_levels(c), c.pairs(), logps[at : at + len(group)]))
        at += len(group)
    return out


@torch.no_grad()
def validate(model: LMLoss, examples: list[DPOExample], comparisons: list[Comparison], pad_id: int, beta: float,
             kind: str) -> dict[str, float]:
    """Validation loss and the implicit reward's ranking accuracy on the stated pairs (the RM's measure)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    losses, scores = [], []
    for i in range(0, len(examples), 16):
        chunk = examples[i : i + 16]
        b = {k: v.to(device) for k, v in collate_dpo(chunk, pad_id).items()}
        losses.append(float(dpo_loss(model, b, beta, kind)[0]) * len(chunk))
        r = implicit_rewards(model, b, beta).cpu().tolist()
        for ex in chunk:
            scores.append(r[: len(ex.levels)])
            r = r[len(ex.levels):]
    model.train(was)
    return {"val_loss": round(sum(losses) / max(len(examples), 1), 5),
            "val_accuracy": round(ranking_accuracy(scores, comparisons), 4)}


def run_dpo(ctx: StageContext) -> dict | None:
    params, cfg, sft_dir = ctx.params, ctx.params.dpo, ctx.input("sft")

    def build():
        lm, tok = load_causal_lm(sft_dir, params.model.dtype)
        disable_dropout(lm)
        return trainable(lm, cfg, "causal_lm", params.model.gradient_checkpointing), tok

    (lm, counts), tok = build()
    train = read_jsonl(ctx.input("comparisons_train"), Comparison)
    val = read_jsonl(ctx.input("comparisons_val"), Comparison)
    if cfg.max_comparisons and len(train) > cfg.max_comparisons:
        train = random.Random(params.project.seed).sample(train, cfg.max_comparisons)
    max_len = min(cfg.max_len, position_limit(lm))
    acc = ctx.accelerator(cfg.grad_accum)
    with ctx.phase("reference"):
        ref = LMLoss(load_causal_lm(sft_dir, params.model.dtype)[0]).to(acc.device).eval()
        train_ex = encode_comparisons(ref, tok, train, max_len)
        val_ex = encode_comparisons(ref, tok, val, max_len)
        del ref
    done = fit(ctx, LMLoss(lm), cfg, train_ex, lambda xs: collate_dpo(xs, tok.pad_token_id),
               lambda m, b: dpo_loss(m, b, cfg.beta, cfg.loss), rebuild=lambda: LMLoss(build()[0][0]), accelerator=acc,
               val_fn=lambda m: validate(m, val_ex, val, tok.pad_token_id, cfg.beta, cfg.loss),
               count_fn=lambda b: int(b["n_comparisons"]), size_fn=lambda e: max(len(s[0]) for s in e.sequences),
               throughput="comparisons_per_s")
    if done.model is None:
        return None
    metrics = {**done.metrics, "loss": cfg.loss, "beta": cfg.beta, "train_accuracy": done.loop.train_metrics.get("accuracy"),
               "train_comparisons": len(train), **counts}
    log.info("dpo: %s", metrics)
    with ctx.phase("save"):
        save_model_atomic(merged(done.model.lm), tok, ctx.output("model"), {MAX_LEN_KEY: max_len})
    return metrics
