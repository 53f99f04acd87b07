"""Scheduled deployments on a real Prefect server: create the work pools,
deploy prefect.yaml, start workers, check the schedules exist, run the weekly
round from the server and see it promote a champion into a real S3 server
(SeaweedFS), with one stage placed on a second ("GPU") pool that exchanges its
inputs and outputs through it."""
import json
import os
import subprocess
import time
import urllib.request

import boto3
import pytest
from conftest import free_port, stop, wait_http
from test_orchestration import BIN, make_project, run
from test_stages import MICRO

pytestmark = pytest.mark.slow


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat()


def api(url: str, path: str, body: dict | None = None) -> dict | list:
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def wait_flow_run(url: str, run_id: str, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        fr = api(url, f"/flow_runs/{run_id}")
        if fr["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return fr
        time.sleep(2)
    raise TimeoutError(f"flow run {run_id} not finished after {timeout} s: {fr['state']}")


@pytest.fixture
def prefect_server(tmp_path):
    port = free_port()
    env = {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",  # the default waits 60 s before its first pass
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", 180, proc)
        yield env
    finally:
        stop(proc)
        log.close()


def test_the_weekly_round_runs_from_the_server_and_promotes_into_s3_with_a_stage_on_the_gpu_pool(
        tmp_path, prefect_server, s3_server):
    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], region_name=s3_server["AWS_REGION"],
                      aws_access_key_id=s3_server["AWS_ACCESS_KEY_ID"], aws_secret_access_key=s3_server["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket="exchange")
    params = {**MICRO, "project": {"artifacts_dir": "artifacts", "threads": 2},
              # micro answers hold control characters: let them be quarantined; promote any challenger that does not lose all
              "rounds": {"enabled": True, "store": "s3://exchange/store", "max_rejected_share": 1.0, "gate_min_lower": 0.0},
              "orchestrate": {"version_with_dvc": False, "gpu_stages": ["round_export"], "exchange_uri": "s3://exchange/runs",
                              "gpu_deployment": "instructflow-stage/gpu-stage"}}
    proj = make_project(tmp_path / "proj", params)
    env = {**prefect_server, **s3_server, "INSTRUCTFLOW_HOME": str(proj), "INSTRUCTFLOW_REPO": str(proj),
           "INSTRUCTFLOW_IMAGE": "unused-by-a-process-pool"}
    url = env["PREFECT_API_URL"]
    prefect = str(BIN / "prefect")
    run([prefect, "work-pool", "create", "instructflow-local", "--type", "process"], proj, env)
    # the "GPU" pool is a second process pool here; production uses infra/prefect/gpu-base-job-template.json
    run([prefect, "work-pool", "create", "instructflow-gpu", "--type", "process"], proj, env)
    run([prefect, "--no-prompt", "deploy", "--name", "weekly-round", "--name", "nightly-eval", "--name", "gpu-stage"], proj, env)

    deployments = {d["name"]: d for d in api(url, "/deployments/filter", {})}
    assert {"weekly-round", "nightly-eval", "gpu-stage"} <= deployments.keys()
    crons = {name: [s["schedule"].get("cron") for s in d["schedules"]] for name, d in deployments.items()}
    assert crons["weekly-round"] == ["0 3 * * 1"] and crons["nightly-eval"] == ["30 1 * * *"]
    assert all(s["active"] for s in deployments["weekly-round"]["schedules"])
    # the server's scheduler has already queued the coming runs
    deadline = time.time() + 60
    while time.time() < deadline:
        scheduled = api(url, "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                                                     "deployments": {"id": {"any_": [deployments["weekly-round"]["id"]]}}})
        if scheduled:
            break
        time.sleep(2)
    assert scheduled and all(fr["expected_start_time"] > fr["created"] for fr in scheduled)

    logs = [open(tmp_path / f"worker-{pool}.log", "w") for pool in ("local", "gpu")]
    workers = [subprocess.Popen([prefect, "worker", "start", "--pool", pool, "--type", "process"], cwd=tmp_path,
                                env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
               for pool, log in zip(("instructflow-local", "instructflow-gpu"), logs)]
    try:
        # the scheduler's next run of the weekly round, brought forward to now
        moved = api(url, f"/flow_runs/{scheduled[0]['id']}/set_state",
                    {"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": _now()}}, "force": True})
        assert moved["status"] == "ACCEPT", moved
        done = wait_flow_run(url, scheduled[0]["id"], 600)
        assert done["state"]["type"] == "COMPLETED", (tmp_path / "worker-local.log").read_text()[-5000:]
        record = json.loads((proj / "artifacts/pipeline/run.json").read_text())
        states = {r["stage"]: r["state"] for r in record["stages"]}
        assert states["round_export"] == "Completed (GPU pool)" and states["round_gate"] == "Completed"
        assert "ppo" not in states  # a round runs its own stages and only the pipeline stages they read
        assert (proj / "artifacts/round_export/rm/manifest.json").exists()  # brought back through object storage
        gpu_runs = api(url, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployments["gpu-stage"]["id"]]}}})
        assert [r["state"]["type"] for r in gpu_runs] == ["COMPLETED"]
        pointer = json.loads(s3.get_object(Bucket="exchange", Key="store/champion.json")["Body"].read())
        assert pointer["version"] == "v1" and pointer["round"] == 1 and pointer["reason"] == "promoted"
        published = [o["Key"] for o in s3.list_objects_v2(Bucket="exchange", Prefix="store/versions/v1/")["Contents"]]
        assert {"store/versions/v1/policy/files.json", "store/versions/v1/rm/manifest.json",
                "store/versions/v1/version.json"} <= set(published)
        report = api(url, "/artifacts/filter", {"artifacts": {"key": {"any_": ["instructflow-round-report"]}}})
        assert report and "Round 1: promoted v1" in report[0]["data"]
    finally:
        stop(*workers)
        for log in logs:
            log.close()
