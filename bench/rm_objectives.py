"""Do other RM objectives generalise better than the paper's pairwise loss?

Each variant trains the real reward stage (params.yaml's `reward` section) from
the same SFT model on the same collected comparisons, at each seed given, and
reports validation accuracy on the training labelers' and the held-out
labeler's rankings:

- pairwise: the stage as it is (Ouyang et al. 2022, eq. 1: all C(K,2) pairs);
- plackett_luce: the full-ranking likelihood, -sum_i [r_(i) - logsumexp(r_(i..K))]
  / (K - 1). The simulated labelers rank by Plackett-Luce, so this is the exact
  likelihood of how their labels arise (its pairwise marginals are the
  Bradley-Terry terms of eq. 1);
- pairwise_lm: eq. 1 plus 0.5 x the SFT loss on 16 demonstrations per step
  (through the tied unembedding), to keep what the SFT model knew;
- frozen_embeddings: eq. 1 with the token embeddings not trained.

    python bench/rm_objectives.py --seeds 0,1 [--variants plackett_luce,pairwise_lm]

It needs the sft, collect and data stages' outputs (about 2 minutes per run on
2 cores).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import instructflow.reward as R
from instructflow.config import load_params
from instructflow.data.formats import Demonstration
from instructflow.io import read_jsonl
from instructflow.modeling import load_tokenizer
from instructflow.pretrain import causal_lm_loss
from instructflow.sft import encode_demonstration, sft_batch

VARIANTS = ("pairwise", "plackett_luce", "pairwise_lm", "frozen_embeddings")
ORIGINAL = (R.rm_loss, R.load_reward_model)  # the stage's own loss and loader, restored between variants


def plackett_luce_loss(rewards: torch.Tensor, owner: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor,
                       n_prompts: int) -> torch.Tensor:
    """Mean over prompts of -1/(K-1) sum_i log softmax over the responses ranked i-th or
    lower, at the i-th. A full ranking is recovered from its pairs: the i-th of K wins
    K - 1 - i of them."""
    n = rewards.shape[0]
    wins = torch.zeros(n, dtype=torch.long, device=rewards.device).index_add_(0, winners, torch.ones_like(winners))
    same = owner[:, None] == owner[None, :]
    if bool(((same & (wins[:, None] == wins[None, :])).sum(1) > 1).any()):
        raise ValueError("plackett_luce needs full rankings: a comparison has responses with equal scores (a tie)")
    at_or_below = same & (wins[None, :] <= wins[:, None])
    k = same.sum(1)
    lse = torch.logsumexp(rewards[None, :].expand(n, n).masked_fill(~at_or_below, float("-inf")), dim=1)
    weight = torch.where(wins == 0, torch.zeros_like(rewards), 1.0 / ((k - 1).clamp(min=1) * n_prompts).to(rewards.dtype))
    return (weight * (lse - rewards)).sum()


def patch(variant: str, params_path: Path, seed: int) -> None:
    """Point the reward stage at this variant's loss or initialisation."""
    R.rm_loss, R.load_reward_model = ORIGINAL
    if variant == "plackett_luce":
        def loss(model, batch):
            r = R.comparison_rewards(model, batch)
            value = plackett_luce_loss(r, batch["owner"], batch["winners"], batch["losers"], int(batch["n_comparisons"]))
            return value, {"accuracy": float((r[batch["winners"]] > r[batch["losers"]]).float().mean())}
        R.rm_loss = loss
    elif variant == "pairwise_lm":
        p = load_params(params_path)
        tok = load_tokenizer(p.stage_dir("sft") / "model")
        demos = [encode_demonstration(tok, d, p.reward.max_len) for d in read_jsonl(p.stage_dir("data") / "sft_train.jsonl", Demonstration)]
        rng = random.Random(seed)

        def loss(model, batch):
            value, metrics = ORIGINAL[0](model, batch)
            b = {k: v.to(batch["owner"].device) for k, v in sft_batch(rng.sample(demos, 16), tok.pad_token_id).items()}
            inner = getattr(model, "module", model)
            h = inner.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            lm = causal_lm_loss(F.linear(h, inner.model.embed_tokens.weight), b["labels"])
            return value + 0.5 * lm, {**metrics, "lm_loss": float(lm)}
        R.rm_loss = loss
    elif variant == "frozen_embeddings":
        def load(path, dtype="float32"):
            model, tok = ORIGINAL[1](path, dtype)
            model.model.embed_tokens.weight.requires_grad_(False)
            return model, tok
        R.load_reward_model = load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="bench/results/rm_objectives.json")
    args = ap.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    params_path = Path(args.params)
    artifacts = Path(load_params(params_path).project.artifacts_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            for seed in (int(s) for s in args.seeds.split(",")):
                patch(variant, params_path, seed)
                work = Path(tmp) / f"{variant}_{seed}"
                work.mkdir()
                for stage in ("data", "sft", "collect"):  # the stage's inputs, as the pipeline left them
                    (work / stage).symlink_to((artifacts / stage).resolve())
                p = load_params(params_path, {"project.artifacts_dir": str(work), "project.seed": seed, "reward.resume": False})
                m = R.run_reward(p)["metrics"]
                row = {"variant": variant, "seed": seed, "val_accuracy": m["val_accuracy"],
                       "heldout_labeler_accuracy": m.get("heldout_labeler_accuracy"), "train_accuracy": m.get("train_accuracy")}
                print(json.dumps(row), flush=True)
                rows.append(row)
    R.rm_loss, R.load_reward_model = ORIGINAL
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
