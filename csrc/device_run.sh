#!/usr/bin/env bash
# One device call on the H200: build as users build, the GPU tests, then the side-by-side bench
# (standard + serving grid) against FlashMLA's prebuilt kernel. Logs under $OUT; compact tables last.
# Here, once: cp -r ../shared/peer .peer && bash ../shared/device/prepare.sh   (both folders git-ignored)
# There, from the repo root, carrying .device and .peer:  source .device/setup.sh && bash csrc/device_run.sh
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
t0=$SECONDS
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1
if ! python3 -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; exit 1
fi
so=$(python3 -c "import mlaserve.worker.kernels._C as m; print(m.__file__)")
cuobjdump --dump-sass "$so" > "$OUT/sass.txt" 2>&1
{
  echo "build: $((SECONDS - t0)) s"
  grep -E "Used [0-9]+ registers|spill stores|Performance Loss" "$OUT/build.log" | sed 's/^ *//' | sort | uniq -c
  # the main kernels' SASS (here, nvcc 13.0, -ftz=true: solo 4048 instructions, 44 HGMMA, 0 LDL/STL, 9 UTMALDG;
  # trio 5192 instructions, 44 HGMMA, 3 LDL/STL, 35 UTMALDG)
  for k in mla_decode_kernel mla_decode_trio_kernel; do
    awk -v k="$k" '$0 ~ ("Function : .*" k "E") {f = 1; next} /Function :/ {f = 0}
         f && /\/\*[0-9a-f][0-9a-f][0-9a-f][0-9a-f]+\*\// {n++; h += /HGMMA/; s += /LDL|STL/; t += /UTMALDG/}
         END {printf "SASS %s: %d instructions, %d HGMMA, %d LDL/STL, %d UTMALDG\n", k, n, h, s, t}' "$OUT/sass.txt"
  done
} | tee "$OUT/summary.txt"
t1=$SECONDS
timeout "${TEST_T:-220}" python3 -m pytest -m gpu tests/kernels -q -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "pytest -m gpu tests/kernels ($((SECONDS - t1)) s): $(tail -1 "$OUT/tests.log")" | tee -a "$OUT/summary.txt"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -10
against=()
if [[ -f .peer/peer_flashmla.py ]]; then
  export PYTHONPATH=$PWD/.peer${PYTHONPATH:+:$PYTHONPATH}
  against=(--against peer_flashmla)
else
  echo "no .peer/peer_flashmla.py: bench without a peer" | tee -a "$OUT/summary.txt"
fi
t2=$SECONDS
timeout "${BENCH_T:-300}" python3 -m mlaserve.worker.kernels.bench --grid both "${against[@]}" --kernel-times \
  --json "$OUT/bench.json" "$@" > "$OUT/bench.log" 2>&1
rc=$?
echo "bench ($((SECONDS - t2)) s, exit $rc); total $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
if grep -q "^# copy" "$OUT/bench.log"; then
  sed -n '/^# copy/,$p' "$OUT/bench.log"  # the compact tables and summaries (per-row lines: bench.log)
else
  tail -40 "$OUT/bench.log"
fi
