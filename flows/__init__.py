"""Prefect flows. Settings that must be in place before Prefect is imported
are set here (a caller's own environment wins)."""

import os

# The temporary local server needs ~25 s on its first start (database migrations);
# Prefect's default 20 s timeout then fails.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Stage logs (the `instructflow` loggers) go to the Prefect run logs too.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "instructflow")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
