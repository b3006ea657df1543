#!/usr/bin/env bash
# Start one site's SuperNode: it serves one data source and only talks to the SuperLink.
#
#   deploy/supernode.sh --superlink HOST:PORT --source NAME --data-root PATH --key certs/nodes/NAME \
#                       [--ca certs/ca.crt] [--port 9094] [--state DIR] [--warm-worker]
#                       [extra flower-supernode flags]
#
#   --superlink HOST:PORT  the SuperLink's address (its certificate must name HOST)
#   --source NAME          the source this site serves (a training source, or a held-out one:
#                          a held-out site only evaluates)
#   --data-root PATH       where this site's data lives (the synthetic benchmark caches there)
#   --key FILE             this site's private key (deploy/make_certs.py --node NAME); the
#                          operator registers FILE.pub with `flwr supernode register`
#   --ca FILE              the federation CA certificate (default: certs/ca.crt)
#   --port PORT            local port of the SuperNode's own Runtime API (default: 9094)
#   --state DIR            the SuperNode's own files (default: DATA_ROOT/.supernode)
#   --warm-worker          also run this site's warm worker (python -m client.worker), which keeps
#                          torch, the data and the model between messages; its socket is
#                          STATE/worker/worker.sock, and it stops with the SuperNode (docs/deploy.md)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
VENV="${VENV:-$ROOT/.venv}"
SUPERLINK="" SOURCE="" DATA_ROOT="" KEY="" CA=certs/ca.crt PORT=9094 STATE="" WARM=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --superlink) SUPERLINK="$2"; shift 2 ;;
    --source) SOURCE="$2"; shift 2 ;;
    --data-root) DATA_ROOT="$2"; shift 2 ;;
    --key) KEY="$2"; shift 2 ;;
    --ca) CA="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --state) STATE="$2"; shift 2 ;;
    --warm-worker) WARM=1; shift ;;
    -h|--help) sed -n '2,19p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
for v in SUPERLINK SOURCE DATA_ROOT KEY; do
  [[ -n "${!v}" ]] || { echo "missing --$(echo "$v" | tr 'A-Z_' 'a-z-'); see --help" >&2; exit 2; }
done
[[ -f "$KEY" ]] || { echo "no private key at $KEY: python deploy/make_certs.py --node <name>" >&2; exit 2; }
[[ -f "$CA" ]] || { echo "no CA certificate at $CA: copy ca.crt from the SuperLink operator" >&2; exit 2; }
[[ "$SOURCE$DATA_ROOT" != *'"'* ]] || { echo "--source and --data-root may not contain double quotes" >&2; exit 2; }
[[ -d "$VENV/bin" ]] && export PATH="$VENV/bin:$PATH"
command -v hdf-supernode >/dev/null || { echo "hdf-supernode not found: install the project (make install) or set VENV" >&2; exit 2; }
mkdir -p "$DATA_ROOT"
STATE="${STATE:-$DATA_ROOT/.supernode}"
mkdir -p "$STATE"
KEY="$(realpath "$KEY")" CA="$(realpath "$CA")" DATA_ROOT="$(realpath "$DATA_ROOT")" STATE="$(realpath "$STATE")"
export FLWR_HOME="${FLWR_HOME:-$STATE/flwr-home}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
export FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}" WANDB_MODE="${WANDB_MODE:-disabled}"
# The SuperExec beside this process polls for a ClientApp task to start every
# FLWR_SUPEREXEC_TASK_POLL_INTERVAL seconds (Flower 1.42 default 1.0, read in
# flwr/supercore/superexec/run_superexec.py); a message waits up to that long before its
# process starts, so poll 10x a second (a local request each, negligible CPU).
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.1}"
# The ClientApp sends each array in chunks of this many bytes, one request each (Flower 1.42
# default 5 MiB, flwr/common/constant.py): 64 MiB, see deploy/flower_env.py.
export FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE="${FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE:-67108864}"
# node-config values are TOML: strings must be quoted.
NODE_CONFIG="source=\"$SOURCE\" data-root=\"$DATA_ROOT\""
# hdf-supernode is Flower's flower-supernode, its idle poll HDF_SUPERNODE_POLL_S (0.2 s) for
# HDF_SUPERNODE_POLL_WINDOW_S (60 s) after each message instead of a fixed 3 s (deploy/supernode.py)
SUPERNODE=(hdf-supernode --superlink "$SUPERLINK" --root-certificates "$CA"
  --auth-supernode-private-key "$KEY" --port "$PORT")
[[ "$WARM" == 1 ]] || exec "${SUPERNODE[@]}" --node-config "$NODE_CONFIG" "${EXTRA[@]}"

# A warm worker: the ClientApp of each message forwards it over the socket (node config
# worker-socket) and runs it itself while the worker is not (yet) reachable.
[[ "$STATE" != *'"'* ]] || { echo "--state may not contain double quotes" >&2; exit 2; }
SOCKET="$STATE/worker/worker.sock"
mkdir -p -m 700 "$STATE/worker"
python -m client.worker --socket "$SOCKET" --stop-with $$ &
WORKER=$!
trap 'kill "$WORKER" 2>/dev/null || true' EXIT
"${SUPERNODE[@]}" --node-config "$NODE_CONFIG worker-socket=\"$SOCKET\"" "${EXTRA[@]}" &
NODE=$!
trap 'kill "$NODE" 2>/dev/null || true' TERM INT
# a trapped signal ends `wait` early: wait again until the SuperNode has stopped
set +e
wait "$NODE"; RC=$?
while kill -0 "$NODE" 2>/dev/null; do wait "$NODE"; RC=$?; done
exit "$RC"
