"""Which failures are worth a retry.

Transient: object storage or network trouble (connection refused or reset,
timeouts, throttling, a DVC transfer that failed). Not transient: bad data,
a bad config, a missing file, a bug; retrying those only delays the report.
"""

from __future__ import annotations

import errno

from instructflow.config import ConfigError
from instructflow.io import DataError

_TRANSIENT_ERRNO = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
                    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPIPE}


def is_transient(exc: BaseException | None) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:  # walk the cause chain: DVC wraps botocore wraps socket
        seen.add(id(exc))
        if isinstance(exc, (ConfigError, DataError, FileNotFoundError)):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO:
            return True
        mod = type(exc).__module__
        name = type(exc).__name__
        if mod.startswith(("botocore", "aiobotocore", "urllib3", "aiohttp", "httpx")) and any(
                w in name for w in ("Connect", "Connection", "Timeout", "Throttl", "Endpoint", "ClientOSError",
                                    "ServerDisconnected", "ReadError", "ResponseStreaming")):
            return True
        if mod.startswith("botocore") and name == "ClientError":
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code in {"SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError", "503", "500"}:
                return True
        if mod.startswith("dvc") and name in {"UploadError", "DownloadError"}:
            return True  # DVC's summary of failed transfers; the cause was logged per file
        exc = exc.__cause__ or exc.__context__
    return False


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry only transient faults."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we classify, not handle
        return is_transient(exc)
    return False
