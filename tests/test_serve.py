"""ONNX export and the scoring endpoint, through the real server over HTTP."""
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import yaml
from conftest import free_port, wait_http
from tiny import MICRO, TEXTS
from transformers import LlamaConfig, LlamaForSequenceClassification

from instructflow.lm.encoding import encode_pair, pad
from instructflow.lm.modeling import load_reward_model, reward_scores
from instructflow.serving.endpoint import TorchScorer
from instructflow.serving.onnx import ExportError, export_reward_model, ort_session, verify_export

pytestmark = pytest.mark.slow
KEY = "test-key-123"
LIMITS = {"max_items": 8, "max_chars": 2000, "max_body_bytes": 40000, "max_batch_size": 16, "max_wait_ms": 20}


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    from instructflow.lm.modeling import train_tokenizer

    tok = train_tokenizer(TEXTS, MICRO.vocab_size)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=MICRO.hidden_size, intermediate_size=MICRO.intermediate_size,
                      num_hidden_layers=MICRO.num_layers, num_attention_heads=MICRO.num_heads,
                      num_key_value_heads=MICRO.num_heads, max_position_embeddings=MICRO.max_position_embeddings,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, num_labels=1)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg)
    model.config.reward_bias = 0.25
    path = tmp_path_factory.mktemp("rm") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def exported(rm_dir, tmp_path_factory):
    dest = tmp_path_factory.mktemp("export") / "rm"
    manifest = export_reward_model(rm_dir, dest, opset=18, tolerance=1e-4, cases=[(1, 5), (3, 17), (4, 64)])
    return dest, manifest


def torch_scores(rm_dir, pairs):
    model, tok = load_reward_model(rm_dir)
    model.eval()
    seqs = [encode_pair(tok, p, r, model.config.max_position_embeddings)[0]
            for p, r in pairs]
    ids, mask = pad(seqs, tok.pad_token_id)
    with torch.no_grad():
        return reward_scores(model, ids, mask).tolist()


def _start(model: str, tmp_path, env_extra: dict, limits: dict = LIMITS):
    port = free_port()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"serve": {**limits, "port": port, "cache_dir": str(tmp_path / "cache")}}))
    env = {**os.environ, **env_extra}
    log_path = tmp_path / "server.log"  # a file, not a pipe: thousands of access-log lines would fill a pipe and stall the server
    with log_path.open("w") as log:
        open_ = [] if "INSTRUCTFLOW_API_KEYS" in env_extra else ["--insecure-no-auth"]
        proc = subprocess.Popen([sys.executable, "-m", "instructflow.cli", "serve", "--model", model, "--params", "params.yaml",
                                 *open_], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log_path = log_path
    return proc, f"http://127.0.0.1:{port}"


def _output(proc, timeout: float) -> str:
    """What the server wrote, once it has exited."""
    proc.wait(timeout=timeout)
    return proc.log_path.read_text()


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    folder, _ = exported
    work = tmp_path_factory.mktemp("serve")
    proc, url = _start(str(folder), work, {"INSTRUCTFLOW_API_KEYS": f"other-key,{KEY}", "INSTRUCTFLOW_ADMIN_KEYS": KEY})
    try:
        wait_http(url + "/healthz", 120, proc)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        out = _output(proc, 30)
        assert KEY not in out  # keys are never logged


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_export_writes_a_manifest_that_verifies(exported, rm_dir):
    folder, manifest = exported
    parity = manifest["parity"]
    assert parity["max_abs_diff"] <= 1e-4 and len({(c["batch"], c["length"]) for c in parity["cases"]}) == 3
    assert "CPUExecutionProvider" in parity["providers"]  # and CUDA too on a GPU host
    assert {c["provider"] for c in parity["cases"]} == set(parity["providers"])
    assert manifest["reward_bias"] == 0.25 and manifest["input_names"] == ["input_ids", "attention_mask"]
    assert set(manifest["files"]) >= {"model.onnx", "tokenizer.json"}
    assert verify_export(folder)["model_version"] == manifest["model_version"]


def test_cuda_asked_for_on_a_host_without_it_is_a_clear_error(exported, rm_dir):
    folder, _ = exported
    assert ort_session(folder / "model.onnx", "cpu")[1] == "CPUExecutionProvider"
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    with pytest.raises(RuntimeError, match="provider=cuda"):
        ort_session(folder / "model.onnx", "cuda")
    with pytest.raises(RuntimeError, match="provider=cuda"):
        TorchScorer(rm_dir, "cuda")
    assert TorchScorer(rm_dir, "auto").provider == "torch-eager-cpu"


def test_export_fails_when_parity_is_broken_and_writes_nothing(rm_dir, tmp_path, monkeypatch):
    # an exporter that writes a graph of slightly different weights: ONNX Runtime then
    # disagrees with the torch model by 0.01, and the real parity check must catch it
    import copy

    real_export = torch.onnx.export

    def drifting_export(graph, args, **kw):
        drifted = copy.deepcopy(graph)
        with torch.no_grad():
            drifted.bias += 0.01
        return real_export(drifted, args, **kw)

    monkeypatch.setattr(torch.onnx, "export", drifting_export)
    with pytest.raises(ExportError, match="parity check failed"):
        export_reward_model(rm_dir, tmp_path / "rm", opset=18, tolerance=1e-4, cases=[(2, 9)])
    assert not (tmp_path / "rm").exists() and not (tmp_path / "rm.tmp").exists()


def test_scores_equal_the_torch_model(server, rm_dir):
    pairs = [("What color is the ball?", "It is red."), ("Name 2 fruits.", "Apple and plum."), ("Hi", "")]
    r = httpx.post(server + "/v1/score", json={"items": [{"prompt": p, "response": a} for p, a in pairs]}, headers=AUTH)
    assert r.status_code == 200, r.text
    got = r.json()["scores"]
    assert "ensemble" not in r.json()  # one model: no spread
    want = torch_scores(rm_dir, pairs)
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4
    c = httpx.post(server + "/v1/compare", json={"prompt": pairs[0][0], "response_a": pairs[0][1], "response_b": "Blue."},
                   headers=AUTH).json()
    ra, rb = torch_scores(rm_dir, [pairs[0], (pairs[0][0], "Blue.")])
    assert c["probability_a_preferred"] == pytest.approx(1 / (1 + torch.exp(torch.tensor(rb - ra)).item()), abs=1e-4)


def test_long_inputs_are_truncated_from_the_left_not_rejected(server, rm_dir):
    long_prompt = "Ana has a green kite. " * 80  # about 1,700 characters: far beyond the 64-token context
    r = httpx.post(server + "/v1/score", json={"items": [{"prompt": long_prompt, "response": "It is green."}]}, headers=AUTH)
    assert r.status_code == 200
    assert r.json()["scores"][0] == pytest.approx(torch_scores(rm_dir, [(long_prompt, "It is green.")])[0], abs=1e-4)


def test_concurrent_callers_each_get_their_own_scores_in_shared_batches(server, rm_dir):
    prompts = [f"Name {i} fruits." for i in range(40)]
    want = torch_scores(rm_dir, [(p, "Apple.") for p in prompts])

    def call(i):
        return httpx.post(server + "/v1/score", json={"items": [{"prompt": prompts[i], "response": "Apple."}]},
                          headers=AUTH, timeout=60).json()["scores"][0]

    before = _batch_count(server)
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(call, range(40)))
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4
    batches = _batch_count(server) - before
    assert batches < 40  # the batcher grouped concurrent requests


def _batch_count(url) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("instructflow_batch_size_count"):
            return float(line.split()[-1])
    return 0.0


def test_auth_limits_and_malformed_input_get_their_status_codes(server):
    item = {"prompt": "Hi", "response": "Hello"}
    assert httpx.post(server + "/v1/score", json={"items": [item]}).status_code == 401
    bad = httpx.post(server + "/v1/score", json={"items": [item]}, headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
    r = httpx.post(server + "/v1/score", json={"items": [item] * 9}, headers=AUTH)
    assert r.status_code == 413 and "max_items=8" in r.json()["detail"]
    r = httpx.post(server + "/v1/score", json={"items": [{"prompt": "x" * 2001, "response": "y"}]}, headers=AUTH)
    assert r.status_code == 413 and "items[0].prompt" in r.json()["detail"] and "max_chars=2000" in r.json()["detail"]
    r = httpx.post(server + "/v1/score", content=b'{"items": [' + b" " * 50000 + b"]}", headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]
    # a body sent in chunks has no Content-Length: the server counts what it reads
    chunked = {**AUTH, "content-type": "application/json"}
    r = httpx.post(server + "/v1/score", content=iter([b'{"items": [', b" " * 50000, b"]}"]), headers=chunked)
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]
    r = httpx.post(server + "/v1/score", content=iter([b'{"items": [', json.dumps(item).encode(), b"]}"]), headers=chunked)
    assert r.status_code == 200 and len(r.json()["scores"]) == 1
    r = httpx.post(server + "/v1/score", content=b'{"items": [', headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]  # truncated: the declared 400, not 422
    r = httpx.post(server + "/v1/score", content=json.dumps({"items": [item]}), headers={**AUTH, "content-type": "text/plain"})
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["detail"] and "text/plain" in r.json()["detail"]
    assert httpx.post(server + "/v1/score", json={"items": []}, headers=AUTH).status_code == 422
    assert httpx.post(server + "/v1/score", json={"items": [{"prompt": 3}]}, headers=AUTH).status_code == 422
    assert httpx.post(server + "/v1/compare", json={"prompt": "a"}, headers=AUTH).status_code == 422
    metrics = httpx.get(server + "/metrics").text
    for status in ("401", "413", "422"):  # every refusal is counted, by path and status
        assert f'instructflow_errors_total{{path="/v1/score",status="{status}"}}' in metrics


def test_health_readiness_metrics_and_openapi(server, exported):
    _, manifest = exported
    assert httpx.get(server + "/healthz").json() == {"status": "alive"}
    ready = httpx.get(server + "/readyz").json()
    assert ready["ready"] and ready["provider"] == "CPUExecutionProvider" and ready["model_version"] == manifest["model_version"]
    metrics = httpx.get(server + "/metrics").text
    assert "instructflow_request_seconds_bucket" in metrics and "instructflow_requests_total" in metrics
    spec = httpx.get(server + "/openapi.json").json()
    assert {"/v1/score", "/v1/compare", "/healthz", "/readyz"} <= spec["paths"].keys()
    # the bearer check is a declared security scheme (/docs' Authorize button), and the limits are in the schema
    assert spec["components"]["securitySchemes"]["APIKey"] == {**spec["components"]["securitySchemes"]["APIKey"],
                                                               "type": "http", "scheme": "bearer"}
    assert spec["paths"]["/v1/score"]["post"]["security"] == [{"APIKey": []}]
    assert {"400", "401", "413", "415", "422"} <= spec["paths"]["/v1/score"]["post"]["responses"].keys()
    schemas = spec["components"]["schemas"]
    assert schemas["ScoreRequest"]["properties"]["items"]["maxItems"] == LIMITS["max_items"]
    assert schemas["Item"]["properties"]["prompt"]["maxLength"] == LIMITS["max_chars"]


def test_a_tampered_model_is_refused(exported, tmp_path):
    import shutil

    folder, _ = exported
    bad = tmp_path / "rm"
    shutil.copytree(folder, bad)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.onnx").write_bytes(bytes(data))
    proc, _ = _start(str(bad), tmp_path, {})
    out = _output(proc, 120)
    assert proc.returncode == 2 and "model.onnx has sha256" in out and "refusing" in out


def test_model_served_from_s3_and_tampering_there_is_refused(exported, s3_server, tmp_path):
    import boto3

    from instructflow.serving.storage import publish_export

    folder, manifest = exported
    client = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], aws_access_key_id="x", aws_secret_access_key="y",
                          region_name="us-east-1")
    client.create_bucket(Bucket="models")
    publish_export(folder, "s3://models/rm/v1", client=client)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="models", Prefix="rm/v1/")["Contents"]]
    assert "rm/v1/manifest.json" in keys and "rm/v1/model.onnx" in keys

    (tmp_path / "good").mkdir()
    proc, url = _start("s3://models/rm/v1", tmp_path / "good", s3_server)
    try:
        wait_http(url + "/readyz", 120, proc)
        assert httpx.get(url + "/readyz").json()["model_version"] == manifest["model_version"]
        assert httpx.post(url + "/v1/score", json={"items": [{"prompt": "Hi", "response": "Hello"}]}).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _output(proc, 30)

    client.put_object(Bucket="models", Key="rm/v1/tokenizer.json", Body=b'{"tampered": true}')
    (tmp_path / "bad").mkdir()
    proc, _ = _start("s3://models/rm/v1", tmp_path / "bad", s3_server)
    out = _output(proc, 120)
    assert proc.returncode == 2 and "tokenizer.json has sha256" in out
    assert not (tmp_path / "bad" / "cache" / "models" / "rm" / "v1").exists()


def _a_second_version(folder, dest):
    """A copy of an export that differs in one file, with its manifest rewritten to match."""
    import shutil

    from instructflow.io import sha256_file

    shutil.copytree(folder, dest)
    cfg = json.loads((dest / "tokenizer_config.json").read_text())
    (dest / "tokenizer_config.json").write_text(json.dumps({**cfg, "comment": "v2"}))
    m = json.loads((dest / "manifest.json").read_text())
    m["files"] = {name: sha256_file(dest / name) for name in m["files"]}
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


def test_publishing_through_a_storage_outage_retries_and_no_reader_sees_a_partial_version(exported, s3_server, tmp_path):
    """`instructflow publish` replaces v1 with v2 while the S3 server drops every connection
    for 6 s (the client itself tries once): publish retries and finishes; a reader polling
    all along finds no model, v1 or v2 complete, never a mix; a truncated file is refused."""
    import threading

    import boto3
    from botocore.exceptions import ClientError
    from conftest import FlakyProxy

    from instructflow.serving.storage import fetch_export, publish_export

    folder, manifest = exported
    client = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], aws_access_key_id="x", aws_secret_access_key="y",
                          region_name="us-east-1")
    client.create_bucket(Bucket="outage")
    publish_export(folder, "s3://outage/rm", client=client)
    v2 = _a_second_version(folder, tmp_path / "v2")
    seen, bad, done = [], [], threading.Event()

    def reader():
        n = 0
        while not done.is_set():
            n += 1
            try:
                got = fetch_export("s3://outage/rm", tmp_path / f"reader{n % 2}", client=client)
                seen.append(json.loads((got / "tokenizer_config.json").read_text()).get("comment", "v1"))
            except ClientError:
                seen.append("none")  # between versions there is no manifest: nothing to take
            except ValueError as err:
                bad.append(str(err))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    port = int(s3_server["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    proxy = FlakyProxy(port, fail_for=6.0)
    try:
        env = {**os.environ, **s3_server, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", "AWS_MAX_ATTEMPTS": "1"}
        proc = subprocess.run([sys.executable, "-m", "instructflow.cli", "publish", "s3://outage/rm", "--folder", str(v2)],
                              env=env, capture_output=True, text=True, timeout=300)
    finally:
        proxy.close()
        done.set()
        thread.join(60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proxy.dropped > 0 and "retry 1/" in proc.stderr  # the outage happened and was ridden out
    assert not bad, bad[:3]
    assert seen and set(seen) <= {"v1", "v2", "none"}
    assert fetch_export("s3://outage/rm", tmp_path / "after", client=client).exists()
    onnx = client.get_object(Bucket="outage", Key="rm/model.onnx")["Body"].read()
    client.put_object(Bucket="outage", Key="rm/model.onnx", Body=onnx[: len(onnx) // 2])  # a truncated upload
    with pytest.raises(ValueError, match="model.onnx has sha256"):
        fetch_export("s3://outage/rm", tmp_path / "truncated", client=client)
    assert not (tmp_path / "truncated" / "outage").exists() or not any((tmp_path / "truncated" / "outage").iterdir())


def test_soak_bench_reports_each_window_and_its_verdict(exported, tmp_path):
    """bench/soak.py, shortened to two 2-second windows: every window's latency and the
    server's memory are reported, and no request failed."""
    folder, _ = exported
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": t}) + "\n" for i, t in enumerate(TEXTS[:8])))
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, "bench/soak.py", "--export", str(folder), "--prompts", str(prompts), "--clients", "4",
                           "--minutes", "2", "--window-seconds", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    result = json.loads(out.read_text())
    assert [m["minute"] for m in result["minutes"]] == [1, 2], proc.stderr[-2000:]
    assert result["errors"] == 0 and result["requests"] > 20
    assert all(m["server_rss_mb"] > 50 and m["p99_ms"] >= m["p50_ms"] > 0 for m in result["minutes"])
    assert proc.returncode == (0 if result["passed"] else 1)


def test_manifest_is_json_with_every_file_hashed(exported):
    folder, _ = exported
    m = json.loads((folder / "manifest.json").read_text())
    on_disk = {p.name for p in folder.iterdir()} - {"manifest.json"}
    assert set(m["files"]) == on_disk


def test_openapi_fuzz_finds_no_server_error(server, tmp_path):
    """Schemathesis generates requests from the served OpenAPI schema (valid and
    invalid bodies, with and without the key) and checks that none gets a 5xx
    and that every response matches the schema."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "schemathesis"), "run", server + "/openapi.json",
           "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
           "--max-examples", "60", "--seed", "1", "--request-timeout", "30",
           "-H", f"Authorization: Bearer {KEY}", "--report", "junit", "--report-dir", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    tail = run.stdout[-4000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    assert "Tested: 6" in run.stdout and "No issues found" in run.stdout, tail  # all six operations were exercised


def _hostile_bodies():
    """Request bodies nobody should send: strings with lone surrogates, control characters
    and astral or huge unicode; NaN and infinities; wrong types; deep nesting; bytes that
    are not UTF-8 or not JSON; each under one of several content types."""
    from hypothesis import strategies as st

    text = st.one_of(
        st.text(max_size=40),
        st.text(st.characters(categories=["Cs", "Cc", "Cf", "Co", "Cn"]), max_size=20),  # surrogates, controls, unassigned
        st.text(st.characters(min_codepoint=0x10000), max_size=30),
        st.integers(1, 2600).map(lambda n: "\U0001f600" * n),   # around max_chars=2000
    )
    scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), text)
    anything = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                            max_leaves=8)
    item = st.fixed_dictionaries({"prompt": text, "response": text}) | st.dictionaries(st.sampled_from(["prompt", "response", "x"]), anything)
    score = st.fixed_dictionaries({"items": st.lists(item, max_size=10) | anything})
    compare = st.fixed_dictionaries({"prompt": text, "response_a": text, "response_b": text | anything})
    as_json = st.tuples(st.one_of(score, compare, anything), st.booleans()).map(
        lambda v: json.dumps(v[0], ensure_ascii=v[1]).encode("utf-8", "surrogatepass"))  # raw surrogates: not UTF-8
    nested = st.tuples(st.integers(1, 30000), st.sampled_from(["[", '{"items":', '{"a":['])).map(lambda v: (v[1] * v[0]).encode())
    body = st.one_of(as_json, as_json, as_json, nested, st.binary(max_size=200))
    ctype = st.sampled_from(["application/json", "application/json; charset=latin-1", "application/vnd.x+json", "text/plain",
                             "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "", "application/json"])
    return st.tuples(st.sampled_from(["/v1/score", "/v1/compare"]), body, ctype)


def test_no_hostile_body_gets_a_server_error(server):
    """At least 5,000 generated requests over real HTTP; none is answered 5xx."""
    from hypothesis import HealthCheck, given, settings

    sent, statuses = [], set()
    with httpx.Client(base_url=server, timeout=30) as client:

        @settings(max_examples=5000, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(_hostile_bodies())
        def check(case):
            path, body, ctype = case
            headers = {**AUTH, **({"content-type": ctype} if ctype else {})}
            r = client.post(path, content=body, headers=headers)
            sent.append(1)
            statuses.add(r.status_code)
            assert r.status_code < 500, (path, body[:300], ctype, r.status_code, r.text[:300])
            r.json()  # every answer, refusals included, is JSON

        check()
    assert len(sent) >= 5000
    assert {200, 413, 422} <= statuses, statuses  # the generator reaches accepted, oversized and invalid bodies


def test_an_oversized_body_is_answered_413_even_while_the_client_is_still_sending(server):
    """urllib sends the whole body before it reads: the server must read (and drop) it
    first, or the client sees a reset connection instead of the answer."""
    import urllib.error
    import urllib.request

    body = b'{"items": [' + b" " * 3_400_000 + b"]}"  # 3.4 MB against max_body_bytes=40000
    for _ in range(5):
        req = urllib.request.Request(server + "/v1/score", data=body, headers={**AUTH, "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 413 and "max_body_bytes" in json.loads(err.value.read())["detail"]


def test_graceful_shutdown_finishes_requests_in_flight(exported, rm_dir, tmp_path):
    """SIGTERM while a request waits in the batcher: the request still gets its
    scores, new connections are refused, and the process exits cleanly."""
    import time

    folder, _ = exported
    proc, url = _start(str(folder), tmp_path, {}, limits={**LIMITS, "max_wait_ms": 2000})  # each batch waits 2 s
    try:
        wait_http(url + "/readyz", 120, proc)
        pairs = [("Say hi", "hi"), ("What is two plus two?", "four")]
        with ThreadPoolExecutor(1) as pool:
            sent = time.perf_counter()
            pending = pool.submit(httpx.post, url + "/v1/score", json={"items": [{"prompt": p, "response": r} for p, r in pairs]},
                                  timeout=30)
            time.sleep(0.5)
            assert not pending.done()  # still waiting in the batcher
            proc.send_signal(signal.SIGTERM)
            reply = pending.result()
        assert reply.status_code == 200 and time.perf_counter() - sent >= 1.5
        assert reply.json()["scores"] == pytest.approx(torch_scores(rm_dir, pairs), abs=1e-4)
        out = _output(proc, 30)
        # uvicorn re-raises the signal it caught once shutdown is complete, so a clean stop reads as -SIGTERM
        assert proc.returncode in (0, -signal.SIGTERM), out
        assert "Waiting for application shutdown" in out and "Application shutdown complete" in out
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_an_ensemble_is_served_as_its_mean_with_each_items_spread(exported, rm_dir, tmp_path):
    """Two exported RMs (same tokenizer, other weights) served as one ensemble over HTTP: each item's
    score is the members' mean, with their spread; a reward_ensemble members.json (checkpoints) on the
    ONNX backend is refused with a clear error."""
    folder, _ = exported
    model, tok = load_reward_model(rm_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    second = tmp_path / "rm2"
    model.save_pretrained(second)
    tok.save_pretrained(second)
    export_reward_model(second, tmp_path / "export2", opset=18, tolerance=1e-4, cases=[(2, 9)])
    proc, url = _start(f"{folder},{tmp_path / 'export2'}", tmp_path, {})
    try:
        wait_http(url + "/readyz", 120, proc)
        pairs = [("What color is the ball?", "It is red."), ("Name 2 fruits.", "Apple and plum.")]
        r = httpx.post(url + "/v1/score", json={"items": [{"prompt": p, "response": a} for p, a in pairs]})
        assert r.status_code == 200, r.text
        body = r.json()
        a, b = torch_scores(rm_dir, pairs), torch_scores(second, pairs)
        for i in range(2):
            assert body["scores"][i] == pytest.approx((a[i] + b[i]) / 2, abs=1e-4)
            assert body["ensemble"][i]["members"] == pytest.approx([a[i], b[i]], abs=1e-4)
            assert body["ensemble"][i]["std"] == pytest.approx(abs(a[i] - b[i]) / 2, abs=1e-4)
        ready = httpx.get(url + "/readyz").json()
        assert ready["members"] == 2 and body["model_version"] == ready["model_version"] and \
            ready["model_version"].startswith("ensemble(")
    finally:
        proc.send_signal(signal.SIGTERM)
        _output(proc, 30)
    listing = tmp_path / "reward_ensemble"
    listing.mkdir()
    (listing / "members.json").write_text(json.dumps({"members": [str(rm_dir), str(second)]}))
    proc, _ = _start(str(listing), tmp_path, {})
    out = _output(proc, 120)
    assert proc.returncode != 0 and "serve.backend: torch" in out and "Traceback" not in out


def _variant(rm_dir, dest, bias: float):
    """The same RM with another reward_bias: its every score is shifted by that much."""
    import shutil

    shutil.copytree(rm_dir, dest)
    cfg = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, "reward_bias": bias}))
    return dest


def test_the_server_follows_the_champion_under_load_through_two_promotions_and_a_rollback(
        exported, rm_dir, s3_server, tmp_path, monkeypatch):
    """32 clients score all along while the pointer moves v1 -> v2 -> v3 -> v2 (two promotions, one rollback):
    no request fails, and each response names a version that was serving while it was in flight, and carries
    that version's score (versions differ by reward_bias, so the score tells which model answered). Then a
    version whose file was tampered with in the store, and one whose probe scores do not match, are refused
    while the old one keeps serving; the poller follows a pointer moved without the admin call."""
    import threading
    import time

    import boto3

    from instructflow.io import sha256_file
    from instructflow.rounds.champion import promote, rollback

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket="champ")
    store = "s3://champ/prod"
    exports = {"v1": exported[0]}
    for v, bias in (("v2", 1.25), ("v3", 2.25)):
        exports[v] = tmp_path / v / "rm"
        export_reward_model(_variant(rm_dir, tmp_path / v / "model", bias), exports[v], 18, 1e-4, [(2, 9)])
    item = ("Name a colour.", "Blue.")
    expected = {"v1": torch_scores(rm_dir, [item])[0]}
    expected["v2"], expected["v3"] = expected["v1"] + 1.0, expected["v1"] + 2.0
    assert promote(store, rm_dir, exports["v1"], {"round": 1})["version"] == "v1"

    proc, url = _start(f"{store}/champion", tmp_path, {**s3_server, "INSTRUCTFLOW_ADMIN_KEYS": "admin-key"},
                       {**LIMITS, "champion_poll_s": 1.0})
    admin = {"Authorization": "Bearer admin-key"}
    try:
        wait_http(url + "/readyz", 120, proc)
        ready = httpx.get(url + "/readyz").json()
        assert ready["model_version"] == "v1" and ready["champion"]["round"] == 1
        served = [("v1", ready["champion"]["since"])]  # (version, serving from)
        assert httpx.post(url + "/admin/reload").status_code == 401
        assert httpx.post(url + "/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 401

        stop_at, results = threading.Event(), []

        def client():
            with httpx.Client(timeout=30) as c:
                while not stop_at.is_set():
                    t0 = time.time()
                    try:
                        r = c.post(url + "/v1/score", json={"items": [{"prompt": item[0], "response": item[1]}]})
                        results.append((t0, time.time(), r.status_code, r.json()))
                    except httpx.HTTPError as err:
                        results.append((t0, time.time(), None, repr(err)))

        threads = [threading.Thread(target=client) for _ in range(32)]
        for t in threads:
            t.start()

        def move(step):
            time.sleep(0.8)
            pointer = step()
            answer = httpx.post(url + "/admin/reload", headers=admin, timeout=60).json()
            champion = httpx.get(url + "/readyz").json()["champion"]
            assert answer["version"] == champion["version"] == pointer["version"], (answer, champion, pointer)
            served.append((champion["version"], champion["since"]))

        move(lambda: promote(store, rm_dir, exports["v2"], {"round": 2}))
        move(lambda: promote(store, rm_dir, exports["v3"], {"round": 3}))
        move(lambda: rollback(store))
        time.sleep(0.8)
        stop_at.set()
        for t in threads:
            t.join()
    finally:
        stop_at.set()
    try:
        assert [v for v, _ in served] == ["v1", "v2", "v3", "v2"]
        failed = [r for r in results if r[2] != 200]
        assert len(results) > 200 and not failed, failed[:3]
        bounds = [(v, start, served[i + 1][1] if i + 1 < len(served) else float("inf")) for i, (v, start) in enumerate(served)]
        seen = set()
        for t_send, t_recv, _, body in results:
            v = body["model_version"]
            seen.add(v)
            assert body["scores"][0] == pytest.approx(expected[v], abs=1e-4)  # the version named is the model that scored
            assert any(v == bv and start <= t_recv and t_send <= end for bv, start, end in bounds), (v, t_send, t_recv, bounds)
        assert seen == {"v1", "v2", "v3"}
        print(f"{len(results)} requests from 32 clients, 0 failed; by version:",
              {v: sum(r[3]["model_version"] == v for r in results) for v in sorted(seen)})
        text = httpx.get(url + "/metrics").text
        assert 'instructflow_model_info{version="v2"} 1.0' in text and 'instructflow_model_info{version="v3"} 0.0' in text
        assert 'instructflow_model_swaps_total{result="ok"} 3.0' in text

        # a bad version is refused, and the old one keeps serving
        client_s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], region_name="us-east-1")
        promote(store, rm_dir, exports["v3"], {"round": 4})  # v4
        client_s3.put_object(Bucket="champ", Key="prod/versions/v4/rm/model.onnx", Body=b"not the model")
        answer = httpx.post(url + "/admin/reload", headers=admin, timeout=60).json()
        assert answer["swapped"] is False and answer["version"] == "v2" and "model.onnx" in answer["refused"]
        bad = tmp_path / "v5" / "rm"
        import shutil

        shutil.copytree(exports["v3"], bad)
        probes = json.loads((bad / "probes.json").read_text())
        (bad / "probes.json").write_text(json.dumps({**probes, "scores": [s + 0.5 for s in probes["scores"]]}))
        manifest = json.loads((bad / "manifest.json").read_text())
        manifest["files"]["probes.json"] = sha256_file(bad / "probes.json")
        (bad / "manifest.json").write_text(json.dumps(manifest))
        promote(store, rm_dir, bad, {"round": 5})  # v5: checksums consistent, parity not
        answer = httpx.post(url + "/admin/reload", headers=admin, timeout=60).json()
        assert answer["swapped"] is False and "parity check failed" in answer["refused"]
        r = httpx.post(url + "/v1/score", json={"items": [{"prompt": item[0], "response": item[1]}]}).json()
        assert r["model_version"] == "v2" and r["scores"][0] == pytest.approx(expected["v2"], abs=1e-4)
        assert 'instructflow_model_swaps_total{result="refused"} 2.0' in httpx.get(url + "/metrics").text
        assert httpx.get(url + "/readyz").json()["champion"]["refused"].startswith("v5")

        # the poller follows a pointer moved without the admin call
        rollback(store, "v1")
        deadline = time.time() + 20
        while httpx.get(url + "/readyz").json()["model_version"] != "v1":
            assert time.time() < deadline, "the poller did not follow the pointer"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = _output(proc, 30)
    assert "admin-key" not in out and "Traceback" not in out


def test_serve_refuses_a_missing_params_file_an_invalid_override_and_no_keys(exported, tmp_path, monkeypatch):
    """A named params file that does not exist is an error (not the defaults, open); --port goes through
    the config's validation; no API keys is an error unless --insecure-no-auth says so."""
    from typer.testing import CliRunner

    from instructflow.cli import app

    folder, _ = exported
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("INSTRUCTFLOW_API_KEYS", raising=False)
    run = CliRunner().invoke
    out = run(app, ["serve", "--model", str(folder), "--params", "typo.yaml"])
    assert out.exit_code == 2 and "typo.yaml: params file not found" in out.output
    out = run(app, ["serve", "--model", str(folder), "--port", "99999"])
    assert out.exit_code == 2 and "serve.port" in out.output and "65535" in out.output
    out = run(app, ["serve", "--model", str(folder)])
    assert out.exit_code == 2 and "no API keys" in out.output and "--insecure-no-auth" in out.output
    (tmp_path / "params.yaml").write_text("serve:\n  api_keys_file: keys.txt\n")
    out = run(app, ["serve", "--model", str(folder)])
    assert out.exit_code == 2 and "serve.api_keys_file: keys.txt not found" in out.output


def test_the_readmes_curl_scores_against_a_real_server(server):
    """The README's curl, as a user copies it, against a running server (its key and address swapped in)."""
    import re
    import shlex

    from conftest import ROOT

    block = re.search(r"curl -s localhost:8000/v1/score.*?'\n", (ROOT / "README.md").read_text(), flags=re.S).group(0)
    words = shlex.split(block.replace("\\\n", " "))
    words = [w.replace("localhost:8000", server.removeprefix("http://")).replace("Bearer my-key", f"Bearer {KEY}")
             for w in words]
    out = subprocess.run(words, capture_output=True, text=True, timeout=60)
    reply = json.loads(out.stdout)
    assert out.returncode == 0 and len(reply["scores"]) == 1 and reply["model_version"]
