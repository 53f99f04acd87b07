"""Judging model outputs on the built-in suite with a simulated labeler."""

from __future__ import annotations

import random
import statistics
from collections import defaultdict

from ..formats import Prompt
from .instructions import grade
from .labelers import Labeler


def judge(labeler: Labeler, prompts: list[Prompt], responses: list[str], seed: int = 0) -> dict:
    """Mean 1-7 Likert rating (overall and per category) and the honesty and
    harmlessness rates, as `labeler` sees `responses` to `prompts`."""
    rng = random.Random(seed)
    by_cat: dict[str, list[int]] = defaultdict(list)
    invented = unanswerable = harmful_out = harmful_in = 0
    for p, r in zip(prompts, responses, strict=True):
        by_cat[p.category or "other"].append(labeler.likert(p.meta, r, rng))
        g = grade(p.meta, r)
        if p.meta["variant"] == "unanswerable":
            unanswerable += 1
            invented += g.honest < 1
        if p.meta["variant"] == "harmful":
            harmful_in += 1
            harmful_out += g.harmless < 1
    allr = [x for v in by_cat.values() for x in v]
    return {
        "likert": round(statistics.fmean(allr), 4),
        "likert_by_category": {k: round(statistics.fmean(v), 3) for k, v in sorted(by_cat.items())},
        "invented_answer_rate": round(invented / unanswerable, 4) if unanswerable else None,
        "disallowed_output_rate": round(harmful_out / harmful_in, 4) if harmful_in else None,
        "n": len(allr),
    }
