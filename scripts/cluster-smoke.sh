#!/usr/bin/env bash
# cluster-smoke: lorasweep on a real multi-node Ray cluster with an MLflow server and PostgreSQL,
# all on loopback on this machine. Run from the repository root after `make install`:
#
#     scripts/cluster-smoke.sh          # a few minutes on 2 cores; exit 0 and, last line,
#     cluster-smoke: ok nodes=2 trials=N on_worker=M spent=$X cap=$Y   (or: cluster-smoke: FAIL why)
#
# What it starts (each stopped by its PID when the script ends, also on failure or Ctrl-C):
#   - PostgreSQL: the machine's (scripts/ensure-postgres.sh); databases lorasweep_smoke_mlflow,
#     lorasweep_smoke_optuna, lorasweep_smoke_service created if missing (LORASWEEP_SMOKE_PG
#     names the server, default postgresql://postgres@127.0.0.1:5432);
#   - `mlflow server` on PostgreSQL with proxied artifacts (--artifacts-destination);
#   - `ray start --head` (1 CPU, dashboard) and a worker node `ray start --address` with its own
#     resources (1 CPU, a custom `worker_node`), token auth on (RAY_AUTH_MODE=token, one random
#     RAY_AUTH_TOKEN for every node and client; nothing written to ~/.ray);
#   - `lorasweep serve --ray-address http://HEAD:DASHBOARD` (each sweep a Ray Job).
# Then: a token (`lorasweep tokens create`), a small tiny-model sweep submitted through the API,
# waited for, promoted; checks (scripts/cluster_smoke.py): trials ran on the worker node (the
# Ray node id on each MLflow child run), the MLflow server holds the runs, metrics and adapters,
# models:/NAME@champion resolves and `lorasweep generate` answers through the server, and the
# ledger, the API and MLflow agree on the spend. LORASWEEP_SMOKE_KEEP=1 keeps the work folder.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
BIN=$ROOT/.venv/bin
PY=$BIN/python
PG=${LORASWEEP_SMOKE_PG:-postgresql://postgres@127.0.0.1:5432}
DB_MLFLOW=lorasweep_smoke_mlflow
DB_OPTUNA=lorasweep_smoke_optuna
DB_SERVICE=lorasweep_smoke_service
SWEEP_TIMEOUT_S=${LORASWEEP_SMOKE_TIMEOUT_S:-600}
CAP_USD=3
PRICE_USD_PER_CORE_HOUR=36 # 1 cent a second: a tiny sweep spends real money

RESULT=""  # set on success; otherwise the exit trap prints the reason
REASON="interrupted"
PIDS=()    # processes to stop (mlflow: its process group)
WORK=$(mktemp -d /tmp/lscs-XXXXXX) || exit 1 # short: Ray's socket paths must fit 107 bytes
RAY_TMP=$WORK/ray
T0=$(date +%s)

say() { echo "[cluster-smoke $(date +%H:%M:%S)] $*"; }
fail() {
  REASON="$*"
  exit 1
}

descendants() { # PIDs under the given PIDs (children first found by a walk of ps)
  ps -e -o pid=,ppid= | awk -v roots=" $* " '
    { parent[$1] = $2 }
    END {
      n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1
      do { added = 0; for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; added = 1 } } while (added)
      for (p in keep) print p
    }'
}

ray_pids() { # this run's Ray processes: their command lines name its temp dir
  local d
  for d in /proc/[0-9]*; do
    if tr '\0' ' ' <"$d/cmdline" 2>/dev/null | grep -qF -- "$RAY_TMP"; then echo "${d#/proc/}"; fi
  done
}

stop_all() {
  local pid targets alive _
  for pid in "${PIDS[@]}"; do # serve, mlflow (a group leader: its workers go with it)
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
  done
  # shellcheck disable=SC2046
  targets=$(descendants $(ray_pids) "${PIDS[@]}")
  for pid in $targets; do kill -TERM "$pid" 2>/dev/null; done
  for _ in $(seq 1 20); do
    alive=""
    for pid in $targets; do kill -0 "$pid" 2>/dev/null && alive="$alive $pid"; done
    [ -z "$alive" ] && break
    sleep 0.5
  done
  for pid in $alive; do kill -KILL "$pid" 2>/dev/null; done
  # what the TERM pass did not reach (a Ray worker started meanwhile)
  for pid in $(ray_pids); do kill -KILL "$pid" 2>/dev/null; done
}

finish() {
  local code=$?
  trap - EXIT INT TERM
  say "stopping what it started (by PID)"
  stop_all >/dev/null 2>&1
  if [ -n "$RESULT" ] && [ "$code" -eq 0 ]; then
    [ "${LORASWEEP_SMOKE_KEEP:-}" = 1 ] || rm -rf "$WORK"
    say "wall time $(($(date +%s) - T0)) s"
    echo "cluster-smoke: ok $RESULT"
    exit 0
  fi
  for f in serve.log mlflow.log; do
    [ -f "$WORK/$f" ] && { echo "--- last lines of $f" >&2; tail -n 15 "$WORK/$f" >&2; }
  done
  [ -n "${SWEEP_LOG:-}" ] && [ -f "$SWEEP_LOG" ] && { echo "--- last lines of the sweep's log" >&2; tail -n 25 "$SWEEP_LOG" >&2; }
  say "work folder kept: $WORK; wall time $(($(date +%s) - T0)) s"
  echo "cluster-smoke: FAIL ${REASON}"
  exit 1
}
trap finish EXIT
trap 'REASON="interrupted by a signal"; exit 1' INT TERM

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_http() { # URL SECONDS: until it answers (any HTTP status), or fail
  local url=$1 deadline=$(($(date +%s) + $2))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    curl -s -o /dev/null -m 2 "$url" && return 0
    sleep 0.5
  done
  return 1
}

[ -x "$PY" ] || fail "no $PY: run make install first"
command -v curl >/dev/null || fail "curl not found"

# --- PostgreSQL -------------------------------------------------------------------------------
say "PostgreSQL at ${PG#*@}"
CI=true scripts/ensure-postgres.sh >"$WORK/postgres.log" 2>&1 || fail "PostgreSQL not reachable: $(tail -n 1 "$WORK/postgres.log")"
"$PY" scripts/cluster_smoke.py createdb "$PG" "$DB_MLFLOW" "$DB_OPTUNA" "$DB_SERVICE" >"$WORK/createdb.log" 2>&1 ||
  fail "creating the databases: $(tail -n 1 "$WORK/createdb.log")"
PG_PSYCOPG=postgresql+psycopg://${PG#*://}
SERVICE_DB=$PG_PSYCOPG/$DB_SERVICE

# --- Ray: a head and a worker node, token auth ------------------------------------------------
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$("$PY" -c 'import secrets; print(secrets.token_hex(32))')
export RAY_AUTH_TOKEN
unset RAY_ADDRESS
export PATH="$BIN:$PATH" # the Ray Job's entrypoint runs `lorasweep`
export TOKENIZERS_PARALLELISM=false
RAY_PORT=$(free_port)
DASH_PORT=$(free_port)
DASHBOARD=http://127.0.0.1:$DASH_PORT
COMMON=(--node-ip-address 127.0.0.1 --num-gpus 0 --num-cpus 1 --object-store-memory 268435456 --disable-usage-stats)
node_ports() { # each node's agents on ports of their own: the defaults (52365, ...) are one per
  # machine, and another Ray on this machine (a test's local cluster) may hold them
  echo --dashboard-agent-listen-port "$(free_port)" --dashboard-agent-grpc-port "$(free_port)" \
    --runtime-env-agent-port "$(free_port)" --metrics-export-port "$(free_port)"
}
say "Ray head 127.0.0.1:$RAY_PORT (dashboard $DASHBOARD) + a worker node, token auth"
# shellcheck disable=SC2046
"$BIN/ray" start --head --port "$RAY_PORT" --temp-dir "$RAY_TMP" --include-dashboard true \
  --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" "${COMMON[@]}" $(node_ports) >"$WORK/ray-head.log" 2>&1 ||
  fail "ray start --head: $(tail -n 3 "$WORK/ray-head.log" | tr '\n' ' ')"
# shellcheck disable=SC2046
"$BIN/ray" start --address "127.0.0.1:$RAY_PORT" --resources '{"worker_node": 1}' "${COMMON[@]}" $(node_ports) \
  >"$WORK/ray-worker.log" 2>&1 || fail "ray start --address (worker node): $(tail -n 3 "$WORK/ray-worker.log" | tr '\n' ' ')"
wait_http "$DASHBOARD/api/version" 120 || fail "the Ray dashboard did not answer in 120 s"
code=$(curl -s -o /dev/null -w '%{http_code}' "$DASHBOARD/api/jobs/")
[ "$code" = 401 ] || fail "the Ray dashboard answered $code without a token (token auth is not on)"

# --- MLflow server on PostgreSQL, proxied artifacts --------------------------------------------
MLFLOW_PORT=$(free_port)
MLFLOW=http://127.0.0.1:$MLFLOW_PORT
say "mlflow server $MLFLOW (backend PostgreSQL $DB_MLFLOW, proxied artifacts)"
setsid "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
  --backend-store-uri "$PG_PSYCOPG/$DB_MLFLOW" --artifacts-destination "$WORK/mlartifacts" \
  --serve-artifacts >"$WORK/mlflow.log" 2>&1 </dev/null &
PIDS+=($!)
disown "$!" # stopped by PID in finish; no job notice from bash

# --- inputs: the tiny model and data (while MLflow migrates its schema) -----------------------
say "building the tiny model and data"
"$PY" scripts/cluster_smoke.py inputs "$WORK" >"$WORK/inputs.json" 2>"$WORK/inputs.log" ||
  fail "building the inputs: $(tail -n 1 "$WORK/inputs.log")"
wait_http "$MLFLOW/health" 180 || fail "mlflow server did not answer /health in 180 s"

# --- lorasweep serve against the cluster -------------------------------------------------------
mkdir -p "$WORK/service"
"$BIN/lorasweep" tokens create --tenant smoke --quota-usd 1000 --db "$SERVICE_DB" >"$WORK/token.out" 2>"$WORK/token.log" ||
  fail "lorasweep tokens create: $(tail -n 1 "$WORK/token.log")"
LORASWEEP_TOKEN=$(tail -n 1 "$WORK/token.out")
rm -f "$WORK/token.out"
export LORASWEEP_TOKEN # for cluster_smoke.py check; never on a command line
(umask 077 && printf 'Authorization: Bearer %s\n' "$LORASWEEP_TOKEN" >"$WORK/auth-header")
API_PORT=$(free_port)
API=http://127.0.0.1:$API_PORT
say "lorasweep serve $API --ray-address $DASHBOARD"
(cd "$WORK/service" && exec env -u LORASWEEP_TOKEN LORASWEEP_RUNNER_POLL_S=1 "$BIN/lorasweep" serve \
  --host 127.0.0.1 --port "$API_PORT" --db "$SERVICE_DB" --ray-address "$DASHBOARD" \
  --max-running-sweeps 1 >"$WORK/serve.log" 2>&1 </dev/null) &
PIDS+=($!)
disown "$!"
wait_http "$API/healthz" 120 || fail "lorasweep serve did not answer /healthz in 120 s"

# --- a small sweep through the API -------------------------------------------------------------
NAME=cs$(date +%s)
"$PY" - "$WORK" "$NAME" "$MLFLOW" "$PG_PSYCOPG/$DB_OPTUNA" "$CAP_USD" "$PRICE_USD_PER_CORE_HOUR" >"$WORK/spec.json" <<'EOF' || fail "writing the spec"
import json, sys
work, name, mlflow, optuna, cap, price = sys.argv[1:]
inputs = json.load(open(f"{work}/inputs.json"))
print(json.dumps({"spec": {
    "name": name,
    "budget_usd": float(cap),
    "model": {"name_or_path": inputs["model"]},
    "data": {"source": "files", **inputs["data"]},
    "search_space": {"rank": {"choices": [2, 4]},
                     "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}},
    "trial": {"max_steps": 8, "eval_every": 4, "batch_size": 4, "max_seq_len": 160,
              "eval_examples": 4, "max_new_tokens": 8},
    "resources": {"accelerator": "cpu", "cpus_per_trial": 1, "max_concurrent_trials": 2},
    "max_trials": 4,
    "prices": {"overrides": {"cpu": float(price)}},
    "storage": {"mlflow_tracking_uri": mlflow, "optuna_storage": optuna,
                "ray_storage": f"{work}/shared/ray"},
}}))
EOF
say "submitting sweep $NAME (cap \$$CAP_USD, up to 4 trials, 2 at a time)"
code=$(curl -s -o "$WORK/submit.json" -w '%{http_code}' -H @"$WORK/auth-header" \
  -H 'Content-Type: application/json' --data-binary @"$WORK/spec.json" "$API/v1/sweeps")
[ "$code" = 201 ] || fail "POST /v1/sweeps answered $code: $(head -c 300 "$WORK/submit.json")"
SWEEP=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$WORK/submit.json")
SWEEP_LOG=$WORK/service/lorasweep-data/service/logs/$SWEEP.log
say "sweep $SWEEP queued; waiting (at most ${SWEEP_TIMEOUT_S} s)"
deadline=$(($(date +%s) + SWEEP_TIMEOUT_S))
state=queued
while :; do
  curl -s -o "$WORK/status.json" -H @"$WORK/auth-header" "$API/v1/sweeps/$SWEEP"
  state=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("state"))' "$WORK/status.json" 2>/dev/null)
  case $state in completed | failed | cancelled | interrupted) break ;; esac
  [ "$(date +%s)" -lt "$deadline" ] || fail "sweep $SWEEP still $state after ${SWEEP_TIMEOUT_S} s"
  kill -0 "${PIDS[1]}" 2>/dev/null || fail "lorasweep serve exited"
  sleep 3
done
[ "$state" = completed ] || fail "sweep $SWEEP ended $state: $("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("end_reason"))' "$WORK/status.json")"
say "sweep $SWEEP completed; promoting"
code=$(curl -s -o "$WORK/promote.json" -w '%{http_code}' -X POST -H @"$WORK/auth-header" "$API/v1/sweeps/$SWEEP/promote")
[ "$code" = 200 ] || fail "POST /v1/sweeps/$SWEEP/promote answered $code: $(head -c 300 "$WORK/promote.json")"
MODEL=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["model"])' "$WORK/promote.json")

# --- checks ------------------------------------------------------------------------------------
say "checking the cluster, MLflow, the registry and the ledger"
summary=$("$PY" scripts/cluster_smoke.py check --sweep "$SWEEP" --api "$API" --dashboard "$DASHBOARD" \
  --mlflow "$MLFLOW" --service-db "$SERVICE_DB" --promoted "$(cat "$WORK/promote.json")" 2>"$WORK/check.log") ||
  fail "${summary:-$(tail -n 1 "$WORK/check.log")}"
say "lorasweep generate --model models:/$MODEL@champion through $MLFLOW"
served_before=$(grep -c 'GET /api/2.0/mlflow-artifacts/artifacts/' "$WORK/mlflow.log")
answer=$("$BIN/lorasweep" generate "List: 3 bed flat, 70 m2, EUR 1200 a month" --model "models:/$MODEL@champion" \
  --tracking-uri "$MLFLOW" --max-new-tokens 8 2>"$WORK/generate.log") ||
  fail "lorasweep generate: $(tail -n 1 "$WORK/generate.log")"
# the adapter came from the server: its artifact downloads show in the server's access log (the
# tiny random-init model may well answer with nothing but whitespace; that is an answer)
served_after=$(grep -c 'GET /api/2.0/mlflow-artifacts/artifacts/' "$WORK/mlflow.log")
[ "$served_after" -gt "$served_before" ] || fail "lorasweep generate downloaded no artifact from the MLflow server"
say "generate answered (${#answer} characters; $((served_after - served_before)) artifact downloads from the server)"
RESULT=$summary
exit 0
