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

from ..config import Params
from ..data.formats import Comparison, Demonstration
from ..lm.encoding import encode_pair, encode_prompt, encode_response, pad
from ..io import StageTimer, helper_result, read_jsonl, write_result
from ..lm.losses import kwise_loss
from ..lm.modeling import (
    MAX_LEN_KEY,
    REWARD_BIAS_KEY,
    is_fsdp,
    load_reward_model,
    make_trainable,
    merged,
    position_limit,
    reward_scores,
    shared_prompt_reward_scores,
    trainable_parameters,
    unwrap,
)
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


def comparison_paths(params: Params) -> tuple[Path, Path, Path | None]:
    """(train, val, held-out labeler's val) comparisons the RM reads."""
    src = params.stage_dir("collect") if params.data.source == "builtin" else params.stage_dir("data")
    held = src / "comparisons_val_heldout.jsonl"
    return src / "comparisons_train.jsonl", src / "comparisons_val.jsonl", held if held.exists() else None


def run_reward(params: Params, key: str = "") -> dict:
    """The `reward` stage: the RM that PPO optimizes, from the SFT model."""
    train, val, held = comparison_paths(params)
    return train_reward_model(params, key, "reward", params.stage_dir("sft") / "model", train, val, held, centre=True)


def run_gold_reward(params: Params, key: str = "") -> dict:
    """The `gold_reward` stage: a second RM, from the base model, on comparisons the proxy RM
    never sees (data.gold_fraction). It trains nothing; it judges the evaluation."""
    data = params.stage_dir("data")
    return train_reward_model(params, key, "gold_reward", params.stage_dir("pretrain") / "model",
                              data / "comparisons_gold.jsonl", data / "comparisons_val.jsonl", None, centre=False)


def train_reward_model(params: Params, key: str, stage: str, init: Path, train_path: Path, val_path: Path,
                       held_path: Path | None, centre: bool, bootstrap_seed: int | None = None) -> dict:
    """Train one RM into artifacts/<stage>/model. With `bootstrap_seed`, on a resample of the
    training comparisons drawn with replacement (an ensemble member's)."""
    setup_runtime(params.project)
    cfg, out = params.reward, params.stage_dir(stage)
    out.mkdir(parents=True, exist_ok=True)
    timer = StageTimer()

    def build():
        model, tok = load_reward_model(init, params.model.dtype)
        model.config.pad_token_id = tok.pad_token_id
        return make_trainable(model, cfg.lora, "score", cfg.train_top_layers), tok

    model, tok = build()
    if params.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable, total = trainable_parameters(model)
    train, val = read_jsonl(train_path, Comparison), read_jsonl(val_path, Comparison)
    if cfg.max_comparisons and len(train) > cfg.max_comparisons:
        train = random.Random(params.project.seed).sample(train, cfg.max_comparisons)
    if bootstrap_seed is not None:
        train = random.Random(bootstrap_seed).choices(train, k=len(train))
    max_len = min(cfg.max_len, position_limit(model))
    train_ex = [encode_comparison(tok, c, max_len) for c in train]
    held = read_jsonl(held_path, Comparison) if held_path is not None else None

    def validate(m) -> dict[str, float]:
        """Accuracy on the training labelers' val rankings and, from the same scores when
        it ranked the same responses, on the held-out labeler's."""
        scores = comparison_scores(m, tok, val, max_len)
        out = {"val_accuracy": round(ranking_accuracy(scores, val), 4)}
        if held is not None:
            held_scores = scores if same_texts(val, held) else comparison_scores(m, tok, held, max_len)
            out["heldout_labeler_accuracy"] = round(ranking_accuracy(held_scores, held), 4)
        return out

    acc = make_accelerator(params.project, cfg.grad_accum, params.model.mixed_precision, out / "trackers", stage)
    model.to(acc.device)
    with timer.phase("train"):
        res = train_loop(
            name=stage, model=model, examples=train_ex, collate=lambda xs: collate_comparisons(xs, tok.pad_token_id),
            loss_fn=rm_loss, cfg=cfg, out_dir=out, accelerator=acc, seed=params.project.seed,
            val_fn=validate,
            count_fn=lambda b: int(b["n_comparisons"]), size_fn=padded_size, run_key=key,
        )
    ran = processes_report(acc, timer)
    trained = trained_model(acc, model, lambda: build()[0])
    if not acc.is_main_process:  # the main process centres and saves
        return helper_result(stage, timer)
    model = merged(trained)
    metrics = {**ran, "steps": res.steps, "train_loss": res.train_metrics.get("loss"), "train_accuracy": res.train_metrics.get("accuracy"),
               **res.val_metrics, "comparisons_per_s": res.items_per_s, "train_comparisons": len(train),
               "train_pairs": sum(len(c.pairs()) for c in train), "resumed_from_step": res.resumed_from_step,
               "trainable_parameters": trainable, "parameters": total}
    inputs = {"init": init, "train": train_path, "val": val_path}
    if held_path is not None:
        inputs["val_heldout_labeler"] = held_path
    if centre:
        with timer.phase("centre"), autocast(params.model.mixed_precision, acc.device):
            demo_path = params.stage_dir("data") / "sft_train.jsonl"
            demos = read_jsonl(demo_path, Demonstration)
            if cfg.centre_samples and len(demos) > cfg.centre_samples:
                demos = random.Random(params.project.seed).sample(demos, cfg.centre_samples)
            metrics["reward_bias"] = centre_on_demonstrations(model, tok, demos, max_len)
            inputs["demonstrations"] = demo_path
    log.info("%s: %s", stage, metrics)
    with timer.phase("save"):
        save_model_atomic(model, tok, out / "model", {MAX_LEN_KEY: max_len})
    return write_result(out, stage, inputs, {"model": out / "model"}, metrics, timer, run_key=key)
