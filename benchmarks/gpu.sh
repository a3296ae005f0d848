#!/usr/bin/env bash
# On a GPU machine with torch, triton and pytest-benchmark already installed and no network:
# build mmalign._C in place against that torch, run the whole test suite (GPU tests included) and the
# benchmarks, and leave one report folder to commit under benchmarks/results/.
#
#   benchmarks/gpu.sh [OUT_DIR] [--quick]
#
# Nothing is downloaded; missing optional packages skip their benchmarks. Exit code: that of the tests.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
QUICK=""
OUT=""
for a in "$@"; do
  case "$a" in --quick) QUICK="--quick" ;; *) OUT="$a" ;; esac
done
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'no-gpu')")
OUT=${OUT:-benchmarks/results/${gpu}-$(date -u +%Y-%m-%d)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
commit=${MMALIGN_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
{
  echo "device: $gpu"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $commit"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
} > "$OUT/meta.txt"

echo "== build (log: $OUT/build.log)"
if ! MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "build failed"; exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -m mmalign env | tee "$OUT/env.txt"

echo "== tests (log: $OUT/tests.txt)"
$PY -m pytest tests -v -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt" | tail -15
test_rc=${PIPESTATUS[0]}

echo "== benchmarks"
(cd benchmarks && $PY -m pytest bench_*.py -q -p no:cacheprovider --bench-device cuda $QUICK \
    --benchmark-json "$OUT/bench.json" --benchmark-columns=median,iqr,rounds 2>&1 | tail -5)
$PY benchmarks/report.py "$OUT/bench.json" --out "$OUT" --commit "$commit" > /dev/null && cat "$OUT/report.md"
exit "$test_rc"
