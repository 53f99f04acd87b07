"""Sampling responses: left-padded batches, KV cache (HF `generate`), plain
temperature sampling (no top-k / top-p, as the paper samples at T=1), or greedy."""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from .modeling import context_length, encode_prompt


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (B, width): each prompt's last token sits at the right edge."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def sampling_config(tokenizer, *, max_new_tokens: int, num_samples: int = 1, temperature: float = 1.0,
                    greedy: bool = False) -> GenerationConfig:
    """Plain temperature sampling (top_k=0, top_p=1) or greedy decoding."""
    return GenerationConfig(
        do_sample=not greedy, temperature=temperature if not greedy else None, top_k=0 if not greedy else None,
        top_p=1.0 if not greedy else None, max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )


@torch.no_grad()
def generate(
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
) -> list[list[str]]:
    """`num_samples` responses per prompt (decoded, stripped, special tokens removed).

    Prompts longer than the context allows are cut from the left.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen_cfg = sampling_config(tokenizer, max_new_tokens=max_new_tokens, num_samples=num_samples,
                              temperature=temperature, greedy=greedy)
    max_prompt = context_length(model) - max_new_tokens
    torch.manual_seed(seed)
    out: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids, mask = left_pad([encode_prompt(tokenizer, p)[-max_prompt:] for p in chunk], tokenizer.pad_token_id)
        seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
        texts = tokenizer.batch_decode(seqs[:, ids.size(1):], skip_special_tokens=True)
        for i in range(len(chunk)):
            out.append([t.strip() for t in texts[i * num_samples : (i + 1) * num_samples]])
    model.train(was_training)
    return out
