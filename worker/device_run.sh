#!/usr/bin/env bash
# One device call on the H200 for the engine: build (unless SKIP_BUILD=1), the worker's GPU tests,
# then the engine bench sweep on deepseek-v2-lite (random weights) and a profile of decode steps.
# There, from the repo root, carrying .device:  source .device/setup.sh && bash worker/device_run.sh
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
t0=$SECONDS
if [[ -z ${SKIP_BUILD:-} ]] && ! python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/engine_build.log" 2>&1; then
  tail -40 "$OUT/engine_build.log"; exit 1
fi
if [[ -z ${SKIP_TESTS:-} ]]; then
  timeout "${TEST_T:-240}" python3 -m pytest -m gpu tests/worker -q -p no:cacheprovider > "$OUT/engine_tests.log" 2>&1
  echo "pytest -m gpu tests/worker ($((SECONDS - t0)) s): $(tail -1 "$OUT/engine_tests.log")"
  grep -E "^(FAILED|ERROR)|Error" "$OUT/engine_tests.log" | head -12
fi
t1=$SECONDS
timeout "${BENCH_T:-330}" python3 -m mlaserve.worker.bench --model deepseek-v2-lite --batch "${BATCHES:-1,16,64,128,256}" \
  --prompt-len 512 --max-tokens 128 --profile "${PROFILE_B:-64}" ${BENCH_FLAGS:-} > "$OUT/engine_bench.log" 2>&1
echo "engine bench ($((SECONDS - t1)) s, exit $?); total $((SECONDS - t0)) s"
grep -vE "^(USDT|STAGE|\[W)" "$OUT/engine_bench.log" | tail -60
