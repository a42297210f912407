#!/usr/bin/env bash
# Train with torchrun. Single node:   NPROC=4 launch/torchrun.sh --config 340m --out out/340m --set parallel.cp=4
# Multi-node (run on every node):      NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 NPROC=8 launch/torchrun.sh --config 1b ...
# Rendezvous on MASTER_ADDR:MASTER_PORT (default 127.0.0.1:29500). Backend: NCCL with CUDA, gloo on CPU.
set -euo pipefail
exec torchrun --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "${NPROC:-2}" \
    --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
    -m pdelta_cp.cli train "$@"
