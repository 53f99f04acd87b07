"""The scoring endpoint: the exported RM on ONNX Runtime behind FastAPI.

    POST /v1/score    {"items": [{"prompt", "response"}, ...]} -> {"scores": [...], "model_version"}
                      (an ensemble, `--model a,b,c` or a members.json: also "ensemble": [{"std", "members"}, ...])
    POST /v1/compare  {"prompt", "response_a", "response_b"} -> P(a preferred) = sigmoid(r_a - r_b)
    GET  /healthz     alive;  GET /readyz  model loaded, names the version and the execution provider
    GET  /metrics     Prometheus (the version served and the swaps too);  GET /docs  OpenAPI
    POST /admin/reload   (admin key) check the champion pointer now

`--model <store>/champion` follows the champion pointer (instructflow/rounds/champion.py):
every serve.champion_poll_s, or on POST /admin/reload, a new version is downloaded
beside the one serving, verified (checksums, and its probe texts scored again
against the scores the export recorded), and swapped in: requests admitted before
the swap finish on the old model, later ones go to the new; a version that fails
verification is refused and the old one keeps serving.

Concurrent requests are grouped by a micro-batcher into one ONNX Runtime call
of at most `max_batch_size` items: those queued while the previous call ran,
plus any arriving within `max_wait_ms` (default 0).
Text is encoded exactly as in training (chat template, response + EOS); a pair
longer than the model's context keeps the whole response when it fits and cuts
the prompt from the LEFT (`encoding.join_truncated`), so long inputs never fail.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import AfterValidator, BaseModel, Field

from ..config import ServeConfig
from ..lm.encoding import encode_pair, pad
from .onnx import MANIFEST, ort_session, verify_export

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the model
def length_groups(lengths: list[int], max_padding: float = 0.25) -> list[list[int]]:
    """Indices of sequences grouped so that each group, padded to its longest, holds at most
    `max_padding` more tokens than its real ones: sorted by length, a group takes the next
    (longer) sequence while that bound holds. One call per group instead of one padded batch
    lets mixed lengths (real chat prompts) cost their own tokens, not the longest one's."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    real = 0
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[i] <= (1 + max_padding) * (real + lengths[i]):
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups


class _Scorer:
    """What both backends share: training's encoding of a (prompt, response) pair, and
    batches cut into groups of similar length."""

    tokenizer = None
    max_length = 0
    max_padding = 0.25

    def encode(self, prompt: str, response: str) -> list[int]:
        return encode_pair(self.tokenizer, prompt, response, self.max_length)[0]

    def score_ids(self, seqs: list[list[int]]) -> list[float]:
        scores = [0.0] * len(seqs)
        for group in length_groups([len(s) for s in seqs], self.max_padding):
            for i, score in zip(group, self.score_batch([seqs[i] for i in group])):
                scores[i] = score
        return scores


class OnnxScorer(_Scorer):
    """Tokenizer + ONNX session of one verified export folder."""

    def __init__(self, folder: Path, provider: str = "auto"):
        from transformers import AutoTokenizer

        self.manifest = verify_export(folder)
        self.version = self.manifest["model_version"]
        self.max_length = int(self.manifest["max_length"])
        self.pad_id = int(self.manifest["pad_token_id"])
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.session, self.provider = ort_session(folder / "model.onnx", provider)

    def score_batch(self, seqs: list[list[int]]) -> list[float]:
        ids, mask = pad(seqs, self.pad_id)
        return self.session.run(["scores"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0].astype(float).tolist()


class TorchScorer(_Scorer):
    """The same interface on the torch RM checkpoint (eager mode): the peer that
    ONNX Runtime is measured against in bench/serve_load.py."""

    def __init__(self, folder: Path, provider: str = "auto"):
        import torch

        from ..lm.modeling import context_length, load_reward_model

        self.torch = torch
        # The same device rule as ONNX Runtime's provider, so a GPU host compares GPU with GPU.
        if provider == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("serve.provider=cuda, but torch sees no CUDA device")
        self.device = torch.device("cuda" if provider != "cpu" and torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer = load_reward_model(folder)
        self.model.eval().to(self.device)
        self.version = f"torch:{folder.name}"
        self.max_length = context_length(self.model)
        self.pad_id = self.tokenizer.pad_token_id
        self.provider = f"torch-eager-{self.device.type}"

    def score_batch(self, seqs: list[list[int]]) -> list[float]:
        from ..lm.modeling import reward_scores

        ids, mask = pad(seqs, self.pad_id)
        with self.torch.inference_mode():
            return reward_scores(self.model, ids.to(self.device), mask.to(self.device)).float().cpu().tolist()


class EnsembleScorer(_Scorer):
    """k reward models served as one (an RM ensemble, e.g. the reward_ensemble stage's members):
    every item is scored by each member; the item's score is their mean, and `spread` gives
    their standard deviation (population) and each member's score. The members must share a
    tokenizer (they do when trained from one SFT model); items are encoded once, for the
    shortest context among them."""

    def __init__(self, members: list[_Scorer]):
        first = members[0]
        for i, m in enumerate(members[1:], 1):
            if m.tokenizer.get_vocab() != first.tokenizer.get_vocab() or m.pad_id != first.pad_id:
                raise ValueError(f"ensemble member {i} ({m.version}) has another tokenizer than member 0 ({first.version})")
        self.members, self.tokenizer, self.pad_id = members, first.tokenizer, first.pad_id
        self.max_length = min(m.max_length for m in members)
        self.version = "ensemble(" + "+".join(m.version for m in members) + ")"
        self.provider = first.provider

    def score_batch(self, seqs: list[list[int]]) -> list[tuple[float, ...]]:
        """Per item: (mean, std, score of member 0, member 1, ...)."""
        each = [m.score_batch(seqs) for m in self.members]
        out = []
        for scores in zip(*each, strict=True):
            mean = sum(scores) / len(scores)
            std = math.sqrt(sum((x - mean) ** 2 for x in scores) / len(scores))
            out.append((mean, std, *scores))
        return out


# --------------------------------------------------------------------------- following the champion
def check_probes(scorer: _Scorer, folder: Path) -> float:
    """Score the export's probe texts (probes.json) and compare with the scores the export
    recorded with torch; raise ValueError beyond its tolerance. Returns the largest difference."""
    import json

    path = folder / "probes.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no probes.json, so its parity cannot be checked (export it again)")
    probes = json.loads(path.read_text())
    got = scorer.score_ids([scorer.encode(p, r) for p, r in probes["items"]])
    worst = max(abs(a - b) for a, b in zip(got, probes["scores"], strict=True))
    if not worst <= probes["tolerance"]:
        raise ValueError(f"{folder}: parity check failed: its probe scores differ from those recorded at export by "
                         f"{worst:.3g} > {probes['tolerance']:g}")
    return worst


def champion_store(model: str) -> str | None:
    """The store of a `<store>/champion` model argument, else None."""
    m = model.rstrip("/")
    if m == "champion" or m.endswith("/champion"):
        return m[: -len("champion")].rstrip("/") or "."
    return None


class ChampionSource:
    """The champion pointer of a store, and each version's RM export fetched into the cache."""

    def __init__(self, store_uri: str, cfg: ServeConfig):
        import hashlib

        from .storage import open_store

        self.uri, self.cfg = store_uri, cfg
        self.store = open_store(store_uri)
        self.cache = Path(cfg.cache_dir) / "champion" / hashlib.sha256(store_uri.encode()).hexdigest()[:12]
        self.initial: tuple[dict, _Scorer] | None = None

    def pointer(self) -> dict | None:
        from ..rounds.champion import read_pointer

        return read_pointer(self.store)

    def load(self, pointer: dict) -> _Scorer:
        """The version's scorer, its export downloaded beside the others and verified; ValueError if it is bad."""
        from .storage import fetch_folder

        dest = self.cache / pointer["version"] / "rm"
        try:
            verify_export(dest)
        except ValueError:
            fetch_folder(self.store, pointer["rm"], dest)
        scorer = OnnxScorer(dest, self.cfg.provider)
        check_probes(scorer, dest)
        scorer.version = pointer["version"]
        scorer.max_padding = self.cfg.max_padding
        return scorer


@dataclass
class Served:
    """One loaded model and its batcher; `inflight` counts the requests admitted to it."""

    scorer: _Scorer
    batcher: MicroBatcher
    inflight: int = 0
    pointer: dict | None = None
    since: float = 0.0          # wall-clock time it began to serve


# --------------------------------------------------------------------------- micro-batching
@dataclass
class _Job:
    seqs: list[list[int]]
    future: asyncio.Future


class MicroBatcher:
    """Collects concurrent jobs into batches of at most `max_batch` sequences:
    every job already queued, then those arriving within `max_wait_s` of the
    first. Runs `fn` in a worker thread, one batch at a time, so under load the
    jobs that queue while one batch runs make up the next."""

    def __init__(self, fn, max_batch: int, max_wait_s: float, on_batch=None):
        self.fn, self.max_batch, self.max_wait_s, self.on_batch = fn, max_batch, max_wait_s, on_batch
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def submit(self, seqs: list[list[int]]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(seqs), self.max_batch):  # a request larger than a batch goes in several
            job = _Job(seqs[i : i + self.max_batch], asyncio.get_running_loop().create_future())
            await self.queue.put(job)
            out.extend(await job.future)
        return out

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        carry: _Job | None = None
        while True:
            jobs = [carry or await self.queue.get()]
            carry = None
            size = len(jobs[0].seqs)
            deadline = loop.time() + self.max_wait_s
            while size < self.max_batch:
                try:  # jobs already queued join at once; only an empty queue waits
                    job = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self.queue.get(), timeout)
                    except asyncio.TimeoutError:
                        break
                if size + len(job.seqs) > self.max_batch:
                    carry = job
                    break
                jobs.append(job)
                size += len(job.seqs)
            seqs = [s for j in jobs for s in j.seqs]
            try:
                scores = await loop.run_in_executor(None, self.fn, seqs)
            except Exception as err:  # noqa: BLE001 - every waiting caller gets the error
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(err)
                continue
            if self.on_batch:
                self.on_batch(len(seqs))
            offset = 0
            for j in jobs:
                if not j.future.done():
                    j.future.set_result(scores[offset : offset + len(j.seqs)])
                offset += len(j.seqs)


# --------------------------------------------------------------------------- API schema
def _unicode_text(v: str) -> str:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"); no tokenizer can encode one."""
    for i, ch in enumerate(v):
        if "\ud800" <= ch <= "\udfff":
            raise ValueError(f"character {i} is a lone surrogate \\u{ord(ch):04x}, not text")
    return v


Text = Annotated[str, AfterValidator(_unicode_text)]


def _printable(value):
    """A 422's details, safe to write as JSON: no input echoed, lone surrogates escaped."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, (list, tuple)):
        return [_printable(v) for v in value]
    return value if isinstance(value, (int, float)) and math.isfinite(value) else str(value)


class Item(BaseModel):
    prompt: Text = Field(description="The prompt, as a user wrote it (the chat template is applied here).")
    response: Text = Field(description="The response to score.")


class ScoreRequest(BaseModel):
    items: list[Item] = Field(min_length=1, description="Pairs to score.")


class CompareRequest(BaseModel):
    prompt: Text
    response_a: Text
    response_b: Text


def with_limits(schema: dict, cfg: ServeConfig) -> dict:
    """The OpenAPI schema with this server's limits (serve.max_items, serve.max_chars) written in. The routes
    check them and answer 413 naming the limit (pydantic would answer 422), so they are not in the models."""
    schemas = schema.get("components", {}).get("schemas", {})
    note = f" At most {cfg.max_chars} characters (413 above)."
    for model, fields in (("Item", ("prompt", "response")), ("CompareRequest", ("prompt", "response_a", "response_b"))):
        for name in fields:
            prop = schemas[model]["properties"][name]
            prop.update(maxLength=cfg.max_chars, description=prop.get("description", "").strip() + note)
    items = schemas["ScoreRequest"]["properties"]["items"]
    items.update(maxItems=cfg.max_items, description=f"Pairs to score: 1 to {cfg.max_items} (413 above).")
    return schema


class Spread(BaseModel):
    std: float = Field(description="Standard deviation of the members' rewards (population): where they disagree.")
    members: list[float] = Field(description="Each member's reward, in the order the ensemble was given.")


class ScoreResponse(BaseModel):
    scores: list[float] = Field(description="One reward per item, in order (demonstrations average 0); an ensemble's "
                                "is its members' mean.")
    ensemble: list[Spread] | None = Field(None, description="Served as an ensemble: each item's spread over the members.")
    model_version: str


class CompareResponse(BaseModel):
    probability_a_preferred: float = Field(description="sigmoid(r_a - r_b), the Bradley-Terry preference the RM was trained on.")
    scores: list[float] = Field(description="[r_a, r_b]")
    model_version: str


class ErrorResponse(BaseModel):
    detail: str | list = Field(description="What is wrong and where (FastAPI lists field errors for 422).")


# Every status code a scoring route can answer, so the OpenAPI schema documents them all.
ERRORS = {
    400: {"model": ErrorResponse, "description": "The body could not be parsed (not UTF-8, or not JSON: truncated, "
          "malformed); the message says where."},
    401: {"model": ErrorResponse, "description": "Missing or invalid API key, when keys are configured."},
    413: {"model": ErrorResponse, "description": "A limit was exceeded: body size, items per request or characters per field; the message names it."},
    415: {"model": ErrorResponse, "description": "The body is not JSON by its Content-Type: send application/json."},
    422: {"model": ErrorResponse, "description": "The JSON does not match the request schema."},
}


class LimitError(Exception):
    def __init__(self, message: str):
        self.message = message


def load_api_keys(cfg: ServeConfig) -> list[str]:
    keys = [k.strip() for k in os.environ.get(cfg.api_keys_env, "").split(",") if k.strip()]
    if cfg.api_keys_file:
        path = Path(cfg.api_keys_file)
        if not path.is_file():
            raise ValueError(f"serve.api_keys_file: {path} not found")
        keys += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return keys


def key_matches(given: str, keys: list[str]) -> bool:
    """Constant-time comparison against every key (no early exit)."""
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given.encode(), k.encode())
    return ok


# --------------------------------------------------------------------------- the app
class BodyLimitAndMetrics:
    """ASGI middleware: refuses bodies over `max_body_bytes` with 413, and calls
    `record(path, status, seconds)` for every HTTP request.

    A plain ASGI class, not Starlette's `@app.middleware("http")`: that one runs
    every request in its own task group with memory streams, and under load
    the event loop paces this server; replacing it gave 14-16% more requests/s
    (docs/decisions.md).
    A body with a Content-Length is judged by the header before it is read; a
    chunked one is read up to the limit, then replayed to the app. A refused body
    is read and dropped before the 413 goes out (for at most `drain_seconds`, and
    64 MB or 16 x the limit), as nginx's lingering close: a client still sending then reads the
    answer instead of a reset connection."""

    def __init__(self, app, max_body_bytes: int, record, drain_seconds: float = 10.0):
        self.app, self.max_body_bytes, self.record = app, max_body_bytes, record
        self.drain_seconds, self.drain_bytes = drain_seconds, max(16 * max_body_bytes, 64 << 20)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                too_big = f"request body of {int(length)} bytes exceeds max_body_bytes={self.max_body_bytes}"
                await self._drain(receive)
            elif length is None and scope["method"] == "POST":
                receive, too_big = await self._read_chunked(receive)
            else:
                too_big = None
            if too_big:
                await JSONResponse({"detail": too_big}, 413, headers={"connection": "close"})(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        finally:
            self.record(scope["path"], status, time.perf_counter() - t0)

    async def _read_chunked(self, receive):
        """Read a body without Content-Length; (a receive that replays it, error or None)."""
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                if message.get("more_body", False):
                    await self._drain(receive)
                return receive, f"request body exceeds max_body_bytes={self.max_body_bytes}"
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return replay, None

    async def _drain(self, receive) -> None:
        """Read and drop the rest of a refused body, within the time and size caps."""
        deadline, size = time.monotonic() + self.drain_seconds, 0
        while size < self.drain_bytes and (left := deadline - time.monotonic()) > 0:
            try:
                message = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:
                return
            size += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                return


class Metrics:
    """The server's Prometheus collectors, in a registry of its own (several apps may live in one process)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.model_info = Gauge("instructflow_model_info", "The version served (1) and those served before (0)",
                                ["version"], registry=registry)
        self.swaps = Counter("instructflow_model_swaps_total", "Champion versions swapped in (ok) or refused", ["result"],
                             registry=registry)
        for result in ("ok", "refused"):
            self.swaps.labels(result)
        self.requests = Counter("instructflow_requests_total", "HTTP requests", ["path", "status"], registry=registry)
        self.latency = Histogram("instructflow_request_seconds", "Request latency", ["path"], registry=registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.batch_sizes = Histogram("instructflow_batch_size", "Items per ONNX Runtime call", registry=registry,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.errors = Counter("instructflow_errors_total", "Requests answered with an error", ["path", "status"],
                              registry=registry)

    def record(self, path: str, status: int, seconds: float) -> None:
        if path != "/metrics":
            self.requests.labels(path, str(status)).inc()
            self.latency.labels(path).observe(seconds)
            if status >= 400:
                self.errors.labels(path, str(status)).inc()


class ModelSlot:
    """The model being served, and (following a champion) the swap to a new version: requests admitted
    before a swap finish on the old model, later ones go to the new; a version that fails verification
    is refused and the old one keeps serving."""

    def __init__(self, source: Path | list[Path] | ChampionSource, cfg: ServeConfig, metrics: Metrics):
        self.champion = source if isinstance(source, ChampionSource) else None
        self.source, self.cfg, self.metrics = source, cfg, metrics
        self.model: Served | None = None
        self.refused: dict | None = None
        self.refused_why: str | None = None
        self.lock: asyncio.Lock | None = None

    def serve(self, scorer: _Scorer, pointer: dict | None = None) -> Served:
        batcher = MicroBatcher(scorer.score_ids, self.cfg.max_batch_size, self.cfg.max_wait_ms / 1000,
                               self.metrics.batch_sizes.observe)
        batcher.start()
        self.metrics.model_info.labels(scorer.version).set(1)
        return Served(scorer, batcher, pointer=pointer, since=time.time())

    async def start(self) -> None:
        if self.champion is not None:
            champion = self.champion
            pointer, scorer = champion.initial or await asyncio.to_thread(lambda: (p := champion.pointer(), champion.load(p)))
            champion.initial = None
            self.model, self.lock = self.serve(scorer, pointer), asyncio.Lock()
        else:
            kind = TorchScorer if self.cfg.backend == "torch" else OnnxScorer
            dirs = self.source if isinstance(self.source, list) else [self.source]
            provider = self.cfg.provider
            scorer = kind(dirs[0], provider) if len(dirs) == 1 else EnsembleScorer([kind(d, provider) for d in dirs])
            scorer.max_padding = self.cfg.max_padding
            self.model = self.serve(scorer)
        log.info("serve: model %s on %s", self.model.scorer.version, self.model.scorer.provider)

    async def stop(self) -> None:
        await self.model.batcher.stop()  # uvicorn has already let the requests in flight finish
        self.model = None

    async def score(self, pairs: list[tuple[str, str]]) -> tuple[list, _Scorer]:
        """Per pair: its reward, or with an ensemble (mean, std, each member's reward); and the model
        that scored them: the one serving when the request was admitted, even if a swap comes meanwhile."""
        m = self.model
        m.inflight += 1
        try:
            return await m.batcher.submit([m.scorer.encode(p, r) for p, r in pairs]), m.scorer
        finally:
            m.inflight -= 1

    async def reload(self) -> dict:
        """Check the champion pointer; swap in a new version when it moved (one check at a time)."""
        async with self.lock:
            old = self.model
            try:
                pointer = await asyncio.to_thread(self.champion.pointer)
            except Exception as err:  # noqa: BLE001 - the store is unreachable: keep serving
                log.warning("serve: cannot read the champion pointer: %s", err)
                return {"swapped": False, "version": old.scorer.version, "error": f"cannot read the pointer: {err}"}
            if pointer is None or pointer["version"] == old.scorer.version:
                return {"swapped": False, "version": old.scorer.version}
            if self.refused == pointer:
                return {"swapped": False, "version": old.scorer.version, "refused": self.refused_why}
            try:
                scorer = await asyncio.to_thread(self.champion.load, pointer)
            except Exception as err:  # noqa: BLE001 - a bad version (checksum, parity, unreadable): refuse it
                self.metrics.swaps.labels("refused").inc()
                self.refused, self.refused_why = pointer, f"{pointer['version']}: {err}"
                log.error("serve: refusing %s, still serving %s: %s", pointer["version"], old.scorer.version, err)
                return {"swapped": False, "version": old.scorer.version, "refused": self.refused_why}
            self.model = new = self.serve(scorer, pointer)  # from here every request is admitted to the new one
            self.metrics.model_info.labels(old.scorer.version).set(0)
            self.metrics.swaps.labels("ok").inc()
            while old.inflight:  # requests admitted before the swap finish on the old model
                await asyncio.sleep(0.005)
            await old.batcher.stop()
            log.info("serve: now serving %s (was %s)", new.scorer.version, old.scorer.version)
            return {"swapped": True, "version": new.scorer.version, "previous": old.scorer.version}

    async def poll(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.champion_poll_s)
            try:
                await self.reload()
            except Exception:  # noqa: BLE001 - never let the poller die
                log.exception("serve: champion check failed")

    def readiness(self) -> dict:
        m, cfg = self.model, self.cfg
        s = m.scorer
        out = {"ready": True, "model_version": s.version, "provider": s.provider, "max_length": s.max_length,
               "max_batch_size": cfg.max_batch_size, "members": len(s.members) if isinstance(s, EnsembleScorer) else 1}
        if self.champion is not None:
            out["champion"] = {"store": self.champion.uri, "version": s.version, "round": (m.pointer or {}).get("round"),
                               "pointer_moved_at": (m.pointer or {}).get("pointer_moved_at"), "since": m.since,
                               "poll_s": cfg.champion_poll_s, "refused": self.refused_why}
        return out


BEARER = HTTPBearer(auto_error=False, scheme_name="APIKey",
                    description="An API key (serve.api_keys_env / serve.api_keys_file): 'Authorization: Bearer <key>'.")


def bearer_check(keys: list[str], what: str, disabled: str = ""):
    """A FastAPI dependency accepting 'Authorization: Bearer <one of keys>' (401 otherwise; none needed when
    `keys` is empty, unless `disabled` says why the routes are off: 403)."""
    def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]) -> None:
        if not keys:
            if disabled:
                raise HTTPException(403, disabled)
            return
        if credentials is None or not key_matches(credentials.credentials, keys):
            raise HTTPException(401, f"missing or invalid {what} (send 'Authorization: Bearer <{what}>')",
                                headers={"WWW-Authenticate": "Bearer"})
    return check


def create_app(model_dir: Path | list[Path] | ChampionSource, cfg: ServeConfig):
    """The FastAPI app serving `model_dir` (an export folder, several: an ensemble, or a champion to follow)."""
    metrics = Metrics()
    slot = ModelSlot(model_dir, cfg, metrics)
    keys = load_api_keys(cfg)
    if not keys:
        log.warning("serve: no API keys configured (%s / serve.api_keys_file); the endpoint is open", cfg.api_keys_env)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await slot.start()
        poller = asyncio.get_running_loop().create_task(slot.poll()) if slot.champion is not None else None
        yield
        if poller:
            poller.cancel()
        await slot.stop()

    app = FastAPI(title="instructflow reward model", version="1", lifespan=lifespan,
                  description="Scores (prompt, response) pairs with the exported InstructGPT-style reward model. "
                  "Authorize with an API key (Bearer) when the server has keys.")
    app.add_middleware(BodyLimitAndMetrics, max_body_bytes=cfg.max_body_bytes, record=metrics.record)
    add_error_handlers(app)
    add_scoring_routes(app, slot, cfg, bearer_check(keys, "API key"))
    add_operations_routes(app, slot, cfg, metrics)
    openapi = app.openapi
    app.openapi = lambda: app.openapi_schema or with_limits(openapi(), cfg)
    return app


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LimitError)
    async def _limit(request, err: LimitError):
        return JSONResponse({"detail": err.message}, 413)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        errors = err.errors()
        broken = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if broken is not None:
            where = (broken.get("ctx") or {}).get("error", "")
            return JSONResponse({"detail": f"the body is not valid JSON ({_printable(where) or 'malformed'}, at "
                                           f"{_printable(list(broken.get('loc', ())))}): send a complete JSON object"}, 400)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media and not (media == "application/json" or media.endswith("+json")):
            return JSONResponse({"detail": f"the body must be JSON: send Content-Type: application/json (got {media!r})"},
                                415)
        # FastAPI's own handler echoes the input, which may hold NaN or a lone surrogate: not JSON, a 500
        return JSONResponse({"detail": [{"loc": _printable(e.get("loc", ())), "msg": _printable(e.get("msg", "")),
                                         "type": _printable(e.get("type", ""))} for e in errors]}, 422)


def add_scoring_routes(app: FastAPI, slot: ModelSlot, cfg: ServeConfig, authorize) -> None:
    def check_chars(name: str, text: str) -> None:
        if len(text) > cfg.max_chars:
            raise LimitError(f"{name} has {len(text)} characters, more than max_chars={cfg.max_chars}")

    @app.post("/v1/score", response_model=ScoreResponse, response_model_exclude_none=True, dependencies=[Depends(authorize)],
              responses=ERRORS)
    async def score(req: ScoreRequest) -> ScoreResponse:
        if len(req.items) > cfg.max_items:
            raise LimitError(f"{len(req.items)} items, more than max_items={cfg.max_items}")
        for i, it in enumerate(req.items):
            check_chars(f"items[{i}].prompt", it.prompt)
            check_chars(f"items[{i}].response", it.response)
        out, scorer = await slot.score([(it.prompt, it.response) for it in req.items])
        if isinstance(scorer, EnsembleScorer):
            return ScoreResponse(scores=[x[0] for x in out], ensemble=[Spread(std=x[1], members=list(x[2:])) for x in out],
                                 model_version=scorer.version)
        return ScoreResponse(scores=out, model_version=scorer.version)

    @app.post("/v1/compare", response_model=CompareResponse, dependencies=[Depends(authorize)], responses=ERRORS)
    async def compare(req: CompareRequest) -> CompareResponse:
        for name in ("prompt", "response_a", "response_b"):
            check_chars(name, getattr(req, name))
        out, scorer = await slot.score([(req.prompt, req.response_a), (req.prompt, req.response_b)])
        ra, rb = (x[0] if isinstance(x, tuple) else x for x in out)
        return CompareResponse(probability_a_preferred=1.0 / (1.0 + math.exp(-(ra - rb))), scores=[ra, rb],
                               model_version=scorer.version)


def add_operations_routes(app: FastAPI, slot: ModelSlot, cfg: ServeConfig, metrics: Metrics) -> None:
    """Health, readiness, Prometheus metrics and the admin reload."""
    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", responses={503: {"description": "The model is not loaded yet."}})
    async def readyz():
        return slot.readiness() if slot.model is not None else JSONResponse({"ready": False}, 503)

    admin_keys = [k.strip() for k in os.environ.get(cfg.admin_keys_env, "").split(",") if k.strip()]
    authorize_admin = bearer_check(admin_keys, "admin key",
                                   disabled=f"admin endpoints are disabled: set {cfg.admin_keys_env} to enable them")

    @app.post("/admin/reload", dependencies=[Depends(authorize_admin)],
              responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, 409: {"model": ErrorResponse}})
    async def admin_reload() -> dict:
        """Check the champion pointer now; when it moved, fetch, verify and swap in the new version.
        Answers once the swap is complete (requests on the old version finished), or with why not."""
        if slot.champion is None:
            raise HTTPException(409, "this server does not follow a champion (serve --model <store>/champion)")
        return await slot.reload()

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format."}})
    async def prometheus_metrics():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def resolve_models(model: str, cfg: ServeConfig) -> list[Path]:
    """One model, or an ensemble: several given with commas, or the reward_ensemble stage's
    members.json (or its folder), whose members are RM checkpoints: served by serve.backend
    torch (give export folders, comma-separated, to serve an ensemble on ONNX Runtime)."""
    listing = Path(model) / "members.json" if Path(model).is_dir() else Path(model)
    if listing.name == "members.json" and listing.is_file():
        if cfg.backend != "torch":
            raise ValueError(f"{listing} lists RM checkpoints: serve them with serve.backend: torch, or export each "
                             "member and give the export folders comma-separated")
        import json

        return [Path(m) for m in json.loads(listing.read_text())["members"]]
    return [resolve_model(m.strip(), cfg) for m in model.split(",") if m.strip()]


def resolve_model(model: str, cfg: ServeConfig) -> Path:
    """A local export folder, or s3://bucket/prefix fetched into the cache and verified."""
    if cfg.backend == "torch":  # a save_pretrained RM folder, for comparisons
        return Path(model)
    if model.startswith("s3://"):
        from .storage import fetch_export

        return fetch_export(model, Path(cfg.cache_dir))
    folder = Path(model)
    if (folder / "rm" / MANIFEST).exists():  # the export stage's folder
        folder = folder / "rm"
    verify_export(folder)
    return folder


def serve(model: str, cfg: ServeConfig) -> None:
    import uvicorn

    store = champion_store(model)
    if store is not None:  # checked here, in one line, rather than by the server's start-up
        if cfg.backend != "onnx":
            raise ValueError("a champion is served from its ONNX export: serve.backend must be onnx")
        source = ChampionSource(store, cfg)
        pointer = source.pointer()
        if pointer is None:
            raise ValueError(f"{store}: no champion pointer (nothing promoted yet: `make round`)")
        source.initial = (pointer, source.load(pointer))
        uvicorn.run(create_app(source, cfg), host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=30)
        return
    folders = resolve_models(model, cfg)
    if len(folders) > 1:  # refused here, in one line, rather than by the server's start-up
        from transformers import AutoTokenizer

        vocab = AutoTokenizer.from_pretrained(str(folders[0])).get_vocab()
        for f in folders[1:]:
            if AutoTokenizer.from_pretrained(str(f)).get_vocab() != vocab:
                raise ValueError(f"ensemble member {f} has another tokenizer than {folders[0]}")
    app = create_app(folders if len(folders) > 1 else folders[0], cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=30)
