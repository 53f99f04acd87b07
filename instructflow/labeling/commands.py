"""What `instructflow label push | status | pull | simulate` do (the CLI stays thin).

Projects are named by title; each has its record under <artifacts_dir>/labeling/.
A pull writes the records to a JSONL file that Great Expectations then checks
(rows that fail are quarantined beside it), and the pull's report (counts, the
annotations left out and why, agreement and each labeler's known-answer
accuracy) beside it as <out>.report.json. The file is rewritten whole by every
pull, so pulling twice adds nothing twice; version it with `dvc add`, or point
data.comparisons / data.demonstrations at it.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

from ..config import Params
from ..data.formats import Prompt
from ..io import read_jsonl, write_json, write_jsonl
from .client import LabelStudio, api_key
from .projects import Project, PullResult
from .tasks import demonstration_task, ranking_task


def record_path(params: Params, title: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "project"
    return Path(params.project.artifacts_dir) / "labeling" / f"{slug}.json"


def client(params: Params) -> LabelStudio:
    cfg = params.labeling
    return LabelStudio(cfg.url, api_key(cfg.api_key_env), cfg.timeout_s, cfg.retry_seconds)


def project(params: Params, title: str, kind: str, ls: LabelStudio) -> Project:
    return Project(ls, title, record_path(params, title), kind, params.labeling, params.collect.k)


def model_folder(params: Params, model: str) -> Path:
    """champion (fetched from rounds.store), a stage's name (its model output), or a model folder."""
    from ..registry import STAGES, output

    if model == "champion":
        from ..rounds.champion import fetch_version, read_pointer
        from ..serving.storage import open_store

        pointer = read_pointer(open_store(params.rounds.store))
        if pointer is None:
            return output(params, "sft", "model")
        dest = Path(params.project.artifacts_dir) / "labeling" / "models" / pointer["version"]
        return fetch_version(params.rounds.store, pointer["version"], dest, "policy")
    if model in STAGES:
        return output(params, model, "model")
    if not Path(model).is_dir():
        raise FileNotFoundError(f"{model}: not champion, a stage with a model, or a model folder")
    return Path(model)


def prompts_to_label(params: Params, prompts_file: Path | None, count: int, seed: int) -> list[Prompt]:
    """The prompts of a file, or `count` fresh ones from the built-in suite."""
    if prompts_file is not None:
        return read_jsonl(prompts_file, Prompt)[: count or None]
    if params.data.source != "builtin":
        raise ValueError("give --prompts FILE (a prompts JSONL): fresh prompts come from the built-in suite only")
    from ..data.suite.build import fresh_prompts

    return fresh_prompts(params.data, seed, count, f"label{seed}", exclude=set())


def push(params: Params, title: str, kind: str, prompts: list[Prompt], model: str, seed: int) -> dict:
    """Ranking tasks (K answers per prompt from `model`) or demonstration tasks, into the project `title`."""
    if kind == "ranking":
        from ..rounds.stages import answers

        rng = random.Random(seed)
        tasks = [ranking_task(p, rs, rng) for p, rs in answers(params, model_folder(params, model), prompts, seed)]
    else:
        tasks = [demonstration_task(p) for p in prompts]
    ls = client(params)
    try:
        return {**project(params, title, kind, ls).push(tasks), "url": params.labeling.url, "title": title}
    finally:
        ls.close()


def status(params: Params, title: str, kind: str) -> dict:
    ls = client(params)
    try:
        return project(params, title, kind, ls).status()
    finally:
        ls.close()


def pull(params: Params, title: str, kind: str, out: Path) -> tuple[PullResult, object]:
    """The project's records into `out` (JSONL, checked by Great Expectations) and its report beside."""
    from ..data.validate import validate_file

    ls = client(params)
    try:
        result = project(params, title, kind, ls).pull()
    finally:
        ls.close()
    write_jsonl(out, result.comparisons if kind == "ranking" else result.demonstrations)
    checked = validate_file(out, "comparisons" if kind == "ranking" else "demonstrations", params.validate_, out.parent)
    write_json(out.with_suffix(".report.json"), {"title": title, **result.report(), "validation": checked.as_dict()})
    return result, checked


def simulate(params: Params, title: str, seed: int, extra: int) -> dict[str, int]:
    """The built-in suite's labelers rank the project's tasks as people (accounts name@labelers.local; their
    password from $LABEL_STUDIO_LABELER_PASSWORD)."""
    from .people import DEFAULT_PASSWORD, PASSWORD_ENV, SimulatedPeople

    cfg = params.labeling
    password = os.environ.get(PASSWORD_ENV, DEFAULT_PASSWORD)
    ls = client(params)
    try:
        proj = project(params, title, "ranking", ls)
        tasks = sorted(ls.tasks(proj.open(create=False)), key=lambda t: t["id"])
    finally:
        ls.close()
    people = SimulatedPeople(cfg.url, api_key(cfg.api_key_env), params, password)
    return people.rank_project([t for t in tasks if not t.get("annotations")], seed, extra)
