"""Who ranks a round's responses: one small interface.

A ranker gets the prompts and each prompt's K responses, and gives back the
comparisons (each a ranking of its responses, best first, ties allowed) for the
prompts it ranked; prompts it left out are simply not returned. The built-in
suite's training labelers are one ranker; people in Label Studio are another,
behind the same `rank` call (instructflow/labeling/).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Protocol

from ..config import Params
from ..data.formats import Comparison, Prompt
from ..data.suite.labelers import Labeler


class Ranker(Protocol):
    name: str

    def rank(self, prompts: list[Prompt], responses: list[list[str]]) -> list[Comparison]:
        """One comparison per prompt ranked, in the prompts' order."""
        ...


class SimulatedLabelers:
    """The built-in suite's training labelers: each prompt goes to one drawn at random, as in `collect`."""

    name = "simulated labelers"

    def __init__(self, params: Params, seed: int):
        self.labelers = [Labeler(lab) for lab in params.data.labelers if not lab.heldout]
        self.rng = random.Random(seed)

    def rank(self, prompts: list[Prompt], responses: list[list[str]]) -> list[Comparison]:
        out = []
        for p, rs in zip(prompts, responses, strict=True):
            lab = self.rng.choice(self.labelers)
            out.append(Comparison(id=p.id, prompt=p.prompt, category=p.category, meta=p.meta, responses=rs,
                                  ranking=lab.rank(p.meta, rs, self.rng), labeler=lab.name))
        return out


class LabelStudioRanker:
    """People in Label Studio: the round's prompts and answers go to a project as ranking tasks (with a share
    of known-answer tasks, labeling.known_share); `rank` returns the comparisons once labeling.min_done of the
    tasks are done, and raises LabelingPending until then (the round waits without holding a worker). The
    labeling report (agreement, each labeler's known-answer accuracy, the annotations left out and why) is
    in `report` after a pull."""

    name = "people in Label Studio"

    def __init__(self, params: Params, seed: int, title: str, record: Path):
        self.params, self.seed, self.title, self.record = params, seed, title, record
        self.report: dict = {}

    def rank(self, prompts: list[Prompt], responses: list[list[str]]) -> list[Comparison]:
        from ..labeling.client import LabelStudio, api_key
        from ..labeling.projects import LabelingPending, Project
        from ..labeling.tasks import ranking_task

        cfg = self.params.labeling
        rng = random.Random(self.seed)
        tasks = [ranking_task(p, rs, rng) for p, rs in zip(prompts, responses, strict=True)]
        tasks += known_answer_tasks(self.params, round(cfg.known_share * len(prompts)), self.seed)
        client = LabelStudio(cfg.url, api_key(cfg.api_key_env), cfg.timeout_s, cfg.retry_seconds)
        try:
            project = Project(client, self.title, self.record, "ranking", cfg, self.params.collect.k)
            project.push(tasks)
            status = project.status()
            if status["done_share"] < cfg.min_done:
                raise LabelingPending.of(status, cfg.min_done, cfg.url)
            pulled = project.pull()
        finally:
            client.close()
        self.report = {"project": status["project"], "title": self.title, **pulled.report()}
        by_id = {c.id: c for c in pulled.comparisons}
        return [by_id[p.id] for p in prompts if p.id in by_id]


def known_answer_tasks(params: Params, n: int, seed: int) -> list[dict]:
    """n ranking tasks whose right answer is known: from labeling.known_comparisons, or with the built-in suite
    a correct and a flawed response to fresh prompts (its grader says which is which)."""
    from ..labeling.tasks import ranking_task

    if n <= 0:
        return []
    rng, cfg = random.Random(seed + 17), params.labeling
    if cfg.known_comparisons:
        from ..io import read_jsonl

        pool = read_jsonl(cfg.known_comparisons, Comparison)
        picked = rng.sample(pool, min(n, len(pool)))
        return [ranking_task(Prompt(id=f"known-{c.id}", prompt=c.prompt, category=c.category, meta=c.meta), c.responses,
                             rng, known=_known_order(c)) for c in picked]
    if params.data.source != "builtin":
        raise ValueError("labeling.known_share > 0 needs labeling.known_comparisons (comparisons whose rankings are "
                         "the known answers) unless data.source is builtin")
    from ..data.suite.build import fresh_prompts
    from ..data.suite.instructions import flawed_response, gold_response

    tasks = []
    for p in fresh_prompts(params.data, seed + 17, 4 * n, f"known{seed}", exclude=set()):
        good, bad = gold_response(p.meta, rng), flawed_response(p.meta, rng)
        if good.strip() and bad.strip() and good != bad and len(tasks) < n:
            tasks.append(ranking_task(p.model_copy(update={"id": f"known-{p.id}"}), [good, bad], rng, known=[0, 1]))
    return tasks


def _known_order(c: Comparison) -> list[int]:
    if c.ranking is not None:
        return list(c.ranking)
    return sorted(range(len(c.responses)), key=lambda i: -c.scores[i])


def make_ranker(params: Params, seed: int, title: str = "", record: Path | None = None) -> Ranker:
    """rounds.ranker: the built-in suite's simulated labelers, or people in Label Studio (`title`: its project,
    `record`: the push record)."""
    if params.rounds.ranker == "label_studio":
        return LabelStudioRanker(params, seed, title, record)
    if params.data.source != "builtin":
        raise ValueError("with data.source: files, a round's answers are ranked by people: set rounds.ranker: "
                         "label_studio (and the labeling section)")
    return SimulatedLabelers(params, seed)
