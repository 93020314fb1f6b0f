#!/usr/bin/env bash
# The real cluster on this machine's GPUs, end to end: which kernel backend is live, the GPU tests,
# then `mlaserve serve` with one worker per GPU driven by `mlaserve bench serve`, and the status table.
# Use (after `pip install -e .` with nvcc present): bash deploy/gpu-cluster-check.sh [MODEL ...]
# Logs go to $OUT (default /tmp/mlaserve-gpu-check).
set -uo pipefail
OUT=${OUT:-/tmp/mlaserve-gpu-check}
mkdir -p "$OUT"
models=("${@:-tiny}")
port=50071
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
python3 -c "import torch; from mlaserve.worker.kernels import backend; print('GPUs', torch.cuda.device_count(), 'backend', backend())"
# SKIP_TESTS=1: the GPU tests ran already; VARLEN=0: fixed prompt and output lengths (to compare with
# `python -m mlaserve.worker.bench` at the same batch)
[[ -n ${SKIP_TESTS:-} ]] || timeout 240 python3 -m pytest -m gpu -q -x -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -4

for model in "${models[@]}"; do
  echo "== cluster on $model"
  mlaserve serve --model "$model" --host 127.0.0.1 --port $port >"$OUT/serve-$model.log" 2>&1 &
  server=$!
  for _ in $(seq 1 240); do
    mlaserve status --server 127.0.0.1:$port --timeout 2 >/dev/null 2>&1 && break
    kill -0 $server 2>/dev/null || break
    sleep 1
  done
  mlaserve status --server 127.0.0.1:$port
  mlaserve bench serve --server 127.0.0.1:$port --requests "${REQUESTS:-512}" --concurrency "${CONCURRENCY:-128}" \
    --prompt-len "${PROMPT_LEN:-512}" --max-tokens "${MAX_TOKENS:-128}" $([[ ${VARLEN:-1} == 0 ]] || echo --varlen) \
    --json "$OUT/bench-$model.json"
  mlaserve status --server 127.0.0.1:$port
  kill -TERM $server
  wait $server
  echo "serve exited with $?"
  tail -3 "$OUT/serve-$model.log"
  port=$((port + 1))
done
