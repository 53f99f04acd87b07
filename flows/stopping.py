"""Stopping a run cleanly on SIGTERM or SIGINT (what systemd, a supervisor or Ctrl-C sends).

Without this, SIGTERM ends the flow's process at once: its stage processes and
the temporary Prefect server it started (uvicorn) go on running, orphaned,
holding their ports and memory. With it, the signal stops the stage
processes, ends the flow (Prefect records it as it ends), and on the way out
every process the run started is stopped; the artifacts lock (an flock) goes
with the process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger("instructflow")


def descendants(pid: int) -> list[int]:
    """Every process started by `pid`, directly or not (Linux /proc), children first."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def terminate(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL what is left after `grace` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and _alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextlib.contextmanager
def stopped_cleanly():
    """Around a run: a SIGTERM or SIGINT stops the stage processes and ends the run with exit status 128 + the
    signal; when it ends, however it ends, every process it started is stopped."""
    def stop(signum, frame):
        log.warning("%s: stopping the run's stages and its server", signal.Signals(signum).name)
        terminate([p for p in descendants(os.getpid()) if "instructflow.cli" in _cmdline(p)])
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        left = descendants(os.getpid())
        if left:
            terminate(left, grace=5.0)
