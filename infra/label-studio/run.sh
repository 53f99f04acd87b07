#!/usr/bin/env bash
# Start Label Studio (SQLite) for instructflow: `make label-studio`.
#   LABEL_STUDIO_API_KEY   the admin's API token instructflow uses (labeling.api_key_env); set it, e.g.
#                          export LABEL_STUDIO_API_KEY=$(python3 -c 'import secrets; print(secrets.token_hex(20))')
#   LABEL_STUDIO_PASSWORD  the admin's password, for the web page (user: $LABEL_STUDIO_USERNAME)
# Both are read from the environment and handed to Label Studio the same way: never on a command
# line (which `ps` shows), never in params.yaml, logs or artifacts.
set -euo pipefail
cd "${LABEL_STUDIO_WORKDIR:-$(dirname "$0")/../..}"
: "${LABEL_STUDIO_API_KEY:?set LABEL_STUDIO_API_KEY (see infra/label-studio/run.sh)}"
: "${LABEL_STUDIO_PASSWORD:?set LABEL_STUDIO_PASSWORD (the admin password for the web page)}"
export LABEL_STUDIO_USERNAME="${LABEL_STUDIO_USERNAME:-admin@instructflow.local}"
export LABEL_STUDIO_USER_TOKEN="$LABEL_STUDIO_API_KEY"   # applied when the admin is created (the first start)
export LABEL_STUDIO_BASE_DATA_DIR="${LABEL_STUDIO_DATA:-$PWD/.label-studio}"
args=(start --no-browser --internal-host "${LABEL_STUDIO_BIND:-127.0.0.1}" --port "${LABEL_STUDIO_PORT:-8080}"
      --data-dir "$LABEL_STUDIO_BASE_DATA_DIR" --enable-legacy-api-token)
if [ -n "${LABEL_STUDIO_HOST:-}" ]; then args+=(--host "$LABEL_STUDIO_HOST"); fi   # its public address, behind a proxy
exec "${LABEL_STUDIO_VENV:-.venv-labelstudio}/bin/label-studio" "${args[@]}"
