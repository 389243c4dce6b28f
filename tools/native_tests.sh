#!/usr/bin/env bash
# Builds and runs the native test programs (csrc/tests/*_test.cpp), each linked against the core sources
# (csrc/*.cpp minus the pybind11 bindings), optionally under ASan+UBSan: tools/native_tests.sh [--sanitize]
# Each program runs under a timeout; exit 77 means every case skipped (reported, not hidden).
set -euo pipefail
cd "$(dirname "$0")/.."
flags=(-std=c++17 -O2 -g -pthread -Icsrc -Wall -Wextra -Wno-unused-parameter)
if [ "${1:-}" = "--sanitize" ]; then
  flags+=(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
fi
uring=()
for d in ${OFFLOAD_URING_INCLUDE:-} /usr/include /usr/local/include; do
  if [ -f "$d/liburing.h" ]; then
    for l in ${OFFLOAD_URING_LIB:-} /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/local/lib; do
      if [ -f "$l/liburing.a" ]; then uring=(-DOFFLOAD_HAVE_URING=1 -I"$d" "$l/liburing.a"); break 2; fi
    done
  fi
done
core=()
for f in csrc/*.cpp; do
  case "$(basename "$f")" in bind_*|module.cpp) ;; *) core+=("$f") ;; esac
done
out=build/native_tests
mkdir -p "$out"
status=0
for t in csrc/tests/*_test.cpp; do
  name=$(basename "$t" .cpp)
  echo "== $name"
  g++ "${flags[@]}" "$t" "${core[@]}" "${uring[@]}" -o "$out/$name"
  set +e
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 timeout 300 "$out/$name"
  rc=$?
  set -e
  case $rc in
    0) ;;
    77) echo "SKIPPED (all cases): $name" ;;
    124) echo "TIMEOUT: $name"; status=1 ;;
    *) echo "FAILED ($rc): $name"; status=1 ;;
  esac
done
exit $status
