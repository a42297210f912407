#!/usr/bin/env bash
# Train under the DeepSpeed launcher with its engine (ZeRO over all ranks, CP inside the model).
#   NPROC=2 launch/deepspeed.sh --config tiny --out out/ds [--set parallel.zero_stage=2]
# On CPU-only machines DeepSpeed counts one "accelerator" per NUMA node: LOCAL_SIZE tells it how many slots.
set -euo pipefail
export LOCAL_SIZE="${LOCAL_SIZE:-${NPROC:-2}}"
exec deepspeed --num_gpus "${NPROC:-2}" --master_port "${MASTER_PORT:-29500}" --module pdelta_cp.cli train \
    --set parallel.engine=deepspeed "$@"
