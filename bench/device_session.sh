#!/usr/bin/env bash
# A whole GPU-machine session in one call, each part under its own time limit so one that hangs cannot
# take the rest with it: build, the GPU tests, the trace-overhead benchmark (with the README's timeline
# picture), the long-context activation benchmark. Logs and results go to $OUT after every part.
#   OFFLOAD_COMMIT=<hash> bash bench/device_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
mkdir -p /tmp/uring
for f in .carry/liburing*.deb; do [ -f "$f" ] && dpkg -x "$f" /tmp/uring; done
export CPATH=/tmp/uring/usr/include LIBRARY_PATH=/tmp/uring/usr/lib/x86_64-linux-gnu
python3 setup.py build_ext --inplace -q > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
save() { cp bench/results.jsonl bench/RESULTS.md "$out/" 2>/dev/null; }
part() {   # part NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -${TAIL:-15} "$out/$name.log" | grep -vE "^  step "
  echo "== $name: exit $rc"
  [ $rc = 0 ] || status=1
  save
}
part tests "${TESTS_S:-200}" bash -c "python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py \
  tests/test_trace_gpu.py tests/test_device_oom.py tests/test_device_update.py; a=\$?; \
  python3 -m pytest -q -p no:cacheprovider tests/test_activations.py -k gpu; exit \$((a | \$?))"
part trace "${TRACE_S:-220}" python3 bench/trace_overhead.py --rounds 1 --steps 4 --warmup 2 \
  --png "$out/timeline-reference.png" --keep-trace "$out/reference.trace.json"
part activations "${ACT_S:-170}" python3 bench/activations.py --workloads long-context --policies auto,recompute \
  --steps 3 --warmup 2 --timeout 80
exit $status
