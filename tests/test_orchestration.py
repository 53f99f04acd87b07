"""The pipeline through its real interfaces: the Prefect flow (temporary local
server), DVC (`dvc repro`, `dvc push`, `dvc pull`) against a real S3 server
(SeaweedFS), and Great Expectations stopping bad data before training.

One micro project is built in a temporary git repository and used by the
tests below in order: Prefect run with a storage fault, cached rerun, a PPO
change, `dvc pull` into a fresh clone, `dvc repro` in another."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import yaml
from conftest import ROOT, FlakyProxy
from test_stages import MICRO

from instructflow.io import content_hash

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
GIT = ["git", "-c", "user.name=instructflow-tests", "-c", "user.email=tests@instructflow.invalid", "-c", "init.defaultBranch=main"]


def run(cmd, cwd, env=None, timeout=600, ok=True, new_session=False):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "INSTRUCTFLOW_LOG": "WARNING", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=new_session)  # its own process group, which a crash point kills
    if ok:
        assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def make_project(dest: Path, params: dict) -> Path:
    """A copy of this repository's pipeline code with `params` as params.yaml, in its own git repo."""
    dest.mkdir(parents=True)
    for d in ("instructflow", "flows", "tasks"):
        shutil.copytree(ROOT / d, dest / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for f in (".dvc/config", ".dvc/.gitignore", ".dvcignore", "prefect.yaml", "configs/presets/pretrained.yaml"):
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, dest / f)
    (dest / ".gitignore").write_text("artifacts/\n.dvcstore/\n.prefect/\n__pycache__/\ndvc_plots/\n")
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([sys.executable, "-m", "instructflow.cli", "dvc-yaml"], dest)
    run([*GIT, "init", "-q"], dest)
    run([*GIT, "add", "-A"], dest)
    run([*GIT, "commit", "-qm", "micro project"], dest)
    return dest


def flow_run(cwd, env, *extra, ok=True):
    proc = run([sys.executable, "-m", "flows.pipeline", "--params", "params.yaml", *extra], cwd, env, ok=ok)
    return proc, json.loads((Path(cwd) / "artifacts/pipeline/run.json").read_text()) if proc.returncode == 0 else None


def states(run_record) -> dict:
    return {r["stage"]: r["state"] for r in run_record["stages"]}


def lock_md5s(project: Path) -> dict:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", [])}


def outs_hashes(project: Path) -> dict:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    paths = sorted({o["path"] for s in lock["stages"].values() for o in s.get("outs", [])})
    return {p: content_hash(project / p) for p in paths}


@pytest.fixture(scope="module")
def bucket(s3_server):
    name = "dvc-micro"
    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], region_name=s3_server["AWS_REGION"],
                 aws_access_key_id=s3_server["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=s3_server["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def project(tmp_path_factory, s3_server, bucket):
    params = {**MICRO, "project": {"artifacts_dir": "artifacts", "threads": 2},
              "orchestrate": {"retries": 5, "retry_delay_s": 1}}
    proj = make_project(tmp_path_factory.mktemp("dvc") / "proj", params)
    run([str(BIN / "dvc"), "remote", "modify", "s3", "url", f"s3://{bucket}/dvc"], proj)
    run([str(BIN / "dvc"), "remote", "default", "s3"], proj)
    run([*GIT, "commit", "-qam", "use the S3 remote"], proj)
    return proj


@pytest.fixture(scope="module")
def env(tmp_path_factory, s3_server):
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    return {**s3_server, "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home"))}


def test_prefect_run_survives_a_storage_fault_and_pushes_every_stage(project, env, s3_server):
    port = int(s3_server["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    # A fault longer than the S3 client's own retries (kept to one attempt here,
    # so the test is short): the push fails and the Prefect task retry recovers.
    proxy = FlakyProxy(port, fail_for=8.0)
    try:
        proc, rec = flow_run(project, {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", "AWS_MAX_ATTEMPTS": "1"})
    finally:
        proxy.close()
    assert proxy.dropped > 0 and proxy.forwarded > 0  # the fault happened, then storage came back
    log = proc.stdout + proc.stderr
    (project.parent / "fault-run.log").write_text(log)
    assert "Retry 1/5 will start" in log  # a Prefect retry of the push, not only the client's
    assert set(states(rec).values()) == {"Completed"}
    assert [r["stage"] for r in rec["stages"]] == ["data", "validate", "pretrain", "sft", "collect", "reward", "export",
                                                   "ppo", "ppo_ptx", "eval"]
    assert rec["wall_s"] >= rec["stage_compute_s"] > 0
    # export, ppo and ppo_ptx read none of each other's outputs: one wave, side by side, each in its own process
    wave = {r["stage"]: r["wave"] for r in rec["stages"]}
    assert wave["export"] == wave["ppo"] == wave["ppo_ptx"] not in (wave["reward"], wave["eval"])
    assert rec["stage_compute_s"] < rec["stage_compute_total_s"]
    for name in ("export", "ppo", "ppo_ptx"):
        assert f'"stage": "{name}"' in (project / "artifacts" / name / "stage.log").read_text()
    assert not (project / "artifacts/eval/stage.log").exists()  # a wave of one runs in the flow's process
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(states(rec))  # every stage recorded: which data, params and code made it
    assert all(o.get("md5") for s in lock["stages"].values() for o in s.get("outs", []))
    run([*GIT, "add", "dvc.lock"], project)
    run([*GIT, "commit", "-qm", "run 1"], project)


# Where the fault-injection test kills the whole pipeline (flow and stage processes) with
# SIGKILL, in pipeline order: each rerun gets further, finished stages being cached.
KILL_POINTS = [
    "atomic_write#4",                 # the data stage, between writing a file and renaming it in
    "checkpoint_written#2",           # SFT: a checkpoint's tensors written, its trainer state not yet
    "dvc_push#4",                     # a stage recorded in dvc.lock, its outputs not yet pushed
    "iteration:ppo#2",                # PPO (in its own process, beside export and PPO-ptx), after iteration 2
]  # (pretraining mid-epoch, a model's, a checkpoint's and the export's folder swaps: the same mechanisms, tested
   # in test_reliability.py without a whole pipeline per kill; the evaluation keeps nothing between its runs)
VOLATILE = ("per_s", "seconds", "rss", "resumed", "gpu", "_s")  # metrics of time and memory, not of results


def _results(project: Path) -> dict:
    out = {}
    for f in sorted((project / "artifacts").glob("*/result.json")):
        metrics = json.loads(f.read_text())["metrics"]
        out[f.parent.name] = {k: v for k, v in metrics.items() if not any(w in k for w in VOLATILE)}
    return out


def _assert_nothing_half_written(project: Path) -> None:
    """What a reader finds after a kill is complete: every result record, JSONL file,
    model and ONNX export that exists reads in full."""
    from safetensors import safe_open

    from instructflow.serving.onnx import verify_export

    art = project / "artifacts"
    for f in art.rglob("*.json"):
        if ".tmp" not in str(f.relative_to(art)) and not f.name.startswith("."):
            json.loads(f.read_text())
    for f in art.glob("data/*.jsonl"):
        [json.loads(line) for line in f.read_text().splitlines()]
    for model in art.glob("*/model"):
        assert (model / "config.json").exists(), model
        for w in model.glob("*.safetensors"):
            with safe_open(str(w), "pt") as fh:
                [fh.get_tensor(k) for k in fh.keys()]
    if (art / "export/rm").exists():
        verify_export(art / "export/rm")


def test_make_methods_flow_compares_every_method_over_two_seeds_and_versions_replicate_0(project, env, tmp_path):
    """flows.methods on a copy of the micro project after its first run, with the methods enabled:
    replicate 0's pipeline stages are Cached, its methods' stages run and are recorded in dvc.lock and
    pushed; replicate 1 (seed + 1) runs every stage under artifacts/seeds/1/; the pooled summary names
    both. (Stages run in the flow's process here, one at a time: side by side, each would pay a
    process start, and that path is the pipeline test's.)"""
    proj = tmp_path / "methods"
    shutil.copytree(project, proj, symlinks=True)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["methods"] = {**params["methods"], "enabled": True, "seeds": 2}
    params["orchestrate"] = {**params["orchestrate"], "concurrent_stages": False}
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([sys.executable, "-m", "instructflow.cli", "dvc-yaml"], proj)
    run([*GIT, "commit", "-qam", "enable the methods"], proj)
    proc = run([sys.executable, "-m", "flows.methods", "--params", "params.yaml"], proj, env, timeout=900)
    main = json.loads((proj / "artifacts/pipeline/run.json").read_text())
    assert {r["stage"]: r["state"] for r in main["stages"] if r["stage"] in ("pretrain", "sft", "ppo", "eval")} == \
        {"pretrain": "Cached", "sft": "Cached", "ppo": "Cached", "eval": "Cached"}
    assert {r["stage"] for r in main["stages"] if r["state"] == "Completed"} == \
        {"reward_ensemble", "dpo", "best_of_n", "ppo_ensemble", "compare", "overoptimization"}
    seed1 = json.loads((proj / "artifacts/seeds/1/pipeline/run.json").read_text())
    assert {r["state"] for r in seed1["stages"]} == {"Completed"} and len(seed1["stages"]) == 16
    assert yaml.safe_load((proj / "artifacts/seeds/1/params.yaml").read_text())["project"]["seed"] == 1
    lock = yaml.safe_load((proj / "pipelines/methods/dvc.lock").read_text())  # the methods' own DVC pipeline
    assert {"dpo", "compare", "overoptimization"} <= set(lock["stages"])
    assert not {"dpo", "compare"} & set(yaml.safe_load((proj / "dvc.lock").read_text())["stages"])
    assert json.loads(run([str(BIN / "dvc"), "status", "--json"], proj, env).stdout or "{}") == {}
    summary = json.loads((proj / "artifacts/methods/summary.json").read_text())
    assert summary["seeds"] == [0, 1] and len(summary["methods"]["dpo"]["win_rate"]["values"]) == 2
    assert {"ppo", "ppo_ensemble", "best_of_n"} <= summary["overoptimization"].keys()
    for f in ("summary.md", "figure1.png", "overoptimization.png"):
        assert (proj / "artifacts/methods" / f).stat().st_size > 500
    assert "Methods over 2 seeds" in proc.stdout


def test_sigkill_at_any_point_then_rerun_gives_the_uninterrupted_result(project, env, tmp_path):
    """The micro pipeline, killed with SIGKILL at four points spread over the stages and
    rerun after each: the final run completes with the metrics of the uninterrupted run
    (`project`'s first run), `dvc status` is clean, and no kill left a half-written artifact."""
    reference = _results(project)
    proj = make_project(tmp_path / "killed", yaml.safe_load((project / "params.yaml").read_text()))
    env = {**env, "PREFECT_HOME": str(tmp_path / "prefect-home")}  # its own: a killed server may leave its database mid-write
    killed = []
    for point in KILL_POINTS:
        proc = run([sys.executable, "-m", "flows.pipeline", "--params", "params.yaml"], proj,
                   {**env, "INSTRUCTFLOW_CRASH_AT": point}, ok=False, new_session=True)
        assert proc.returncode == -9, f"{point}: the run was not killed there (exit {proc.returncode})\n{proc.stderr[-3000:]}"
        killed.append(point)
        _assert_nothing_half_written(proj)
    _, rec = flow_run(proj, env)
    assert set(states(rec).values()) <= {"Completed", "Cached"} and len(killed) == len(KILL_POINTS)
    assert _results(proj) == reference
    status = run([str(BIN / "dvc"), "status", "--json"], proj)
    assert json.loads(status.stdout or "{}") == {}


def test_second_run_is_all_cached_and_a_ppo_change_reruns_only_what_follows(project, env):
    _, rec = flow_run(project, env)
    assert set(states(rec).values()) == {"Cached"}, states(rec)
    assert rec["stage_compute_s"] == 0
    # an edit to code no stage runs (the endpoint) changes no key (test_registry.py) and no DVC stage
    serve = project / "instructflow/serving/endpoint.py"
    serve.write_text(serve.read_text().replace('"""The scoring endpoint', '"""The scoring endpoint (edited)', 1))
    assert "up to date" in run([str(BIN / "dvc"), "status"], project, env).stdout
    run([*GIT, "checkout", "instructflow/serving/endpoint.py"], project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ppo"]["lr"] = 3e-4
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # and outputs deleted behind Prefect's back are rebuilt, not reported as cached: the export (which reads
    # no PPO setting) runs again only because its folder is gone
    shutil.rmtree(project / "artifacts/export/rm")
    _, rec = flow_run(project, env)
    ran = {s for s, st in states(rec).items() if st != "Cached"}
    assert ran == {"ppo", "ppo_ptx", "eval", "export"}, states(rec)
    assert (project / "artifacts/export/rm/manifest.json").exists()
    run([*GIT, "checkout", "params.yaml"], project)


def test_sigterm_stops_the_run_its_stage_processes_and_its_server_and_frees_the_lock(project, env, tmp_path):
    """What systemd or a supervisor sends: SIGTERM while PPO and PPO-ptx run in their own processes. The run
    ends (exit 143) within seconds, and no process it started is left: not the stages, not the temporary
    Prefect server; the artifacts folder can be locked again."""
    from flows.stopping import _alive, descendants
    from instructflow.io import exclusive

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ppo"].update(lr=2e-4, iterations=60, snapshot_every=0)  # PPO and PPO-ptx run again, side by side
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with (tmp_path / "run.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--params", "params.yaml"], cwd=project,
                                env={**os.environ, **env, "INSTRUCTFLOW_LOG": "INFO"}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        # the stage processes' progress lines reach the run's log (Prefect's), steps done and time left
        while not re.search(r"ppo(_ptx)? iteration 2/60 \(3%, [0-9.]+ s/iteration, \d+m\d+s left\)",
                            (tmp_path / "run.log").read_text()):
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "run.log").read_text()[-3000:]
            time.sleep(0.5)
        started_by_run = descendants(proc.pid)
        assert len(started_by_run) >= 3  # the server and the two stage processes (and what they started)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 143, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        run([*GIT, "checkout", "params.yaml"], project)
    time.sleep(1)
    assert [p for p in started_by_run if _alive(p)] == []  # (a zombie that init has not reaped yet is not alive)
    assert "SIGTERM: stopping the run's stages and its server" in (tmp_path / "run.log").read_text()
    with exclusive(project / "artifacts", "the test"):
        pass


def test_dvc_pull_into_a_fresh_clone_restores_every_output(project, env, tmp_path):
    clone = tmp_path / "clone"
    run([*GIT, "clone", "-q", str(project), str(clone)], tmp_path)
    run([str(BIN / "dvc"), "pull"], clone, env)
    pulled = outs_hashes(clone)  # every output, metric and plot dvc.lock names (run 1's)
    assert len(pulled) >= 30
    assert "up to date" in run([str(BIN / "dvc"), "status"], clone, env).stdout  # bytes match dvc.lock's md5s
    # and they are the bytes run 1 wrote (the stages before export were not rerun since)
    for path, sha in pulled.items():
        if path.split("/")[1] in ("data", "validate", "pretrain", "sft", "collect", "reward"):
            assert content_hash(project / path) == sha, path


def test_dvc_repro_on_a_fresh_clone_reproduces_the_run(project, env, tmp_path):
    clone = tmp_path / "repro"
    run([*GIT, "clone", "-q", str(project), str(clone)], tmp_path)
    before = lock_md5s(clone)
    out = run([str(BIN / "dvc"), "repro"], clone, env, timeout=900).stdout
    assert "Running stage 'ppo_ptx'" in out and "Running stage 'eval'" in out
    # same data, params and code on the same machine: the same bytes for every dataset,
    # model, export and evaluation (result.json and training logs also hold timings)
    after = lock_md5s(clone)
    timed = [p for p in after if p.endswith(("result.json", "train_log.jsonl"))]
    assert len(after) - len(timed) >= 20
    assert {p: m for p, m in after.items() if p not in timed} == {p: m for p, m in before.items() if p not in timed}
    metrics = run([str(BIN / "dvc"), "metrics", "show"], clone, env).stdout
    assert "win_rate_ppo_vs_sft" in metrics and "val_accuracy" in metrics
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["eval"]["bootstrap"] = 300
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([str(BIN / "dvc"), "repro"], clone, env, timeout=900).stdout
    assert "Running stage 'eval'" in out and "Running stage 'ppo'" not in out
    diff = run([str(BIN / "dvc"), "params", "diff"], clone, env).stdout
    assert "eval.bootstrap" in diff
    run([str(BIN / "dvc"), "metrics", "diff"], clone, env)
    run([str(BIN / "dvc"), "plots", "show", "-o", "dvc_plots"], clone, env)
    assert (clone / "dvc_plots/index.html").stat().st_size > 1000


def _round(project, env, ok=True, run_flow=True, **rounds):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["rounds"] = {**params.get("rounds", {}), **rounds}
    params["orchestrate"] = {**params["orchestrate"], "concurrent_stages": False}  # micro stages: no process starts
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([sys.executable, "-m", "instructflow.cli", "dvc-yaml"], project)
    run([*GIT, "commit", "-qm", f"rounds: {rounds}", "--", "params.yaml", "dvc.yaml"], project)
    if not run_flow:
        return None
    who = {f"GIT_{role}_{k}": v for role in ("AUTHOR", "COMMITTER") for k, v in (("NAME", "rounds"), ("EMAIL", "r@x.invalid"))}
    return run([sys.executable, "-m", "flows.rounds", "--params", "params.yaml"], project, {**env, **who}, ok=ok)


def test_rounds_stop_on_bad_feedback_then_promote_keep_and_commit_each_round(project, env, bucket, s3_server, tmp_path):
    """Rounds on the micro project, with the store in SeaweedFS. The champion's micro answers hold control
    characters: with no rejected share allowed, Great Expectations stops the round's feedback stage (the
    flow stops on a failed stage before the next: test_bad_data_stops_the_flow_before_any_training).
    Round 1 (gate at 0) promotes v1: policy and RM published, pointer moved, ledger line, one git commit
    of ticket, ledger and dvc.lock. Round 2 starts from v1 with a challenger forced bad (PPO at lr 0.05)
    and the default gate: not promoted, the pointer stays, the report says why. Round 1's commit,
    checked out elsewhere, pulls round 1's feedback only."""
    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], region_name=s3_server["AWS_REGION"],
                      aws_access_key_id=s3_server["AWS_ACCESS_KEY_ID"], aws_secret_access_key=s3_server["AWS_SECRET_ACCESS_KEY"])
    store = f"s3://{bucket}/store"
    _round(project, env, run_flow=False, enabled=True, store=store, max_rejected_share=0.0)
    (project / "rounds").mkdir()
    (project / "rounds/round.json").write_text('{"round": 1, "champion": "sft"}')  # as the flow opens round 1
    run([sys.executable, "-m", "instructflow.cli", "run", "--stages", "round_champion"], project, env)
    proc = run([sys.executable, "-m", "instructflow.cli", "round-feedback"], project, env, ok=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "responses have no control characters or U+FFFD" in log and "quarantined to" in log
    assert not (project / "artifacts/round_reward/result.json").exists() and "Contents" not in s3.list_objects_v2(
        Bucket=bucket, Prefix="store/")

    proc = _round(project, env, max_rejected_share=1.0, gate_min_lower=0.0)
    pointer = json.loads(s3.get_object(Bucket=bucket, Key="store/champion.json")["Body"].read())
    assert pointer["version"] == "v1" and pointer["round"] == 1 and pointer["previous"] is None
    for part in ("policy", "rm"):
        s3.head_object(Bucket=bucket, Key=f"store/versions/v1/{part}/files.json")
    assert "round 1: promoted: the challenger's win rate over the champion (sft)" in proc.stdout
    assert run([*GIT, "log", "-1", "--format=%s"], project).stdout.startswith("round 1: promoted v1")
    assert set(run([*GIT, "show", "--name-only", "--format=", "HEAD"], project).stdout.split()) == \
        {"rounds/round.json", "rounds/ledger.jsonl", "dvc.lock", "pipelines/rounds/dvc.yaml", "pipelines/rounds/dvc.lock"}
    assert json.loads(run([str(BIN / "dvc"), "status", "--json", "pipelines/rounds/dvc.yaml"], project, env).stdout or "{}") == {}
    lock = yaml.safe_load((project / "pipelines/rounds/dvc.lock").read_text())
    assert {"round_champion", "round_feedback", "round_reward", "round_ppo", "round_export", "round_gate"} <= set(lock["stages"])

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ppo"] = {**params["ppo"], "lr": 0.05}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = _round(project, env, gate_min_lower=0.5)  # commits the lr with the gate
    report = json.loads((project / "artifacts/round_gate/report.json").read_text())
    assert report["round"] == 2 and report["champion"] == "v1" and report["promote"] is False
    assert report["reason"].startswith("not promoted: the challenger's win rate over the champion (v1)")
    assert "so the champion stays" in proc.stdout
    assert json.loads(s3.get_object(Bucket=bucket, Key="store/champion.json")["Body"].read())["version"] == "v1"
    ledger = [json.loads(x) for x in (project / "rounds/ledger.jsonl").read_text().splitlines()]
    assert [(r["round"], r["promoted"], r["champion_after"]) for r in ledger] == [(1, True, "v1"), (2, False, "v1")]
    assert [r["comparisons_all_rounds"] > r["comparisons_added"] > 0 for r in ledger] == [False, True]
    assert run([*GIT, "log", "-1", "--format=%s"], project).stdout.startswith("round 2: kept v1")
    compared = json.loads(run([sys.executable, "-m", "instructflow.cli", "champion", "compare", "v1", "sft"], project, env).stdout)
    assert compared["a"] == "v1" and compared["prompts"] == 40 and 0 <= compared["ci95"][0] <= compared["win_rate"] <= 1

    clone = tmp_path / "round1"
    run([*GIT, "clone", "-q", str(project), str(clone)], tmp_path)
    round1 = run([*GIT, "log", "--format=%H", "--grep=^round 1:"], clone).stdout.split()
    run([*GIT, "checkout", "-q", *round1], clone)
    run([str(BIN / "dvc"), "pull", "pipelines/rounds/dvc.yaml:round_feedback"], clone, env)
    assert [f.name for f in (clone / "artifacts/round_feedback/feedback").iterdir()] == ["round_001.jsonl"]
    assert json.loads((clone / "rounds/round.json").read_text()) == {"round": 1, "champion": "sft"}


def test_bad_data_stops_the_flow_before_any_training(tmp_path, env):
    bad = tmp_path / "comparisons.jsonl"
    rows = [{"id": f"c{i}", "prompt": f"Question {i}?", "responses": [f"answer {i}", f"other {i}"], "ranking": [0, 1]}
            for i in range(30)]
    rows[7]["ranking"] = [1, 1]
    rows[12]["responses"] = ["same", "same"]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = {**{k: v for k, v in MICRO.items() if k not in ("collect", "eval")},
              "project": {"artifacts_dir": "artifacts", "threads": 2},
              "data": {"source": "files", "comparisons": str(bad)}}
    proj = tmp_path / "files"
    proj.mkdir()
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**env, "PYTHONPATH": str(ROOT)}
    proc = run([sys.executable, "-m", "flows.pipeline", "--params", "params.yaml"], proj, env, ok=False)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert f"{bad}: 1 row(s) fail 'ranking is a permutation" in log and "lines 8" in log
    assert "responses within a comparison are distinct" in log and "lines 13" in log
    assert not (proj / "artifacts/pretrain").exists() and not (proj / "artifacts/data/sft_train.jsonl").exists()
    q = [json.loads(x) for x in (proj / "artifacts/data/quarantine/comparisons.quarantine.jsonl").read_text().splitlines()]
    assert [r["line"] for r in q] == [8, 13]


def test_stage_waves_group_only_stages_that_read_none_of_each_others_outputs():
    from instructflow.config import Params
    from instructflow.registry import IO, STAGES, StageSpec, group_specs, pipeline_specs, stage_waves

    names = [[s.name for s in w] for w in stage_waves(pipeline_specs(Params()))]
    assert names == [["data"], ["validate"], ["pretrain"], ["sft"], ["collect"], ["reward"],
                     ["export", "ppo", "ppo_ptx"], ["eval"]]
    names = [[s.name for s in w] for w in stage_waves(group_specs(Params(), "pipeline", "methods"))]  # `make methods`
    assert names[6:] == [["export", "ppo", "ppo_ptx", "reward_ensemble", "dpo", "best_of_n"], ["ppo_ensemble", "eval"],
                         ["compare", "overoptimization"]]
    # a path inside another stage's output folder is a dependency too; order is kept
    def spec(name, deps, outs):
        io = IO(deps={f"d{i}": d for i, d in enumerate(deps)}, outs={f"o{i}": o for i, o in enumerate(outs)})
        return StageSpec(STAGES["data"], io.deps, io.outs, io, f"out/{name}")

    a = spec("a", (), ("out/a",))
    b = spec("b", ("in/b.jsonl",), ("out/b",))
    c = spec("c", ("out/a/model/config.json",), ("out/c",))
    assert stage_waves([a, b, c]) == [[a, b], [c]]
