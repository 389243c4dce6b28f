#!/usr/bin/env bash
# GPU-machine work in one call, each part under its own time limit so one that hangs cannot take the rest
# with it; logs and results go to $OUT after every part. PARTS picks and orders them (default: the first
# three). A call has 10 minutes: about 1 of them starts the machine and builds.
#   tests        the GPU tests (engine, trace, out-of-memory, device-side AdamW, activations)   ~2 min
#   trace        trace on vs off on the reference workload, and the README's timeline picture     ~3 min
#   act          long-context activations: auto vs full recompute (1.35B, seq 32768)             ~3 min
#                (ACT_WORKLOADS=long-context,reference ACT_POLICIES=auto,recompute,keep pick others)
#   probe        `offload probe` of this machine and its disk, the profile kept as machine.json       ~1 min
#   reference    offload vs DeepSpeed ZeRO-3 CPU vs GPU-resident PyTorch, one run                  ~8 min
#                (REF_SYSTEMS=offload picks some)
#   lora         LoRA rank 16 on the largest preset that fits (bench/lora.py; LORA_ARGS adds flags) ~5 min
#   scale        the largest LLaMA-shaped model that trains under 24 GiB (bench/scale.py)           ~6 min
#   plan         predicted beside measured step time, three configurations (plan_check.py)       ~4 min
#                (PLAN_CONFIGS=reference-nvme picks some)
#   nvme         the NVMe regime, offload and DeepSpeed (NVME_SYSTEMS, NVME_MBS, NVME_ACCUM pick) ~9 min
#   dist         on a machine with several GPUs (nvidia-h200-x2 and up): the 2-rank NCCL parity test, then
#                bench/dist_reference.py: offload on 1 and DIST_RANKS (2) GPUs, DeepSpeed on DIST_RANKS   ~9 min
#   overhead     bench/host_overhead.py on the GPU, optimizer states on the host and on the device      ~1 min
#   w:ARGS       reference.py's offload worker alone, 3 steps after 2 warm-up, its whole log kept;
#                ARGS are its extra flags with commas for spaces (w:--activations,recompute); a run
#                about to hit WORKER_S prints every thread's stack first                          ~1.5 min
#   OFFLOAD_COMMIT=<hash> PARTS="tests trace act" bash bench/device_session.sh
# OFFLOAD_COMMIT must be the hash written out here: the copy on the GPU machine does not carry the latest
# commits, so `git rev-parse` there names an older one.
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
deepspeed_env() {   # DeepSpeed's wheels and libaio from .carry (see shared/device/README.md)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/*.whl >/dev/null 2>&1
  mkdir -p /tmp/aio && for f in .carry/libaio*.deb; do dpkg -x "$f" /tmp/aio; done
  ln -sf /tmp/aio/lib/x86_64-linux-gnu/libaio.so.1 /tmp/aio/usr/lib/x86_64-linux-gnu/libaio.so 2>/dev/null
  export PYTHONPATH="$PYTHONPATH:/tmp/site" CPATH="$CPATH:/tmp/aio/usr/include" TORCH_CUDA_ARCH_LIST=9.0
  export LIBRARY_PATH="$LIBRARY_PATH:/tmp/aio/usr/lib/x86_64-linux-gnu:/tmp/aio/lib/x86_64-linux-gnu"
  export LD_LIBRARY_PATH="/tmp/aio/usr/lib/x86_64-linux-gnu:/tmp/aio/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
}
for p in ${PARTS:-tests trace act}; do
  case "$p" in
    tests) part tests "${TESTS_S:-170}" bash -c "python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py \
             tests/test_trace_gpu.py tests/test_device_oom.py tests/test_device_update.py tests/test_dist_one_rank.py; a=\$?; \
             python3 -m pytest -q -p no:cacheprovider tests/test_activations.py -k gpu; exit \$((a | \$?))" ;;
    trace) part trace "${TRACE_S:-300}" python3 bench/trace_overhead.py --rounds 1 --steps 4 --warmup 2 --timeout 170 \
             --png "$out/timeline-reference.png" --keep-trace "$out/reference.trace.json" ;;
    act) part activations "${ACT_S:-170}" python3 bench/activations.py --workloads "${ACT_WORKLOADS:-long-context}" \
             --policies "${ACT_POLICIES:-auto,recompute}" --steps 3 --warmup 2 --timeout 150 ;;
    probe) mkdir -p /tmp/offload-nvme; part probe "${PROBE_S:-120}" python3 -m offload probe --nvme /tmp/offload-nvme \
             -o "$out/machine.json" ;;
    reference) deepspeed_env; part reference "${REF_S:-480}" python3 bench/reference.py \
             --systems "${REF_SYSTEMS:-offload,deepspeed,pytorch}" --steps 5 --warmup 2 --cpu-memory 100GiB --timeout 200 ;;
    lora) part lora "${LORA_S:-300}" python3 bench/lora.py ${LORA_ARGS:-} ;;
    scale) part scale "${SCALE_S:-560}" python3 bench/scale.py --time-budget $(( ${SCALE_S:-560} - 20 )) ;;
    plan) part plan-check "${PLAN_S:-420}" python3 bench/plan_check.py --time-budget $(( ${PLAN_S:-420} - 20 )) \
             ${PLAN_CONFIGS:+--configs $PLAN_CONFIGS} ;;
    nvme) deepspeed_env; part nvme-regime "${NVME_S:-560}" python3 bench/nvme_regime.py \
             --systems "${NVME_SYSTEMS:-offload,deepspeed}" --mbs "${NVME_MBS:-4}" --grad-accum "${NVME_ACCUM:-1}" \
             --time-budget $(( ${NVME_S:-560} - 20 )) ;;
    dist) deepspeed_env; part dist-tests "${DIST_TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider \
             tests/test_dist_gpu.py
          part dist-reference "${DIST_S:-570}" python3 bench/dist_reference.py --ranks "${DIST_RANKS:-2}" \
             --timeout 170 ;;
    overhead) part host-overhead "${OVERHEAD_S:-150}" bash -c "python3 bench/host_overhead.py --device cuda --tier cpu --steps 10 \
             && python3 bench/host_overhead.py --device cuda --tier device --steps 10" ;;
    w:*) args=${p#w:}; part "worker${args//[^a-z0-9]/-}" "${WORKER_S:-200}" \
             env OFFLOAD_STACKS_AFTER=$(( ${WORKER_S:-200} - 15 )) python3 bench/reference.py \
             --worker offload --steps 3 --warmup 2 ${args//,/ } ;;
    *) echo "unknown part $p" >&2; status=2 ;;
  esac
done
exit $status
