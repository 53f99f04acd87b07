"""Who ranks a round's responses: one small interface.

A ranker gets the prompts and each prompt's K responses, and gives back the
comparisons (each a ranking of its responses, best first, ties allowed) for the
prompts it ranked; prompts it left out are simply not returned. The built-in
suite's training labelers are one ranker; rankings from people (a labeling tool)
are another, behind the same `rank` call.
"""

from __future__ import annotations

import random
from typing import Protocol

from ..config import Params
from ..data.formats import Comparison, Prompt
from ..data.suite.labelers import Labeler


class Ranker(Protocol):
    name: str

    def rank(self, prompts: list[Prompt], responses: list[list[str]]) -> list[Comparison]:
        """One comparison per prompt ranked, in the prompts' order."""
        ...


class SimulatedLabelers:
    """The built-in suite's training labelers: each prompt goes to one drawn at random, as in `collect`."""

    name = "simulated labelers"

    def __init__(self, params: Params, seed: int):
        self.labelers = [Labeler(lab) for lab in params.data.labelers if not lab.heldout]
        self.rng = random.Random(seed)

    def rank(self, prompts: list[Prompt], responses: list[list[str]]) -> list[Comparison]:
        out = []
        for p, rs in zip(prompts, responses, strict=True):
            lab = self.rng.choice(self.labelers)
            out.append(Comparison(id=p.id, prompt=p.prompt, category=p.category, meta=p.meta, responses=rs,
                                  ranking=lab.rank(p.meta, rs, self.rng), labeler=lab.name))
        return out


def make_ranker(params: Params, seed: int) -> Ranker:
    if params.data.source != "builtin":
        raise ValueError("rounds need someone to rank the new responses: the built-in suite's labelers "
                         "(data.source: builtin); rankings from people are not wired in yet")
    return SimulatedLabelers(params, seed)
