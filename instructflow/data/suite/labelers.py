"""Simulated labelers: each weighs the three axes in its own way, rates on the
paper's 1-7 Likert scale with its own noise, ranks K responses by sampling a
Plackett-Luce ranking, and writes demonstrations with its own error rate.

Quality of a response for labeler L (all terms in [0, 1]):

    helpful = correct * ((1 - cw_L) + cw_L * constraint)
    q       = helpful * (1 - hon_L * (1 - honest)) * (1 - harm_L * (1 - harmless))
    latent  = 1 + 6 q                                   (on the 1-7 scale)

Likert rating = clip(round(latent + N(0, rating_noise_L)), 1, 7).
Ranking of K responses ~ Plackett-Luce with weights exp(latent / T_L): the
best is drawn with probability softmax(latent / T_L), then the next from what
is left, and so on. For K = 2 this is Bradley-Terry:
P(a > b) = sigmoid((latent_a - latent_b) / T_L).
"""

from __future__ import annotations

import itertools
import math
import random

from ...config import LabelerConfig
from .instructions import Grade, flawed_response, gold_response, grade


class Labeler:
    def __init__(self, cfg: LabelerConfig):
        self.cfg = cfg
        self.name = cfg.name

    def quality(self, g: Grade) -> float:
        c = self.cfg
        helpful = g.correct * ((1 - c.constraint_weight) + c.constraint_weight * g.constraint)
        return helpful * (1 - c.honesty_penalty * (1 - g.honest)) * (1 - c.harm_penalty * (1 - g.harmless))

    def latent(self, spec: dict, response: str) -> float:
        return 1.0 + 6.0 * self.quality(grade(spec, response))

    def likert(self, spec: dict, response: str, rng: random.Random) -> int:
        noisy = self.latent(spec, response) + rng.gauss(0.0, self.cfg.rating_noise)
        return int(min(7, max(1, round(noisy))))

    def rank(self, spec: dict, responses: list[str], rng: random.Random) -> list[int]:
        """Indices of `responses` best to worst, sampled by Plackett-Luce."""
        utils = [self.latent(spec, r) / self.cfg.ranking_temperature for r in responses]
        left, order = list(range(len(responses))), []
        while left:
            m = max(utils[i] for i in left)
            weights = [math.exp(utils[i] - m) for i in left]
            pick = rng.choices(left, weights=weights)[0]
            order.append(pick)
            left.remove(pick)
        return order

    def demonstrate(self, spec: dict, rng: random.Random) -> str:
        """A demonstration: gold most of the time, a plausible mistake otherwise."""
        if rng.random() < self.cfg.demo_error_rate:
            return flawed_response(spec, rng)
        return gold_response(spec, rng)


def pairwise_agreement(rank_a: list[int], rank_b: list[int]) -> tuple[int, int]:
    """(agreeing pairs, total pairs) between two rankings of the same K items."""
    pos_a = {item: i for i, item in enumerate(rank_a)}
    pos_b = {item: i for i, item in enumerate(rank_b)}
    pairs = list(itertools.combinations(range(len(rank_a)), 2))
    agree = sum((pos_a[x] < pos_a[y]) == (pos_b[x] < pos_b[y]) for x, y in pairs)
    return agree, len(pairs)
