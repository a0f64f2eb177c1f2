#!/usr/bin/env bash
# The GPU machine's benchmark session (see README "Results"): build, then one phase per call so
# each stays inside the device tool's 10-minute command limit. Results land in $OUT.
#   bash scripts/gpu_bench.sh io|gpu-tests|train3b|train-more|nvme3b|big|snap3b|ckpt3b|attn|act7b|act128k|dist7b|dist13b
#   (train3b: DEVICE_BLOCKS=12, RUN=1; act7b, act128k: DEVICE_BLOCKS=10 or auto, the plan's;
#   dist7b and dist13b need 2 GPUs: kind nvidia-h200-x2)
# DeepSpeed's wheels and libaio come from .bench/deps (../shared/baselines/fetch_deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 setup.py build_ext --inplace -q 2>&1 | grep -iE " error" || true
# Everything a phase prints goes to $OUT/<phase>.log as it comes (a call cut by its time limit
# still brings back what ran); the terminal gets the last lines, warnings left out.
show() { tee -a "$OUT/${PHASE}.log" | grep -vi warn | tail -n "$1"; }
PHASE=${1:?phase}
deepspeed_env() {
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .bench/deps/wheels/*.whl
  mkdir -p /tmp/aio && for f in .bench/deps/debs/*.deb; do dpkg -x "$f" /tmp/aio; done
  export PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0 CPATH=/tmp/aio/usr/include
  export LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu LD_LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu
}
case "$PHASE" in
  io)
    for size in 1GiB 4GiB; do python3 scripts/bench_io.py --dir /tmp --size "$size" --out "$OUT" | tail -12; done ;;
  gpu-tests)
    python3 -m pytest -q $(ls tests/test_{wrap_gpu,pool,activations_gpu,attention_keep,checkpoint_gpu}.py 2>/dev/null) \
      2>&1 | show 8 ;;
  ckpt3b)  # issue 6: a save every step of a 40-micro-batch step (~25 s), each written over the last (ACC=1 EVERY=32
           # STEPS=96: spaced). About 400 s on the H100 at STEPS=3 (the DCP comparison included): one call each.
    rm -rf /tmp/ckpt-bench
    # PLAIN: steps without saves first (default STEPS); DCP=0: no DCP comparison; TRACE=1: a timeline;
    # STAGING: the ring, GiB, host or state; "default" (the default): offload's own (two records);
    # GRADIENTS: where the micro-batches' fp32 sums are made, gpu (the default) or host
    python3 scripts/bench_ckpt.py --size 3b --steps "${STEPS:-3}" --plain "${PLAIN:-${STEPS:-3}}" --warmup "${WARMUP:-1}" --accumulate "${ACC:-40}" \
      --save-every "${EVERY:-1}" --gradients "${GRADIENTS:-gpu}" $([ "${STAGING:-default}" != default ] && echo --staging-gib "${STAGING:-default}") --prune "${PRUNE:-before}" --dir /tmp/ckpt-bench \
      $([ "${DCP:-1}" = 0 ] && echo --no-dcp) $([ "${TRACE:-0}" = 1 ] && echo --trace "$OUT/trace_ckpt.json") \
      --out "$OUT/ckpt_3b_acc${ACC:-40}_every${EVERY:-1}.json" 2>&1 | show 30 ;;
  attn)  # attention's forward and backward by kernel, and through offload's kept call
    python3 scripts/bench_attention.py --seqs "${SEQS:-32768,131072}" --out "$OUT/attention.json" 2>&1 | show 12 ;;
  act7b)  # issue 5: recompute against auto's per-block keeps, and the boundary states on the host
    python3 scripts/bench_activations.py --size 7b --device-blocks "${DEVICE_BLOCKS:-10}" --seqs "${SEQS:-2048,8192,16384,32768}" \
      --placements "${PLACEMENTS:-recompute,auto,host,auto-host}" --steps 3 --out "$OUT/activations_7b.json" 2>&1 | show 24 ;;
  act128k)  # issue 5: 128K tokens on the 6.7B shape, recompute or auto (P=host, auto-host, nvme or auto-nvme;
            # nvme: the boundary states, 32 GiB, under /tmp/offload-act; P=nvme,auto-nvme: both, one wrap)
    P=${P:-host}
    python3 scripts/bench_activations.py --size 7b --device-blocks "${DEVICE_BLOCKS:-10}" --seqs 131072 \
      --placements "$P" --loss-chunk 8192 --steps "${STEPS:-2}" --out "$OUT/act_128k_${P//,/_}.json" 2>&1 | show 12 ;;
  train3b)
    deepspeed_env
    db=${DEVICE_BLOCKS:-12}
    python3 scripts/bench_train.py --size 3b --systems gpu,deepspeed,offload --device-blocks "$db" \
      --trace "$OUT/trace_3b_d$db.json" --out "$OUT/train_3b_d${db}_run${RUN:-1}.json" 2>&1 | show 12 ;;
  dist7b)
    python3 -m pytest -q -x tests/test_dist.py 2>&1 | show 3
    python3 scripts/bench_train.py --size 7b --systems offload --device-blocks 10 --steps 6 \
      --out "$OUT/train_7b_1rank.json" 2>&1 | show 3
    torchrun --standalone --nproc-per-node 2 scripts/bench_train.py --size 7b --systems offload \
      --device-blocks 10 --steps 6 --out "$OUT/train_7b_2rank.json" 2>&1 | show 3 ;;
  dist13b)
    torchrun --standalone --nproc-per-node 2 scripts/bench_train.py --size 13b --systems offload \
      --device-blocks "${DEVICE_BLOCKS:-8}" --steps 5 --out "$OUT/train_13b_2rank.json" 2>&1 | show 4 ;;
  nvme3b)
    mkdir -p /tmp/nvme-state
    python3 scripts/bench_train.py --size 3b --systems offload --optimizer-state nvme --nvme-dir /tmp/nvme-state \
      --steps 4 --out "$OUT/train_3b_nvme.json" 2>&1 | show 5 ;;
  big)  # issue 4 (b): the largest model, its state spilled to NVMe where the host budget ends
    mkdir -p /tmp/nvme-state
    python3 scripts/bench_train.py --size "${SIZE:-13b}" --systems offload --device-blocks auto \
      --optimizer-state auto --master auto --nvme-dir /tmp/nvme-state --host-bytes "${HOST_BYTES:-120GiB}" --gpu-bytes "${GPU_BYTES:-76GiB}" \
      --steps "${STEPS:-5}" --trace "$OUT/trace_${SIZE:-13b}_spill.json" --out "$OUT/train_${SIZE:-13b}_spill.json" 2>&1 | show 30 ;;
  snap3b)  # issue 8: what a snapshot of the 3.4B state costs a step, and how fast it comes back
    python3 scripts/bench_snapshot.py --size 3b --batch 4 --seq 2048 --steps "${STEPS:-2}" --every "${EVERY:-32}" \
      --out "$OUT/snapshot_3b.json" 2>&1 | show 16 ;;
  train-more)
    for db in 12 0; do
      python3 scripts/bench_train.py --size 3b --systems offload --device-blocks $db \
        --out "$OUT/train_3b_d$db.json" 2>&1 | show 3
    done
    python3 scripts/bench_train.py --size 7b --systems offload --device-blocks 10 --steps 6 \
      --trace "$OUT/trace_7b.json" --out "$OUT/train_7b.json" 2>&1 | show 8 ;;
esac
