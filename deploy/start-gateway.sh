#!/usr/bin/env bash
# Start (or restart) the mlaserve gRPC gateway on the Ray head node.
#
#   bash ~/mlaserve/deploy/start-gateway.sh                 # detached; waits until it answers
#   bash ~/mlaserve/deploy/start-gateway.sh --no-wait       # detached, returns at once (ray up)
#   bash ~/mlaserve/deploy/start-gateway.sh --foreground    # in this terminal (systemd, debugging)
#   bash ~/mlaserve/deploy/start-gateway.sh --stop
#
# The gateway joins the running Ray cluster (`--address auto`), starts its pool of GPU workers and
# serves mlaserve.v1.Decoder on $MLASERVE_PORT. Detached, it runs under a small supervisor that
# restarts `mlaserve serve` when it exits with an error: on a fresh cluster the first GPU node can
# take longer to launch and set up than the pool waits for its first worker. Its output goes to
# ~/mlaserve-gateway.log. Waiting for it to answer (the default), the first failed start stops
# everything and prints the log instead.
#
# Settings come from the environment, then from ~/mlaserve.env (KEY=value lines), then the
# defaults below:
#   MLASERVE_MODEL        preset name or checkpoint directory visible on every GPU node (shared storage)
#   MLASERVE_PORT         gRPC port (50051)
#   MLASERVE_MIN_WORKERS  workers kept up when idle (1); MLASERVE_MAX_WORKERS: upper bound (32 = 4 nodes x 8 GPUs)
#   MLASERVE_GPUS_PER_WORKER  GPUs each worker holds (1): explicit, because the gateway starts
#                         before the autoscaler has launched any GPU node
#   MLASERVE_AUTH_TOKEN   bearer token the gateway requires (unset: none)
#   MLASERVE_TLS_DIR      (~/mlaserve-tls) certificates made by deploy/make-certs.sh, made there on
#                         the first start: the gateway serves mutual TLS with them (its server
#                         certificate; clients need a certificate from its CA, in DIR/client/).
#                         `off`: no TLS (then bind to loopback or require a token). Not used when
#                         MLASERVE_TLS_CERT/KEY name certificates of your own:
#   MLASERVE_TLS_CERT, MLASERVE_TLS_KEY   the gateway's certificate and key (--tls-cert/--tls-key)
#   MLASERVE_TLS_CLIENT_CA  accept only clients with a certificate this CA signed (--tls-client-ca)
#   MLASERVE_TLS_CA, MLASERVE_TLS_CLIENT_CERT, MLASERVE_TLS_CLIENT_KEY   how the readiness check
#                         (`mlaserve status` on localhost) connects: the CA of the gateway's
#                         certificate (unset: the system's roots), a client certificate for mTLS
#   MLASERVE_SERVE_ARGS   anything else for `mlaserve serve`
set -euo pipefail

ENV_FILE=${MLASERVE_ENV_FILE:-$HOME/mlaserve.env}
if [[ -f "$ENV_FILE" ]]; then
  while IFS='=' read -r key value; do
    [[ "$key" =~ ^MLASERVE_[A-Z_]+$ ]] || continue
    [[ -n "${!key:-}" ]] || export "$key=$value"
  done <"$ENV_FILE"
fi
MODEL=${MLASERVE_MODEL:-deepseek-v2-lite}
PORT=${MLASERVE_PORT:-50051}
MIN_WORKERS=${MLASERVE_MIN_WORKERS:-1}
MAX_WORKERS=${MLASERVE_MAX_WORKERS:-32}
GPUS_PER_WORKER=${MLASERVE_GPUS_PER_WORKER:-1}
PIDFILE=${MLASERVE_GATEWAY_PIDFILE:-$HOME/.mlaserve-gateway.pid}
LOG=${MLASERVE_GATEWAY_LOG:-$HOME/mlaserve-gateway.log}
RESTART_DELAY_S=${MLASERVE_GATEWAY_RESTART_DELAY_S:-10}
WAIT_S=${MLASERVE_GATEWAY_WAIT_S:-600}
EXITED="mlaserve gateway: serve exited with status"

TLS_DIR=${MLASERVE_TLS_DIR-$HOME/mlaserve-tls}
TLS_DIR=${TLS_DIR/#\~/$HOME}
if [[ -z "${MLASERVE_TLS_CERT:-}${MLASERVE_TLS_KEY:-}" && -n "$TLS_DIR" && "$TLS_DIR" != off ]]; then
  if [[ "${1:-}" != --stop && (! -f "$TLS_DIR/server.crt" || ! -f "$TLS_DIR/client/client.crt") ]]; then
    bash "$(dirname "${BASH_SOURCE[0]}")/make-certs.sh" "$TLS_DIR"
  fi
  export MLASERVE_TLS_CERT=$TLS_DIR/server.crt MLASERVE_TLS_KEY=$TLS_DIR/server.key
  export MLASERVE_TLS_CLIENT_CA=${MLASERVE_TLS_CLIENT_CA:-$TLS_DIR/ca.crt}
  export MLASERVE_TLS_CA=${MLASERVE_TLS_CA:-$TLS_DIR/client/ca.crt}
  export MLASERVE_TLS_CLIENT_CERT=${MLASERVE_TLS_CLIENT_CERT:-$TLS_DIR/client/client.crt}
  export MLASERVE_TLS_CLIENT_KEY=${MLASERVE_TLS_CLIENT_KEY:-$TLS_DIR/client/client.key}
fi
TLS_ARGS=()
PROBE_ARGS=(--server "localhost:$PORT")
if [[ -n "${MLASERVE_TLS_CERT:-}${MLASERVE_TLS_KEY:-}" ]]; then
  TLS_ARGS+=(--tls-cert "${MLASERVE_TLS_CERT:-}" --tls-key "${MLASERVE_TLS_KEY:-}")
  PROBE_ARGS+=(--tls)  # MLASERVE_TLS_CA / _CLIENT_CERT / _CLIENT_KEY from the environment
fi
if [[ -n "${MLASERVE_TLS_CLIENT_CA:-}" ]]; then
  TLS_ARGS+=(--tls-client-ca "$MLASERVE_TLS_CLIENT_CA")
fi

# shellcheck disable=SC2206
CMD=(mlaserve serve --address auto --host 0.0.0.0 --port "$PORT" --model "$MODEL"
  --min-workers "$MIN_WORKERS" --max-workers "$MAX_WORKERS" --num-gpus-per-worker "$GPUS_PER_WORKER"
  ${TLS_ARGS[@]+"${TLS_ARGS[@]}"} ${MLASERVE_SERVE_ARGS:-})

alive() {  # a running process (a zombie nobody has reaped yet counts as gone)
  [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null || return 1
  [[ "$(sed -n 's/.*) \(.\).*/\1/p' "/proc/$1/stat" 2>/dev/null)" != "Z" ]]
}

stop_previous() {  # the supervisor leads its own process group: stop the group, serve included
  [[ -f "$PIDFILE" ]] || return 0
  local pid
  pid=$(cat "$PIDFILE")
  if alive "$pid"; then
    echo "stopping the gateway (process group $pid): it drains its in-flight requests first"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 1 60); do alive "$pid" || break; sleep 1; done
    if alive "$pid"; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"; fi
  fi
  rm -f "$PIDFILE"
}

supervise() {  # run serve until it stops cleanly; restart it after a failure
  local child="" rc
  echo $$ >"$PIDFILE"  # this process leads its own session and process group (setsid)
  trap 'alive "$child" && kill -TERM "$child"; wait "$child" 2>/dev/null; exit 0' TERM INT
  while true; do
    "${CMD[@]}" &
    child=$!
    rc=0
    wait "$child" || rc=$?
    [[ $rc -eq 0 ]] && exit 0
    echo "$EXITED $rc; restarting in ${RESTART_DELAY_S} s"
    sleep "$RESTART_DELAY_S" &
    wait $! || true
  done
}

case "${1:-}" in
  --stop)
    stop_previous
    exit 0
    ;;
  --foreground)
    stop_previous
    exec "${CMD[@]}"
    ;;
  --supervise) # internal: the detached process
    supervise
    ;;
  --no-wait)
    WAIT_S=0
    ;;
  "") ;;
  *)
    echo "usage: $0 [--no-wait | --foreground | --stop]" >&2
    exit 2
    ;;
esac

stop_previous
touch "$LOG"
offset=$(wc -c <"$LOG")
echo "starting: ${CMD[*]}  (log: $LOG)"
setsid nohup bash "$0" --supervise >>"$LOG" 2>&1 </dev/null &
for _ in $(seq 1 100); do [[ -s "$PIDFILE" ]] && break; sleep 0.1; done

# Ready once `mlaserve status` gets an answer through the port (the first GPU node and the model
# can take many minutes).
[[ "$WAIT_S" -gt 0 ]] || exit 0
answer=""
for _ in $(seq 1 "$WAIT_S"); do
  if tail -c "+$((offset + 1))" "$LOG" | grep -q "$EXITED" || ! alive "$(cat "$PIDFILE")"; then
    echo "the gateway failed to start; last lines of $LOG:" >&2
    tail -c "+$((offset + 1))" "$LOG" | tail -n 30 >&2
    stop_previous >/dev/null
    exit 1
  fi
  if answer=$(mlaserve status "${PROBE_ARGS[@]}" 2>&1 >/dev/null); then
    echo "gateway ready on port $PORT${TLS_ARGS[*]:+ (TLS)}"
    exit 0
  fi
  sleep 1
done
echo "the gateway did not answer on port $PORT within $WAIT_S s (still loading?); see $LOG" >&2
[[ -z "$answer" ]] || echo "last answer of \`mlaserve status ${PROBE_ARGS[*]}\`: ${answer##*$'\n'}" >&2
