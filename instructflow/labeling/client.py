"""A small client of Label Studio's HTTP API (label-studio 1.23, in its own virtual
environment: `make label-studio`). instructflow talks to it over HTTP only.

Every call retries a connection failure, a timeout or a 5xx with exponential
backoff for up to `retry_seconds` (Label Studio restarting takes tens of
seconds), then raises `LabelStudioDown` with one line saying where and why;
a 4xx is a `LabelStudioError` naming the call and Label Studio's answer.
The API key is sent as 'Authorization: Token <key>' and never logged.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator

import httpx

log = logging.getLogger(__name__)


class LabelStudioError(RuntimeError):
    """Label Studio answered, and said no (a 4xx): the message names the call and its answer."""


class LabelStudioDown(LabelStudioError):
    """Label Studio did not answer for the whole retry budget."""


def api_key(env: str) -> str:
    key = os.environ.get(env, "").strip()
    if not key:
        raise LabelStudioError(f"no Label Studio API key: set ${env} (the token `make label-studio` starts the "
                               "server with, or your account's token from Label Studio's Account & Settings)")
    return key


class LabelStudio:
    """Label Studio at `url`, as the user whose API key is `key`."""

    def __init__(self, url: str, key: str, timeout: float = 30.0, retry_seconds: float = 120.0):
        self.url, self.retry_seconds = url.rstrip("/"), retry_seconds
        self.http = httpx.Client(base_url=self.url, timeout=timeout, headers={"Authorization": f"Token {key}"})

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, **kwargs):
        """One API call with retries; its JSON (None for an empty body)."""
        deadline, delay = time.monotonic() + self.retry_seconds, 1.0
        while True:
            try:
                r = self.http.request(method, path, **kwargs)
                if r.status_code < 500:
                    break
                problem = f"HTTP {r.status_code}"
            except httpx.TransportError as err:  # refused, reset, timed out: down or restarting
                problem = f"{type(err).__name__}: {err}"
            if time.monotonic() + delay > deadline:
                raise LabelStudioDown(f"Label Studio at {self.url} did not answer {method} {path} for "
                                      f"{self.retry_seconds:g} s ({problem}); nothing was written") from None
            log.warning("Label Studio %s %s: %s; retrying in %.0f s", method, path, problem, delay)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(2 * delay, 10.0)
        if r.status_code >= 400:
            raise LabelStudioError(f"Label Studio refused {method} {path}: HTTP {r.status_code} {r.text[:300]}")
        return r.json() if r.content else None

    # ---- the calls instructflow makes
    def projects(self) -> list[dict]:
        out = self.call("GET", "/api/projects/", params={"page_size": 1000})
        return out["results"] if isinstance(out, dict) else out

    def project(self, project_id: int) -> dict:
        return self.call("GET", f"/api/projects/{project_id}/")

    def find_project(self, title: str) -> dict | None:
        return next((p for p in self.projects() if p["title"] == title), None)

    def create_project(self, title: str, label_config: str, **settings) -> dict:
        return self.call("POST", "/api/projects/", json={"title": title, "label_config": label_config, **settings})

    def update_project(self, project_id: int, **settings) -> dict:
        return self.call("PATCH", f"/api/projects/{project_id}/", json=settings)

    def import_tasks(self, project_id: int, tasks: list[dict]) -> dict:
        return self.call("POST", f"/api/projects/{project_id}/import", json=tasks)

    def tasks(self, project_id: int, page_size: int = 100) -> Iterator[dict]:
        """Every task of a project with its annotations, page by page."""
        page = 1
        while True:
            out = self.call("GET", "/api/tasks/", params={"project": project_id, "page": page, "page_size": page_size,
                                                          "fields": "all"})
            rows = out["tasks"] if isinstance(out, dict) else out
            yield from rows
            if len(rows) < page_size or (isinstance(out, dict) and page * page_size >= out.get("total", 0)):
                return
            page += 1

    def users(self) -> dict[int, str]:
        """user id -> email, for everyone in the organization."""
        out = self.call("GET", "/api/users/", params={"page_size": 1000})
        rows = out["results"] if isinstance(out, dict) else out
        return {u["id"]: u["email"] for u in rows}

    def annotate(self, task_id: int, result: list[dict], **extra) -> dict:
        """Submit an annotation as this client's user, as the labeling page does."""
        return self.call("POST", f"/api/tasks/{task_id}/annotations/", json={"result": result, **extra})

    def whoami(self) -> dict:
        return self.call("GET", "/api/current-user/whoami")
