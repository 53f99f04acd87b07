"""People in Label Studio, against a real Label Studio server (its own venv, a free port, SQLite):
push, people annotating through the API (each with an account of their own, signed up through the invite
link as a browser does), pull checked byte for byte, a second pull that adds nothing, what is left out and
why, Label Studio down during a pull, a deleted project, the ranking page in a real browser, and a round
whose rankings go through Label Studio giving exactly the direct path's comparisons and decision."""
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from test_stages import MICRO

from instructflow.config import parse_params
from instructflow.data.formats import Comparison, Prompt
from instructflow.io import read_jsonl, write_jsonl
from instructflow.labeling import commands
from instructflow.labeling.client import LabelStudio
from instructflow.labeling.people import DEFAULT_PASSWORD, login, ranking_result
from instructflow.labeling.projects import ProjectGone
from instructflow.labeling.tasks import comparison_of, ranking_task

pytestmark = pytest.mark.slow
PEOPLE = ("ada", "bo", "cy")


@pytest.fixture
def setup(label_studio, tmp_path, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.key)
    params = parse_params({"project": {"artifacts_dir": str(tmp_path / "artifacts")}, "collect": {"k": 4},
                           "labeling": {"url": label_studio.url, "labelers": [f"{p}@labelers.local" for p in PEOPLE],
                                        "retry_seconds": 240}})
    return params, LabelStudio(label_studio.url, label_studio.key)


def person(server, name: str) -> LabelStudio:
    """A person's account (the same password `label simulate` gives the simulated labelers: one server per session)."""
    return LabelStudio(server.url, login(server.url, server.key, f"{name}@labelers.local", DEFAULT_PASSWORD))


def _prompts(n, k=4, tag="t"):
    rng = random.Random(n)
    return [(Prompt(id=f"{tag}{i}", prompt=f"Question {i} of {tag}?", category="open_qa", meta={"i": i}),
             [f"answer {j} to {i} {rng.random():.3f}" for j in range(k)]) for i in range(n)]


def _tasks_by_key(client, params, title):
    project = commands.project(params, title, "ranking", client)
    return {t["data"]["instructflow"]["key"]: t for t in client.tasks(project.open(create=False))}


def test_push_annotate_and_pull_byte_for_byte_what_is_left_out_and_a_second_pull(setup, label_studio, tmp_path):
    params, admin = setup
    title = "test ranking"
    rng = random.Random(0)
    tasks = [ranking_task(p, rs, rng) for p, rs in _prompts(6)]
    project = commands.project(params, title, "ranking", admin)
    assert project.push(tasks)["pushed"] == 6
    assert project.push(tasks)["pushed"] == 0  # by key: pushing again adds nothing
    by_key = _tasks_by_key(admin, params, title)
    ada, bo, cy, mallory = (person(label_studio, n) for n in ("ada", "bo", "cy", "mallory"))
    ada.annotate(by_key["t0"]["id"], ranking_result([2, 0, 3, 1], {"invents_facts": ["B"]}, "B makes things up"))
    bo.annotate(by_key["t0"]["id"], ranking_result([2, 1, 3, 0]))                    # a second ranking: agreement
    bo.annotate(by_key["t1"]["id"], ranking_result([0, 0, 1, 2]))                    # A and B tied
    cy.annotate(by_key["t2"]["id"], [], was_cancelled=True)                          # skipped
    ada.annotate(by_key["t3"]["id"], [{"from_name": "rank", "to_name": "responses", "type": "ranker", "value": {
        "ranker": {"rank_1": ["A"], "rank_2": ["B"], "_": ["C", "D"]}}}])            # two of four ranked
    mallory.annotate(by_key["t4"]["id"], ranking_result([0, 1, 2, 3]))               # not one of labeling.labelers
    edited = by_key["t5"]
    edited["data"]["responses"][0]["body"] = "changed in the UI"
    admin.call("PATCH", f"/api/tasks/{edited['id']}/", json={"data": edited["data"]})
    ada.annotate(edited["id"], ranking_result([0, 1, 2, 3]))

    out = tmp_path / "pulled.jsonl"
    result, checked = commands.pull(params, title, "ranking", out)
    expected = tmp_path / "expected.jsonl"  # what the people submitted, mapped back by hand
    write_jsonl(expected, [comparison_of(by_key["t0"]["data"], [2, 0, 3, 1], "ada"),
                           comparison_of(by_key["t1"]["data"], [0, 0, 1, 2], "bo")])
    assert out.read_bytes() == expected.read_bytes() and checked.ok
    assert read_jsonl(out, Comparison)[1].scores is not None  # the tie: scores, not a ranking
    reasons = {(p.task, p.reason.split(":")[0]) for p in result.problems}
    assert reasons == {(by_key["t2"]["id"], "skipped by the labeler"), (by_key["t3"]["id"], "partial"),
                       (by_key["t4"]["id"], "unknown labeler (mallory@labelers.local is not one of labeling.labelers)"),
                       (by_key["t5"]["id"], "edited")}
    assert result.quality["tasks_with_several_rankings"] == 1 and result.quality["agreement"] == round(5 / 6, 4)
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["comparisons"] == 2 and report["new_annotations"] == report["annotations"] == 3 and len(report["problems"]) == 4
    assert "LABEL_STUDIO" not in out.with_suffix(".report.json").read_text() and label_studio.key not in report.__repr__()

    again, _ = commands.pull(params, title, "ranking", out)
    assert out.read_bytes() == expected.read_bytes() and again.new_annotations == 0  # a second pull adds nothing
    status = commands.status(params, title, "ranking")
    assert status["tasks"] == 6 and status["done"] == 5 and status["skipped"] == 1
    assert status["per_labeler"] == {"ada": 3, "bo": 2, "mallory": 1}


def test_a_demonstration_written_by_a_person_is_pulled_with_its_labeler(setup, label_studio, tmp_path):
    params, admin = setup
    prompts = [Prompt(id=f"d{i}", prompt=f"Write a haiku about {w}.") for i, w in enumerate(("rain", "snow"))]
    commands.push(params, "test demonstrations", "demonstration", prompts, "sft", 0)
    tasks = {t["data"]["instructflow"]["key"]: t for t in admin.tasks(admin.find_project("test demonstrations")["id"])}
    text = "Rain on the tin roof\nthe kettle starts its humming\nwe stay in today"
    person(label_studio, "cy").annotate(tasks["d0"]["id"], [{"from_name": "demonstration", "to_name": "prompt",
                                                             "type": "textarea", "value": {"text": [text]}}])
    out = tmp_path / "demos.jsonl"
    result, checked = commands.pull(params, "test demonstrations", "demonstration", out)
    assert checked.ok and [json.loads(x) for x in out.read_text().splitlines()] == [
        {"id": "d0", "prompt": "Write a haiku about rain.", "response": text, "labeler": "cy"}]
    assert result.problems == []  # d1 is simply not done yet


def test_a_pull_outlasts_label_studio_stopped_for_20_s_with_every_annotation_once(setup, label_studio, tmp_path):
    params, admin = setup
    title = "test outage"
    tasks = [ranking_task(p, rs, random.Random(1)) for p, rs in _prompts(3, tag="o")]
    commands.project(params, title, "ranking", admin).push(tasks)
    by_key = _tasks_by_key(admin, params, title)
    ada = person(label_studio, "ada")
    for key in ("o0", "o1", "o2"):
        ada.annotate(by_key[key]["id"], ranking_result([3, 2, 1, 0]))
    label_studio.stop()
    out, got = tmp_path / "outage.jsonl", {}
    puller = threading.Thread(target=lambda: got.update(result=commands.pull(params, title, "ranking", out)[0]))
    t0 = time.monotonic()
    puller.start()
    time.sleep(20)
    assert puller.is_alive()  # retrying, nothing written
    assert not out.exists()
    label_studio.start()
    puller.join(300)
    assert not puller.is_alive() and time.monotonic() - t0 >= 20
    assert [c["id"] for c in map(json.loads, out.read_text().splitlines())] == ["o0", "o1", "o2"]
    assert got["result"].annotations == 3 and got["result"].new_annotations == 3


def test_a_project_deleted_mid_round_is_one_clear_error(setup, label_studio, tmp_path):
    params, admin = setup
    project = commands.project(params, "test deleted", "ranking", admin)
    project.push([ranking_task(p, rs, random.Random(2)) for p, rs in _prompts(2, tag="x")])
    admin.call("DELETE", f"/api/projects/{project.record['project']}/")
    with pytest.raises(ProjectGone, match="is gone \\(deleted in Label Studio\\?\\); its 2 pushed tasks"):
        commands.pull(params, "test deleted", "ranking", tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def test_the_ranking_page_in_a_real_browser_drag_submit_and_pull(setup, label_studio, tmp_path):
    """Headless Chromium (Debian's), driven by Playwright: a person logs in, drags the 4 responses into
    columns and submits; the pull maps the drag back to the responses. The page is screenshotted
    (docs/label-studio-ranking.png comes from here, with $INSTRUCTFLOW_SCREENSHOT_DIR)."""
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("no /usr/bin/chromium: `make browser` installs Debian's chromium (needs root)")
    from playwright.sync_api import expect, sync_playwright

    params, admin = setup
    params = params.model_copy(update={"labeling": params.labeling.model_copy(update={"labelers": []})})  # anyone
    prompt = Prompt(id="b0", prompt="Name three fruits in one sentence.")
    responses = ["Apples, pears and plums are fruits.", "I like cars.", "Apple.", "Bananas, kiwis and mangoes."]
    project = commands.project(params, "test browser", "ranking", admin)
    project.push([ranking_task(prompt, responses, random.Random(4))])
    task = _tasks_by_key(admin, params, "test browser")["b0"]
    best_first = [0, 3, 2, 1]  # the person's ranking of the responses (original order)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(label_studio.url + "/user/login/")
        page.fill("input[name=email]", "admin@instructflow.local")
        page.fill("input[name=password]", label_studio.password)
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")
        page.goto(f"{label_studio.url}/projects/{project.record['project']}/data?task={task['id']}")
        page.wait_for_load_state("networkidle")  # the app re-renders once (it adds &tab=...) before it settles
        expect(page.locator(".htx-ranker-item")).to_have_count(4, timeout=60000)
        expect(page.locator(".htx-ranker-column")).to_have_count(5)
        page.wait_for_timeout(1000)
        shot = Path(os.environ.get("INSTRUCTFLOW_SCREENSHOT_DIR", tmp_path)) / "label-studio-ranking.png"
        page.screenshot(path=str(shot))
        columns = page.locator(".htx-ranker-column")
        for place, i in enumerate(best_first):
            target = columns.nth(place + 1)  # column 0 holds the unranked responses
            for _ in range(3):  # a drag the page missed (a busy machine) is dragged again
                drag(page, page.locator(".htx-ranker-item", has_text=responses[i]), target)
                if responses[i] in target.inner_text():
                    break
            assert responses[i] in target.inner_text()
        page.get_by_role("button", name="Submit").click()
        deadline = time.monotonic() + 30
        while not admin.call("GET", f"/api/tasks/{task['id']}/annotations/") and time.monotonic() < deadline:
            time.sleep(0.5)
        browser.close()
    assert shot.stat().st_size > 20_000
    result, _ = commands.pull(params, "test browser", "ranking", tmp_path / "browser.jsonl")
    assert [c.ranking for c in result.comparisons] == [best_first] and result.comparisons[0].labeler == "admin"


def test_a_round_ranked_through_label_studio_gives_the_direct_paths_comparisons_and_decision(label_studio, tmp_path):
    """The micro pipeline, then round 1 twice: ranked directly by the simulated labelers, and through Label
    Studio, where the flow pushes the tasks and stops waiting (a run by hand: exit 0, no worker held), the
    same labelers rank as people over the API, and the round goes on. The comparisons are the same bytes and
    the gate decides the same."""
    env = {**os.environ, "LABEL_STUDIO_API_KEY": label_studio.key, "INSTRUCTFLOW_LOG": "WARNING",
           "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(ROOT)}
    params = {**MICRO, "project": {"artifacts_dir": "artifacts", "threads": 2},
              "rounds": {"enabled": True, "prompts": 12, "store": "store", "gate_min_lower": 0.0, "git_commit": False,
                         "max_rejected_share": 1.0,
                         "ranker": "label_studio"},
              "orchestrate": {"version_with_dvc": False, "concurrent_stages": False},
              "labeling": {"url": label_studio.url, "retry_seconds": 60, "known_share": 0.25, "min_known_tasks": 1}}
    people = tmp_path / "people"
    people.mkdir()
    (people / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "flows.rounds", "--params", "params.yaml"], cwd=people, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "round 1 is waiting: waiting for people: 0 of" in proc.stdout
    assert not (people / "artifacts/round_reward").exists()  # nothing trained on rankings nobody made

    direct = tmp_path / "direct"
    shutil.copytree(people, direct, ignore=shutil.ignore_patterns("prefect", "round_feedback"))
    (direct / "params.yaml").write_text(yaml.safe_dump({**params, "rounds": {**params["rounds"], "ranker": "simulated"}}))
    round_stages = "round_champion,round_feedback,round_reward,round_ppo,round_export,round_gate"
    _cli(direct, env, "run", "--stages", round_stages)

    title = "instructflow round 001: rank the answers"
    _cli(people, env, "label", "simulate", "--project", title, "--seed", "1000", "--extra", "1")  # seed + 1000 x round
    _cli(people, env, "run", "--stages", round_stages)
    feedback = "artifacts/round_feedback/feedback/round_001.jsonl"
    assert (people / feedback).read_bytes() == (direct / feedback).read_bytes()
    assert len((people / feedback).read_text().splitlines()) >= 5  # 12 prompts, some quarantined (micro answers)
    gate = [json.loads((d / "artifacts/round_gate/report.json").read_text()) for d in (people, direct)]
    assert gate[0]["promote"] == gate[1]["promote"] and gate[0]["challenger_vs_champion"] == gate[1]["challenger_vs_champion"]
    labeling = json.loads((people / "artifacts/round_feedback/labeling.json").read_text())
    assert labeling["ranker"] == "people in Label Studio" and labeling["problems"] == []
    quality = labeling["quality"]  # every task ranked twice: agreement; 3 known-answer tasks score who did them
    assert quality["tasks_with_several_rankings"] >= 8 and 0 <= quality["agreement"] <= 1
    assert sum(p["known_answer_tasks"] for p in quality["labelers"].values()) == 3
    assert gate[0]["labeling"]["labeler_agreement"] == quality["agreement"]


def drag(page, item, column) -> None:
    """Drag a card to a column with the mouse, in small steps, as a person does."""
    box, target = item.bounding_box(), column.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + 10)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2 + 5, box["y"] + 15, steps=5)
    page.mouse.move(target["x"] + target["width"] / 2, target["y"] + 80, steps=20)
    page.mouse.up()
    page.wait_for_timeout(300)


def _cli(cwd, env, *args):
    proc = subprocess.run([sys.executable, "-m", "instructflow.cli", *args, "--params", "params.yaml"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout
