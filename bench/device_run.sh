#!/usr/bin/env bash
# One call on the GPU machine: install the carried .debs/wheels, build, run the GPU tests, run a benchmark.
# Logs go to $OUT (or ./out). Usage:
#   bash bench/device_run.sh [--tests "PYTEST ARGS"] [--bench "bench/SCRIPT.py ARGS"] [--deepspeed]
# .carry/ holds liburing*.deb (and for DeepSpeed its wheels and the libaio .debs), copied from shared/device.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out}"
mkdir -p "$out"
tests="" bench="" ds=0
while [ $# -gt 0 ]; do
  case "$1" in
    --tests) tests="$2"; shift 2 ;;
    --bench) bench="$2"; shift 2 ;;
    --deepspeed) ds=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1
mkdir -p /tmp/uring
for f in .carry/liburing*.deb; do [ -f "$f" ] && dpkg -x "$f" /tmp/uring; done
export CPATH=/tmp/uring/usr/include LIBRARY_PATH=/tmp/uring/usr/lib/x86_64-linux-gnu
if [ "$ds" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/*.whl >/dev/null 2>&1
  mkdir -p /tmp/aio && for f in .carry/libaio*.deb; do dpkg -x "$f" /tmp/aio; done
  ln -sf libaio.so.1 /tmp/aio/usr/lib/x86_64-linux-gnu/libaio.so 2>/dev/null || true
  ls /tmp/aio/lib/x86_64-linux-gnu/libaio.so.1* >/dev/null 2>&1 && ln -sf /tmp/aio/lib/x86_64-linux-gnu/libaio.so.1 /tmp/aio/usr/lib/x86_64-linux-gnu/libaio.so
  export PYTHONPATH=/tmp/site CPATH="$CPATH:/tmp/aio/usr/include" LIBRARY_PATH="$LIBRARY_PATH:/tmp/aio/usr/lib/x86_64-linux-gnu:/tmp/aio/lib/x86_64-linux-gnu"
  export LD_LIBRARY_PATH="/tmp/aio/usr/lib/x86_64-linux-gnu:/tmp/aio/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}" TORCH_CUDA_ARCH_LIST=9.0
fi
python3 setup.py build_ext --inplace -q > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
grep -i "offload:" "$out/build.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import offload; print(offload.native_info(['/tmp']))"
status=0
if [ -n "$tests" ]; then
  python3 -m pytest -q -x $tests 2>&1 | tee "$out/tests.log" | tail -25
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if [ -n "$bench" ]; then
  python3 $bench 2>&1 | tee "$out/bench.log" | grep -vE "^  step" | tail -60
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  cp bench/results.jsonl bench/RESULTS.md "$out/" 2>/dev/null
fi
exit $status
