#!/usr/bin/env bash
# Start the SuperLink (the federation's coordinator) with TLS and SuperNode authentication on.
#
#   deploy/superlink.sh [--certs DIR] [--host ADDR] [--port PORT] [--state DIR] [extra flower-superlink flags]
#
#   --certs DIR   folder made by deploy/make_certs.py: ca.crt, server.pem, server.key (default: certs)
#   --host ADDR   address to listen on (default: 0.0.0.0, every interface)
#   --port PORT   the one HTTPS port for the Fleet, Control and Runtime APIs (default: 8000)
#   --state DIR   keeps state.db (registered nodes, runs) across restarts (default: superlink-state)
#
# Only SuperNodes whose public key was registered with `flwr supernode register` may join.
# The ServerApp runs in a subprocess of the SuperLink from the venv of this checkout (or $VENV).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
VENV="${VENV:-$ROOT/.venv}"
CERTS=certs HOST=0.0.0.0 PORT=8000 STATE=superlink-state
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --certs) CERTS="$2"; shift 2 ;;
    --host) HOST="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --state) STATE="$2"; shift 2 ;;
    -h|--help) sed -n '2,11p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
for f in ca.crt server.pem server.key; do
  [[ -f "$CERTS/$f" ]] || { echo "missing $CERTS/$f: run python deploy/make_certs.py --out $CERTS --san <this host's name or IP>" >&2; exit 2; }
done
[[ -d "$VENV/bin" ]] && export PATH="$VENV/bin:$PATH"
command -v flower-superlink >/dev/null || { echo "flower-superlink not found: install the project (make install) or set VENV" >&2; exit 2; }
mkdir -p "$STATE"
CERTS="$(realpath "$CERTS")" STATE="$(realpath "$STATE")"
export FLWR_HOME="${FLWR_HOME:-$STATE/flwr-home}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
export FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}" WANDB_MODE="${WANDB_MODE:-offline}"
# The SuperExec beside this process asks the SuperLink for a ServerApp task to start every
# FLWR_SUPEREXEC_TASK_POLL_INTERVAL seconds (read in flwr/supercore/superexec/run_superexec.py).
# A ServerApp lives for its whole run, so Flower's 1 s delays a run's start by at most 0.9 s
# once; 0.1 s made these polls nearly all of the SuperLink's requests (deploy/flower_env.py).
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPERLINK_TASK_POLL_INTERVAL:-1.0}"
# The ServerApp sends each array in chunks of this many bytes, one request each (Flower 1.42
# default 5 MiB, flwr/common/constant.py): 64 MiB, see deploy/flower_env.py.
export FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE="${FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE:-67108864}"
cd "$ROOT"  # run folders (runs/...) are written relative to the checkout
exec flower-superlink \
  --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem" --ssl-keyfile "$CERTS/server.key" \
  --enable-supernode-auth \
  --host "$HOST" --port "$PORT" \
  --database "$STATE/state.db" \
  --disable-runtime-dependency-installation \
  "${EXTRA[@]}"
