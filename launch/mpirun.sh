#!/usr/bin/env bash
# Train under mpirun: ranks come from Open MPI's environment (mpi4py broadcasts a free port from rank 0).
#   NP=2 launch/mpirun.sh --config tiny --out out/mpi
# Multi-node: add your hostfile to MPIRUN_ARGS and export MASTER_ADDR (host of rank 0) and MASTER_PORT.
set -euo pipefail
exec mpirun ${MPIRUN_ARGS:-} --allow-run-as-root --oversubscribe -np "${NP:-2}" \
    -x MASTER_ADDR -x MASTER_PORT -x PATH -x PYTHONPATH python -m pdelta_cp.cli train "$@"
