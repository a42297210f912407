#!/usr/bin/env bash
# One device call of a GPU session (docs/gpu_runbook.md): `bash benchmarks/gpu_session.sh cp|peers`.
# Works on 2 or 4 GPUs. Writes everything under $OUT as it goes (at most 8 files come back).
# Assumes the set-up lines of the runbook (wheels on PYTHONPATH, kernels/ linked into pdelta_cp).
set -u
OUT=${OUT:-/tmp/pdelta_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
N=${NGPU:-$(nvidia-smi -L | wc -l)}; LAST=$((N - 1))
TR="torchrun --standalone"
BENCH=benchmarks/bench_cp.py
# fla-core autotunes for minutes per shape on a cold machine: keep Triton's autotune results (small JSON files)
# from call to call — this script returns them as $OUT/triton_autotune.tgz; unpack that into .triton_autotune/
# (git-ignored) and carry it, and the next machine starts warm.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}; mkdir -p "$TRITON_CACHE_DIR"
# benchmarks/triton_autotune_h100/ keeps the H100 entries (fla GDN, part of fla KDA) in the repository: a fresh
# checkout starts from them; a carried .triton_autotune (newer) goes on top
[ -d benchmarks/triton_autotune_h100 ] && cp -r benchmarks/triton_autotune_h100/. "$TRITON_CACHE_DIR"/
[ -d .triton_autotune ] && cp -r .triton_autotune/. "$TRITON_CACHE_DIR"/
# At most 8 files come back: the logs travel as one archive (logs.tgz), packed when the script exits.
pack_outputs() {
  (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf "$OUT/triton_autotune.tgz" -T -)
  (cd "$OUT" && ls *.log > /dev/null 2>&1 && tar czf logs.tgz *.log && rm -f *.log)
}
trap pack_outputs EXIT
{ nvidia-smi --query-gpu=name,memory.total --format=csv; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/gpu.txt" 2>&1
# One GPU: the kernel GPU tests at the defaults as two background processes (a cold machine spends most of this in
# compiles, on the CPU; one process took > 180 s for eight cases in session l). The caller waits.
default_gpu_tests() {
  timeout $1 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -s -k "k256 or varlen" \
      > "$OUT/gpu_tests.log" 2>&1 &
  timeout $1 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -s -k "not k256 and not varlen" \
      > "$OUT/gpu_tests_rest.log" 2>&1 &
}
# Per-kernel tables at 32K for the op names in $PROFILE (ours or fla's), into logs.tgz, while the budget lasts.
profiles() {
  for v in ${PROFILE:-}; do
    left=$(( ${BUDGET:-570} - SECONDS )); [ "$left" -lt 40 ] && break
    (cd benchmarks && timeout $left python3 profile_op.py --variant $v --T 32768 --out "$OUT/profile_$v.log" \
        > /dev/null 2>&1); echo "profile $v rc=$? at ${SECONDS}s"
  done
}
case "$1" in
cp)  # our CP: GPU tests, strong/weak scaling on N GPUs (up to 1M tokens), then 2 and 1 GPU; K=256 kernel tests
  if python3 -c "import megatron.core" 2>/dev/null; then  # the Megatron bf16 check (2 GPUs)
    CUDA_VISIBLE_DEVICES=0,1 timeout 150 $TR --nproc-per-node 2 -m pytest -q -s -p no:cacheprovider -m gpu \
        tests/distributed/test_megatron_gpu.py > "$OUT/megatron.log" 2>&1; echo "megatron rc=$?"
  fi
  timeout 200 $TR --nproc-per-node $N -m pytest -q -p no:cacheprovider -m gpu tests/distributed/test_cp_gpu.py \
      > "$OUT/cp_tests.log" 2>&1; echo "cp tests rc=$?"
  timeout 170 $TR --nproc-per-node $N $BENCH --T 131072 524288 1048576 --weak 32768 --methods ours ours-tree ulysses \
      --out "$OUT/cp$N.json" >> "$OUT/bench.log" 2>&1; echo "cp$N rc=$?"
  if [ "$N" -ge 4 ]; then
    CUDA_VISIBLE_DEVICES=1,2 timeout 150 $TR --nproc-per-node 2 $BENCH --T 131072 524288 --weak 32768 \
        --methods ours ulysses --out "$OUT/cp2.json" >> "$OUT/bench.log" 2>&1 &
  fi
  CUDA_VISIBLE_DEVICES=0 timeout 150 $TR --nproc-per-node 1 $BENCH --T 131072 --weak 32768 --methods ours \
      --out "$OUT/cp1.json" >> "$OUT/bench.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=$LAST timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k k256 -s \
      > "$OUT/gpu_tests.log" 2>&1 &
  wait; echo "cp done"
  ;;
four)  # 4 GPUs, one call: CP tests at 2 and 4 with the kernel tests beside them; scaling on 4, then 2 and 1 side by side
  timeout 200 $TR --nproc-per-node $N -m pytest -q -p no:cacheprovider -m gpu tests/distributed/test_cp_gpu.py \
      > "$OUT/cp_tests.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=$LAST timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "not k256" -s \
      > "$OUT/gpu_tests.log" 2>&1 &
  wait; echo "tests done"; tail -1 "$OUT/cp_tests.log"; tail -1 "$OUT/gpu_tests.log"
  timeout 200 $TR --nproc-per-node $N $BENCH --T 131072 524288 1048576 --weak 32768 --methods ours ulysses \
      --out "$OUT/cp$N.json" >> "$OUT/bench.log" 2>&1; echo "cp$N rc=$?"
  CUDA_VISIBLE_DEVICES=1,2 timeout 150 $TR --nproc-per-node 2 $BENCH --T 131072 524288 --weak 32768 \
      --methods ours ulysses --out "$OUT/cp2.json" >> "$OUT/bench2.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=0 timeout 150 $TR --nproc-per-node 1 $BENCH --T 131072 --weak 32768 --methods ours \
      --out "$OUT/cp1.json" >> "$OUT/bench1.log" 2>&1 &
  (export CUDA_VISIBLE_DEVICES=$LAST
   timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k k256 -s >> "$OUT/gpu_tests.log" 2>&1
   timeout 65 python3 benchmarks/bench_kernels.py --T 32768 131072 --warmup 5 --rep 20 --ops pgdn pkda \
       --out "$OUT/kernels_ours.json" > "$OUT/kernels.log" 2>&1) &
  wait; echo "four done"
  ;;
cpprofile)  # issue 4's PGDN gap: one profiled fwd+bwd step at 32K tokens per GPU, on 1 GPU and on N (weak scaling)
  mkdir -p "$OUT/prof"
  for n in 1 $N; do
    CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) timeout 150 $TR --nproc-per-node $n $BENCH --T --weak 32768 \
        --methods ours --variants pgdn pkda --check 0 --profile "$OUT/prof" --out "$OUT/prof/cp$n.json" \
        >> "$OUT/bench.log" 2>&1; echo "profile on $n rc=$?"
  done
  (cd "$OUT" && tar czf prof.tgz prof && rm -rf prof)  # six files: over the 8-file limit with the rest
  ;;
peers)  # fla-core KCP at the same sizes (all GPUs first), then 1 GPU, and the kernel benchmark on the last GPU
  timeout 200 $TR --nproc-per-node $N $BENCH --T 131072 524288 --weak 32768 --methods fla \
      --out "$OUT/fla$N.json" >> "$OUT/bench.log" 2>&1; echo "fla$N rc=$?"
  CUDA_VISIBLE_DEVICES=$LAST timeout 330 python3 benchmarks/bench_kernels.py --T 8192 32768 131072 --batch-case \
      --warmup 10 --rep 50 --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1 &
  if [ "$N" -ge 4 ]; then
    CUDA_VISIBLE_DEVICES=1,2 timeout 200 $TR --nproc-per-node 2 $BENCH --T 131072 524288 --weak 32768 \
        --methods fla --out "$OUT/fla2.json" >> "$OUT/bench.log" 2>&1 &
  fi
  CUDA_VISIBLE_DEVICES=0 timeout 200 $TR --nproc-per-node 1 $BENCH --T 131072 --weak 32768 --methods fla \
      --out "$OUT/fla1.json" >> "$OUT/bench.log" 2>&1 &
  wait; echo "peers done"
  ;;
recheck)  # GPU CP tests, then fla-core KCP on all GPUs; the kernel benchmark and fla on one GPU side by side
  timeout 150 $TR --nproc-per-node $N -m pytest -q -p no:cacheprovider -m gpu tests/distributed/test_cp_gpu.py \
      > "$OUT/cp_tests.log" 2>&1; echo "cp tests rc=$?"
  timeout 130 $TR --nproc-per-node $N $BENCH --T 131072 --weak 32768 --methods fla \
      --out "$OUT/fla$N.json" >> "$OUT/bench.log" 2>&1; echo "fla$N rc=$?"
  CUDA_VISIBLE_DEVICES=$LAST timeout 270 python3 benchmarks/bench_kernels.py --T 8192 32768 131072 --batch-case \
      --warmup 10 --rep 50 --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=0 timeout 200 $TR --nproc-per-node 1 $BENCH --T 131072 --weak 32768 --methods fla \
      --out "$OUT/fla1.json" >> "$OUT/bench.log" 2>&1 &
  wait; echo "recheck done"
  ;;
scale)  # 2+ GPUs after a `cp` call: Megatron bf16 check, 1M tokens + weak scaling, profiles, then fla KCP
  if python3 -c "import megatron.core" 2>/dev/null; then
    CUDA_VISIBLE_DEVICES=0,1 timeout 150 $TR --nproc-per-node 2 -m pytest -q -s -p no:cacheprovider -m gpu \
        tests/distributed/test_megatron_gpu.py > "$OUT/megatron.log" 2>&1; echo "megatron rc=$?"
  fi
  timeout 200 $TR --nproc-per-node $N $BENCH --T 1048576 --weak 32768 --methods ours ulysses \
      --out "$OUT/cp${N}_long.json" >> "$OUT/bench.log" 2>&1; echo "cp$N long rc=$?"
  CUDA_VISIBLE_DEVICES=0 timeout 60 python3 benchmarks/profile_op.py --variant pgdn --T 32768 \
      --out "$OUT/profile_pgdn.txt" > /dev/null 2>&1 &
  CUDA_VISIBLE_DEVICES=$LAST timeout 60 python3 benchmarks/profile_op.py --variant pkda --T 32768 \
      --out "$OUT/profile_pkda.txt" > /dev/null 2>&1 &
  wait
  timeout 170 $TR --nproc-per-node $N $BENCH --T 131072 --methods fla \
      --out "$OUT/fla$N.json" >> "$OUT/bench.log" 2>&1; echo "fla$N rc=$?"
  ;;
verify)  # 2 GPUs: Megatron bf16 check; kernel GPU tests, profiles and our kernel timings on GPU 0, fla on the last
  if python3 -c "import megatron.core" 2>/dev/null; then
    CUDA_VISIBLE_DEVICES=0,1 timeout 120 $TR --nproc-per-node 2 -m pytest -q -s -p no:cacheprovider -m gpu \
        tests/distributed/test_megatron_gpu.py > "$OUT/megatron.log" 2>&1; echo "megatron rc=$?"
  fi
  CUDA_VISIBLE_DEVICES=$LAST timeout 380 python3 benchmarks/bench_kernels.py --T 8192 32768 131072 --batch-case \
      --warmup 10 --rep 50 --ops fla-gdn fla-pgdn fla-kda fla-pkda --out "$OUT/kernels_fla.json" \
      > "$OUT/kernels.log" 2>&1 &
  export CUDA_VISIBLE_DEVICES=0
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "not k256" -s > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"
  timeout 60 python3 benchmarks/profile_op.py --variant pgdn --T 32768 --out "$OUT/profile_pgdn.txt" > /dev/null 2>&1
  timeout 60 python3 benchmarks/profile_op.py --variant pkda --T 32768 --out "$OUT/profile_pkda.txt" > /dev/null 2>&1
  timeout 150 python3 benchmarks/bench_kernels.py --T 8192 32768 131072 --batch-case --warmup 10 --rep 50 \
      --ops pdn pgdn pkda --out "$OUT/kernels_ours.json" >> "$OUT/kernels.log" 2>&1; echo "ours rc=$?"
  unset CUDA_VISIBLE_DEVICES
  wait; echo "verify done"
  ;;
million)  # issue 6: 340M PGDN trained at CP = N on the longest of $TS (default 1M, then 512K, 256K) that fits
  # PROBE=1 TS="1048576 2097152 3145728" STEPS=3: climb instead — train a few steps at each size until one fails
  # Data: a byte-level corpus of this repository's sources and docs, repeated (long-range copying is learnable).
  # Runs live in .runs/ (git-ignored: kept on a warm machine between calls) with a checkpoint every 10 steps, so
  # a run cut by the call's time limit resumes in the next call on the same machine.
  # preflight: kernels changed since their last GPU check must match PyTorch here before hours of training
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_triton_diagonal_scan.py \
      tests/test_activation_checkpointing.py tests/test_conv.py tests/test_model_parts.py > "$OUT/preflight.log" 2>&1 || { echo "preflight failed"; exit 1; }
  files=$(ls pdelta_cp/*.py pdelta_cp/*/*.py kernels/*.py megatron_patches/*.py docs/*.md README.md)
  [ -f /tmp/corpus/meta.json ] || python3 -m pdelta_cp.cli preprocess \
      $(for i in $(seq ${REPEAT:-16}); do echo $files; done) --out /tmp/corpus > "$OUT/prep.log" 2>&1 \
      || { echo "preprocess failed"; exit 1; }
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # long runs: no fragmentation between chunk sizes
  for T in ${TS:-1048576 524288 262144}; do
    RUN=.runs/run$T; RESUME=""; [ -f $RUN/checkpoint.json ] && RESUME="--resume"
    timeout ${LIMIT:-540} $TR --nproc-per-node $N -m pdelta_cp.cli train --config ${CONFIG:-340m} --out $RUN $RESUME \
        --set parallel.cp=$N --set data.task=tokens --set data.path=/tmp/corpus --set data.seq_len=$T \
        --set data.batch_size=1 --set steps=${STEPS:-50} --set log_every=5 --set optim.warmup_steps=10 \
        --set checkpoint_every=10 ${EXTRA:-} > "$OUT/train_$T.log" 2>&1
    rc=$?; echo "T=$T rc=$rc"
    cp $RUN/metrics.jsonl "$OUT/metrics_$T.jsonl" 2>/dev/null
    [ -f $RUN/loss.png ] && cp $RUN/loss.png "$OUT/loss_$T.png"
    if [ -n "${PROBE:-}" ]; then  # longest context that trains: go up the ladder until a size fails
      [ $rc -eq 0 ] || break
    elif [ $rc -eq 0 ] || [ -f $RUN/checkpoint.json ]; then break; fi  # done, or cut by time: resume next call
  done
  ;;
numerics)  # issue 8: CP-vs-one-GPU error against T (to 1M) and ranks (2..N), with summary-chain amplification
  timeout ${LIMIT:-400} $TR --nproc-per-node $N benchmarks/numerics_cp.py --T ${TS:-65536 262144 1048576} \
      --out "$OUT/numerics.json" > "$OUT/numerics.log" 2>&1; echo "numerics rc=$?"
  ;;
optin)  # one GPU: the opt-in kernel paths (CPU-tested) — GPU tests with each, then A/B timings and profiles
  # (PDELTA_STATE_BWD_SPLIT, the split state backward, became the default on 2026-11-27)
  # PDELTA_WY_BLOCKED=1: WY forward in 16-row blocks
  export CUDA_VISIBLE_DEVICES=0
  timeout 100 python3 benchmarks/bench_kernels.py --T 32768 131072 --warmup 10 --rep 30 --ops pgdn pkda \
      --out "$OUT/kernels_base.json" >> "$OUT/kernels.log" 2>&1
  for flag in ${FLAGS:-PDELTA_WY_BLOCKED}; do
    env $flag=1 timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "not k256" -s \
        > "$OUT/gpu_tests_$flag.log" 2>&1; echo "$flag tests rc=$?"
    env $flag=1 timeout 100 python3 benchmarks/bench_kernels.py --T 32768 131072 --warmup 10 --rep 30 \
        --ops pgdn pkda --out "$OUT/kernels_$flag.json" >> "$OUT/kernels.log" 2>&1; echo "$flag timing rc=$?"
    env $flag=1 timeout 60 python3 benchmarks/profile_op.py --variant pgdn --T 32768 \
        --out "$OUT/profile_pgdn_$flag.txt" > /dev/null 2>&1
  done
  unset CUDA_VISIBLE_DEVICES
  ;;
wyab)  # one GPU: the WY forward kernels side by side (accuracy against float64, time; the op with each) for the
  # scalar decay (PDN/PGDN: row and blocked) and the per-channel decay (PKDA: the row kernel at 4 and 8 warps),
  # then the kernels' registers/spills under this image's Triton
  export CUDA_VISIBLE_DEVICES=0
  for decay in ${DECAYS:-channel scalar}; do
    timeout ${LIMIT:-150} python3 benchmarks/wy_forward_ab.py --decay $decay --T 32768 131072 \
        --out "$OUT/wy_ab_$decay.json" > "$OUT/wy_ab_$decay.log" 2>&1; echo "wy ab $decay rc=$?"
  done
  python3 benchmarks/kernel_resources.py --out "$OUT/kernel_resources.json" > "$OUT/kernel_resources.log" 2>&1
  unset CUDA_VISIBLE_DEVICES
  ;;
gap)  # one GPU, issue 3: the kernel GPU tests (session g's dW/dU reuse never ran on a GPU), then where fla's
  # GDN/KDA and our PGDN/PKDA spend a 32K fwd+bwd, kernel by kernel, then the same-process benchmark with fla at
  # 32K and 128K (carry .triton_autotune: fla then skips its autotuning)
  export CUDA_VISIBLE_DEVICES=0
  timeout 280 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -s > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"
  for v in fla-gdn pgdn fla-kda pkda; do
    (cd benchmarks && timeout 120 python3 profile_op.py --variant $v --T 32768 --out "$OUT/profile_$v.txt" \
        > /dev/null 2>&1); echo "profile $v rc=$?"
  done
  (cd "$OUT" && tar czf profiles.tgz profile_*.txt && rm -f profile_*.txt)
  timeout ${LIMIT:-240} python3 benchmarks/bench_kernels.py --T 32768 131072 --warmup 5 --rep 20 \
      --ops pgdn fla-gdn fla-pgdn pkda fla-kda fla-pkda --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
  echo "bench rc=$?"
  # the states remade in backward (session g, opt-in): time and peak beside the default rows above
  PDELTA_RECOMPUTE_STATES=1 timeout 120 python3 benchmarks/bench_kernels.py --T 32768 131072 --warmup 5 --rep 20 \
      --ops pgdn pkda --out "$OUT/kernels_recompute_states.json" >> "$OUT/kernels.log" 2>&1
  echo "recompute states rc=$?"
  unset CUDA_VISIBLE_DEVICES
  ;;
warps)  # one GPU: every kernel family at 4 and 8 warps (miscompile check against the default, then timing)
  CUDA_VISIBLE_DEVICES=0 timeout ${LIMIT:-540} python3 benchmarks/warps_sweep.py --variants pgdn pkda \
      --out "$OUT/warps.json" > "$OUT/warps.log" 2>&1; echo "warps rc=$?"
  ;;
accuracy)  # one GPU: ours and fla each against its own reference (benchmarks/accuracy_vs_fla.py), then num_stages
  # trials of the state pass and output backward; one process per op and per trial (an illegal memory access poisons
  # the CUDA context for the rest of its process), each under the call's time left ($BUDGET seconds, default 540)
  export CUDA_VISIBLE_DEVICES=0; mkdir -p "$OUT/acc"
  for op in fla-pgdn pgdn fla-gdn fla-pkda pkda fla-kda; do
    [ $SECONDS -lt $(( ${BUDGET:-540} - 100 )) ] || break
    timeout 100 python3 benchmarks/accuracy_vs_fla.py --T 8192 --H 16 --ops $op --out "$OUT/acc/$op.json" \
        > "$OUT/acc/$op.log" 2>&1; echo "accuracy $op rc=$? at ${SECONDS}s"
  done
  for s in STATE_FWD STATE_BWD STATE_GRADS OUTPUT_BWD_STATE; do
    [ $SECONDS -lt $(( ${BUDGET:-540} - 90 )) ] || break
    timeout 90 python3 benchmarks/warps_sweep.py --variants pgdn --settings PDELTA_STAGES_$s=2 \
        --out "$OUT/acc/stages_$s.json" > "$OUT/acc/stages_$s.log" 2>&1; echo "stages $s rc=$? at ${SECONDS}s"
  done
  (cd "$OUT" && tar czf accuracy.tgz acc && rm -rf acc)
  unset CUDA_VISIBLE_DEVICES
  ;;
single)  # one GPU (only one-GPU kinds lent): the kernel GPU tests first (CPU-only changes since the last GPU run),
  # per-kernel profiles of PGDN and PKDA at 32K, then the same-process benchmark with fla at 32K (and $TS if set)
  export CUDA_VISIBLE_DEVICES=0
  timeout ${TLIMIT:-230} python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -s > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$? at ${SECONDS}s"; tail -1 "$OUT/gpu_tests.log"
  for v in ${PROFILES:-pgdn pkda}; do
    (cd benchmarks && timeout 60 python3 profile_op.py --variant $v --T 32768 --out "$OUT/profile_$v.txt" \
        > /dev/null 2>&1); echo "profile $v rc=$? at ${SECONDS}s"
  done
  (cd "$OUT" && ls profile_*.txt > /dev/null 2>&1 && tar czf profiles.tgz profile_*.txt && rm -f profile_*.txt)
  timeout $(( ${BUDGET:-560} - SECONDS )) python3 benchmarks/bench_kernels.py --T ${TS:-32768} --warmup 5 --rep 20 \
      --ops ${OPS:-pgdn pkda fla-gdn fla-kda} --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
  echo "bench rc=$? at ${SECONDS}s"
  unset CUDA_VISIBLE_DEVICES
  ;;
gram)  # one GPU, session i: PKDA's split diagonal Gram blocks — the Gram and PKDA GPU tests, then PKDA timed with
  # the split and with the exact loop (PDELTA_GRAM_SPLIT=0), each in its own process, fla KDA beside, and a profile
  export CUDA_VISIBLE_DEVICES=0
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_triton_gram.py tests/test_gpu.py -k "gram or pkda" -s \
      > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$? at ${SECONDS}s"; tail -1 "$OUT/gpu_tests.log"
  for split in 1 0; do
    PDELTA_GRAM_SPLIT=$split timeout 120 python3 benchmarks/bench_kernels.py --T 32768 --warmup 5 --rep 20 \
        --ops ${OPS:-pkda} --out "$OUT/kernels_split$split.json" > "$OUT/kernels_split$split.log" 2>&1
    echo "bench split=$split rc=$? at ${SECONDS}s"
  done
  (cd benchmarks && timeout 60 python3 profile_op.py --variant pkda --T 32768 --out "$OUT/profile_pkda.txt" \
      > /dev/null 2>&1); echo "profile rc=$? at ${SECONDS}s"
  timeout $(( ${BUDGET:-560} - SECONDS )) python3 benchmarks/bench_kernels.py --T 32768 --warmup 5 --rep 20 \
      --ops fla-kda --out "$OUT/kernels_fla.json" > "$OUT/kernels_fla.log" 2>&1; echo "fla rc=$? at ${SECONDS}s"
  unset CUDA_VISIBLE_DEVICES
  ;;
strips)  # one GPU, session i: the Gram strips' shared row factors — Gram and PKDA GPU tests; PKDA's WY forward at 8 warps
  # (miscompile check + same-process timing); PKDA without the strips change ($AB_OLD: the previous gram_channel.py,
  # swapped in for one process); then the record benchmark with fla at 32K and 128K
  export CUDA_VISIBLE_DEVICES=0
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_triton_gram.py tests/test_gpu.py -k "gram or pkda" -s \
      > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$? at ${SECONDS}s"; tail -1 "$OUT/gpu_tests.log"
  timeout 120 python3 benchmarks/warps_sweep.py --variants pkda --settings PDELTA_WARPS_WY_CHANNEL_FWD=8 \
      --out "$OUT/sweep.json" > "$OUT/sweep.log" 2>&1; echo "sweep rc=$? at ${SECONDS}s"
  if [ -n "${AB_OLD:-}" ]; then
    cp kernels/gram_channel.py /tmp/gram_new.py && cp "$AB_OLD" kernels/gram_channel.py
    timeout 90 python3 benchmarks/bench_kernels.py --T 32768 --warmup 5 --rep 20 --ops pkda \
        --out "$OUT/kernels_old.json" > "$OUT/kernels_old.log" 2>&1; echo "old rc=$? at ${SECONDS}s"
    cp /tmp/gram_new.py kernels/gram_channel.py
  fi
  timeout $(( ${BUDGET:-560} - SECONDS )) python3 benchmarks/bench_kernels.py --T 32768 131072 --warmup 5 --rep 20 \
      --ops pkda fla-kda pgdn fla-gdn --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1; echo "bench rc=$? at ${SECONDS}s"
  unset CUDA_VISIBLE_DEVICES
  ;;
optini)  # one GPU: session i's CPU-tested changes — the GPU tests at the defaults (PGDN's WY backward without K̂Pᵀ) and
  # with the three opt-ins set, then PGDN and PKDA at 32K per setting, one process each (default, each, all).
  # Next session's first call (docs/gpu_runbook.md "Next work" 0)
  export CUDA_VISIBLE_DEVICES=0
  # both test runs at once (correctness only; they share the GPU), then the timings alone on it
  timeout 250 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -s > "$OUT/gpu_tests.log" 2>&1 &
  PDELTA_REMAKE_FROM_INVERSE=1 PDELTA_WY_CHANNEL_BLOCKED=1 PDELTA_SCRATCH_TRANSPOSE=1 timeout 250 python3 -m pytest -q \
      -p no:cacheprovider tests/test_gpu.py -k "${TESTS:-pgdn_16k or pkda_4k or varlen}" -s \
      > "$OUT/gpu_tests_optins.log" 2>&1 &
  wait
  echo "gpu tests done at ${SECONDS}s"; tail -1 "$OUT/gpu_tests.log"; tail -1 "$OUT/gpu_tests_optins.log"
  i=0
  for setting in PDELTA_DEFAULT=1 PDELTA_REMAKE_FROM_INVERSE=1 PDELTA_WY_CHANNEL_BLOCKED=1 PDELTA_SCRATCH_TRANSPOSE=1 \
      "PDELTA_REMAKE_FROM_INVERSE=1 PDELTA_WY_CHANNEL_BLOCKED=1 PDELTA_SCRATCH_TRANSPOSE=1"; do
    left=$(( ${BUDGET:-585} - SECONDS )); [ "$left" -gt 100 ] && left=100; [ "$left" -lt 20 ] && break
    env $setting timeout $left python3 benchmarks/bench_kernels.py --T 32768 --warmup 5 --rep 20 --ops pgdn pkda \
        --out "$OUT/kernels_$i.json" > "$OUT/kernels_$i.log" 2>&1; echo "bench [$setting] rc=$? at ${SECONDS}s"
    i=$((i + 1))
  done
  unset CUDA_VISIBLE_DEVICES
  ;;
glue)  # one GPU, session k: the glue cuts (q/k relayout fused into the l2 norm, O/dO in the stream layout, K̂'s
  # gradients summed in-kernel, dV in V's dtype) — GPU tests, then ours now against the tree before them ($AB_OLD, a
  # `git archive` of that commit, carried), one process each, alternating; then fla GDN/KDA alone (fills the autotune
  # cache that triton_autotune.tgz brings back)
  export CUDA_VISIBLE_DEVICES=0
  timeout 260 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -s > "$OUT/gpu_tests.log" 2>&1 &
  if [ -n "${AB_OLD:-}" ]; then  # compile the old tree's kernels beside the tests (no timing)
    (cd "$AB_OLD" && ln -sfn ../kernels pdelta_cp/kernels && ln -sfn ../megatron_patches pdelta_cp/megatron_patches &&
     PYTHONPATH=/tmp/site:$PWD timeout 250 python3 benchmarks/bench_kernels.py --T 32768 --warmup 1 --rep 1        --ops pgdn pkda --out /tmp/warm_old.json > "$OUT/warm_old.log" 2>&1) &
  fi
  wait; echo "gpu tests done at ${SECONDS}s"; tail -1 "$OUT/gpu_tests.log"
  for round in 1 2; do
    for tree in new old; do
      left=$(( ${BUDGET:-585} - SECONDS )); [ "$left" -gt 90 ] && left=90; [ "$left" -lt 30 ] && break 2
      if [ "$tree" = new ]; then
        timeout $left python3 benchmarks/bench_kernels.py --T 32768 131072 --warmup 5 --rep 20 --ops pgdn pkda \
            --out "$OUT/kernels_${tree}_$round.json" > "$OUT/kernels_${tree}_$round.log" 2>&1
      elif [ -n "${AB_OLD:-}" ]; then
        (cd "$AB_OLD" && PYTHONPATH=/tmp/site:$PWD timeout $left python3 benchmarks/bench_kernels.py --T 32768 131072 \
            --warmup 5 --rep 20 --ops pgdn pkda --out "$OUT/kernels_${tree}_$round.json") > "$OUT/kernels_${tree}_$round.log" 2>&1
      fi
      echo "bench $tree round $round rc=$? at ${SECONDS}s"
    done
  done
  left=$(( ${BUDGET:-585} - SECONDS ))
  [ "$left" -gt 30 ] && timeout $left python3 benchmarks/bench_kernels.py --T 32768 131072 --warmup 5 --rep 20 \
      --ops fla-gdn fla-kda --out "$OUT/kernels_fla.json" > "$OUT/kernels_fla.log" 2>&1; echo "fla rc=$? at ${SECONDS}s"
  unset CUDA_VISIBLE_DEVICES
  ;;
ab)  # one GPU, session l: A/B of env settings ($SETTINGS, e.g. "default PDELTA_STATES_BF16=1"). GPU tests: all at
  # default, $TESTS_AB (a -k filter) under every other setting, side by side; then one benchmark process per setting,
  # alternating ($ROUNDS rounds, $TS tokens, $OPS ours); then fla ($FLA_OPS) alone and profiles ($PROFILE: op names),
  # while the budget lasts
  export CUDA_VISIBLE_DEVICES=0
  default_gpu_tests ${TESTLIMIT:-300}
  n=0
  for setting in ${SETTINGS:-default}; do
    [ "$setting" = default ] && continue; n=$((n + 1))
    env $setting timeout ${TESTLIMIT:-300} python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -s \
        -k "${TESTS_AB:-pgdn_16k or pkda_4k or varlen}" > "$OUT/gpu_tests_ab$n.log" 2>&1 &
  done
  wait; echo "gpu tests done at ${SECONDS}s"; tail -qn1 "$OUT"/gpu_tests*.log
  for round in $(seq ${ROUNDS:-2}); do
    n=0
    for setting in ${SETTINGS:-default}; do
      n=$((n + 1)); left=$(( ${BUDGET:-570} - SECONDS )); [ "$left" -gt 100 ] && left=100; [ "$left" -lt 30 ] && break 2
      [ "$setting" = default ] && setting=PDELTA_AB_DEFAULT=1
      env $setting timeout $left python3 benchmarks/bench_kernels.py --T ${TS:-32768 131072} --warmup 5 --rep 20 \
          --ops ${OPS:-pgdn pkda} --out "$OUT/kernels_ab${n}_$round.json" > "$OUT/kernels_ab${n}_$round.log" 2>&1
      echo "bench $setting round $round rc=$? at ${SECONDS}s"
    done
  done
  left=$(( ${BUDGET:-570} - SECONDS ))
  [ "$left" -gt 30 ] && timeout $left python3 benchmarks/bench_kernels.py --T ${TS:-32768 131072} --warmup 5 --rep 20 \
      --ops ${FLA_OPS:-fla-gdn fla-kda} --out "$OUT/kernels_fla.json" > "$OUT/kernels_fla.log" 2>&1
  echo "fla rc=$? at ${SECONDS}s"
  profiles
  unset CUDA_VISIBLE_DEVICES
  ;;
sweep)  # one GPU, session m: GPU tests at the default (two processes) and under each of $SETTINGS_TESTS beside them;
  # then one process per T sweeping $SWEEP (warps_sweep.py --settings: miscompile check, then fwd+bwd against the
  # default in the same process), profiles ($PROFILE) and fla ($FLA_OPS) while the budget lasts
  export CUDA_VISIBLE_DEVICES=0
  [ -z "${SKIP_DEFAULT_TESTS:-}" ] && default_gpu_tests ${TESTLIMIT:-240}
  n=0
  for setting in ${SETTINGS_TESTS:-}; do
    n=$((n + 1))
    env ${setting//,/ } timeout ${TESTLIMIT:-240} python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -s \
        -k "${TESTS_AB:-pgdn_16k or weak_decay}" > "$OUT/gpu_tests_ab$n.log" 2>&1 &  # VAR=1,VAR2=2: several
  done
  wait; echo "gpu tests done at ${SECONDS}s"; tail -qn1 "$OUT"/gpu_tests*.log
  for TH in ${TS:-32768 131072}; do  # T, or T:H for another head count
    T=${TH%%:*}; H=16; [ "$TH" != "$T" ] && H=${TH##*:}
    left=$(( ${BUDGET:-570} - SECONDS )); [ "$left" -lt 40 ] && break
    timeout $left python3 benchmarks/warps_sweep.py --variants ${OPS:-pgdn} --T $T --H $H --tolerance 2e-2 \
        --rep-ms ${REP_MS:-400} --settings $SWEEP --out "$OUT/sweep_${T}_h$H.json" > "$OUT/sweep_${T}_h$H.log" 2>&1
    echo "sweep $T H=$H rc=$? at ${SECONDS}s"
  done
  profiles  # before fla: a cold fla op (KDA, PKDA) can autotune for the rest of the call
  left=$(( ${BUDGET:-570} - SECONDS ))
  [ "$left" -gt 30 ] && [ -n "${FLA_OPS:-}" ] && timeout $left python3 benchmarks/bench_kernels.py --T ${FLA_TS:-32768} \
      --warmup 5 --rep 20 --ops $FLA_OPS --out "$OUT/kernels_fla.json" > "$OUT/kernels_fla.log" 2>&1
  echo "fla rc=$? at ${SECONDS}s"
  unset CUDA_VISIBLE_DEVICES
  ;;
record)  # one GPU: tests/test_gpu.py at the defaults (two processes), then the record benchmark — every op, ours and
  # fla's, in one process, the target lengths first (carry .triton_autotune: fla's KDA autotunes for minutes cold)
  export CUDA_VISIBLE_DEVICES=0
  if [ -z "${SKIP_DEFAULT_TESTS:-}" ]; then  # (set it when the same tree's tests passed in an earlier call)
    default_gpu_tests ${TESTLIMIT:-200}
    wait; echo "gpu tests done at ${SECONDS}s"; tail -qn1 "$OUT"/gpu_tests*.log
  fi
  timeout $(( ${BUDGET:-570} - SECONDS )) python3 benchmarks/bench_kernels.py --T ${TS:-32768 131072 8192} \
      --batch-case --warmup 5 --rep 20 --ops ${OPS:-pdn pgdn pkda fla-gdn fla-pgdn fla-kda fla-pkda} \
      --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
  echo "bench rc=$? at ${SECONDS}s"
  profiles
  unset CUDA_VISIBLE_DEVICES
  ;;
validate)  # 2 GPUs, session h: the CP GPU tests (the output/state-pass gradient handoff under CP), then side by side
  # the kernel GPU tests on GPU 0 and the same-process benchmark with fla on GPU 1 (timings: no other work on GPU 1)
  timeout ${CPLIMIT:-220} $TR --nproc-per-node 2 -m pytest -q -p no:cacheprovider -m gpu tests/distributed/test_cp_gpu.py \
      > "$OUT/cp_tests.log" 2>&1; echo "cp tests rc=$? at ${SECONDS}s"
  { CUDA_VISIBLE_DEVICES=0 timeout 230 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -s \
      > "$OUT/gpu_tests.log" 2>&1
    PDELTA_RECOMPUTE_STATES=1 CUDA_VISIBLE_DEVICES=0 timeout 60 python3 -m pytest -q -p no:cacheprovider \
      tests/test_gpu.py -s -k "pgdn_16k or pkda_4k or varlen" > "$OUT/gpu_tests_recompute_states.log" 2>&1; } &
  CUDA_VISIBLE_DEVICES=1 timeout 230 python3 benchmarks/bench_kernels.py --T 32768 131072 --warmup 5 --rep 20 \
      --ops pgdn fla-gdn pkda fla-kda --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1 &
  wait; echo "gpu tests and bench done at ${SECONDS}s"; tail -1 "$OUT/gpu_tests.log"
  ;;
esac
