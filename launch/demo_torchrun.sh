#!/usr/bin/env bash
# The CP demo under torchrun (NPROC processes on this node, gloo).
#   NPROC=4 launch/demo_torchrun.sh [--dtype float64]
set -euo pipefail
exec torchrun --nproc-per-node "${NPROC:-2}" -m pdelta_cp.cli demo "$@"
