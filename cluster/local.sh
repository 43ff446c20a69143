#!/usr/bin/env bash
# A real multi-node Ray cluster on ONE host: a head node and N worker nodes, each its own
# `ray start` (own raylet, object store, CPU share, temp dir and port block), all advertised
# on a loopback address and all with token authentication.
#
#   bash cluster/local.sh up N     start the head and N worker nodes; wait until N+1 are alive
#   bash cluster/local.sh down     stop exactly the processes of this cluster (nothing else)
#   bash cluster/local.sh status   `ray status` of this cluster
#   bash cluster/local.sh env      print the environment a driver needs to join
#
# A driver joins with:   eval "$(bash cluster/local.sh env)"; python -c 'import ray; ray.init(address="auto")'
#                  or:   backfill run --address auto --store out/tree.zarr
#
# Knobs (environment):
#   BACKFILL_RAY_PORT          GCS port of the head                     (default 6380)
#   BACKFILL_RAY_IP            loopback address every node advertises   (default 127.0.0.2, see below)
#   BACKFILL_RAY_ROOT          temp root of this cluster                (default /tmp/bf-ray-$PORT)
#   BACKFILL_RAY_HEAD_CPUS     CPUs the head advertises                 (default 0: it only coordinates)
#   BACKFILL_RAY_WORKER_CPUS   CPUs each worker node advertises         (default 1)
#   BACKFILL_RAY_WORKER_GPUS   GPUs each worker node advertises         (default 0)
#   BACKFILL_RAY_OBJECT_STORE  object store bytes per node              (default 200000000)
#   BACKFILL_RAY_DASHBOARD     1: dashboard + job API on 127.0.0.1:$PORT+1 (default 0: none)
#   BACKFILL_RAY_TIMEOUT       seconds to wait for the nodes            (default 60)
#   RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN   the cluster token (default ~/.ray/auth_token;
#                              generated with `ray get-auth-token --generate` when missing)
#
# Why 127.0.0.2 and not 127.0.0.1: `ray start` rewrites 127.0.0.1 / localhost to the host's
# outside address (ray._private.services.resolve_ip_for_localhost) unless
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with that variable set `ray start --address ...`
# refuses to start a worker node ("Multi-node Ray clusters are not supported"). Any other
# 127.x.y.z address is loopback on Linux and is used as given.
#
# Ray's own gRPC servers listen on all interfaces whatever the advertised address; token
# authentication (RAY_AUTH_MODE=token) is what keeps other hosts out.
#
# `down` does NOT run `ray stop`: that kills every Ray process on the host, including other
# users' `ray.init()` sessions. Every process this script starts carries
# BACKFILL_RAY_CLUSTER=<root> in its environment; only those are stopped (SIGTERM, then
# SIGKILL after a short grace period, as `ray stop --force` would).
set -euo pipefail

PORT="${BACKFILL_RAY_PORT:-6380}"
IP="${BACKFILL_RAY_IP:-127.0.0.2}"
ROOT="${BACKFILL_RAY_ROOT:-/tmp/bf-ray-${PORT}}"
HEAD_CPUS="${BACKFILL_RAY_HEAD_CPUS:-0}"
WORKER_CPUS="${BACKFILL_RAY_WORKER_CPUS:-1}"
WORKER_GPUS="${BACKFILL_RAY_WORKER_GPUS:-0}"
OBJECT_STORE="${BACKFILL_RAY_OBJECT_STORE:-200000000}"
DASHBOARD="${BACKFILL_RAY_DASHBOARD:-0}"
TIMEOUT="${BACKFILL_RAY_TIMEOUT:-60}"
GRACE="${BACKFILL_RAY_GRACE:-3}"
ADDR="${IP}:${PORT}"
MARK="BACKFILL_RAY_CLUSTER=${ROOT}"
ENV_FILE="${ROOT}/driver.env"

die() { echo "local.sh: error: $*" >&2; exit 1; }
usage() { echo "local.sh: error: usage: $*" >&2; exit 2; }  # a wrong command line
log() { echo "local.sh: $*" >&2; }

need_ray() {
  command -v ray >/dev/null 2>&1 \
    || die "the 'ray' CLI is not on PATH (activate the venv: . .venv/bin/activate)"
  PY="$(dirname "$(command -v ray)")/python"
  [[ -x "$PY" ]] || PY="$(command -v python3)"
}

check_knobs() {
  if ! [[ "$PORT" =~ ^[0-9]+$ ]] || ((PORT < 1024 || PORT > 64000)); then
    die "BACKFILL_RAY_PORT=$PORT must be a port number from 1024 to 64000"
  fi
  case "$IP" in
    127.0.0.1 | localhost | ::1)
      die "BACKFILL_RAY_IP=$IP: ray start rewrites it to the host's outside address; use another loopback address such as 127.0.0.2" ;;
    127.*) ;;
    *) log "warning: BACKFILL_RAY_IP=$IP is not a loopback address" ;;
  esac
}

# The environment of a driver that joins this cluster.
driver_env() {
  echo "export RAY_ADDRESS=${ADDR}"
  echo "export RAY_AUTH_MODE=token"
  if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then printf 'export RAY_AUTH_TOKEN_PATH=%q\n' "$RAY_AUTH_TOKEN_PATH"; fi
}

# Ray processes of the cluster: marked, token auth on, no usage stats. Without
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (=0 refuses worker nodes) and RAY_ADDRESS (a driver's).
RAY_ENV=(-u RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER -u RAY_ADDRESS RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0)
ray_node() { env "${RAY_ENV[@]}" "$MARK" "$@"; }
# Short-lived clients (not marked, so `down` never sees them).
ray_client() { env "${RAY_ENV[@]}" "$@"; }

ensure_token() {
  if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then return; fi
  if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    [[ -s "$RAY_AUTH_TOKEN_PATH" ]] || die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty"
    return
  fi
  if [[ ! -s "$HOME/.ray/auth_token" ]]; then
    log "no token at ~/.ray/auth_token; generating one (ray get-auth-token --generate)"
    ray get-auth-token --generate >/dev/null
  fi
}

# The processes of this cluster. Each `ray start` runs under `setsid`, so its daemons (and
# the workers they spawn) share a session of their own; a session counts as ours when one of
# its processes carries the marker in its environment (gcs_server and raylet keep theirs;
# Python workers overwrite theirs with setproctitle). Processes with the marker and their
# descendants are included too. The caller's own session is never included.
cluster_pids() {
  local p stat rest own_sid
  local -a f
  local -A sid_of ppid_of ours_sid=() ours=()
  own_sid="$(ps -o sid= -p $$ | tr -d ' ')"
  for p in /proc/[0-9]*; do
    p="${p#/proc/}"
    [[ "$p" == "$$" ]] && continue
    stat="$(cat "/proc/$p/stat" 2>/dev/null)" || continue
    rest="${stat##*) }"
    read -r -a f <<<"$rest"          # state ppid pgrp session ...
    [[ "${f[0]}" == Z ]] && continue  # zombies are already dead
    ppid_of[$p]="${f[1]}"
    sid_of[$p]="${f[3]}"
    if grep -qzxF "$MARK" "/proc/$p/environ" 2>/dev/null; then
      ours[$p]=1
      [[ "${f[3]}" != "$own_sid" ]] && ours_sid[${f[3]}]=1
    fi
  done
  local changed=1
  while ((changed)); do
    changed=0
    for p in "${!ppid_of[@]}"; do
      [[ -n "${ours[$p]:-}" ]] && continue
      if [[ -n "${ours_sid[${sid_of[$p]}]:-}" || -n "${ours[${ppid_of[$p]}]:-}" ]]; then
        ours[$p]=1
        changed=1
      fi
    done
  done
  for p in "${!ours[@]}"; do echo "$p"; done
}

# Node i (0 = head) gets the ports PORT+100+100*i ... +99, so several raylets share one host.
node_ports() {
  local i="$1" b
  b=$((PORT + 100 + 100 * i))
  echo "--node-manager-port=$b --object-manager-port=$((b + 1))" \
    "--dashboard-agent-grpc-port=$((b + 2)) --dashboard-agent-listen-port=$((b + 3))" \
    "--metrics-export-port=$((b + 4)) --runtime-env-agent-port=$((b + 5))" \
    "--min-worker-port=$((b + 10)) --max-worker-port=$((b + 99))"
}

# What `up` was asked for; an `up` with the same shape and settings is a no-op.
shape() {
  echo "workers=$1 ip=$IP head_cpus=$HEAD_CPUS worker_cpus=$WORKER_CPUS worker_gpus=$WORKER_GPUS" \
    "object_store=$OBJECT_STORE dashboard=$DASHBOARD"
}

port_busy() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# Number of ALIVE nodes registered at this cluster's GCS; -1 when it cannot be reached.
alive_nodes() {
  ray_client timeout 20 "$PY" - "$ADDR" 2>/dev/null <<'PYEOF' || echo -1
import sys
from ray._raylet import GcsClient
from ray.core.generated import gcs_pb2
nodes = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=5).values()
print(sum(1 for n in nodes if n.state == gcs_pb2.GcsNodeInfo.GcsNodeState.ALIVE))
PYEOF
}

wait_alive() {
  local want="$1" deadline=$((SECONDS + TIMEOUT)) n
  while :; do
    n="$(alive_nodes | tail -n1)"
    [[ "$n" == "$want" ]] && return 0
    if ((SECONDS >= deadline)); then
      log "only ${n} of ${want} nodes alive after ${TIMEOUT}s; logs: ${ROOT}/n*/session_latest/logs"
      return 1
    fi
    sleep 1
  done
}

start_or_fail() {  # name, log file, command...
  local name="$1" out="$2"
  shift 2
  if ! "$@" >"$out" 2>&1; then
    sed 's/\x1b\[[0-9;]*m//g' "$out" | tail -n 25 >&2
    log "$name failed (full output: $out); tearing the cluster down"
    cmd_down
    die "$name failed"
  fi
}

cmd_up() {
  local n="${1:-}"
  [[ "$n" =~ ^[0-9]+$ && $# -eq 1 ]] ||
    usage "local.sh up N   (N = number of worker nodes, an integer >= 0)"
  need_ray
  check_knobs
  ensure_token

  if [[ -n "$(cluster_pids)" ]]; then
    local have
    have="$(alive_nodes | tail -n1)"
    if [[ "$have" == "$((n + 1))" && -f "$ROOT/shape" && "$(cat "$ROOT/shape")" == "$(shape "$n")" ]]; then
      log "cluster at ${ADDR} is already up with $((n + 1)) nodes"
      driver_env >"$ENV_FILE"
      driver_env
      return 0
    fi
    log "cluster at ${ADDR} is running with another shape or settings (${have} nodes alive); restarting it"
    cmd_down
  fi
  if port_busy "$IP" "$PORT" || port_busy 127.0.0.1 "$PORT"; then
    die "port $PORT is taken by another program; pick another with BACKFILL_RAY_PORT"
  fi
  # every node's fixed ports too (another cluster's blocks may overlap this one's)
  local i p
  for ((i = 0; i <= n; i++)); do
    for ((p = PORT + 100 + 100 * i; p <= PORT + 105 + 100 * i; p++)); do
      if port_busy "$IP" "$p" || port_busy 127.0.0.1 "$p"; then
        die "port $p (node $i's block, ports $((PORT + 100 + 100 * i))..$((PORT + 199 + 100 * i))) is taken by another program; pick a BACKFILL_RAY_PORT at least $((100 * (n + 2))) away from any other cluster's"
      fi
    done
  done

  rm -rf "${ROOT:?}"/n[0-9]* "$ROOT/shape" "$ENV_FILE"
  mkdir -p "$ROOT"
  local dash=(--include-dashboard=false)
  if [[ "$DASHBOARD" == 1 ]]; then
    dash=(--include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port=$((PORT + 1)))
  fi

  log "starting the head at ${ADDR} (num-cpus ${HEAD_CPUS})"
  # shellcheck disable=SC2046  # node_ports is a list of flags
  start_or_fail "ray start --head" "$ROOT/n0.start.log" \
    ray_node setsid -w ray start --head --node-ip-address="$IP" --port="$PORT" \
    --num-cpus="$HEAD_CPUS" --num-gpus=0 --object-store-memory="$OBJECT_STORE" \
    --ray-client-server-port=$((PORT + 2)) "${dash[@]}" \
    --temp-dir="$ROOT/n0" --disable-usage-stats $(node_ports 0)

  for ((i = 1; i <= n; i++)); do
    log "starting worker node $i (num-cpus ${WORKER_CPUS}, num-gpus ${WORKER_GPUS})"
    # shellcheck disable=SC2046
    start_or_fail "ray start (worker node $i)" "$ROOT/n$i.start.log" \
      ray_node setsid -w ray start --address="$ADDR" --node-ip-address="$IP" \
      --num-cpus="$WORKER_CPUS" --num-gpus="$WORKER_GPUS" --object-store-memory="$OBJECT_STORE" \
      --temp-dir="$ROOT/n$i" --disable-usage-stats $(node_ports "$i")
  done

  if ! wait_alive $((n + 1)); then
    cmd_down
    die "the cluster did not come up"
  fi
  shape "$n" >"$ROOT/shape"
  driver_env >"$ENV_FILE"
  log "up: $((n + 1)) nodes alive at ${ADDR}. A driver needs (also in ${ENV_FILE}):"
  driver_env
}

cmd_down() {
  local pids
  pids="$(cluster_pids)"
  if [[ -z "$pids" ]]; then
    log "nothing to stop: no process of the cluster at ${ADDR} (root ${ROOT})"
  else
    log "stopping $(wc -w <<<"$pids") processes of the cluster at ${ADDR}"
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    local deadline=$((SECONDS + GRACE))
    while [[ -n "$(cluster_pids)" ]] && ((SECONDS < deadline)); do sleep 0.5; done
    pids="$(cluster_pids)"
    if [[ -n "$pids" ]]; then
      # shellcheck disable=SC2086
      kill -KILL $pids 2>/dev/null || true
      deadline=$((SECONDS + 5))
      while [[ -n "$(cluster_pids)" ]] && ((SECONDS < deadline)); do sleep 0.2; done
    fi
    pids="$(cluster_pids)"
    [[ -z "$pids" ]] || die "processes survived SIGKILL: $(tr '\n' ' ' <<<"$pids")"
  fi
  rm -f "$ROOT/shape" "$ENV_FILE"
}

cmd_status() {
  need_ray
  [[ -n "$(cluster_pids)" ]] || die "no cluster running at ${ADDR} (root ${ROOT}); start one: local.sh up N"
  ray_client ray status --address="$ADDR"
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) driver_env ;;
  *) usage "local.sh up N | down | status | env" ;;
esac
