#!/usr/bin/env bash
# One device call of a GPU session (docs/gpu_runbook.md): `bash benchmarks/gpu_session.sh cp|peers`.
# Writes everything under $OUT as it goes (at most 8 files come back). Assumes the set-up lines of the runbook.
set -u
OUT=${OUT:-/tmp/pdelta_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
TR="torchrun --standalone"
BENCH=benchmarks/bench_cp.py
{ nvidia-smi --query-gpu=name,memory.total --format=csv; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/gpu.txt" 2>&1
case "$1" in
cp)  # our CP: GPU tests, then strong/weak scaling on 4, 2 and 1 GPUs (1M tokens on 4), kernel tests on GPU 3
  timeout 200 $TR --nproc-per-node 4 -m pytest -q -p no:cacheprovider -m gpu tests/distributed/test_cp_gpu.py \
      > "$OUT/cp_tests.log" 2>&1; echo "cp tests rc=$?"
  timeout 170 $TR --nproc-per-node 4 $BENCH --T 131072 524288 1048576 --weak 32768 --methods ours ulysses \
      --out "$OUT/cp4.json" >> "$OUT/bench.log" 2>&1; echo "cp4 rc=$?"
  CUDA_VISIBLE_DEVICES=0,1 timeout 150 $TR --nproc-per-node 2 $BENCH --T 131072 524288 --weak 32768 \
      --methods ours ulysses --out "$OUT/cp2.json" >> "$OUT/bench.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=2 timeout 150 $TR --nproc-per-node 1 $BENCH --T 131072 --weak 32768 --methods ours \
      --out "$OUT/cp1.json" >> "$OUT/bench.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=3 timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k k256 -s \
      > "$OUT/gpu_tests.log" 2>&1 &
  wait; echo "phase 3 done"
  ;;
peers)  # fla-core KCP at the same sizes (4 GPUs first), then the single-GPU kernel benchmark on GPU 3
  timeout 200 $TR --nproc-per-node 4 $BENCH --T 131072 524288 --weak 32768 --methods fla \
      --out "$OUT/fla4.json" >> "$OUT/bench.log" 2>&1; echo "fla4 rc=$?"
  CUDA_VISIBLE_DEVICES=3 timeout 330 python3 benchmarks/bench_kernels.py --T 8192 32768 131072 --batch-case \
      --warmup 10 --rep 50 --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=0,1 timeout 200 $TR --nproc-per-node 2 $BENCH --T 131072 524288 --weak 32768 \
      --methods fla --out "$OUT/fla2.json" >> "$OUT/bench.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=2 timeout 200 $TR --nproc-per-node 1 $BENCH --T 131072 --weak 32768 --methods fla \
      --out "$OUT/fla1.json" >> "$OUT/bench.log" 2>&1 &
  wait; echo "peers done"
  ;;
esac
