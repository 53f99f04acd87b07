"""Prefect tasks: thin wrappers that add cache keys, retries, timeouts and
logging around instructflow's stage functions (the core library knows
nothing of Prefect)."""
