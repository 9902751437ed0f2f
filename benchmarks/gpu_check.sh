#!/usr/bin/env bash
# The GPU check: one command on a one-GPU machine (H100 or H200), at most BUDGET seconds (480:
# 8 minutes) in all, most important first, each step with its own time limit (cut to what is
# left of the budget; a step with under 20 s left is skipped, saying so), results packed after
# every step (so a run cut short still returns what it has).
#   bash benchmarks/gpu_check.sh          (or `make gpu-check`)
#   SMOKE=1 bash benchmarks/gpu_check.sh  (the same steps on CPU with tiny sizes: checks the
#                                          script itself, no figures; about a minute)
# 1. fused kernels: single-process images/s, ResNet-110 K=55, batch 1024, bf16 + channels-last +
#    CUDA graph: BP and DGL+MLAAN side by side, then DGL+MLAAN with train.compile=on (inductor's
#    kernels inside the graph; its run seconds include the compilation);
# 2. the compile tests on the GPU: compiled + graphed steps against eager ones (fp32, bf16),
#    compiled pipeline ranks sharing the GPU against the eager single process;
# 3. Table 3 per rank on the GPU: CUDA's allocator peak of one process and of each rank of a
#    4-rank pipeline (each stage alone, real shapes), ResNet-110 K=55 / ResNet-32 K=16 at batch
#    1024 and ResNet-34 K=17 at 224x224, fp32 (the paper's setting) then bf16, BP and DGL+MLAAN
#    first, the paper's figures beside ours (benchmarks.table3);
# 4. what the pipeline costs on one device: the 4-rank DGL+MLAAN pipeline sharing the GPU (gloo
#    through pinned host buffers) against the single process, in one call, with each rank's
#    compute / wait split (benchmarks/throughput.py --ranks 1,4);
# 5. projections to 2, 4 and 8 GPUs (one per rank, NCCL) from per-stage CUDA times and boundary
#    bytes measured here, beside BP pipelined by torch.distributed.pipelining 1F1B and BP with
#    DDP, plus step 4's per-rank host staging (benchmarks/projection.py measure --shared);
# 6. GPU busy over traced steady-state steps of the compiled, graphed DGL+MLAAN step;
# 7. the other GPU tests (CUDA graph replay, ranks sharing the GPU; tests/test_gpu.py), with
#    what is left of the budget.
# Results land in benchmarks/results/ (gpu-check-<stamp>.log, throughput-cuda-*, memory-cuda-*,
# projection-cuda-*, trace summaries) and, when $OUT is set, as $OUT/gpu-check.log +
# $OUT/gpu-results.tar.gz. Runs from the source tree (PYTHONPATH=.): the GPU machine needs torch
# (with triton and a C compiler, which triton builds its launchers with, for the compilation),
# torchvision, rich and nvidia-ml-py, and nothing installed from this project. Compiled kernels
# are cached under /tmp/torchinductor_$USER/pipemlaan: steps after the first compile faster.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
STAMP=$(date -u +%Y-%m-%d-%H%M)
START=$(date +%s)
BUDGET=${BUDGET:-480}
RES=benchmarks/results
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu; RES=$(mktemp -d); export OMP_NUM_THREADS=1
  BIG=(--model resnet14 --K 5 --batch 16 --image 3,8,8)     # 4 ranks need K >= 5
  STEPS=(--steps 4 --warmup 2 --log-every 2)
  TABLE=(--nets resnet8:4 --methods bp,dgl+mlaan --ranks 2 --batch 8 --alone)
  PROJ=(--model resnet14 --K 5 --batch 16 --image 3,8,8 --stages 2,4 --steps 1 --warmup 1)
  BUSY_NET=(--model.name=resnet8 --model.K=4 --train.batch_size=16 --data.synthetic_image=[3,8,8])
  BUSY_STEPS=(--train.max_steps=6 --run.profile_steps=[4,5])
  COMPILE=auto     # eager on CPU: compiling there takes a minute and checks nothing of the script
else
  DEV=cuda
  BIG=(--model resnet110 --K 55 --batch 1024 --image 3,32,32)
  STEPS=(--steps 16 --warmup 6 --log-every 2)
  TABLE=(--ranks 4 --batch 1024 --imagenet-batch 128)
  PROJ=(--model resnet110 --K 55 --batch 1024 --image 3,32,32 --stages 2,4,8 --steps 4 --warmup 1)
  BUSY_NET=(--model.name=resnet110 --model.K=55 --train.batch_size=1024 --data.synthetic_image=[3,32,32])
  BUSY_STEPS=(--train.max_steps=14 --run.profile_steps=[8,11])
  COMPILE=on       # a compilation that fails says so in the log (and the run goes on eagerly)
fi
mkdir -p "$RES"
export PIPEMLAAN_RESULTS=$RES      # where benchmarks/throughput.py writes
LOG=$RES/gpu-check-$STAMP.log
MARK=$(mktemp)                      # results newer than this are this check's
status=0
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
step() { echo; echo "=== [$(date -u +%H:%M:%S), $(( $(date +%s) - START )) of ${BUDGET} s] $*" | tee -a "$LOG"; }
run() { "$@" 2>&1 | tee -a "$LOG"; local rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { echo "FAILED ($rc): $*" | tee -a "$LOG"; status=1; }; }
limited() {   # limited SECONDS CMD...: CMD under min(SECONDS, what is left of the budget)
  local want=$1 l; shift; l=$(( $(left) - 10 ))
  [ "$l" -gt "$want" ] && l=$want
  if [ "$l" -lt 20 ]; then echo "SKIPPED (the budget is spent): $*" | tee -a "$LOG"; status=1; return; fi
  echo "(time limit ${l} s)" | tee -a "$LOG"
  run timeout -k 5 "$l" "$@"
}
pack() {   # what this check wrote so far, for $OUT (at most a few files come back from there)
  [ -n "${OUT:-}" ] || return 0
  cp "$LOG" "$OUT/gpu-check.log"
  (cd "$RES" && find . -maxdepth 1 -type f -newer "$MARK" -printf '%P\n' \
      | tar czf "$OUT/gpu-results.tar.gz" -T -) 2>/dev/null
}

step "device ($DEV)"
[ "$DEV" = cuda ] && run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))
from pipemlaan.engine.compiled import inductor_unavailable
print('inductor:', inductor_unavailable(torch.device('$DEV')) or 'available')"
pack

VARIANTS="bf16=;bf16-compiled:dgl+mlaan=--train.compile=$COMPILE"
step "1/7 fused kernels: single-process images/s (${BIG[*]}), bf16 + CUDA graph, eager kernels vs torch.compile"
limited 170 $PY -m benchmarks.throughput --device $DEV --ranks 1 --methods bp,dgl+mlaan \
    "${BIG[@]}" "${STEPS[@]}" --repeats 1 --variants "$VARIANTS" --timeout 150 --name compile
pack

step "2/7 GPU tests: train.compile against eager steps (graphed single process, pipeline ranks)"
if [ "$DEV" = cuda ]; then
  limited 120 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -k compile
else
  limited 60 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -k compile   # skip
fi
pack

step "3/7 Table 3 per rank: one process and each rank of a 4-rank pipeline, fp32 then bf16"
limited 110 $PY -m benchmarks.table3 "${TABLE[@]}" --device $DEV \
    --precisions fp32,bf16 --steps 2 --warmup 1 --json "$RES/memory-$DEV-$STAMP.json"
pack

step "4/7 the 4-rank DGL+MLAAN pipeline sharing one device against the single process (${BIG[*]}, bf16)"
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} \
  limited 100 $PY -m benchmarks.throughput --device $DEV --ranks 1,4 --methods dgl+mlaan \
    "${BIG[@]}" "${STEPS[@]}" --repeats 1 --variants "bf16=" --timeout 90 --name shared
pack

step "5/7 projected: 2, 4 and 8 GPUs from stage times measured here, beside BP 1F1B and BP DDP"
SHARED=$(ls -t "$RES"/throughput-$DEV-shared-*.json 2>/dev/null | head -1)
limited 80 $PY -m benchmarks.projection measure --device $DEV "${PROJ[@]}" \
    ${SHARED:+--shared "$SHARED"} --json "$RES/projection-$DEV-$STAMP.json"
pack

step "6/7 GPU busy over traced steps of the compiled single-process DGL+MLAAN step (bf16, graph)"
rm -rf /tmp/pipemlaan-gpu-check/busy
limited 75 $PY -m pipemlaan.train --data.name=synthetic --data.synthetic_size=16384 \
    "${BUSY_NET[@]}" --method.name=dgl --method.mlm=true --method.lam=true --train.epochs=1 \
    "${BUSY_STEPS[@]}" --train.compile=$COMPILE --train.device=$DEV --run.progress=false \
    --run.log_every=7 --run.overwrite=true --run.dir=/tmp/pipemlaan-gpu-check --run.name=busy
if [ -f /tmp/pipemlaan-gpu-check/busy/traces/rank0.json ]; then
  run $PY -m benchmarks.gpu_busy /tmp/pipemlaan-gpu-check/busy/traces/rank0.json
  run cp /tmp/pipemlaan-gpu-check/busy/summary.json "$RES/busy-summary-$DEV-$STAMP.json"
  gzip -c /tmp/pipemlaan-gpu-check/busy/traces/rank0.json > "$RES/trace-dgl-mlaan-$DEV-$STAMP.json.gz"
fi
pack

step "7/7 the other GPU tests: CUDA graphs first, then ranks sharing the GPU"
if [ "$DEV" = cuda ]; then
  limited 60 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -k "cuda_graph and not compile"
  pack
  limited 200 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -k "not cuda_graph and not compile"
fi
pack

step "done (status $status); results: $RES (this check's: newer than its start)"
ls -t "$RES" | head -20 | tee -a "$LOG"
pack
rm -f "$MARK"
exit $status
