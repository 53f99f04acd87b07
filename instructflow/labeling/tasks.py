"""Label Studio tasks and annotations <-> instructflow's records (pure functions).

A ranking task carries, beside what the page shows, `data.instructflow`: the
prompt's record (id, category, meta), the order the responses are shown in
(`order[j]` is the index of the response shown as letter j) and the sha256 of
the responses as pushed, so that a pull maps every column back to the right
response and notices a task whose text was edited in the UI.

An annotation becomes a comparison when it ranked every response (a strict
order is a `ranking`; ties, a response sharing a column with another, are
`scores`: K - column). Anything else is a `Problem` with the task and
annotation ids and the reason, never guessed at: skipped, partial (fewer than
K ranked), contradictory (a response in two columns, or a letter the task has
not), from a user who is not one of the project's labelers, or on an edited task.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

from ..data.formats import Comparison, Demonstration, Prompt
from .interfaces import COMMENT, DEMONSTRATION, FLAGS, LETTERS, RANKER, bucket


@dataclass(frozen=True)
class Problem:
    """An annotation (or task) a pull left out, and why."""

    task: int
    annotation: int | None
    reason: str

    def as_dict(self) -> dict:
        return {"task": self.task, "annotation": self.annotation, "reason": self.reason}


def responses_sha(responses: list[str]) -> str:
    return hashlib.sha256(json.dumps(responses, ensure_ascii=False).encode()).hexdigest()


# --------------------------------------------------------------------------- push
def ranking_task(prompt: Prompt, responses: list[str], rng: random.Random, known: list[int] | None = None) -> dict:
    """The Label Studio task that asks for a ranking of `responses` to `prompt`, shown in a random order.
    `known`: the ranking that counts as the right answer (a known-answer task, which scores labelers)."""
    if not 2 <= len(responses) <= len(LETTERS):
        raise ValueError(f"prompt {prompt.id}: {len(responses)} responses; a ranking task takes 2 to {len(LETTERS)}")
    order = list(range(len(responses)))
    rng.shuffle(order)
    letters = LETTERS[: len(responses)]
    shown = [{"id": letters[j], "title": f"Response {letters[j]}", "body": responses[i]} for j, i in enumerate(order)]
    record = {"kind": "ranking", "key": prompt.id, "category": prompt.category, "meta": prompt.meta, "order": order,
              "sha256": responses_sha(responses), **({"known": known} if known is not None else {})}
    return {"prompt": prompt.prompt, "responses": shown, "letters": [{"value": x} for x in letters],
            "instructflow": record}


def demonstration_task(prompt: Prompt) -> dict:
    return {"prompt": prompt.prompt, "instructflow": {"kind": "demonstration", "key": prompt.id,
                                                      "category": prompt.category, "meta": prompt.meta}}


def task_responses(data: dict) -> list[str]:
    """The responses of a ranking task in their original order (as pushed, unless edited)."""
    order, shown = data["instructflow"]["order"], data["responses"]
    out = [""] * len(order)
    for j, i in enumerate(order):
        out[i] = shown[j]["body"]
    return out


def edited(data: dict) -> bool:
    """Whether a ranking task's responses are not the ones pushed (edited in Label Studio)."""
    try:
        return responses_sha(task_responses(data)) != data["instructflow"]["sha256"]
    except (KeyError, IndexError, TypeError):
        return True


# --------------------------------------------------------------------------- pull
def _result(annotation: dict, name: str) -> dict | None:
    return next((r for r in annotation.get("result") or [] if r.get("from_name") == name), None)


def ranking_levels(annotation: dict, k: int) -> list[int] | str:
    """Each shown letter's column (0 best), or why the annotation is not a full ranking."""
    letters = LETTERS[:k]
    result = _result(annotation, RANKER)
    columns = (result or {}).get("value", {}).get("ranker") or {}
    level: dict[str, int] = {}
    for name, items in columns.items():
        if name == "_" or not items:
            continue
        col = next((i for i in range(k) if bucket(i) == name), None)
        if col is None:
            return f"contradictory: a column '{name}' the page does not have"
        for letter in items:
            if letter not in letters:
                return f"contradictory: response '{letter}' is not one of this task's {k}"
            if letter in level:
                return f"contradictory: response {letter} is in two columns"
            level[letter] = col
    if len(level) < k:
        missing = "".join(x for x in letters if x not in level)
        return f"partial: {len(level)} of {k} responses ranked (not ranked: {', '.join(missing)})"
    if len(set(level.values())) == 1:
        return "partial: every response in one column (no preference stated)"
    return [level[x] for x in letters]


def levels_to_order(levels_by_response: list[int]) -> Comparison | dict:
    """A strict order as `ranking`, ties as `scores` (K - column): the fields of a Comparison."""
    k = len(levels_by_response)
    if len(set(levels_by_response)) == k:
        return {"ranking": sorted(range(k), key=lambda i: levels_by_response[i])}
    return {"scores": [float(k - lv) for lv in levels_by_response]}


def comparison_of(data: dict, levels: list[int], labeler: str, id_: str | None = None) -> Comparison:
    """The comparison an annotation's columns (`levels`, per shown letter) state about the task's responses."""
    info = data["instructflow"]
    by_response = [0] * len(info["order"])
    for j, i in enumerate(info["order"]):
        by_response[i] = levels[j]
    return Comparison(id=id_ or info["key"], prompt=data["prompt"], category=info.get("category"), meta=info.get("meta"),
                      responses=task_responses(data), labeler=labeler, **levels_to_order(by_response))


def flags(annotation: dict, data: dict) -> dict[str, list[int]]:
    """The paper's flags an annotation set: flag name -> the responses (original indices) flagged."""
    order, out = data["instructflow"]["order"], {}
    for name in FLAGS:
        chosen = ((_result(annotation, name) or {}).get("value") or {}).get("choices") or []
        out[name] = sorted(order[LETTERS.index(x)] for x in chosen if x in LETTERS[: len(order)])
    return out


def comment(annotation: dict) -> str:
    texts = ((_result(annotation, COMMENT) or {}).get("value") or {}).get("text") or []
    return " ".join(texts).strip()


def demonstration_of(data: dict, annotation: dict, labeler: str, id_: str | None = None) -> Demonstration | str:
    """The demonstration an annotation wrote, or why there is none."""
    texts = ((_result(annotation, DEMONSTRATION) or {}).get("value") or {}).get("text") or []
    text = "\n".join(texts).strip()
    if not text:
        return "partial: no demonstration written"
    info = data["instructflow"]
    return Demonstration(id=id_ or info["key"], prompt=data["prompt"], response=text, category=info.get("category"),
                         meta=info.get("meta"), labeler=labeler)


# --------------------------------------------------------------------------- quality
def agreement(a: list[int], b: list[int]) -> tuple[int, int]:
    """(agreeing, total) ordered pairs between two rankings given as levels per item (ties: no statement)."""
    agree = total = 0
    for x in range(len(a)):
        for y in range(x + 1, len(a)):
            if a[x] == a[y] or b[x] == b[y]:
                continue
            total += 1
            agree += (a[x] < a[y]) == (b[x] < b[y])
    return agree, total
