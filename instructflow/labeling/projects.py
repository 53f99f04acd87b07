"""A labeling project: push tasks into Label Studio, ask how far people are, pull what they did.

Each project has a local record (JSON, written atomically): the Label Studio
project id, every pushed task's key and id, and the annotations pulled so far.
Push is idempotent (a task already there by its key is not pushed again), and
a pull rebuilds the whole result from Label Studio each time (so pulling twice
adds nothing twice; the record counts which annotations are new).

What a pull gives: one comparison (or demonstration) per task, from its first
full annotation by a labeler in good standing; every other full annotation
of a task measures inter-annotator agreement (InstructGPT: 72.6 +- 1.5%);
known-answer tasks score each labeler and are not training data; everything
left out is a Problem naming the task, the annotation and why.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..config import LabelingConfig
from ..data.formats import Comparison, Demonstration
from ..io import write_json
from .client import LabelStudio, LabelStudioError
from .interfaces import demonstration_config, ranking_config
from .tasks import Problem, agreement, comparison_of, demonstration_of, edited, ranking_levels

log = logging.getLogger(__name__)


class ProjectGone(LabelStudioError):
    """The project this record pushed to is no longer in Label Studio."""


class LabelingPending(Exception):
    """People have not finished a project's tasks yet: whoever waits (a round) tries again later. A stage that
    raises it exits with EXIT_CODE (the orchestrator's signal to wait, not to fail)."""

    EXIT_CODE = 3

    @classmethod
    def of(cls, status: dict, needed: float, url: str) -> LabelingPending:
        return cls(f"waiting for people: {status['done']} of {status['tasks']} tasks done in Label Studio project "
                   f"'{status['title']}' ({url}/projects/{status['project']}); the round goes on at {needed:.0%} "
                   "(labeling.min_done)")


def labeler_name(email: str) -> str:
    """A labeler's id in the data: the part of the email before the @."""
    return email.split("@", 1)[0]


@dataclass
class PullResult:
    comparisons: list[Comparison] = field(default_factory=list)
    demonstrations: list[Demonstration] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    quality: dict = field(default_factory=dict)
    annotations: int = 0                       # full annotations read
    new_annotations: int = 0                   # of them, not pulled before

    def report(self) -> dict:
        return {"comparisons": len(self.comparisons), "demonstrations": len(self.demonstrations),
                "annotations": self.annotations, "new_annotations": self.new_annotations,
                "problems": [p.as_dict() for p in self.problems], "quality": self.quality}


class Project:
    """One Label Studio project of `kind` ("ranking": K <= k responses per task; "demonstration"), and its record."""

    def __init__(self, client: LabelStudio, title: str, record: Path, kind: str, cfg: LabelingConfig, k: int = 9):
        if kind not in ("ranking", "demonstration"):
            raise ValueError(f"unknown kind of labeling project '{kind}': ranking or demonstration")
        self.client, self.title, self.path, self.kind, self.cfg, self.k = client, title, Path(record), kind, cfg, k
        self.record = json.loads(self.path.read_text()) if self.path.is_file() else {
            "title": title, "kind": kind, "project": None, "tasks": {}, "pulled": []}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, self.record)

    # ---- the project itself
    def open(self, create: bool = True) -> int:
        """The Label Studio project's id: the recorded one (refused if it was deleted meanwhile), else the one
        with this title, else a new one (when `create`)."""
        known = self.record.get("project")
        if known is not None:
            if not any(p["id"] == known for p in self.client.projects()):
                raise ProjectGone(f"Label Studio project {known} ('{self.title}') is gone (deleted in Label Studio?); "
                                  f"its {len(self.record['tasks'])} pushed tasks and their annotations went with it. "
                                  f"Push again to a new project (remove {self.path} first)")
            return known
        found = self.client.find_project(self.title)
        if found is None and not create:
            raise LabelStudioError(f"no Label Studio project '{self.title}' at {self.client.url}: push first")
        if found is None:
            config = ranking_config(self.k) if self.kind == "ranking" else demonstration_config()
            found = self.client.create_project(self.title, config, **self._settings())
            log.info("labeling: created project %s '%s'", found["id"], self.title)
        self.record["project"] = found["id"]
        self.save()
        return found["id"]

    def _settings(self) -> dict:
        """How many people label a task: `overlap` for a share `overlap_share` of the tasks, one for the rest."""
        cfg = self.cfg
        return {"description": "instructflow labeling project (https://github.com/instructflow)",
                "maximum_annotations": cfg.overlap, "overlap_cohort_percentage": round(100 * cfg.overlap_share),
                "show_skip_button": True, "show_instruction": True, "expert_instruction": INSTRUCTIONS[self.kind]}

    # ---- push
    def push(self, tasks: list[dict]) -> dict:
        """Import the tasks not yet in the project (by their key); returns how many were new and already there."""
        project = self.open()
        there = {t["data"]["instructflow"]["key"]: t["id"] for t in self.client.tasks(project)
                 if isinstance(t.get("data", {}).get("instructflow"), dict)}
        new = [t for t in tasks if t["instructflow"]["key"] not in there]
        if new:
            self.client.import_tasks(project, new)
            there = {t["data"]["instructflow"]["key"]: t["id"] for t in self.client.tasks(project)
                     if isinstance(t.get("data", {}).get("instructflow"), dict)}
        for t in tasks:
            key = t["instructflow"]["key"]
            self.record["tasks"][key] = {"id": there[key], "sha256": t["instructflow"].get("sha256")}
        self.save()
        return {"project": project, "pushed": len(new), "already_there": len(tasks) - len(new), "tasks": len(tasks)}

    # ---- status
    def status(self) -> dict:
        """Tasks done (at least one full, not skipped, annotation) and annotations per labeler."""
        project = self.open(create=False)
        users = self.client.users()
        done, skipped, per_labeler = 0, 0, defaultdict(int)
        tasks = list(self.client.tasks(project))
        for t in tasks:
            finished = [a for a in t.get("annotations", []) if not a.get("was_cancelled")]
            done += bool(finished)
            skipped += sum(bool(a.get("was_cancelled")) for a in t.get("annotations", []))
            for a in finished:
                per_labeler[labeler_name(users.get(a.get("completed_by"), f"user {a.get('completed_by')}"))] += 1
        return {"project": project, "title": self.title, "tasks": len(tasks), "done": done, "skipped": skipped,
                "done_share": round(done / len(tasks), 4) if tasks else 0.0, "per_labeler": dict(sorted(per_labeler.items()))}

    # ---- pull
    def pull(self) -> PullResult:
        """Every finished annotation as records, problems and the quality figures (see the module's doc)."""
        project = self.open(create=False)
        users = self.client.users()
        allowed = {labeler_name(x) for x in self.cfg.labelers}
        out, seen, full = PullResult(), set(self.record.get("pulled", [])), []
        order = {key: i for i, key in enumerate(self.record["tasks"])}
        tasks = sorted(self.client.tasks(project), key=lambda t: (order.get(_key(t), len(order)), t["id"]))
        for task in tasks:
            full += self._read_task(task, users, allowed, out)
        out.annotations = len(full)
        out.new_annotations = sum(a["annotation"] not in seen for a in full)
        self._train_and_score(full, out)
        self.record["pulled"] = sorted({a["annotation"] for a in full} | seen)
        self.save()
        return out

    def _read_task(self, task: dict, users: dict, allowed: set[str], out: PullResult) -> list[dict]:
        """The task's full annotations, in order, as {task, annotation, labeler, levels | record, known};
        its problems into `out`."""
        data, tid = task.get("data") or {}, task["id"]
        info = data.get("instructflow")
        if not isinstance(info, dict):
            out.problems.append(Problem(tid, None, "not a task instructflow pushed (no data.instructflow)"))
            return []
        if self.kind == "ranking" and edited(data):
            out.problems.append(Problem(tid, None, "edited: the task's responses are not the ones pushed (changed in "
                                                   "Label Studio); its annotations are left out"))
            return []
        full = []
        for a in sorted(task.get("annotations", []), key=lambda a: (a.get("created_at") or "", a["id"])):
            email = users.get(a.get("completed_by"))
            if a.get("was_cancelled"):
                out.problems.append(Problem(tid, a["id"], "skipped by the labeler"))
            elif email is None or (allowed and labeler_name(email) not in allowed):
                out.problems.append(Problem(tid, a["id"], f"unknown labeler ({email or 'user %s' % a.get('completed_by')}"
                                                          " is not one of labeling.labelers)"))
            else:
                got = (ranking_levels(a, len(info["order"])) if self.kind == "ranking"
                       else demonstration_of(data, a, labeler_name(email)))
                if isinstance(got, str):
                    out.problems.append(Problem(tid, a["id"], got))
                else:
                    full.append({"task": tid, "annotation": a["id"], "labeler": labeler_name(email), "data": data,
                                 "result": got, "known": info.get("known")})
        return full

    def _train_and_score(self, full: list[dict], out: PullResult) -> None:
        """Known-answer accuracy per labeler, agreement on tasks several labelers did, and the training records:
        per task, the first annotation by a labeler in good standing."""
        out.quality = quality(full, self.cfg) if self.kind == "ranking" else {}
        held = set(out.quality.get("held_out", []))
        used: set[int] = set()
        for a in full:
            if a["known"] is not None or a["task"] in used or a["labeler"] in held:
                continue
            used.add(a["task"])
            if self.kind == "ranking":
                out.comparisons.append(comparison_of(a["data"], a["result"], a["labeler"]))
            else:
                out.demonstrations.append(a["result"])


def _key(task: dict) -> str:
    info = (task.get("data") or {}).get("instructflow")
    return info.get("key", "") if isinstance(info, dict) else ""


def quality(full: list[dict], cfg: LabelingConfig) -> dict:
    """Inter-annotator agreement on tasks with several full rankings, each labeler's agreement with the known
    answers, who is below labeling.min_known_accuracy, and who is held out for it."""
    by_task: dict[int, list[dict]] = defaultdict(list)
    for a in full:
        by_task[a["task"]].append(a)
    agree = total = 0
    per: dict[str, dict] = defaultdict(lambda: {"annotations": 0, "known_tasks": 0, "known_agree": 0, "known_pairs": 0})
    for anns in by_task.values():
        for i, a in enumerate(anns):
            per[a["labeler"]]["annotations"] += 1
            for b in anns[i + 1:]:
                x, n = agreement(a["result"], b["result"])
                agree, total = agree + x, total + n
            if a["known"] is not None:  # the known ranking, best first, over the responses' original indices
                order = a["data"]["instructflow"]["order"]
                known_level = {resp: lv for lv, resp in enumerate(a["known"])}
                x, n = agreement(a["result"], [known_level[order[j]] for j in range(len(order))])
                p = per[a["labeler"]]
                p["known_tasks"], p["known_agree"], p["known_pairs"] = p["known_tasks"] + 1, p["known_agree"] + x, p["known_pairs"] + n
    labelers = {name: {"annotations": p["annotations"], "known_answer_tasks": p["known_tasks"],
                       "known_answer_accuracy": round(p["known_agree"] / p["known_pairs"], 4) if p["known_pairs"] else None}
                for name, p in sorted(per.items())}
    below = [n for n, p in labelers.items() if p["known_answer_tasks"] >= cfg.min_known_tasks
             and p["known_answer_accuracy"] is not None and p["known_answer_accuracy"] < cfg.min_known_accuracy]
    return {"tasks_with_several_rankings": sum(len(a) > 1 for a in by_task.values()),
            "agreement": round(agree / total, 4) if total else None, "agreement_pairs": total,
            "labelers": labelers, "below_min_known_accuracy": below,
            "held_out": below if cfg.hold_out_below else [], "min_known_accuracy": cfg.min_known_accuracy}


INSTRUCTIONS = {
    "ranking": "<p>Rank the responses to the prompt from best to worst, as InstructGPT's labelers did: a good "
               "response follows the instruction, is truthful (does not invent facts, says so when it cannot know) "
               "and is harmless. Drag each response into a column, the best on the left; responses you find equally "
               "good share a column. Flag the responses that fail the instruction, invent facts or are harmful. "
               "Skip a task you cannot judge.</p>",
    "demonstration": "<p>Write the response you would want an assistant to give to the prompt: helpful, truthful "
                     "and harmless.</p>",
}
