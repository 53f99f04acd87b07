"""Files between stages: JSONL with validation, atomic writes, content hashes,
and the small `result.json` record each stage leaves behind."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class DataError(ValueError):
    """Bad input data; the message names the file, line and field."""


class LineError(ValueError):
    """One line of a JSONL file that cannot be read as a record; the message is the reason."""


BOM = b"\xef\xbb\xbf"  # what many editors and spreadsheet exports put before the first line


def _refuse_constant(name: str):
    raise LineError(f"{name} is not a number (JSON has no NaN or infinities)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise LineError(f"field '{dup}' appears twice")
    return obj


def _lone_surrogate(value: Any, where: str = "") -> str | None:
    """The first string (or key) in `value` holding a lone UTF-16 surrogate, by field path."""
    if isinstance(value, str):
        for ch in value:
            if "\ud800" <= ch <= "\udfff":
                return f"field '{where or '(record)'}' holds a lone surrogate \\u{ord(ch):04x}, which is not text"
    elif isinstance(value, dict):
        for k, v in value.items():
            found = _lone_surrogate(k, where) or _lone_surrogate(v, f"{where}.{k}" if where else k)
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _lone_surrogate(v, f"{where}[{i}]")
            if found:
                return found
    return None


def parse_json_text(text: str) -> Any:
    """json.loads for data nobody here wrote: NaN, infinities, duplicate keys, lone
    surrogates and runaway nesting are refused with a LineError naming what is wrong."""
    try:
        obj = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise LineError(f"not valid JSON: {err.msg} (column {err.colno})") from None
    except RecursionError:
        raise LineError("not valid JSON: nested too deeply") from None
    problem = _lone_surrogate(obj)
    if problem:
        raise LineError(problem)
    return obj


def parse_json_line(raw: bytes, lineno: int) -> Any:
    """One JSONL line as bytes -> its JSON value, or LineError with the reason.
    A UTF-8 byte-order mark before the first line is accepted."""
    if lineno == 1 and raw.startswith(BOM):
        raw = raw[len(BOM):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LineError(f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
    return parse_json_text(text)


def field_error(err: ValidationError) -> str:
    """pydantic's first error as "field 'x': what is wrong"."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(record)"
    return f"field '{field}': {first['msg']}"


def iter_jsonl(path: str | Path, model: type[M]) -> Iterator[M]:
    """Yield validated records; raise DataError naming file, line and field."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip() or (lineno == 1 and not raw.removeprefix(BOM).strip()):
                continue
            try:
                record = model.model_validate(parse_json_line(raw, lineno))
            except LineError as err:
                raise DataError(f"{path}:{lineno}: {err}") from None
            except ValidationError as err:
                raise DataError(f"{path}:{lineno}: {field_error(err)}") from None
            yield record


CRASH_ENV = "INSTRUCTFLOW_CRASH_AT"
_crash_passes: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Fault injection for the kill tests. When $INSTRUCTFLOW_CRASH_AT is `name` (or
    `name#n`: its n-th pass in this process), SIGKILL this process's whole group (the
    flow and every stage process it started), as a power cut would. `name#n@rankR`
    SIGKILLs only the process of rank R of a distributed run, as a lost node would.
    Unset: a no-op."""
    want, _, rank = os.environ.get(CRASH_ENV, "").partition("@rank")
    if not want or want.partition("#")[0] != name or (rank and os.environ.get("RANK") != rank):
        return
    _crash_passes[name] = _crash_passes.get(name, 0) + 1
    if _crash_passes[name] >= int(want.partition("#")[2] or 1):
        import signal

        if rank:
            os.kill(os.getpid(), signal.SIGKILL)
        os.killpg(os.getpgrp(), signal.SIGKILL)


def restore_aside(dest: Path) -> None:
    """After a kill between swap_in's two renames the previous folder is at DEST.old:
    put it back (or drop it when DEST is there)."""
    old = dest.with_name(dest.name + ".old")
    if old.exists():
        if dest.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, dest)


def swap_in(tmp: Path, dest: Path) -> None:
    """Put the complete folder `tmp` at `dest`, with a complete copy on disk at every
    moment: the previous `dest` is renamed aside, `tmp` renamed in, the previous one
    deleted. A reader sees the old folder, no folder for an instant, or the new one;
    never a half-written one."""
    restore_aside(dest)
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        os.replace(dest, old)
    crash_point(f"swap_in:{dest.name}")
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


class DiskFull(OSError):
    """No space left while saving; what was saved before is intact."""


@contextmanager
def writing_folder(tmp: Path, kept: Path, main: bool = True):
    """Around writing the folder `tmp` that will replace `kept`: on any failure remove it
    (a partial folder is never taken for a whole one), and turn a full disk, however the
    writer reports it (safetensors and ONNX do not raise OSError), into DiskFull."""
    try:
        yield
    except BaseException as err:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err):
            raise DiskFull(errno.ENOSPC, f"no space left on the device of {tmp.parent} while saving {kept.name}; "
                           f"{kept} is as it was before") from err
        raise


class ArtifactsBusy(RuntimeError):
    """Another pipeline holds this artifacts folder."""


@contextmanager
def exclusive(folder: str | Path, what: str):
    """Hold `folder`'s lock for the block: one pipeline at a time per artifacts folder, so
    two never interleave their writes. A second one raises ArtifactsBusy naming the
    holder. The lock is an flock: the kernel releases it when its holder dies, even by SIGKILL."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fh = open(folder / ".lock", "a+")  # noqa: SIM115 - held open for the whole block
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise ArtifactsBusy(f"{folder} is in use by another pipeline ({holder}); let it finish or stop it, "
                            "or give this run its own project.artifacts_dir") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {platform.node()}, {what}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    fh.flush()
    try:
        yield
    finally:
        fh.truncate(0)
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def read_jsonl(path: str | Path, model: type[M]) -> list[M]:
    return list(iter_jsonl(path, model))


def read_jsonl_dicts(path: str | Path) -> list[dict]:
    """A JSONL file this package wrote itself (stage outputs), one dict per line."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; rename over it only on success.

    Readers never see a half-written file, and a failure leaves any existing
    file untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        crash_point("atomic_write")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_jsonl(path: str | Path, records: Iterable[BaseModel | dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            obj = rec.model_dump(exclude_none=True) if isinstance(rec, BaseModel) else rec
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_hash(path: str | Path) -> str:
    """sha256 of a file, or of a folder's (relative path, file hash) list."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel.startswith("checkpoint/"):  # resumable state is not content
            continue
        h.update(f"{rel}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _rss_mb() -> float:
    """This process's resident memory now (Linux: /proc/self/statm), else its peak so far."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return _max_rss_mb()


def _max_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """The peak resident memory (RSS) of this process while a stage runs.

    When the process reaches a new high during the stage, the kernel's own peak
    (ru_maxrss) is exact; when an earlier stage of the same process had gone
    higher (`instructflow run` runs them all in one), a thread sampling every
    `interval` seconds measures this stage's."""

    def __init__(self, interval: float = 0.05) -> None:
        self.before = _max_rss_mb()
        self.sampled = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sampled = max(self.sampled, _rss_mb())

    def peak_mb(self) -> float:
        now = _max_rss_mb()
        return round(now if now > self.before else max(self.sampled, _rss_mb()), 1)

    def stop(self) -> float:
        self._stop.set()
        return self.peak_mb()


class StageTimer:
    """Records wall time of named phases inside a stage, and its peak memory."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}
        self.memory = PeakMemory()

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = round(self.phases.get(name, 0.0) + time.perf_counter() - t0, 3)

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.start, 3)


def gpu_memory() -> dict:
    """The GPU this process used and its peak allocated memory; empty on CPU-only runs."""
    torch = sys.modules.get("torch")  # never import torch just to ask
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"gpu": torch.cuda.get_device_name(), "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
