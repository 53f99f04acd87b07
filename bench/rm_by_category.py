"""Where the reward model is right and wrong: pairwise accuracy per task category,
split into pairs whose ranking labeler saw a real difference (non-tie: the two
responses' latent qualities differ) and pairs it ordered at random (tie: equal
latent quality, where 0.5 is the best any model can do).

Beside the RM, two other judges order the same pairs:

- oracle: the ranking labeler's own latent quality, without its noise (ties
  score 0.5). This is the ceiling for any reward model of that labeler;
- sft_logp (with --sft): the SFT model's log-likelihood of the response,
  log p(response + EOS | prompt), with no training on comparisons at all. Where
  it beats the RM, the SFT model held knowledge that RM training did not keep.

Built-in suite only (it needs the simulated labelers' latent qualities):

    python bench/rm_by_category.py                      # artifacts/reward/model on artifacts/collect/comparisons_val.jsonl
    python bench/rm_by_category.py --rm DIR --comparisons FILE [--sft DIR]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from instructflow.config import load_params
from instructflow.data.formats import Comparison
from instructflow.evaluate import sequence_logprobs
from instructflow.io import read_jsonl
from instructflow.modeling import load_causal_lm, load_reward_model
from instructflow.reward import comparison_scores
from instructflow.suite.labelers import Labeler


def pair_credit(better: float, worse: float) -> float:
    """1 when a judge's score orders the pair as the labeler did, 0.5 on a tie, 0 otherwise."""
    return 1.0 if better > worse else 0.5 if better == worse else 0.0


def by_category(comps: list[Comparison], labelers: dict[str, Labeler],
                judges: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per category (and ALL): pair and tie counts, the oracle's accuracy, and each judge's
    accuracy over all pairs and over non-tie pairs. `judges` maps a name to one score per
    response, flattened over `comps` in order."""
    for i, c in enumerate(comps):
        if c.labeler not in labelers or not c.meta:
            raise ValueError(f"comparison {i + 1} (id {c.id!r}): needs a built-in labeler and task meta to grade; "
                             f"labeler is {c.labeler!r}, known: {sorted(labelers)}")
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    offset = 0
    for c in comps:
        latent = [labelers[c.labeler].latent(c.meta, r) for r in c.responses]
        scores = {name: s[offset : offset + c.k] for name, s in judges.items()}
        offset += c.k
        for better, worse in c.pairs():
            tie = abs(latent[better] - latent[worse]) < 1e-9
            for cat in (c.category or "other", "ALL"):
                row = sums[cat]
                row["pairs"] += 1
                row["tie_pairs"] += tie
                row["oracle"] += pair_credit(latent[better], latent[worse])
                for name, s in scores.items():
                    credit = pair_credit(s[better], s[worse])
                    row[name] += credit
                    row[f"{name}_non_tie"] += 0 if tie else credit
    out = {}
    for cat in sorted(sums, key=lambda k: (k == "ALL", k)):
        r = sums[cat]
        non_tie = r["pairs"] - r["tie_pairs"]
        out[cat] = {"pairs": int(r["pairs"]), "tie_share": r["tie_pairs"] / r["pairs"], "oracle": r["oracle"] / r["pairs"],
                    **{name: r[name] / r["pairs"] for name in judges},
                    **{f"{name}_non_tie": r[f"{name}_non_tie"] / max(non_tie, 1) for name in judges}}
    return out


def judge_scores(comps: list[Comparison], rm_dir: Path, sft_dir: Path | None, max_len: int) -> dict[str, list[float]]:
    prompts = [c.prompt for c in comps for _ in c.responses]
    responses = [r for c in comps for r in c.responses]
    model, tok = load_reward_model(rm_dir)
    judges = {"rm": [x for s in comparison_scores(model, tok, comps, max_len) for x in s]}  # as the reward stage scores
    if sft_dir is not None:
        lm, lm_tok = load_causal_lm(sft_dir)
        judges["sft_logp"] = sequence_logprobs(lm, lm_tok, prompts, responses, max_len).tolist()
    return judges


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rm", type=Path, default=Path("artifacts/reward/model"))
    ap.add_argument("--comparisons", type=Path, default=Path("artifacts/collect/comparisons_val.jsonl"))
    ap.add_argument("--sft", type=Path, default=None, help="Also judge by this causal LM's log-likelihood (the SFT model).")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args()
    p = load_params(args.params)
    comps = read_jsonl(args.comparisons, Comparison)
    judges = judge_scores(comps, args.rm, args.sft, p.reward.max_len)
    rows = by_category(comps, {cfg.name: Labeler(cfg) for cfg in p.data.labelers}, judges)
    head = f"{'category':15s} {'pairs':>6s} {'ties':>5s} {'oracle':>6s}"
    head += "".join(f" {name:>9s} {'non-tie':>7s}" for name in judges)
    print(head)
    for cat, r in rows.items():
        line = f"{cat:15s} {r['pairs']:6d} {r['tie_share']:5.2f} {r['oracle']:6.3f}"
        print(line + "".join(f" {r[name]:9.3f} {r[name + '_non_tie']:7.3f}" for name in judges))


if __name__ == "__main__":
    main()
