"""The `reward` stage: the reward model, trained on K-wise rankings.

The RM is the SFT model with its unembedding replaced by a scalar head that
reads the last non-pad token (the EOS that ends the response); it is saved as
a plain `AutoModelForSequenceClassification` with num_labels=1.

Loss (Ouyang et al. 2022, eq. 1), for one prompt x with K ranked responses:

    loss(x) = -1/C(K,2) * sum over pairs (y_w better than y_l) of log sigmoid(r(x, y_w) - r(x, y_l))

All C(K,2) pairs of a prompt live in ONE batch element: the K responses are
scored with K forward passes and every pair reuses those K scores (pairs
would need 2*C(K,2)). The K passes share their prompt: it is computed once and
its KV cache extended by each response (`shared_prompt_reward_scores`), which
halves the RM's training time here and changes no value or gradient. With
per-response scores and ties, tied pairs state no preference and the
normaliser is the number of strict pairs. The batch loss is the mean over
prompts.

After training, the bias b = -mean r(x, y_demo) over the labelers'
demonstrations is stored in the model's config (`reward_bias`) so the
demonstrations score 0 on average before RL.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..context import StageContext
from ..data.formats import Comparison, Demonstration
from ..io import read_jsonl
from ..lm.encoding import encode_pair, encode_prompt, encode_response, pad
from ..lm.losses import kwise_loss
from ..lm.modeling import (
    MAX_LEN_KEY,
    REWARD_BIAS_KEY,
    is_fsdp,
    load_reward_model,
    merged,
    position_limit,
    reward_scores,
    shared_prompt_reward_scores,
    trainable_parameters,
    unwrap,
)
from ..lm.training import autocast, fit, save_model_atomic, trainable

log = logging.getLogger(__name__)


@dataclass
class EncodedComparison:
    prompt: list[int]                 # the rendered prompt's tokens, shared by the K responses
    responses: list[list[int]]        # K token lists: response_k + EOS
    pairs: list[tuple[int, int]]      # (winner, loser) indices into responses

    @property
    def sequences(self) -> list[list[int]]:
        """The K full sequences prompt + response_k that the RM scores."""
        return [self.prompt + r for r in self.responses]


def encode_comparison(tokenizer, c: Comparison, max_len: int) -> EncodedComparison:
    """Truncation as `join_truncated`, with one prompt cut for all K responses: each
    response keeps at most max_len - 1 tokens, and the prompt is cut from the left
    to fit beside the longest of them (keeping at least its last token)."""
    responses = [encode_response(tokenizer, r)[: max_len - 1] for r in c.responses]
    prompt = encode_prompt(tokenizer, c.prompt)
    keep = max(1, min(len(prompt), max_len - max(len(r) for r in responses)))
    return EncodedComparison(prompt[-keep:], responses, c.pairs())


def padded_size(c: EncodedComparison) -> tuple[int, int]:
    """What a comparison's padding in a batch depends on: its longest response (every
    response row is as wide as the batch's longest), then its prompt."""
    return max(len(r) for r in c.responses), len(c.prompt)


def collate_comparisons(batch: list[EncodedComparison], pad_id: int) -> dict[str, torch.Tensor]:
    """B comparisons as B left-padded prompts and sum(K_b) right-padded responses,
    plus the pair index tensors.

    owner:          (N,) the prompt row of each response;
    winners/losers: (P,) indices into the N responses;
    pair_weight:    (P,) 1 / (n_pairs of its prompt * B), so the weighted sum
                    is the mean over prompts of each prompt's mean pair loss.
    """
    responses, owner, win, lose, weight = [], [], [], [], []
    for b, c in enumerate(batch):
        offset = len(responses)
        responses.extend(c.responses)
        owner.extend([b] * len(c.responses))
        for w, l in c.pairs:
            win.append(offset + w)
            lose.append(offset + l)
            weight.append(1.0 / (len(c.pairs) * len(batch)))
    prompt_ids, prompt_mask = pad([c.prompt for c in batch], pad_id, side="left")
    response_ids, response_mask = pad(responses, pad_id)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids,
            "response_mask": response_mask, "owner": torch.tensor(owner), "winners": torch.tensor(win),
            "losers": torch.tensor(lose), "pair_weight": torch.tensor(weight, dtype=torch.float32),
            "n_comparisons": torch.tensor(len(batch))}


def comparison_rewards(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Reward of every response of a collated batch; (N,).

    Each prompt runs once and its responses on its KV cache, except when gradient
    checkpointing is training the model (transformers then turns the cache off) or FSDP
    shards it (its backward re-gathers a layer's weights for that layer's outputs, and the
    responses reach the prompt's layers through the cache instead): then each response runs
    joined to its prompt (the same rewards, more tokens)."""
    if model.training and (is_fsdp(model) or any(getattr(m, "gradient_checkpointing", False) is True
                                                 for m in unwrap(model).modules())):
        owner = batch["owner"]
        ids = torch.cat([batch["prompt_ids"][owner], batch["response_ids"]], dim=1)
        mask = torch.cat([batch["prompt_mask"][owner], batch["response_mask"]], dim=1)
        return reward_scores(model, ids, mask)
    return shared_prompt_reward_scores(model, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                                       batch["response_mask"], batch["owner"])


def rm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    r = comparison_rewards(model, batch)  # (N,) one forward row per response, on its prompt's shared cache
    loss = kwise_loss(r, batch["winners"], batch["losers"], batch["pair_weight"])
    acc = (r[batch["winners"]] > r[batch["losers"]]).float().mean()
    return loss, {"accuracy": float(acc)}


@torch.no_grad()
def score_texts(model, tokenizer, prompts: list[str], responses: list[str], max_len: int, batch_size: int = 64) -> torch.Tensor:
    """Reward (bias included) of each (prompt, response); (N,). Batches hold pairs of similar
    length (sorted, then put back in order), so that little of each is padding."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    seqs = [encode_pair(tokenizer, p, r, max_len)[0] for p, r in zip(prompts, responses, strict=True)]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.zeros(len(seqs))
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        ids, mask = pad([seqs[j] for j in rows], tokenizer.pad_token_id)
        out[rows] = reward_scores(model, ids.to(device), mask.to(device)).float().cpu()
    model.train(was)
    return out


@torch.no_grad()
def comparison_scores(model, tokenizer, comparisons: list[Comparison], max_len: int, batch_size: int = 32) -> list[list[float]]:
    """Reward (bias included) of each response of each comparison, encoded as in training;
    batches of similar length, as `score_texts`."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [encode_comparison(tokenizer, c, max_len) for c in comparisons]
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i].prompt), padded_size(encoded[i])))
    out: list[list[float]] = [[] for _ in comparisons]
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        batch = collate_comparisons([encoded[j] for j in rows], tokenizer.pad_token_id)
        flat = comparison_rewards(model, {k: v.to(device) for k, v in batch.items()}).float().cpu().tolist()
        for j in rows:
            k = len(encoded[j].responses)
            out[j], flat = flat[:k], flat[k:]
    model.train(was)
    return out


def ranking_accuracy(scores: list[list[float]], comparisons: list[Comparison]) -> float:
    """Share of the comparisons' stated (winner, loser) pairs that `scores` order correctly (ties count wrong)."""
    correct = total = 0
    for s, c in zip(scores, comparisons, strict=True):
        for w, l in c.pairs():
            correct += s[w] > s[l]
            total += 1
    return correct / max(total, 1)


def pairwise_accuracy(model, tokenizer, comparisons: list[Comparison], max_len: int) -> float:
    """Share of the stated (winner, loser) pairs the RM orders correctly."""
    return ranking_accuracy(comparison_scores(model, tokenizer, comparisons, max_len), comparisons)


def same_texts(a: list[Comparison], b: list[Comparison]) -> bool:
    """Whether two comparison lists hold the same prompts and responses (rankings may differ)."""
    return len(a) == len(b) and all(x.prompt == y.prompt and x.responses == y.responses for x, y in zip(a, b))


def centre_on_demonstrations(model, tokenizer, demos: list[Demonstration], max_len: int) -> float:
    """Set config.reward_bias so the demonstrations' mean reward is 0; return it."""
    setattr(model.config, REWARD_BIAS_KEY, 0.0)
    raw = score_texts(model, tokenizer, [d.prompt for d in demos], [d.response for d in demos], max_len)
    bias = -float(raw.double().mean())
    setattr(model.config, REWARD_BIAS_KEY, bias)
    return bias


def run_reward(ctx: StageContext) -> dict | None:
    """The `reward` stage: the RM that PPO optimizes, from the SFT model, centred on the demonstrations."""
    return train_reward_model(ctx, RewardData.of(ctx), ctx.folder, ctx.run_key, ctx.params.project.seed, centre=True)


def run_gold_reward(ctx: StageContext) -> dict | None:
    """The `gold_reward` stage: a second RM, from the base model, on comparisons the proxy RM
    never sees (data.gold_fraction). It trains nothing; it judges the evaluation."""
    return train_reward_model(ctx, RewardData.of(ctx), ctx.folder, ctx.run_key, ctx.params.project.seed, centre=False)


@dataclass(frozen=True)
class RewardData:
    """What an RM trains from: the model it starts from, its comparisons and (to centre it) demonstrations."""

    init: Path
    train: Path
    val: Path
    val_heldout: Path | None = None            # the held-out labeler's rankings of the val responses
    demonstrations: Path | None = None

    @classmethod
    def of(cls, ctx: StageContext, train: Path | None = None) -> RewardData:
        """A stage's declared inputs: init, comparisons_train (or `train`), comparisons_val[, comparisons_val_heldout,
        sft_train]."""
        optional = {k: ctx.input(n) if ctx.has_input(n) else None
                    for k, n in (("val_heldout", "comparisons_val_heldout"), ("demonstrations", "sft_train"))}
        return cls(ctx.input("init"), train or ctx.input("comparisons_train"), ctx.input("comparisons_val"), **optional)


def train_reward_model(ctx: StageContext, data: RewardData, out: Path, run_key: str, seed: int, centre: bool,
                       bootstrap: bool = False) -> dict | None:
    """Train one RM into out/model (its checkpoints and log in `out`, under `run_key`); its metrics, or None
    in a helper process. With `bootstrap`, on a resample of the training comparisons drawn with
    replacement (an ensemble member's); `seed` draws it, and the sample of max_comparisons."""
    params, cfg = ctx.params, ctx.params.reward

    def build():
        model, tok = load_reward_model(data.init, params.model.dtype)
        model.config.pad_token_id = tok.pad_token_id
        return trainable(model, cfg, "score", params.model.gradient_checkpointing)[0], tok

    model, tok = build()
    counts = trainable_parameters(model)
    train, val = read_jsonl(data.train, Comparison), read_jsonl(data.val, Comparison)
    if cfg.max_comparisons and len(train) > cfg.max_comparisons:
        train = random.Random(seed).sample(train, cfg.max_comparisons)
    if bootstrap:
        train = random.Random(seed).choices(train, k=len(train))
    max_len = min(cfg.max_len, position_limit(model))
    held = read_jsonl(data.val_heldout, Comparison) if data.val_heldout is not None else None
    done = fit(ctx, model, cfg, [encode_comparison(tok, c, max_len) for c in train],
               lambda xs: collate_comparisons(xs, tok.pad_token_id), rm_loss, rebuild=lambda: build()[0],
               val_fn=lambda m: rm_validation(m, tok, val, held, max_len),
               count_fn=lambda b: int(b["n_comparisons"]), size_fn=padded_size, throughput="comparisons_per_s",
               folder=out, run_key=run_key, seed=seed)
    if done.model is None:  # the main process centres and saves
        return None
    model = merged(done.model)
    metrics = {**done.metrics, "train_accuracy": done.loop.train_metrics.get("accuracy"),
               "train_comparisons": len(train), "train_pairs": sum(len(c.pairs()) for c in train),
               "trainable_parameters": counts[0], "parameters": counts[1]}
    if centre:
        with ctx.phase("centre"), autocast(params.model.mixed_precision, done.accelerator.device):
            demos = read_jsonl(data.demonstrations, Demonstration)
            if cfg.centre_samples and len(demos) > cfg.centre_samples:
                demos = random.Random(seed).sample(demos, cfg.centre_samples)
            metrics["reward_bias"] = centre_on_demonstrations(model, tok, demos, max_len)
    log.info("%s: %s", ctx.name, metrics)
    with ctx.phase("save"):
        save_model_atomic(model, tok, out / "model", {MAX_LEN_KEY: max_len})
    return metrics


def rm_validation(model, tok, val: list[Comparison], held: list[Comparison] | None, max_len: int) -> dict[str, float]:
    """Accuracy on the training labelers' val rankings and, from the same scores when
    it ranked the same responses, on the held-out labeler's."""
    scores = comparison_scores(model, tok, val, max_len)
    out = {"val_accuracy": round(ranking_accuracy(scores, val), 4)}
    if held is not None:
        held_scores = scores if same_texts(val, held) else comparison_scores(model, tok, held, max_len)
        out["heldout_labeler_accuracy"] = round(ranking_accuracy(held_scores, held), 4)
    return out
