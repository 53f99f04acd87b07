"""Probe: does a causal LM read its own context? Two zero-shot checks on the
built-in world's text, scored among the 8 colour words only:

- copy:   "Here is what they have. Ana has a red cup. Ben has a blue hat. Cleo has
           a pink box. As I said, Ana has a" -> "red" (the phrase is repeated verbatim);
- recall: "... So Ben's hat is" -> "blue" (look up the fact about Ben's hat).

Chance is 1/8 for both. "in context" is the share of recall predictions that
name one of the three colours in the text (3/8 by chance); a model that can
only copy, not look up, scores there.

Closed QA, rewrite, summarization and extraction need these mechanisms, in
the policy to answer and in the RM to judge answers; `bench/rm_by_category.py`
shows where the RM is at chance.

    python bench/context_probe.py                          # artifacts/pretrain/model and artifacts/sft/model
    python bench/context_probe.py PATH [PATH ...]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from instructflow.modeling import load_causal_lm
from instructflow.suite import world as W


def probe(path: str | Path, n: int = 300, seed: int = 5) -> dict[str, float]:
    model, tok = load_causal_lm(path)
    model.eval()
    color_ids = [tok(" " + c, add_special_tokens=False)["input_ids"] for c in W.COLORS]
    if any(len(ids) != 1 for ids in color_ids):
        raise ValueError(f"{path}: the probe needs each colour to be one token; got {dict(zip(W.COLORS, color_ids))}")
    color_ids = [ids[0] for ids in color_ids]

    def predict(text: str) -> str:
        with torch.no_grad():
            logits = model(input_ids=tok(text, return_tensors="pt")["input_ids"]).logits[0, -1]
        return W.COLORS[int(logits[color_ids].argmax())]

    rng = random.Random(seed)
    copy = recall = in_context = 0
    for _ in range(n):
        people, objs, cols = rng.sample(W.NAMES, 3), rng.sample(W.OBJECTS, 3), rng.sample(W.COLORS, 3)
        # The lead sentence puts a space before every name: BPE gives "Ana" at the start of a text and
        # " Ana" after a space different tokens, and the read-back's name must match the fact's.
        text = "Here is what they have. " + " ".join(f"{p} has a {c} {o}." for p, c, o in zip(people, cols, objs))
        i = rng.randrange(3)
        copy += predict(f"{text} As I said, {people[i]} has a") == cols[i]
        said = predict(f"{text} So {people[i]}'s {objs[i]} is")
        recall += said == cols[i]
        in_context += said in cols
    return {"copy": copy / n, "recall": recall / n, "recall_in_context": in_context / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=["artifacts/pretrain/model", "artifacts/sft/model"])
    ap.add_argument("--n", type=int, default=300, help="probes per check")
    args = ap.parse_args()
    print(f"{'model':40s} {'copy':>6s} {'recall':>7s} {'in context':>11s}   (chance 0.125 / 0.125 / 0.375)")
    for m in args.models:
        r = probe(m, args.n)
        print(f"{m:40s} {r['copy']:6.3f} {r['recall']:7.3f} {r['recall_in_context']:11.3f}")


if __name__ == "__main__":
    main()
