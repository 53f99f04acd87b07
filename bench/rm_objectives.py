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
- frozen_embeddings: eq. 1 with the token embeddings not trained;
- pairwise_logprob: eq. 1 plus 0.5 x eq. 1 applied to 2 x each response's mean
  token log-probability under the same network (tied unembedding, no
  reference model). The SFT model's likelihood alone orders many pairs the RM
  gets wrong (bench/rm_by_category.py --sft); this trains the trunk on the
  labelers' orderings through that path as well as through the score head;
- base_init: eq. 1 from the pretrained base model instead of SFT;
- mismatched_demos: eq. 1 on the collected comparisons plus one K = 2
  comparison per demonstration: the demonstration over another prompt's
  demonstration of the same category (an answer to this prompt beats an
  answer to another one), to teach checks of a response against its prompt.

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
from instructflow.data.formats import Comparison, Demonstration
from instructflow.io import read_jsonl, write_jsonl
from instructflow.modeling import load_tokenizer, position_ids_from_mask
from instructflow.pretrain import causal_lm_loss
from instructflow.sft import encode_demonstration, sft_batch

VARIANTS = ("pairwise", "plackett_luce", "pairwise_lm", "frozen_embeddings", "pairwise_logprob", "base_init",
            "mismatched_demos")
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


def scores_and_mean_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The score head's reward (bias excluded) and the mean log-probability of the response's
    tokens (EOS included) under the same network through its tied unembedding, per response;
    (N,), (N,). One shared-prompt pass, as `shared_prompt_reward_scores` runs it."""
    body = getattr(model, "module", model)
    trunk = body.model
    pm, rm, owner, rids = batch["prompt_mask"], batch["response_mask"], batch["owner"], batch["response_ids"]
    out = trunk(input_ids=batch["prompt_ids"], attention_mask=pm, position_ids=position_ids_from_mask(pm), use_cache=True)
    cache = out.past_key_values
    cache.batch_select_indices(owner)
    positions = pm.long().sum(-1)[owner][:, None] + torch.arange(rids.size(1), device=rids.device)[None]
    h = trunk(input_ids=rids, attention_mask=torch.cat([pm[owner], rm], -1), position_ids=positions,
              past_key_values=cache, use_cache=False).last_hidden_state          # (N, R, H)
    last = rm.long().sum(-1) - 1
    reward = body.score(h[torch.arange(h.size(0), device=h.device), last]).squeeze(-1)
    # the state before each response token predicts it: the prompt's last (prompts are left-padded), then the response's own
    before = torch.cat([out.last_hidden_state[owner, -1:], h[:, :-1]], dim=1)
    logp = F.log_softmax(F.linear(before, trunk.embed_tokens.weight).float(), -1).gather(-1, rids[..., None]).squeeze(-1)
    m = rm.to(logp.dtype)
    return reward, (logp * m).sum(-1) / m.sum(-1)


def logprob_aux_loss(model, batch: dict[str, torch.Tensor], weight: float = 0.5, scale: float = 2.0):
    """Eq. 1 on the score head plus `weight` x eq. 1 on `scale` x the mean token log-probability."""
    r, mean_logp = scores_and_mean_logprobs(model, batch)
    w, l, pw = batch["winners"], batch["losers"], batch["pair_weight"]
    main, aux = R.kwise_loss(r, w, l, pw), R.kwise_loss(scale * mean_logp, w, l, pw)
    return main + weight * aux, {"accuracy": float((r[w] > r[l]).float().mean()), "logprob_loss": float(aux),
                                 "logprob_accuracy": float((mean_logp[w] > mean_logp[l]).float().mean())}


def mismatched_demo_comparisons(demos: list[Demonstration], seed: int) -> list[Comparison]:
    """One K = 2 comparison per demonstration: it, over the demonstration of another prompt of the same
    category (with another response text). Demonstrations with no such partner give none."""
    rng = random.Random(seed)
    by_category: dict[str | None, list[Demonstration]] = {}
    for d in demos:
        by_category.setdefault(d.category, []).append(d)
    out = []
    for d in demos:
        others = [o for o in by_category[d.category] if o.prompt != d.prompt and o.response != d.response]
        if others:
            o = rng.choice(others)
            out.append(Comparison(id=f"mismatch-{d.id}", prompt=d.prompt, category=d.category, meta=d.meta,
                                  responses=[d.response, o.response], ranking=[0, 1], labeler=d.labeler))
    return out


def patch(variant: str, params_path: Path, seed: int, work: Path) -> dict:
    """Point the reward stage at this variant's loss or initialisation; returns the
    variant's overrides of params.yaml (inputs written under `work`)."""
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
    elif variant == "pairwise_logprob":
        R.rm_loss = logprob_aux_loss
    elif variant == "base_init":
        return {"reward.init_from": str(load_params(params_path).stage_dir("pretrain").resolve() / "model")}
    elif variant == "mismatched_demos":
        p = load_params(params_path)
        collected = read_jsonl(p.stage_dir("collect") / "comparisons_train.jsonl", Comparison)
        extra = mismatched_demo_comparisons(read_jsonl(p.stage_dir("data") / "sft_train.jsonl", Demonstration), seed)
        rows = collected + extra
        random.Random(seed).shuffle(rows)
        path = work / "comparisons_train_mismatched.jsonl"
        write_jsonl(path, rows)
        return {"reward.comparisons_train": str(path)}
    return {}


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
                work = Path(tmp) / f"{variant}_{seed}"
                work.mkdir()
                for stage in ("data", "sft", "collect"):  # the stage's inputs, as the pipeline left them
                    (work / stage).symlink_to((artifacts / stage).resolve())
                overrides = patch(variant, params_path, seed, work)
                p = load_params(params_path, {"project.artifacts_dir": str(work), "project.seed": seed, "reward.resume": False,
                                              **overrides})
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
