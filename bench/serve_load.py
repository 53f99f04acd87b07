"""Load test of the scoring endpoint: ONNX Runtime against torch eager, same model, same run.

Starts the real server (a subprocess, real HTTP) once per backend and drives it
with N concurrent clients for D seconds, each sending one-item /v1/score
requests drawn from the evaluation prompts. Reports requests/s and p50/p99
latency per backend and the throughput ratio.

    python bench/serve_load.py --export artifacts/export --rm artifacts/reward/model --clients 32 --seconds 30
    python bench/serve_load.py --export artifacts/smollm2-hh/export --comparisons artifacts/smollm2-hh/data/comparisons_val.jsonl \
        --clients 1,8 --backends onnx --engine-batches ""
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml


def run_loop(coro):
    """asyncio.run on uvloop where installed (uvicorn[standard] brings it), as the server runs."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, backend: str, work: Path, max_padding: float = 0.25) -> tuple[subprocess.Popen, str]:
    port = free_port()
    (work / "params.yaml").write_text(yaml.safe_dump({"serve": {"port": port, "backend": backend, "max_padding": max_padding}}))
    env = {**os.environ, "INSTRUCTFLOW_LOG": "WARNING"}
    env.pop("INSTRUCTFLOW_API_KEYS", None)
    proc = subprocess.Popen([sys.executable, "-m", "instructflow.cli", "serve", "--model", model, "--params", "params.yaml",
                             "--insecure-no-auth"],
                            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{backend} server did not become ready")


async def _post_loop(host: str, port: int, requests: list[bytes], first: int, step: int, stop: float,
                     latencies: list[float]) -> int:
    """One client: a keep-alive connection that posts requests[first], requests[first + step], ...
    until `stop`, one at a time, and records each round trip; returns its count of non-200s."""
    reader, writer = await asyncio.open_connection(host, port)
    errors, k = 0, first
    try:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            writer.write(requests[k % len(requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = None
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length is None:
                raise RuntimeError(f"response without Content-Length (status {status}); this client reads only sized bodies")
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            errors += status != 200
            k += step
    finally:
        writer.close()
    return errors


async def drive(url: str, items: list[dict], clients: int, seconds: float) -> dict:
    """`clients` concurrent keep-alive connections, each sending one-item /v1/score
    requests back to back. The requests are encoded once, up front, and the client
    speaks bare HTTP/1.1 on asyncio streams: the load generator shares the machine's
    cores with the server, and a full HTTP client (httpx) took about half a core of
    the two here, which the server then lacked (docs/decisions.md)."""
    host, port = url.removeprefix("http://").split(":")
    requests = []
    for item in items:
        body = json.dumps({"items": [item]}).encode()
        requests.append(f"POST /v1/score HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    t0 = time.perf_counter()
    errors = await asyncio.gather(*(_post_loop(host, int(port), requests, i, clients, stop, latencies) for i in range(clients)))
    elapsed = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"requests": len(lat), "errors": sum(errors), "seconds": round(elapsed, 2), "requests_per_s": round(len(lat) / elapsed, 1),
            "p50_ms": round(1000 * lat[len(lat) // 2], 2), "p99_ms": round(1000 * lat[int(len(lat) * 0.99)], 2),
            "mean_ms": round(1000 * statistics.fmean(lat), 2)}


def engine_only(export: Path, rm: Path, items: list[dict], batches: list[int], seconds: float = 5.0) -> dict:
    """Scores per second of the two backends' score_ids alone (no HTTP), same batches,
    each backend on the device the server would pick (CUDA where it runs)."""
    from instructflow.config import ServeConfig
    from instructflow.serving.endpoint import OnnxScorer, TorchScorer, resolve_model

    out = {}
    for name, scorer in (("onnx", OnnxScorer(resolve_model(str(export), ServeConfig()))), ("torch", TorchScorer(rm))):
        out[f"{name}_provider"] = scorer.provider
        for batch in batches:
            seqs = [scorer.encode(it["prompt"], it["response"]) for it in (items * batch)[:batch]]
            scorer.score_ids(seqs)  # warm-up
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                scorer.score_ids(seqs)  # returns host floats, so a GPU backend is synchronised
                n += len(seqs)
            out.setdefault(f"batch_{batch}", {})[f"{name}_scores_per_s"] = round(n / (time.perf_counter() - t0), 1)
    for batch in batches:
        row = out[f"batch_{batch}"]
        row["ratio_onnx_vs_torch"] = round(row["onnx_scores_per_s"] / row["torch_scores_per_s"], 2)
    return out


def load_items(prompts: Path, comparisons: str = "") -> list[dict]:
    """One-item requests: each comparison's (prompt, response) pairs, real lengths; or each
    prompt with the response 'I do not know.'."""
    if comparisons:
        rows = [json.loads(line) for line in Path(comparisons).read_text().splitlines()]
        return [{"prompt": c["prompt"], "response": r} for c in rows for r in c["responses"]]
    return [{"prompt": json.loads(line)["prompt"], "response": "I do not know."} for line in prompts.read_text().splitlines()]


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def machine() -> str:
    text = f"{platform.machine()}, {os.cpu_count()} CPUs"
    try:
        import torch

        if torch.cuda.is_available():
            text += f", {torch.cuda.get_device_name()}"
    except ImportError:
        pass
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", default="artifacts/export")
    ap.add_argument("--rm", default="artifacts/reward/model")
    ap.add_argument("--prompts", default="artifacts/data/eval_prompts.jsonl",
                    help="Prompts JSONL; each request scores one with the response 'I do not know.'")
    ap.add_argument("--comparisons", default="", help="Comparisons JSONL instead: each request scores one of their "
                    "(prompt, response) pairs, real lengths (e.g. artifacts/smollm2-hh/data/comparisons_val.jsonl).")
    ap.add_argument("--clients", default="32", help="Concurrent clients; comma-separated for several runs (e.g. 1,8).")
    ap.add_argument("--backends", default="onnx,torch")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max-padding", type=float, default=0.25, help="serve.max_padding (1000: one padded call per batch).")
    ap.add_argument("--engine-batches", default="32", help="Comma-separated batch sizes for the engine-only figures.")
    ap.add_argument("--out", default="bench/results/serve_load.json")
    args = ap.parse_args()
    items = load_items(Path(args.prompts), args.comparisons)
    clients = [int(c) for c in args.clients.split(",")]
    backends = args.backends.split(",")
    result = {"clients": clients, "seconds": args.seconds, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
              "items": len(items), "max_padding": args.max_padding}
    for backend in backends:
        model = args.export if backend == "onnx" else args.rm
        with tempfile.TemporaryDirectory() as work:
            proc, url = start(str(Path(model).resolve()), backend, Path(work), args.max_padding)
            try:
                provider = httpx.get(url + "/readyz").json()["provider"]
                for n in clients:
                    drive_result = run_loop(drive(url, items, n, args.seconds))
                    drive_result["provider"] = provider
                    result[f"{backend}_{n}"] = drive_result
                    print(backend, n, "clients", drive_result, flush=True)
            finally:
                stop(proc)
    if set(backends) == {"onnx", "torch"}:
        for n in clients:
            result[f"throughput_ratio_onnx_vs_torch_{n}"] = round(
                result[f"onnx_{n}"]["requests_per_s"] / result[f"torch_{n}"]["requests_per_s"], 2)
    if args.engine_batches:
        batches = [int(b) for b in args.engine_batches.split(",")]
        result["engine_only"] = engine_only(Path(args.export), Path(args.rm), items, batches)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
