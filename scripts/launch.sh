#!/usr/bin/env bash
# offload train RECIPE on NPROC ranks per node over torchrun (docs/distributed.md).
#   bash scripts/launch.sh recipes/llama-7b.yaml [--set key=value ...]
# One node: NPROC=2 bash scripts/launch.sh RECIPE. Several nodes: run the same line on each with
# NNODES, NODE_RANK and the rendezvous endpoint of one of them, e.g.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash scripts/launch.sh RECIPE   # on 10.0.0.1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash scripts/launch.sh RECIPE   # on the other node
set -euo pipefail
exec torchrun --nproc-per-node "${NPROC:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')}" \
  --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" \
  --rdzv-backend "${RDZV_BACKEND:-c10d}" --rdzv-endpoint "${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}" \
  --rdzv-id "${RDZV_ID:-offload}" -m offload.cli.main train "$@"
