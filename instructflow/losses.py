"""The losses more than one stage uses: the language-modelling loss (pretraining,
SFT, PPO-ptx, evaluation), per-token log-probabilities (PPO, evaluation) and
the reward model's K-wise ranking loss. PPO's own terms live in ppo.py, in
the order the algorithm uses them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100.

    logits: (B, T, V) predicts token t+1 at position t; labels: (B, T).
    """
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), ignore_index=-100)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / T) at `tokens`, and optionally the entropy of each position's distribution.

    logits: (..., V), the distribution each token was drawn from; tokens: (...). Returns (...)-shaped tensors."""
    logp_all = F.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, tokens.clamp(min=0)[..., None]).squeeze(-1)
    if not with_entropy:
        return logp, None
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def kwise_loss(rewards: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor, pair_weight: torch.Tensor) -> torch.Tensor:
    """The RM loss (Ouyang et al. 2022, eq. 1): -sum_p w_p log sigmoid(r[winner_p] - r[loser_p]).

    rewards: (N,) one per response; winners, losers, pair_weight: (P,). With w_p = 1 / (C(K,2) * B)
    this is the mean over the batch's B prompts of -1/C(K,2) sum over that prompt's pairs."""
    return -(pair_weight * F.logsigmoid(rewards[winners] - rewards[losers])).sum()
