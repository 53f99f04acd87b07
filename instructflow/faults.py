"""Which failures are worth a retry, and retrying them.

Transient: object storage or network trouble (connection refused or reset,
timeouts, throttling, a DVC transfer that failed). Not transient: bad data,
a bad config, a missing file, a bug; retrying those only delays the report.
Prefect's task retries (tasks/faults.py) and `retrying` below share this test.
"""

from __future__ import annotations

import errno

from .config import ConfigError
from .io import DataError

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


def retrying(fn, what: str, attempts: int = 6, base_delay_s: float = 1.0, max_delay_s: float = 20.0):
    """fn(), again after a transient fault, with exponential backoff and jitter, up to
    `attempts` times in all; any other fault, or the last one, is raised."""
    import logging
    import random
    import time

    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:
            if attempt == attempts or not is_transient(err):
                raise
            delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            logging.getLogger(__name__).warning("%s: %s; retry %d/%d in %.1f s", what, type(err).__name__,
                                                attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
