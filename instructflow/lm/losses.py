"""The losses more than one stage uses: the language-modelling loss (pretraining,
SFT, PPO-ptx, evaluation, DPO), per-token log-probabilities (PPO, evaluation),
the reward model's K-wise ranking loss (RM, pairwise DPO) and DPO's
Plackett-Luce loss. PPO's own terms live in ppo.py, in
the order the algorithm uses them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .modeling import layer_classes


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100.

    logits: (B, T, V) predicts token t+1 at position t; labels: (B, T).
    """
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), ignore_index=-100)


class LMLoss(torch.nn.Module):
    """A causal LM whose forward returns `causal_lm_loss` without ever holding the (B, T, V) logits.

    The transformer runs once; the LM head then runs only on the positions that carry a label
    (SFT: the response tokens), `chunk_size` positions at a time, each chunk's logits recomputed
    in the backward pass instead of kept. With SmolLM2's 49,152-token vocabulary, full fp32 logits
    of a batch of 8 x 256 are 400 MB per copy, and a step holds several copies.
    Prepare this module (not the bare LM) with accelerate, so DDP and autocast see its forward."""

    def __init__(self, lm: torch.nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.lm, self.chunk_size = lm, chunk_size
        self._no_split_modules = layer_classes(lm)  # FSDP shards the wrapper layer by layer, as it would the LM

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, per_row: bool = False) -> torch.Tensor:
        """The mean loss over labelled tokens; with per_row, each row's summed loss, (B,):
        -log p(labelled tokens of that row), what DPO's implicit reward reads."""
        nll, rows = self.token_nll(input_ids, attention_mask, labels)
        if per_row:
            return nll.new_zeros(input_ids.size(0)).index_add(0, rows, nll)
        return nll.mean() if nll.numel() else nll.sum()

    def token_nll(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-log p of every labelled token, (N,), and the batch row each belongs to, (N,)."""
        from .modeling import backbone, position_ids_from_mask

        if labels is None:
            labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
        positions = None if attention_mask is None else position_ids_from_mask(attention_mask)
        hidden = backbone(self.lm)(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).last_hidden_state
        target = labels[:, 1:]                                                       # position t predicts token t+1
        keep = target != -100
        h, y = hidden[:, :-1][keep], target[keep]                                    # (N, H), (N,)
        rows = keep.nonzero()[:, 0]
        if y.numel() == 0:
            return hidden.sum() * 0.0 + h.new_zeros(0), rows
        head, cap = self.lm.get_output_embeddings(), getattr(self.lm.config, "final_logit_softcapping", None)

        def nll(h_chunk: torch.Tensor, y_chunk: torch.Tensor) -> torch.Tensor:
            logits = head(h_chunk).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            return F.cross_entropy(logits, y_chunk, reduction="none")

        chunks = [checkpoint(nll, h[i : i + self.chunk_size], y[i : i + self.chunk_size], use_reentrant=False)
                  for i in range(0, y.numel(), self.chunk_size)]
        return torch.cat(chunks), rows


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


def plackett_luce_loss(rewards: torch.Tensor, owner: torch.Tensor, levels: torch.Tensor, n_prompts: int) -> torch.Tensor:
    """-log P(ranking) under the Plackett-Luce model, summed over each prompt, mean over prompts.

    rewards: (N,) one per response (DPO: beta * log(pi/pi_SFT)); owner: (N,) its prompt; levels: (N,)
    its rank in that prompt, 0 best. For a strict ranking y_1 > ... > y_K the prompt's term is
        -sum_{k<K} [ r_k - log sum_{j>=k} exp(r_j) ]     (Rafailov et al. 2023, eq. 18)
    With ties (equal levels) each response's denominator holds every response ranked no better
    than it, tied ones included (Breslow's form); the worst level adds no term. For K = 2 it is
    -log sigmoid(r_w - r_l), pairwise DPO."""
    same = owner[:, None] == owner[None, :]
    below = same & (levels[None, :] >= levels[:, None])                     # [i, j]: j in i's denominator
    worst = levels[None, :].masked_fill(~same, -1).max(1).values             # (N,) the worst level of i's prompt
    denom = torch.logsumexp(rewards[None, :].masked_fill(~below, float("-inf")), dim=1)
    terms = (rewards - denom).masked_fill(levels == worst, 0.0)
    return -terms.sum() / n_prompts


def conservative_reward(scores: torch.Tensor, how: str = "mean_minus_std", std_coef: float = 1.0) -> torch.Tensor:
    """One reward per response from an ensemble's (k, B) scores (Coste et al. 2024):
    mean - std_coef * std (population std over the k members), the minimum, or the mean."""
    if how == "mean_minus_std":
        return scores.mean(0) - std_coef * scores.std(0, correction=0)
    if how == "min":
        return scores.min(0).values
    if how == "mean":
        return scores.mean(0)
    raise ValueError(f"unknown ensemble reward '{how}': mean_minus_std, min or mean")
