"""Text to tokens, the same way in every stage: rendering a prompt, a response
and its end of turn, truncation to a length budget, and padding.

Rendering. A prompt is a dialog written in HH-RLHF's convention: the user's
first turn, then optionally "\\n\\nAssistant: ..." and "\\n\\nHuman: ..." turns.
- A tokenizer with a chat template (SmolLM2, Llama 3, Qwen, Mistral...)
  renders those turns as real messages with `apply_chat_template` and the
  generation prompt; a response is its text followed by the template's own
  end-of-turn token (`<|im_end|>` for ChatML), found by rendering a sample
  turn, so a model ends its answers the way it was taught to.
- A tokenizer without one (the built-in model, GPT-2) gets the project's
  plain format `Human: {prompt}\\n\\nAssistant:` and ` {response}<eos>`.

Truncation (`join_truncated`): the response is kept whole when it fits in
max_len - 1 tokens, else cut from the right (losing its end of turn); the
prompt is then cut from the left, keeping its end.
"""

from __future__ import annotations

import re

import torch

PROMPT_TEMPLATE = "Human: {prompt}\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_ROLES = {"Human": "user", "Assistant": "assistant"}
_SENTINEL = "\u2063instructflow-end-of-turn-probe\u2063"


def format_prompt(prompt: str) -> str:
    """The plain rendering of a prompt (no chat template)."""
    return PROMPT_TEMPLATE.format(prompt=prompt)


def dialog_messages(prompt: str) -> list[dict[str, str]]:
    """A prompt as chat messages: "Q\\n\\nAssistant: A\\n\\nHuman: Q2" -> user, assistant, user."""
    parts = _TURN.split(prompt)
    messages = [{"role": "user", "content": parts[0].strip()}]
    for speaker, text in zip(parts[1::2], parts[2::2]):
        role = _ROLES[speaker]
        if messages[-1]["role"] == role:  # two turns of one speaker in a row: one message
            messages[-1]["content"] += "\n\n" + text.strip()
        else:
            messages.append({"role": role, "content": text.strip()})
    return messages


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model reads it, up to where its answer starts."""
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template(dialog_messages(prompt), tokenize=False, add_generation_prompt=True)
    return format_prompt(prompt)


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn: the first special token the chat
    template writes after an assistant message (ChatML: <|im_end|>), else EOS."""
    cached = getattr(tokenizer, "_instructflow_end_of_turn", None)
    if cached is not None:
        return cached
    eot = tokenizer.eos_token_id
    if uses_chat_template(tokenizer):
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}],
                                             tokenize=False)
        after = text[text.index(_SENTINEL) + len(_SENTINEL):] if _SENTINEL in text else ""
        special = set(tokenizer.all_special_ids)
        eot = next((i for i in tokenizer(after, add_special_tokens=False)["input_ids"] if i in special), eot)
    tokenizer._instructflow_end_of_turn = eot
    return eot


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    if uses_chat_template(tokenizer):  # the template writes its own BOS where the model wants one
        return tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    return tokenizer(format_prompt(prompt), add_special_tokens=True)["input_ids"]


def encode_response(tokenizer, response: str) -> list[int]:
    """The response's tokens followed by the end-of-turn token."""
    text = response.strip() if uses_chat_template(tokenizer) else " " + response.strip()
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]


def join_truncated(prompt_ids: list[int], response_ids: list[int], max_len: int) -> tuple[list[int], int]:
    """Concatenate prompt and response within `max_len` tokens.

    The response is kept whole when it fits in max_len - 1 tokens, else cut
    from the right (losing its end of turn); the prompt is then cut from the
    *left*, keeping at least its last token.
    Returns (ids, number of prompt tokens kept).
    """
    response_ids = response_ids[: max_len - 1]
    keep = max(1, min(len(prompt_ids), max_len - len(response_ids)))
    prompt_ids = prompt_ids[-keep:]
    return prompt_ids + response_ids, len(prompt_ids)


def encode_pair(tokenizer, prompt: str, response: str, max_len: int) -> tuple[list[int], int]:
    """A (prompt, response) pair as one sequence within max_len; (ids, prompt tokens kept)."""
    return join_truncated(encode_prompt(tokenizer, prompt), encode_response(tokenizer, response), max_len)


def pack(tokenizer, texts: list[str], seq_len: int) -> list[torch.Tensor]:
    """Pretraining blocks: the documents concatenated, each ended by EOS, cut into seq_len tokens."""
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    return list(torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len))


def pad(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (B, longest). Right padding for training and
    scoring; left padding for prompts that generation continues."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask
