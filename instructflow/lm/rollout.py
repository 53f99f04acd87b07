"""Rollouts for RL: sampling responses from the policy, and what the trainer records about them.

Making experience is one seam with two sides:

    Sampler.sample(prompt_ids, prompt_mask, ...)  -> response tokens     (who generates)
    make_rollout(sampler, models, ...)            -> Rollout             (what the trainer measures)

`PolicySampler` decodes with the policy being trained (instructflow's own loop,
lm/generation.sample_tokens). A rollout engine (vLLM) implements the same two
calls: `sample`, and `sync(policy)`, which the trainer calls after every update
so that the engine samples from the current weights. Whoever samples, the
log-probs the loss uses are recomputed here by the trainer's own model.

Shapes: a rollout's token tensors are (B, R), one row per prompt and one column
per response position; its `mask` is 1 on the tokens the policy chose, EOS included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .encoding import encode_prompt, end_of_turn_id, pad
from .generation import sample_tokens
from .losses import token_logprobs
from .modeling import (
    accepts_logits_to_keep,
    backbone,
    context_length,
    position_ids_from_mask,
    reward_scores,
    score_head,
)


class Sampler(Protocol):
    """Who generates the responses of a rollout."""

    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
               temperature: float) -> torch.Tensor:
        """Response tokens for left-padded prompts: (B, steps), EOS kept, padding after it."""
        ...

    def sync(self, policy: torch.nn.Module) -> None:
        """The policy's weights changed (after an update): sample from them from now on."""
        ...


class PolicySampler:
    """Samples with the policy being trained, through instructflow's decoding loop (KV cache, finished
    rows leave the batch). `policy()` gives the current (unwrapped) policy; `all_done` keeps sharded
    processes in step (training.all_done_across)."""

    def __init__(self, policy: Callable[[], torch.nn.Module], eos_id: int, pad_id: int,
                 all_done: Callable[[bool], bool] | None = None):
        self.policy, self.eos_id, self.pad_id, self.all_done = policy, eos_id, pad_id, all_done

    def sample(self, prompt_ids, prompt_mask, max_new_tokens, temperature):
        return sample_tokens(self.policy(), prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, eos_id=self.eos_id,
                             pad_id=self.pad_id, temperature=temperature, all_done=self.all_done)

    def sync(self, policy) -> None:
        """Nothing to do: it samples from the live policy."""


# --------------------------------------------------------------------------- what the trainer measures
class ValueModel(torch.nn.Module):
    """Per-token values from a sequence classifier (the RM): its backbone plus its
    scalar head applied at every position. forward -> (B, T)."""

    def __init__(self, seq_cls):
        super().__init__()
        from .modeling import layer_classes

        self.seq_cls = seq_cls
        self._no_split_modules = layer_classes(seq_cls)  # for FSDP's layer-by-layer wrapping

    def forward(self, input_ids, attention_mask, position_ids):
        hidden = backbone(self.seq_cls)(input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=position_ids).last_hidden_state
        return score_head(self.seq_cls)(hidden).squeeze(-1).float()


def response_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, prompt_width: int, temperature: float,
                      with_entropy: bool = False):
    """log pi(y_t | x, y_<t) for the response tokens ids[:, P:], (B, R); and the per-token entropy.

    Position P-1+t predicts response token t, so only the last R+1 positions need the LM
    head: `logits_to_keep` skips it on the prompt. That is 5% of a training step on the
    default model (vocabulary 1,024; docs/decisions.md) and most of one with a real vocabulary."""
    R = ids.size(1) - prompt_width
    keep = {"logits_to_keep": R + 1} if accepts_logits_to_keep(model) else {}
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn), **keep).logits
    return token_logprobs(logits[:, -R - 1 : -1], ids[:, prompt_width:], temperature, with_entropy)


def response_values(value_model, ids: torch.Tensor, attn: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """V(x, y_<t) for each response token t, (B, R): read where that token is predicted."""
    return value_model(ids, attn, position_ids_from_mask(attn))[:, prompt_width - 1 : -1]


def reference_logprobs(policy, ref, ids: torch.Tensor, attn: torch.Tensor, prompt_width: int, temperature: float) -> torch.Tensor:
    """log pi_SFT of the response tokens: the frozen reference model, or, with LoRA,
    the policy itself with its adapters disabled (which is SFT: no second copy)."""
    if ref is not None:
        return response_logprobs(ref, ids, attn, prompt_width, temperature)[0]
    with policy.disable_adapter():
        return response_logprobs(policy, ids, attn, prompt_width, temperature)[0]


def apply_no_eos_score(scores: torch.Tensor, ended: torch.Tensor, no_eos_score: float) -> torch.Tensor:
    """The RM's score where the response ended with EOS, else the fixed penalty score."""
    return torch.where(ended, scores, torch.full_like(scores, no_eos_score))


@dataclass
class RolloutModels:
    """The models a rollout is measured with: the policy (unwrapped), the frozen reference (None with LoRA:
    the policy with its adapters off), the value model (None for critic-free methods), and the reward:
    reward(ids, attn) -> (scores (B,), the ensemble members' spread (B,) or None)."""

    policy: torch.nn.Module
    ref: torch.nn.Module | None
    value: torch.nn.Module | None
    reward: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def rm_reward(rm: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, None]]:
    """One RM as a rollout's reward: its score (bias included) read at the last non-pad token."""
    return lambda ids, attn: (reward_scores(rm, ids, attn).float(), None)


@dataclass
class Rollout:
    ids: torch.Tensor           # (B, P+R) prompt (left-padded) + response (right-padded)
    attn: torch.Tensor          # (B, P+R)
    mask: torch.Tensor          # (B, R) response tokens the policy chose, EOS included
    prompt_width: int           # P
    logprobs: torch.Tensor      # (B, R) log pi_old
    ref_logprobs: torch.Tensor  # (B, R) log pi_SFT
    values: torch.Tensor        # (B, R) V_old (zeros without a value model)
    scores: torch.Tensor        # (B,) RM score, or no_eos_score
    raw_scores: torch.Tensor    # (B,) RM score as read
    ended: torch.Tensor         # (B,) bool: EOS within the limit
    reward_std: torch.Tensor | None = None  # (B,) the ensemble members' spread


@torch.no_grad()
def make_rollout(sampler: Sampler, models: RolloutModels, tok, prompts: list[str], cfg, device) -> Rollout:
    """Sample one response per prompt (cfg: max_new_tokens, temperature, no_eos_score), then measure it:
    log pi_old, log pi_SFT, V_old per token, and the RM's score read at EOS (or the cut-off token)."""
    max_prompt = context_length(models.policy) - cfg.max_new_tokens
    p_ids, p_attn = pad([encode_prompt(tok, p)[-max_prompt:] for p in prompts], tok.pad_token_id, side="left")
    p_ids, p_attn = p_ids.to(device), p_attn.to(device)
    eos = end_of_turn_id(tok)
    resp = sampler.sample(p_ids, p_attn, cfg.max_new_tokens, cfg.temperature)
    P = p_ids.size(1)
    is_eos = resp == eos
    ended = is_eos.any(1)
    first_eos = torch.where(ended, is_eos.float().argmax(1), torch.full_like(ended, resp.size(1) - 1, dtype=torch.long))
    mask = (torch.arange(resp.size(1), device=device)[None] <= first_eos[:, None]).float()
    resp = torch.where(mask.bool(), resp, torch.full_like(resp, tok.pad_token_id))
    ids = torch.cat([p_ids, resp], 1)
    attn = torch.cat([p_attn, mask.long()], 1)
    logprobs, _ = response_logprobs(models.policy, ids, attn, P, cfg.temperature)
    ref_logprobs = reference_logprobs(models.policy, models.ref, ids, attn, P, cfg.temperature)
    values = response_values(models.value, ids, attn, P) if models.value is not None else torch.zeros_like(mask)
    raw, spread = models.reward(ids, attn)  # read at EOS, or the cut-off token; an ensemble's conservative reward
    return Rollout(ids, attn, mask, P, logprobs * mask, ref_logprobs * mask, values * mask,
                   apply_no_eos_score(raw, ended, cfg.no_eos_score), raw, ended, spread)


def minibatch(ro: Rollout, rows: torch.Tensor, *per_token: torch.Tensor):
    """Rows `rows` of a rollout, without the columns that are padding in every one of them:
    the left-padded prompts' leading pad columns and the right-padded responses' trailing
    ones (the batch is as wide as its longest prompt plus its longest response). Exact:
    positions come from the attention mask, and padding carries no loss.

    Returns (ids, attn, prompt_width, [each (B, R) tensor of `per_token`, cut to match])."""
    attn = ro.attn[rows]
    lead = int((attn[:, : ro.prompt_width].sum(0) == 0).cumprod(0).sum())  # all-pad prompt columns
    width = int(ro.mask[rows].sum(1).max())                                 # longest response
    end = ro.prompt_width + width
    return (ro.ids[rows, lead:end], attn[:, lead:end], ro.prompt_width - lead,
            [t[rows, :width] for t in per_token])
