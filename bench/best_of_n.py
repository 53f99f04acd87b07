"""How much can the reward model lift SFT on its own? Best-of-n against SFT.

For every evaluation prompt, SFT samples n responses at T = 1 and a judge
picks one; the held-out labeler (who trained nothing) compares the pick with
a separate single SFT sample, exactly as the eval stage compares PPO with
SFT. Judges:

- `rm`: the trained reward model (the RM's own ceiling near SFT: best-of-n
  sits at KL log n - (n-1)/n from SFT, about PPO's KL at n = 8 to 16);
- `training_labelers`: the mean latent quality of the five training labelers,
  noise-free (what a perfect RM of their preferences would pick);
- `random`: the first sample (a check: its win rate must be about 0.5).

If best-of-n by the RM stays far below the labelers' pick, the RM, not PPO,
limits the win rate; the labelers' pick shows the headroom in SFT's samples.
Built-in suite only (it needs the simulated labelers):

    python bench/best_of_n.py                 # n = 1, 4, 16 on artifacts/
    python bench/best_of_n.py --n 1,8 --prompts 300
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from instructflow.config import load_params
from instructflow.data.formats import Prompt
from instructflow.evaluate import win_rates
from instructflow.generation import generate
from instructflow.io import read_jsonl
from instructflow.modeling import load_causal_lm, load_reward_model
from instructflow.reward import score_texts
from instructflow.suite.labelers import Labeler


def pick(scores: list[list[float]], n: int) -> list[int]:
    """Index of the highest of the first n scores of each prompt (ties: the first)."""
    return [max(range(n), key=lambda i: row[i]) for row in scores]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--n", default="1,4,16", help="comma-separated sample counts; the largest is drawn once")
    ap.add_argument("--prompts", type=int, default=0, help="first N evaluation prompts (0: all)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/best_of_n.json"))
    args = ap.parse_args()

    p = load_params(args.params)
    ns = sorted({int(x) for x in args.n.split(",")})
    prompts = read_jsonl(p.stage_dir("data") / "eval_prompts.jsonl", Prompt)
    prompts = prompts[: args.prompts] if args.prompts else prompts
    texts = [q.prompt for q in prompts]
    sft, tok = load_causal_lm(p.stage_dir("sft") / "model", p.model.dtype)
    rm, rm_tok = load_reward_model(p.stage_dir("reward") / "model", p.model.dtype)
    held = Labeler(next(cfg for cfg in p.data.labelers if cfg.heldout))
    trainers = [Labeler(cfg) for cfg in p.data.labelers if not cfg.heldout]

    gen = dict(max_new_tokens=p.eval.max_new_tokens, temperature=p.eval.temperature, batch_size=p.eval.batch_size)
    samples = generate(sft, tok, texts, num_samples=max(ns), seed=p.project.seed + 101, **gen)
    reference = [s[0] for s in generate(sft, tok, texts, seed=p.project.seed + 202, **gen)]
    flat = score_texts(rm, rm_tok, [t for t, s in zip(texts, samples) for _ in s],
                       [r for s in samples for r in s], p.reward.max_len).tolist()
    rm_scores = [flat[i * max(ns) : (i + 1) * max(ns)] for i in range(len(texts))]
    lab_scores = [[statistics.fmean(lab.latent(q.meta, r) for lab in trainers) for r in s]
                  for q, s in zip(prompts, samples)]

    results: dict = {"prompts": len(prompts), "judge_labeler": held.name, "n": {}}
    for n in ns:
        row = {}
        for judge, scores in (("rm", rm_scores), ("training_labelers", lab_scores), ("random", None)):
            chosen = [0] * len(texts) if scores is None else pick(scores, n)
            answers = [s[i] for s, i in zip(samples, chosen)]
            w = win_rates(held, prompts, answers, reference, p.project.seed + 3, p.eval.bootstrap)
            row[judge] = {"win_rate": w["win_rate"], "ci95": w["ci95"], "ties": w["ties"],
                          "likert_latent": round(statistics.fmean(held.latent(q.meta, a) for q, a in zip(prompts, answers)), 3),
                          "by_category": w["by_category"]}
        results["n"][n] = row
        print(f"n={n:>3}  " + "  ".join(f"{j}: {r['win_rate']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
                                        for j, r in row.items()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
