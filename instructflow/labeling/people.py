"""Accounts of people in Label Studio, and the built-in suite's simulated labelers working as people.

`login` does what a person's browser does: it signs up through the
organization's invite link (once) or logs in with email and password, then
reads the account's API key from /api/current-user/token. `SimulatedPeople`
uses that to let the suite's labelers rank tasks over the API as the labeling
page submits them (the Ranker's columns, the flags, a comment), each under its
own account: the path people take, with rankings a test can predict (the
direct path's, `rounds.ranking.SimulatedLabelers`, for the same seed).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import httpx

from ..config import Params
from ..data.formats import Comparison, Prompt
from ..data.suite.labelers import Labeler
from .client import LabelStudio, LabelStudioError
from .interfaces import LETTERS, RANKER, bucket
from .tasks import task_responses

DOMAIN = "labelers.local"  # the simulated labelers' email domain: ada@labelers.local
PASSWORD_ENV, DEFAULT_PASSWORD = "LABEL_STUDIO_LABELER_PASSWORD", "simulated-labeler-password"  # simulated people only


def login(url: str, admin_key: str, email: str, password: str) -> str:
    """The API key of the person with this email, signing them up through the invite link when new."""
    admin = LabelStudio(url, admin_key, retry_seconds=30)
    try:
        exists = email in admin.users().values()
        invite = None if exists else admin.call("GET", "/api/invite")["token"]
    finally:
        admin.close()
    with httpx.Client(base_url=url.rstrip("/"), timeout=30, follow_redirects=True) as browser:
        page = "/user/login/" if exists else f"/user/signup/?token={invite}"
        browser.get(page)
        form = {"csrfmiddlewaretoken": browser.cookies.get("csrftoken", ""), "email": email, "password": password}
        if not exists:
            form.update(how_find_us="", allow_newsletters="false")
        browser.post(page, data=form, headers={"Referer": f"{url.rstrip('/')}{page}"})
        r = browser.get("/api/current-user/token")
        if r.status_code != 200 or "token" not in r.text:
            raise LabelStudioError(f"cannot log {email} in to Label Studio at {url} (HTTP {r.status_code}): wrong "
                                   "password, or signup closed")
        return r.json()["token"]


def ranking_result(levels: list[int], flagged: dict[str, list[str]] | None = None, note: str = "") -> list[dict]:
    """An annotation's result as the ranking page sends it: each shown letter's column, the flags, the comment."""
    k = len(levels)
    columns = {bucket(i): [LETTERS[j] for j in range(k) if levels[j] == i] for i in range(k)}
    result = [{"from_name": RANKER, "to_name": "responses", "type": "ranker", "value": {"ranker": columns},
               "origin": "manual"}]
    for name, letters in (flagged or {}).items():
        if letters:
            result.append({"from_name": name, "to_name": "prompt", "type": "choices", "value": {"choices": letters},
                           "origin": "manual"})
    if note:
        result.append({"from_name": "comment", "to_name": "prompt", "type": "textarea", "value": {"text": [note]},
                       "origin": "manual"})
    return result


def shown_levels(comparison_levels: list[int], order: list[int]) -> list[int]:
    """Levels per response (original order) -> levels per shown letter."""
    return [comparison_levels[i] for i in order]


def levels_of(c: Comparison) -> list[int]:
    """A comparison's column per response: its place in the ranking, or, with scores, the number of higher scores."""
    if c.ranking is not None:
        out = [0] * len(c.responses)
        for place, i in enumerate(c.ranking):
            out[i] = place
        return out
    distinct = sorted(set(c.scores), reverse=True)
    return [distinct.index(s) for s in c.scores]


@dataclass
class SimulatedPeople:
    """The suite's training labelers as Label Studio users (name@labelers.local), ranking as people do."""

    url: str
    admin_key: str
    params: Params
    password: str

    def __post_init__(self):
        self.labelers = {lab.name: Labeler(lab) for lab in self.params.data.labelers if not lab.heldout}
        self.keys: dict[str, str] = {}

    def account(self, name: str) -> LabelStudio:
        if name not in self.keys:
            self.keys[name] = login(self.url, self.admin_key, f"{name}@{DOMAIN}", self.password)
        return LabelStudio(self.url, self.keys[name], retry_seconds=30)

    def rank_project(self, tasks: list[dict], seed: int, extra_per_task: int = 0) -> dict[str, int]:
        """Rank every task: first by the labeler the direct path draws for it (SimulatedLabelers with `seed`:
        the same labeler, the same ranking), then `extra_per_task` more by other labelers (agreement);
        known-answer tasks by a labeler drawn at random. Returns annotations submitted per labeler."""
        from ..rounds.ranking import SimulatedLabelers

        real = [t for t in tasks if "known" not in t["data"]["instructflow"]]
        prompts = [Prompt(id=t["data"]["instructflow"]["key"], prompt=t["data"]["prompt"],
                          category=t["data"]["instructflow"].get("category"), meta=t["data"]["instructflow"].get("meta"))
                   for t in real]
        direct = SimulatedLabelers(self.params, seed).rank(prompts, [task_responses(t["data"]) for t in real])
        rng, done = random.Random(seed + 1), {}
        for task, c in zip(real, direct, strict=True):
            others = rng.sample([n for n in self.labelers if n != c.labeler], extra_per_task)
            self._submit(task, c.labeler, levels_of(c))
            done[c.labeler] = done.get(c.labeler, 0) + 1
            for name in others:
                ranking = self.labelers[name].rank(c.meta or {}, c.responses, rng)
                self._submit(task, name, levels_of(c.model_copy(update={"ranking": ranking, "scores": None})))
                done[name] = done.get(name, 0) + 1
        for task in tasks:
            if "known" in task["data"]["instructflow"]:
                name = rng.choice(sorted(self.labelers))
                info = task["data"]["instructflow"]
                responses = task_responses(task["data"])
                ranking = self.labelers[name].rank(info.get("meta") or {}, responses, rng)
                self._submit(task, name, levels_of(Comparison(id="k", prompt="k", responses=responses, ranking=ranking)))
                done[name] = done.get(name, 0) + 1
        return done

    def _submit(self, task: dict, name: str, levels: list[int]) -> None:
        order = task["data"]["instructflow"]["order"]
        account = self.account(name)
        try:
            account.annotate(task["id"], ranking_result(shown_levels(levels, order)), lead_time=1.0)
        finally:
            account.close()

