"""The `reward_ensemble` stage and the ensemble's reward (Coste et al. 2024).

A proxy RM is wrong in places, and PPO finds those places. k reward models
that differ only in their seed (head initialisation, data order; optionally a
bootstrap resample of the comparisons) agree where the data pins the reward
down and disagree where it does not; PPO against a conservative reward, the
members' mean minus lambda times their standard deviation, or their minimum,
gains little from answers the members disagree on.

Member 0 is the `reward` stage's RM (it trained exactly as member i would with
i = 0); the stage trains members 1..k-1 with project.seed + i, each centred on
the demonstrations as the RM is, so their scores share a zero.
Outputs: artifacts/reward_ensemble/member_<i>/model and members.json (the
member paths, in order); metrics: every member's validation accuracy and the
ensemble mean's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import EnsembleConfig
from ..context import StageContext
from ..data.formats import Comparison
from ..io import read_jsonl, write_json
from ..lm.losses import conservative_reward
from ..lm.modeling import load_reward_model, position_limit, reward_scores
from ..lm.training import seed_everything
from .reward import RewardData, comparison_scores, ranking_accuracy, train_reward_model

log = logging.getLogger(__name__)


def member_dirs(ctx: StageContext) -> list[Path]:
    """The ensemble's models as a stage declares them: member_0 (the reward stage's RM; `reward_model` in PPO's
    inputs), then member_1 .. member_{k-1} (the reward_ensemble stage's outputs, the others' inputs)."""
    first = ctx.input("member_0") if ctx.has_input("member_0") else ctx.input("reward_model")
    return [first, *(ctx.input(f"member_{i}") if ctx.has_input(f"member_{i}") else ctx.output(f"member_{i}")
                     for i in range(1, ctx.params.ensemble.members))]


class RewardEnsemble(torch.nn.Module):
    """k frozen reward models scored together; `forward` gives the conservative reward and
    the members' spread, both (B,)."""

    def __init__(self, members: list[torch.nn.Module], cfg: EnsembleConfig):
        super().__init__()
        self.members, self.cfg = torch.nn.ModuleList(members), cfg

    @torch.no_grad()
    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Every member's reward (bias included) of every row; (k, B)."""
        return torch.stack([reward_scores(m, input_ids, attention_mask).float() for m in self.members])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scores(input_ids, attention_mask)
        return conservative_reward(s, self.cfg.reward, self.cfg.std_coef), s.std(0, correction=0)


def load_ensemble(ctx: StageContext, device) -> RewardEnsemble:
    members = []
    for d in member_dirs(ctx):
        m, _ = load_reward_model(d, ctx.params.model.dtype)
        members.append(m.requires_grad_(False).eval().to(device))
    return RewardEnsemble(members, ctx.params.ensemble)


def run_reward_ensemble(ctx: StageContext) -> dict | None:
    """Train members 1..k-1 (the reward stage's RM is member 0), then measure the ensemble."""
    params = ctx.params
    metrics: dict = {"members": params.ensemble.members, "bootstrap": params.ensemble.bootstrap}
    data = RewardData.of(ctx)
    for i in range(1, params.ensemble.members):
        seed = params.project.seed + i
        seed_everything(seed)  # the member's score head and data order, as the reward stage's with its seed
        with ctx.phase(f"member_{i}"):
            member = train_reward_model(ctx, data, ctx.output(f"member_{i}").parent, f"{ctx.run_key}-member{i}", seed,
                                        centre=True, bootstrap=params.ensemble.bootstrap)
        if member is None:
            return None
        metrics[f"member_{i}_val_accuracy"] = member.get("val_accuracy")
    seed_everything(params.project.seed)
    dirs = member_dirs(ctx)
    with ctx.phase("measure"):
        comparisons = read_jsonl(data.val, Comparison)
        per_member = []
        for d in dirs:
            m, tok = load_reward_model(d, params.model.dtype)
            per_member.append(comparison_scores(m, tok, comparisons, min(params.reward.max_len, position_limit(m))))
        accs = [ranking_accuracy(s, comparisons) for s in per_member]
        mean = [[sum(v) / len(v) for v in zip(*resp, strict=True)] for resp in zip(*per_member, strict=True)]
        spread = torch.tensor([x for resp in zip(*per_member, strict=True) for x in zip(*resp, strict=True)]).std(1, correction=0)
    metrics.update({"member_val_accuracies": [round(a, 4) for a in accs], "val_accuracy": round(ranking_accuracy(mean, comparisons), 4),
                    "mean_member_val_accuracy": round(sum(accs) / len(accs), 4), "val_score_std": round(float(spread.mean()), 4)})
    write_json(ctx.output("members"), {"members": [str(d) for d in dirs], "reward": params.ensemble.reward,
                                       "std_coef": params.ensemble.std_coef})
    log.info("reward_ensemble: %s", metrics)
    return metrics
