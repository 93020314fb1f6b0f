#!/usr/bin/env bash
# One device call: build (as users build), SASS dump, smoke check, GPU tests, bench.
# Usage on the device machine, from the repo root, after `source .device/setup.sh`:
#   bash csrc/device_run.sh [tests|notests] [bench args...]
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
mode=${1:-tests}; shift || true
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1
t0=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"; grep -E "registers|spill|arning|Performance Loss" "$OUT/build.log" | sort | uniq | head -20
so=$(python3 -c "import mlaserve.worker.kernels._C as m; print(m.__file__)")
cuobjdump --dump-sass "$so" > "$OUT/sass.txt" 2>&1
echo "SASS: $(grep -c HGMMA "$OUT/sass.txt") HGMMA, $(grep -cE 'LDL|STL' "$OUT/sass.txt") LDL/STL, $(grep -c UTMALDG "$OUT/sass.txt") UTMALDG"
for k in ${KERNELS:-solo seesaw split}; do
  echo "== smoke MLASERVE_MLA_KERNEL=$k"
  MLASERVE_MLA_KERNEL=$k timeout ${SMOKE_T:-120} python3 csrc/smoke.py 2>&1 | tee -a "$OUT/smoke.log"
done
if grep -q "SMOKE FAIL" "$OUT/smoke.log" || ! grep -q "SMOKE PASS" "$OUT/smoke.log"; then
  echo "smoke failed; skipping tests"; mode=notests
fi
if [[ $mode == tests ]]; then
  timeout ${TEST_T:-240} python3 -m pytest -m gpu tests/kernels/test_sm90.py -q --maxfail=6 -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
fi
# BENCH_VARIANTS: space-separated "kernel:sched:pdl" triples, each a bench run (default: the default build)
for v in ${BENCH_VARIANTS:-solo:auto:1}; do
  IFS=: read -r k sch pdl <<< "$v"
  echo "== bench kernel=$k sched=$sch pdl=$pdl" | tee -a "$OUT/bench.log"
  MLASERVE_MLA_KERNEL=$k MLASERVE_MLA_SCHED=$sch MLASERVE_MLA_PDL=$pdl timeout ${BENCH_T:-200} \
    python3 -m mlaserve.worker.kernels.bench "$@" 2>&1 | tee -a "$OUT/bench.log"
done
