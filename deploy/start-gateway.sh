#!/usr/bin/env bash
# Start (or restart) the mlaserve gRPC gateway on the Ray head node.
#
#   bash ~/mlaserve/deploy/start-gateway.sh                 # detached; log in ~/mlaserve-gateway.log
#   bash ~/mlaserve/deploy/start-gateway.sh --foreground    # in this terminal (systemd, debugging)
#   bash ~/mlaserve/deploy/start-gateway.sh --no-wait       # detached, without waiting until it answers
#   bash ~/mlaserve/deploy/start-gateway.sh --stop
#
# The gateway joins the running Ray cluster (`--address auto`), starts its pool of GPU workers and
# serves mlaserve.v1.Decoder on $MLASERVE_PORT. Settings come from the environment, then from
# ~/mlaserve.env (KEY=value lines), then the defaults below:
#   MLASERVE_MODEL        preset name or checkpoint directory visible on every GPU node (shared storage)
#   MLASERVE_PORT         gRPC port (50051)
#   MLASERVE_MIN_WORKERS  workers kept up when idle (1); MLASERVE_MAX_WORKERS: upper bound (32 = 4 nodes x 8 GPUs)
#   MLASERVE_GPUS_PER_WORKER  GPUs each worker holds (1): explicit, because the gateway starts
#                         before the autoscaler has launched any GPU node
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

# shellcheck disable=SC2206
CMD=(mlaserve serve --address auto --host 0.0.0.0 --port "$PORT" --model "$MODEL"
  --min-workers "$MIN_WORKERS" --max-workers "$MAX_WORKERS" --num-gpus-per-worker "$GPUS_PER_WORKER"
  ${MLASERVE_SERVE_ARGS:-})

stop_previous() {
  [[ -f "$PIDFILE" ]] || return 0
  local pid
  pid=$(cat "$PIDFILE")
  if kill -0 "$pid" 2>/dev/null; then
    echo "stopping the gateway (pid $pid): it drains its in-flight requests first"
    kill -TERM "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
  fi
  rm -f "$PIDFILE"
}

WAIT_S=${MLASERVE_GATEWAY_WAIT_S:-600}
case "${1:-}" in
  --no-wait)
    WAIT_S=0
    ;;
  --stop)
    stop_previous
    exit 0
    ;;
  --foreground)
    stop_previous
    exec "${CMD[@]}"
    ;;
  "") ;;
  *)
    echo "usage: $0 [--foreground | --no-wait | --stop]" >&2
    exit 2
    ;;
esac

stop_previous
echo "starting: ${CMD[*]}  (log: $LOG)"
nohup "${CMD[@]}" >>"$LOG" 2>&1 </dev/null &
echo $! >"$PIDFILE"

# Ready once `mlaserve status` gets an answer through the port (the model may take minutes to load).
[[ "$WAIT_S" -gt 0 ]] || exit 0
for _ in $(seq 1 "$WAIT_S"); do
  if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "the gateway exited; last lines of $LOG:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
  if mlaserve status --server "localhost:$PORT" >/dev/null 2>&1; then
    echo "gateway ready on port $PORT"
    exit 0
  fi
  sleep 1
done
echo "the gateway did not answer on port $PORT yet (still loading?); see $LOG" >&2
