"""Scheduled deployments on a real Prefect server: create the work pools,
deploy prefect.yaml, start workers, check the schedules exist, trigger the
retrain and see it complete, with one stage placed on a second ("GPU") pool
that exchanges its inputs and outputs through a real S3 server."""
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


def test_deploy_schedule_and_run_with_a_stage_on_the_gpu_pool(tmp_path, prefect_server, s3_server):
    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], region_name=s3_server["AWS_REGION"],
                 aws_access_key_id=s3_server["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=s3_server["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket="exchange")
    params = {**MICRO, "project": {"artifacts_dir": "artifacts", "threads": 2},
              "orchestrate": {"version_with_dvc": False, "gpu_stages": ["export"], "exchange_uri": "s3://exchange/runs",
                              "gpu_deployment": "instructflow-stage/gpu-stage"}}
    proj = make_project(tmp_path / "proj", params)
    env = {**prefect_server, **s3_server, "INSTRUCTFLOW_HOME": str(proj), "INSTRUCTFLOW_REPO": str(proj),
           "INSTRUCTFLOW_IMAGE": "unused-by-a-process-pool"}
    url = env["PREFECT_API_URL"]
    prefect = str(BIN / "prefect")
    run([prefect, "work-pool", "create", "instructflow-local", "--type", "process"], proj, env)
    # the "GPU" pool is a second process pool here; production uses infra/prefect/gpu-base-job-template.json
    run([prefect, "work-pool", "create", "instructflow-gpu", "--type", "process"], proj, env)
    run([prefect, "--no-prompt", "deploy", "--name", "weekly-retrain", "--name", "nightly-eval", "--name", "gpu-stage"], proj, env)

    deployments = {d["name"]: d for d in api(url, "/deployments/filter", {})}
    assert {"weekly-retrain", "nightly-eval", "gpu-stage"} <= deployments.keys()
    crons = {name: [s["schedule"].get("cron") for s in d["schedules"]] for name, d in deployments.items()}
    assert crons["weekly-retrain"] == ["0 3 * * 1"] and crons["nightly-eval"] == ["30 1 * * *"]
    assert all(s["active"] for s in deployments["weekly-retrain"]["schedules"])
    # the server's scheduler has already queued the coming runs
    deadline = time.time() + 60
    while time.time() < deadline:
        scheduled = api(url, "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                                                     "deployments": {"id": {"any_": [deployments["weekly-retrain"]["id"]]}}})
        if scheduled:
            break
        time.sleep(2)
    assert scheduled and all(fr["expected_start_time"] > fr["created"] for fr in scheduled)

    logs = [open(tmp_path / f"worker-{pool}.log", "w") for pool in ("local", "gpu")]
    workers = [subprocess.Popen([prefect, "worker", "start", "--pool", pool, "--type", "process"], cwd=tmp_path,
                                env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
               for pool, log in zip(("instructflow-local", "instructflow-gpu"), logs)]
    try:
        fr = api(url, f"/deployments/{deployments['weekly-retrain']['id']}/create_flow_run", {"state": {"type": "SCHEDULED"}})
        done = wait_flow_run(url, fr["id"], 600)
        assert done["state"]["type"] == "COMPLETED", (tmp_path / "worker-local.log").read_text()[-5000:]
        record = json.loads((proj / "artifacts/pipeline/run.json").read_text())
        states = {r["stage"]: r["state"] for r in record["stages"]}
        assert states["export"] == "Completed (GPU pool)" and states["eval"] == "Completed"
        assert (proj / "artifacts/export/rm/manifest.json").exists()  # brought back through object storage
        gpu_runs = api(url, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployments["gpu-stage"]["id"]]}}})
        assert [r["state"]["type"] for r in gpu_runs] == ["COMPLETED"]

        fr = api(url, f"/deployments/{deployments['nightly-eval']['id']}/create_flow_run", {"state": {"type": "SCHEDULED"}})
        assert wait_flow_run(url, fr["id"], 300)["state"]["type"] == "COMPLETED"
    finally:
        stop(*workers)
        for log in logs:
            log.close()
