#!/usr/bin/env bash
# The two Quick start commands of README.md. Each installs what it needs, then:
#   tools/quickstart.sh train   fine-tunes the bundled tiny preset on the bundled text, on the CPU, with
#                               budgets that put model state on all three tiers (compute device, CPU
#                               arena, NVMe in ./runs/nvme), and prints where bytes and time went
#   tools/quickstart.sh test    runs the test suite: pytest, then the native tests under ASan+UBSan
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-}"
case "$what" in train|test) ;; *) echo "usage: tools/quickstart.sh train|test" >&2; exit 2 ;; esac

py=python3
# torch first, pinned: letting pip resolve torch would fetch a multi-GB CUDA build.
if ! $py -c "import torch" 2>/dev/null; then
  $py -m pip install -q torch==2.13.0
fi
# liburing for the io_uring store backend (the build falls back to a thread pool without it).
if [ ! -f /usr/include/liburing.h ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq liburing-dev >/dev/null) || echo "offload: liburing-dev not installed; using the thread-pool store backend" >&2
fi
$py -m pip install -q "pybind11>=2.12" setuptools wheel numpy safetensors psutil tqdm transformers peft
if [ "$what" = test ]; then
  $py -m pip install -q pytest hypothesis matplotlib
fi
$py -m pip install -q --no-build-isolation --no-deps -e .

if [ "$what" = train ]; then
  mkdir -p runs/nvme
  exec $py -m offload train --model tiny --data offload/data/tiny.txt --steps 30 --seq 64 --batch 4 \
    --lr 3e-3 --device cpu --gpu-memory 5MiB --cpu-memory 24MiB --nvme runs/nvme --save runs/tiny \
    --checkpoint-every 10
fi
status=0
$py -m pytest -q tests || status=$?
if [ "$status" = 5 ]; then status=1; fi   # "no tests ran" is a failure here
tools/native_tests.sh --sanitize || status=1
exit $status
