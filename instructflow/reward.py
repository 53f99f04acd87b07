"""The `reward` stage: the reward model, trained on K-wise rankings.

The RM is the SFT model with its unembedding replaced by a scalar head that
reads the last non-pad token (the EOS that ends the response); it is saved as
a plain `AutoModelForSequenceClassification` with num_labels=1.

Loss (Ouyang et al. 2022, eq. 1), for one prompt x with K ranked responses:

    loss(x) = -1/C(K,2) * sum over pairs (y_w better than y_l) of log sigmoid(r(x, y_w) - r(x, y_l))

All C(K,2) pairs of a prompt live in ONE batch element: the K responses are
scored with K forward passes and every pair reuses those K scores (pairs
would need 2*C(K,2)). With per-response scores and ties, tied pairs state no
preference and the normaliser is the number of strict pairs. The batch loss is
the mean over prompts.

After training, the bias b = -mean r(x, y_demo) over the labelers'
demonstrations is stored in the model's config (`reward_bias`) so the
demonstrations score 0 on average before RL.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import Params
from .data.formats import Comparison, Demonstration
from .pipeline import stage_key
from .io import StageTimer, read_jsonl, write_result
from .modeling import (
    REWARD_BIAS_KEY,
    encode_prompt,
    encode_response,
    join_truncated,
    load_reward_model,
    pad_right,
    reward_scores,
)
from .training import make_accelerator, save_model_atomic, setup_runtime, train_loop

log = logging.getLogger(__name__)


@dataclass
class EncodedComparison:
    sequences: list[list[int]]        # K token sequences: prompt + response_k + EOS
    pairs: list[tuple[int, int]]      # (winner, loser) indices into sequences


def encode_comparison(tokenizer, c: Comparison, max_len: int) -> EncodedComparison:
    prompt_ids = encode_prompt(tokenizer, c.prompt)
    seqs = [join_truncated(prompt_ids, encode_response(tokenizer, r), max_len)[0] for r in c.responses]
    return EncodedComparison(seqs, c.pairs())


def collate_comparisons(batch: list[EncodedComparison], pad_id: int) -> dict[str, torch.Tensor]:
    """Flatten B comparisons into sum(K_b) sequences plus the pair index tensors.

    winners/losers: (P,) row indices into the flattened sequences;
    pair_weight:    (P,) 1 / (n_pairs of its prompt * B), so the weighted sum
                    is the mean over prompts of each prompt's mean pair loss.
    """
    seqs, win, lose, weight = [], [], [], []
    for c in batch:
        offset = len(seqs)
        seqs.extend(c.sequences)
        for w, l in c.pairs:
            win.append(offset + w)
            lose.append(offset + l)
            weight.append(1.0 / (len(c.pairs) * len(batch)))
    ids, mask = pad_right(seqs, pad_id)
    return {"input_ids": ids, "attention_mask": mask, "winners": torch.tensor(win), "losers": torch.tensor(lose),
            "pair_weight": torch.tensor(weight), "n_comparisons": torch.tensor(len(batch))}


def kwise_loss(rewards: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor, pair_weight: torch.Tensor) -> torch.Tensor:
    """-sum_p w_p log sigmoid(r[winner_p] - r[loser_p]); rewards: (N,), the rest (P,)."""
    return -(pair_weight * F.logsigmoid(rewards[winners] - rewards[losers])).sum()


def rm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    r = reward_scores(model, batch["input_ids"], batch["attention_mask"])  # (N,) one forward row per response
    loss = kwise_loss(r, batch["winners"], batch["losers"], batch["pair_weight"])
    acc = (r[batch["winners"]] > r[batch["losers"]]).float().mean()
    return loss, {"accuracy": float(acc)}


@torch.no_grad()
def score_texts(model, tokenizer, prompts: list[str], responses: list[str], max_len: int, batch_size: int = 64) -> torch.Tensor:
    """Reward (bias included) of each (prompt, response); (N,)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        seqs = [join_truncated(encode_prompt(tokenizer, p), encode_response(tokenizer, r), max_len)[0]
                for p, r in zip(prompts[i : i + batch_size], responses[i : i + batch_size])]
        ids, mask = pad_right(seqs, tokenizer.pad_token_id)
        out.append(reward_scores(model, ids.to(device), mask.to(device)).float().cpu())
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def pairwise_accuracy(model, tokenizer, comparisons: list[Comparison], max_len: int) -> float:
    """Share of the stated (winner, loser) pairs the RM orders correctly."""
    prompts = [c.prompt for c in comparisons for _ in c.responses]
    responses = [r for c in comparisons for r in c.responses]
    scores = score_texts(model, tokenizer, prompts, responses, max_len)
    correct = total = offset = 0
    for c in comparisons:
        for w, l in c.pairs():
            correct += bool(scores[offset + w] > scores[offset + l])
            total += 1
        offset += c.k
    return correct / max(total, 1)


def centre_on_demonstrations(model, tokenizer, demos: list[Demonstration], max_len: int) -> float:
    """Set config.reward_bias so the demonstrations' mean reward is 0; return it."""
    setattr(model.config, REWARD_BIAS_KEY, 0.0)
    raw = score_texts(model, tokenizer, [d.prompt for d in demos], [d.response for d in demos], max_len)
    bias = -float(raw.double().mean())
    setattr(model.config, REWARD_BIAS_KEY, bias)
    return bias


def comparison_paths(params: Params) -> tuple[Path, Path, Path | None]:
    """(train, val, held-out labeler's val) comparisons the RM reads."""
    cfg = params.reward
    src = params.stage_dir("collect") if params.data.source == "builtin" else params.stage_dir("data")
    train = Path(cfg.comparisons_train) if cfg.comparisons_train else src / "comparisons_train.jsonl"
    val = Path(cfg.comparisons_val) if cfg.comparisons_val else src / "comparisons_val.jsonl"
    held = src / "comparisons_val_heldout.jsonl"
    return train, val, held if held.exists() and not cfg.comparisons_val else None


def run_reward(params: Params) -> dict:
    key = stage_key(params, "reward")
    setup_runtime(params.project)
    cfg, out = params.reward, params.stage_dir("reward")
    out.mkdir(parents=True, exist_ok=True)
    timer = StageTimer()
    init = Path(cfg.init_from) if cfg.init_from else params.stage_dir("sft") / "model"
    model, tok = load_reward_model(init, params.model.dtype)
    model.config.pad_token_id = tok.pad_token_id
    train_path, val_path, held_path = comparison_paths(params)
    train, val = read_jsonl(train_path, Comparison), read_jsonl(val_path, Comparison)
    max_len = min(cfg.max_len, model.config.max_position_embeddings)
    train_ex = [encode_comparison(tok, c, max_len) for c in train]

    acc = make_accelerator(params.project, cfg.grad_accum)
    model.to(acc.device)
    with timer.phase("train"):
        res = train_loop(
            name="reward", model=model, examples=train_ex, collate=lambda xs: collate_comparisons(xs, tok.pad_token_id),
            loss_fn=rm_loss, cfg=cfg, out_dir=out, accelerator=acc, seed=params.project.seed,
            val_fn=lambda m: {"val_accuracy": round(pairwise_accuracy(m, tok, val, max_len), 4)},
            count_fn=lambda b: int(b["n_comparisons"]), run_key=key,
        )
    model = acc.unwrap_model(model)
    metrics = {"steps": res.steps, "train_loss": res.train_metrics.get("loss"), "train_accuracy": res.train_metrics.get("accuracy"),
               **res.val_metrics, "comparisons_per_s": res.items_per_s, "train_comparisons": len(train),
               "train_pairs": sum(len(c.pairs()) for c in train), "resumed_from_step": res.resumed_from_step}
    inputs = {"init": init, "train": train_path, "val": val_path}
    with timer.phase("eval"):
        if held_path is not None:
            metrics["heldout_labeler_accuracy"] = round(pairwise_accuracy(model, tok, read_jsonl(held_path, Comparison), max_len), 4)
            inputs["val_heldout_labeler"] = held_path
        demo_path = params.stage_dir("data") / "sft_train.jsonl"
        demos = read_jsonl(demo_path, Demonstration)
        metrics["reward_bias"] = centre_on_demonstrations(model, tok, demos, max_len)
        inputs["demonstrations"] = demo_path
    log.info("reward: %s", metrics)
    with timer.phase("save"):
        save_model_atomic(model, tok, out / "model")
    return write_result(out, "reward", inputs, {"model": out / "model"}, metrics, timer, run_key=key)
