"""Where the reward model is right and wrong: pairwise accuracy per task category,
split into pairs whose ranking labeler saw a real difference (non-tie: the two
responses' latent qualities differ) and pairs it ordered at random (tie: equal
latent quality, where 0.5 is the best any model can do).

Built-in suite only (it needs the simulated labelers' latent qualities):

    python bench/rm_by_category.py                      # artifacts/reward/model on artifacts/collect/comparisons_val.jsonl
    python bench/rm_by_category.py --rm DIR --comparisons FILE
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from instructflow.config import load_params
from instructflow.data.formats import Comparison
from instructflow.io import read_jsonl
from instructflow.modeling import load_reward_model
from instructflow.reward import score_texts
from instructflow.suite.labelers import Labeler


def by_category(rm_dir: Path, comparisons: Path, params: Path) -> dict[str, dict[str, float]]:
    p = load_params(params)
    labelers = {cfg.name: Labeler(cfg) for cfg in p.data.labelers}
    model, tok = load_reward_model(rm_dir)
    comps = read_jsonl(comparisons, Comparison)
    # every response of every comparison in one batched scoring pass
    flat = score_texts(model, tok, [c.prompt for c in comps for _ in c.responses],
                       [r for c in comps for r in c.responses], p.reward.max_len).tolist()
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # right, n (non-tie); right, n (tie)
    offset = 0
    for c in comps:
        scores, offset = flat[offset : offset + c.k], offset + c.k
        latent = [labelers[c.labeler].latent(c.meta, r) for r in c.responses]
        for better, worse in c.pairs():
            tie = abs(latent[better] - latent[worse]) < 1e-9
            row = counts[c.category or "other"]
            row[2 * tie] += scores[better] > scores[worse]
            row[2 * tie + 1] += 1
    rows = dict(sorted(counts.items()))
    rows["ALL"] = [sum(r[i] for r in counts.values()) for i in range(4)]
    return {cat: {"non_tie_accuracy": r[0] / max(r[1], 1), "non_tie_pairs": r[1],
                  "tie_accuracy": r[2] / max(r[3], 1), "tie_pairs": r[3],
                  "accuracy": (r[0] + r[2]) / max(r[1] + r[3], 1)} for cat, r in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rm", type=Path, default=Path("artifacts/reward/model"))
    ap.add_argument("--comparisons", type=Path, default=Path("artifacts/collect/comparisons_val.jsonl"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args()
    print(f"{'category':15s} {'non-tie acc':>11s} {'pairs':>6s} {'tie acc':>8s} {'pairs':>6s} {'all':>6s}")
    for cat, r in by_category(args.rm, args.comparisons, args.params).items():
        print(f"{cat:15s} {r['non_tie_accuracy']:11.3f} {r['non_tie_pairs']:6d} {r['tie_accuracy']:8.3f} {r['tie_pairs']:6d} {r['accuracy']:6.3f}")


if __name__ == "__main__":
    main()
