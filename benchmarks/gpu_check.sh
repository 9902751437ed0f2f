#!/usr/bin/env bash
# The GPU check: one command on a one-GPU machine, most important first, each step with its own
# time limit, results packed after every step (so a run cut short still returns what it has).
#   bash benchmarks/gpu_check.sh          (or `make gpu-check`; about 8 minutes on one H100)
#   SMOKE=1 bash benchmarks/gpu_check.sh  (the same steps on CPU with tiny sizes: checks the
#                                          script itself, no figures)
# 1. single-process throughput, ResNet-110 K=55, batch 1024, 3x32x32: BP and DGL+MLAAN side by
#    side in bf16 + channels-last with CUDA graphs, the same without graphs, and fp32;
# 2. the same for ResNet-32 K=16 in bf16;
# 3. GPU busy over traced steady-state steps of ResNet-110 DGL+MLAAN (bf16, graphs);
# 4. the GPU tests: CUDA graph replay equals eager steps, a NaN planted inside the graph, then
#    ranks sharing the GPU against the single process (tests/test_gpu.py);
# 5. memory per device in the paper's Table 3 shape on the GPU (pipemlaan.profile --table3).
# Results land in benchmarks/results/ (gpu-check-<stamp>.log, throughput-cuda-*, memory-cuda-*,
# trace summaries) and, when $OUT is set, as $OUT/gpu-check.log + $OUT/gpu-results.tar.gz.
# Runs from the source tree (PYTHONPATH=.): the GPU machine needs torch, torchvision, rich and
# nvidia-ml-py, and nothing installed from this project.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
STAMP=$(date -u +%Y-%m-%d-%H%M)
RES=benchmarks/results
T=1   # time-limit scale
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu; RES=$(mktemp -d); export OMP_NUM_THREADS=1
  BIG=(--model resnet8 --K 4 --batch 16 --image 3,8,8)
  SMALL=(--model resnet8 --K 2 --batch 16 --image 3,8,8)
  STEPS=(--steps 6 --warmup 2 --log-every 2)
  TABLE=(--batch 8 --imagenet-batch 2)
  BUSY_NET=(--model.name=resnet8 --model.K=4 --train.batch_size=16 --data.synthetic_image=[3,8,8])
else
  DEV=cuda
  BIG=(--model resnet110 --K 55 --batch 1024 --image 3,32,32)
  SMALL=(--model resnet32 --K 16 --batch 1024 --image 3,32,32)
  STEPS=(--steps 16 --warmup 6 --log-every 2)
  TABLE=(--batch 1024 --imagenet-batch 128)
  BUSY_NET=(--model.name=resnet110 --model.K=55 --train.batch_size=1024 --data.synthetic_image=[3,32,32])
fi
mkdir -p "$RES"
export PIPEMLAAN_RESULTS=$RES      # where benchmarks/throughput.py writes
LOG=$RES/gpu-check-$STAMP.log
status=0
step() { echo; echo "=== [$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
run() { "$@" 2>&1 | tee -a "$LOG"; local rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { echo "FAILED ($rc): $*" | tee -a "$LOG"; status=1; }; }
pack() {   # what this check wrote so far, for $OUT (at most a few files come back from there)
  [ -n "${OUT:-}" ] || return 0
  cp "$LOG" "$OUT/gpu-check.log"
  (cd "$RES" && tar czf "$OUT/gpu-results.tar.gz" $(ls | grep -e "$STAMP" -e "-$DEV-" 2>/dev/null)) 2>/dev/null
}

step "device ($DEV)"
[ "$DEV" = cuda ] && run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))"

VARIANTS="bf16=;bf16-eager=--train.cuda_graphs=false;fp32=--train.bf16=false"
step "1/5 single-process throughput (${BIG[*]}): $VARIANTS"
run timeout $((300 * T)) $PY -m benchmarks.throughput --device $DEV --ranks 1 --methods bp,dgl+mlaan \
    "${BIG[@]}" "${STEPS[@]}" --repeats 1 --variants "$VARIANTS" --name big
pack

step "2/5 single-process throughput (${SMALL[*]}), bf16"
run timeout $((100 * T)) $PY -m benchmarks.throughput --device $DEV --ranks 1 --methods bp,dgl+mlaan \
    "${SMALL[@]}" "${STEPS[@]}" --repeats 1 --variants "bf16=" --name small
pack

step "3/5 GPU busy over traced steps of a single-process DGL+MLAAN run (bf16, NHWC, CUDA graph)"
run timeout $((120 * T)) $PY -m pipemlaan.train --data.name=synthetic --data.synthetic_size=16384 \
    "${BUSY_NET[@]}" --method.name=dgl --method.mlm=true --method.lam=true --train.epochs=1 \
    --train.max_steps=14 --train.device=$DEV --run.progress=false --run.log_every=7 \
    --run.profile_steps=[8,11] --run.overwrite=true --run.dir=/tmp/pipemlaan-gpu-check \
    --run.name=busy
run $PY -m benchmarks.gpu_busy /tmp/pipemlaan-gpu-check/busy/traces/rank0.json
run cp /tmp/pipemlaan-gpu-check/busy/summary.json "$RES/busy-summary-$STAMP.json"
gzip -c /tmp/pipemlaan-gpu-check/busy/traces/rank0.json > "$RES/trace-dgl-mlaan-$STAMP.json.gz"
pack

step "4/5 GPU tests: CUDA graphs first, then ranks sharing the GPU"
if [ "$DEV" = cuda ]; then
  run timeout 150 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -k "cuda_graph"
  pack
  run timeout 200 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -k "not cuda_graph"
else
  run timeout 60 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider   # all skip
fi
pack

step "5/5 memory per device (Table 3 shape), one process and a 4-rank pipeline"
if [ "$DEV" = cuda ]; then
  run timeout 200 $PY -m pipemlaan.profile --table3 --ranks 4 "${TABLE[@]}" --device cuda \
      --json "$RES/memory-cuda-$STAMP.json"
else   # the same per-rank stage-alone path on CPU, one small network
  run timeout 60 $PY -c "from pipemlaan.profile import table3, METHODS; import torch
print(table3(2, 8, 2, methods=METHODS[:3], nets=[('ResNet-32 (K=16)', 'resnet8', 4, 'cifar')], alone=True, steps=1))"
fi
pack

step "done (status $status); results: $RES/*$STAMP*"
pack
exit $status
