"""Stopping a run cleanly on SIGTERM or SIGINT (what systemd, a supervisor, Ctrl-C or
Prefect's runner cancelling a deployment's run sends).

Without this, SIGTERM ends the flow's process at once: its stage processes and
the temporary Prefect server it started (uvicorn) go on running, orphaned,
holding their ports and memory. And while a flow runs, Prefect's engine has
its own SIGTERM handler in place: it ends the flow, but the flow's task
threads wait for their stage processes, so the run would go on until they
finish. Two pieces, then:

- `stages_stop_first`, on each flow function: a signal first stops the stage
  processes, then goes on to the handler in place before (Prefect's), which
  ends the flow run and records it as crashed or cancelled;
- `stopped_cleanly`, around the whole run in `main`: the run ends with exit
  status 128 + the signal, and last of all anything the run started that is
  still there (Prefect's temporary server) is stopped. The artifacts lock (an
  flock) goes with the process.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import signal
import threading
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


_signalled: list[int] = []  # the signals this process got, first first


def _stop_stages(signum: int) -> None:
    """Stop the stage processes this run started (and what they started), once per signal."""
    if signum not in _signalled:
        _signalled.append(signum)
        log.warning("%s: stopping the run's stages and its server", signal.Signals(signum).name)
    terminate([p for p in descendants(os.getpid()) if "instructflow.cli" in _cmdline(p)], grace=5.0)


def stages_stop_first(flow_fn):
    """Decorate a flow function (under @flow): while it runs, SIGTERM or SIGINT first stops the stage
    processes, then goes to the handler that was in place (Prefect's engine's, ours, or Python's)."""

    @functools.wraps(flow_fn)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
            return flow_fn(*args, **kwargs)

        def first(signum, frame):
            _stop_stages(signum)
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            else:  # SIG_DFL or SIG_IGN: as if this handler were not there
                signal.signal(signum, handler)
                os.kill(os.getpid(), signum)

        previous = {s: signal.signal(s, first) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return flow_fn(*args, **kwargs)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    return wrapper


@contextlib.contextmanager
def stopped_cleanly():
    """Around a run: a SIGTERM or SIGINT stops the stage processes and ends the run with exit status 128 + the
    signal; Prefect then records the run and stops its temporary server as the interpreter exits, and last of
    all anything the run started that is still there is stopped. (A run that ends by itself leaves its
    temporary server to Prefect alone.)"""
    atexit.register(_stop_leftovers)  # registered before Prefect's own exit handlers: runs after them

    def stop(signum, frame):
        _stop_stages(signum)
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stop_leftovers() -> None:
    if _signalled:
        terminate(descendants(os.getpid()), grace=5.0)
