"""Sampling responses: plain temperature sampling (no top-k / top-p, as the
paper samples at T=1) or greedy, from left-padded prompt batches with a KV cache.

`sample_tokens` is the decoding loop. Two things make it faster than
`model.generate` on the workloads here (measured in docs/decisions.md):
- several samples per prompt share the prompt's computation: the prompt runs
  once and its KV cache is copied to each sample's row (HF's `generate` runs
  every prompt once per sample);
- a row that has produced EOS leaves the batch (its cache rows are dropped), so
  each step costs the unfinished rows only, where `generate` keeps computing
  every row until the longest one ends. Responses here average a quarter of
  the length limit.
Each row's tokens are drawn from softmax(logits / T) exactly as `generate` does;
which random numbers a row gets depends on the batch, so samples match
`generate`'s in distribution, not draw for draw (greedy decoding matches token
for token: tests/test_generation.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .encoding import encode_prompt, end_of_turn_id, pad
from .modeling import accepts_logits_to_keep, context_length, position_ids_from_mask


@torch.no_grad()
def sample_tokens(model, ids: torch.Tensor, mask: torch.Tensor, *, num_samples: int = 1, max_new_tokens: int,
                  eos_id: int, pad_id: int, temperature: float = 1.0, greedy: bool = False,
                  all_done: Callable[[bool], bool] | None = None) -> torch.Tensor:
    """New tokens for `num_samples` rows per left-padded prompt, prompt-major (rows i*n .. i*n+n-1 answer
    prompt i): (B * num_samples, steps), EOS kept, `pad_id` after it, where steps <= max_new_tokens is
    the longest row's length (as `generate` returns). A row without EOS ran to the limit.

    `all_done(done_here)` says whether every process has finished (FSDP: each forward pass
    gathers every layer in every process together, so a process whose rows have all ended
    keeps running one-token passes, their output unused, until the others end too; its
    own rows and random draws are those of an unsharded run)."""
    keep_last = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True, **keep_last)
    cache = out.past_key_values
    cache.batch_repeat_interleave(num_samples)  # each sample row starts from its prompt's keys and values
    logits = out.logits[:, -1].repeat_interleave(num_samples, 0)
    mask = mask.repeat_interleave(num_samples, 0)
    position = mask.sum(-1)  # of the token about to be fed: prompts are left-padded
    tokens = torch.full((mask.size(0), max_new_tokens), pad_id, dtype=torch.long, device=ids.device)
    rows = torch.arange(mask.size(0), device=ids.device)  # which output row each batch row is
    length, done = 0, False
    for steps in range(1, max_new_tokens + 1):
        if not done:
            if greedy:
                new = logits.argmax(-1)
            else:
                new = torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1).squeeze(1)
            tokens[rows, steps - 1] = new
            running = (new != eos_id).nonzero().squeeze(1)
            length, done = steps, steps == max_new_tokens or running.numel() == 0
        if done if all_done is None else all_done(done):
            break
        if done:  # keeping pace with the other processes
            model(input_ids=ids[:1, -1:], attention_mask=ids.new_ones(1, 1), use_cache=False)
            continue
        if running.numel() < rows.numel():  # finished rows leave the batch and the cache
            cache.batch_select_indices(running)
            rows, mask, new, position = rows[running], mask[running], new[running], position[running]
        mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
        logits = model(input_ids=new[:, None], attention_mask=mask, position_ids=position[:, None],
                       past_key_values=cache, use_cache=True).logits[:, -1]
        position = position + 1
    return tokens[:, :length]


@dataclass(frozen=True)
class Answer:
    text: str          # decoded, stripped, special tokens removed
    ended: bool        # the model ended it (end-of-turn token) within the limit
    tokens: int        # its length in tokens, the end of turn included


@torch.no_grad()
def sample_answers(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    greedy: bool = False,
    batch_size: int = 64,
    seed: int = 0,
) -> list[list[Answer]]:
    """`num_samples` answers per prompt, rendered and ended as every stage renders them
    (encoding.py). Prompts longer than the model's context allows are cut from the left."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    max_prompt = max(1, context_length(model) - max_new_tokens)
    eos = end_of_turn_id(tokenizer)
    torch.manual_seed(seed)
    out: list[list[Answer]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids, mask = pad([encode_prompt(tokenizer, p)[-max_prompt:] for p in chunk], tokenizer.pad_token_id, side="left")
        tokens = sample_tokens(model, ids.to(device), mask.to(device), num_samples=num_samples,
                               max_new_tokens=max_new_tokens, eos_id=eos,
                               pad_id=tokenizer.pad_token_id, temperature=temperature, greedy=greedy)
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        is_eos = tokens == eos
        ended = is_eos.any(1).tolist()
        lengths = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(is_eos[:, 0], tokens.size(1),
                                                                                              dtype=torch.long)).tolist()
        rows = [Answer(t.strip(), e, n) for t, e, n in zip(texts, ended, lengths)]
        out += [rows[i * num_samples : (i + 1) * num_samples] for i in range(len(chunk))]
    model.train(was_training)
    return out


def generate(model, tokenizer, prompts: list[str], **kwargs) -> list[list[str]]:
    """The texts of `sample_answers` (same arguments)."""
    return [[a.text for a in row] for row in sample_answers(model, tokenizer, prompts, **kwargs)]
