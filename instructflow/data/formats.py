"""The JSONL record formats that pass between stages (documented in README.md).

- Prompt:         {"id", "prompt", "category"?, "meta"?}
- Demonstration:  {"id", "prompt", "response", "category"?, "labeler"?, "meta"?}
- Comparison:     {"id", "prompt", "responses": [K strings], "ranking": [indices best->worst]}
                  or the same with "scores": [K numbers] (higher is better, ties allowed)
- PretrainText:   {"text"}

`meta` holds what the built-in suite needs to grade a response (the task
spec); imported data leaves it empty.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator, model_validator

MIN_K, MAX_K = 2, 9


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN scores never reach training


def _non_blank(v: str, what: str) -> str:
    if not v.strip():
        raise ValueError(f"{what} is empty or whitespace")
    return v


class Prompt(_Record):
    id: str = Field(min_length=1)
    prompt: str
    category: str | None = None
    meta: dict[str, Any] | None = None

    @field_validator("id", "prompt")
    @classmethod
    def _prompt(cls, v: str, info) -> str:
        return _non_blank(v, info.field_name)


class Demonstration(Prompt):
    response: str
    labeler: str | None = None

    @field_validator("response")
    @classmethod
    def _response(cls, v: str) -> str:
        return _non_blank(v, "response")


class Comparison(Prompt):
    responses: list[str]
    ranking: list[StrictInt] | None = None      # strict: true/false or "1" are not ranks
    scores: list[StrictFloat] | None = None
    labeler: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Comparison:
        k = len(self.responses)
        if not MIN_K <= k <= MAX_K:
            raise ValueError(f"responses: need {MIN_K} to {MAX_K} responses, got {k}")
        for i, r in enumerate(self.responses):
            if not r.strip():
                raise ValueError(f"responses[{i}] is empty or whitespace")
        if (self.ranking is None) == (self.scores is None):
            raise ValueError("give exactly one of 'ranking' (indices best to worst) or 'scores'")
        if self.ranking is not None and sorted(self.ranking) != list(range(k)):
            raise ValueError(f"ranking must be a permutation of 0..{k - 1}, got {self.ranking}")
        if self.scores is not None and len(self.scores) != k:
            raise ValueError(f"scores has {len(self.scores)} entries for {k} responses")
        return self

    @property
    def k(self) -> int:
        return len(self.responses)

    def pairs(self) -> list[tuple[int, int]]:
        """Every (winner, loser) index pair the ranking states; ties give no pair.

        A full ranking of K gives C(K,2) pairs.
        """
        if self.ranking is not None:
            r = self.ranking
            return [(r[i], r[j]) for i in range(len(r)) for j in range(i + 1, len(r))]
        s = self.scores
        return [(i, j) for i in range(self.k) for j in range(self.k) if s[i] > s[j]]


def split_by_prompt(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Split records so that no prompt text is in both parts (no train/validation
    leakage); about `val_fraction` of the distinct prompts go to validation."""
    import random

    prompts = sorted({r.prompt for r in records})
    random.Random(seed).shuffle(prompts)
    n_val = max(1, round(len(prompts) * val_fraction))
    val_prompts = set(prompts[:n_val])
    return [r for r in records if r.prompt not in val_prompts], [r for r in records if r.prompt in val_prompts]


class PretrainText(_Record):
    text: str

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        return _non_blank(v, "text")
