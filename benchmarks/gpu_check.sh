#!/usr/bin/env bash
# The GPU check: one command on a one-GPU machine, at most about 8 minutes on one H100.
#   bash benchmarks/gpu_check.sh          (or `make gpu-check`)
#   SMOKE=1 bash benchmarks/gpu_check.sh  (the same steps on CPU with tiny sizes, in about
#                                          2 minutes: checks the script itself, no figures)
# 1. the GPU tests (tests/test_gpu.py: ranks sharing the GPU equal the single process, async,
#    replicas, bf16 + channels-last, a dead rank);
# 2. single-process throughput on the GPU, BP and the local methods side by side
#    (benchmarks/throughput.py --device cuda);
# 3. memory per device in the paper's Table 3 shape, one process and each rank of a 4-rank
#    pipeline, measured on the GPU (python -m pipemlaan.profile --table3 --device cuda);
# 4. per-stage step times on the GPU and the images/s they project for 2, 4 and 8 GPUs,
#    beside BP's 1F1B (benchmarks/gpu_projection.py), in fp32 and bf16;
#    and the GPU busy fraction over traced steps of a single-process run (benchmarks/gpu_busy.py);
# 5. a 4-rank async pipeline on the one GPU (ranks share it through host memory).
# Results land in benchmarks/results/*-<date>.* and, when $OUT is set, in $OUT too.
# Runs from the source tree (PYTHONPATH=.), so the GPU machine needs torch, torchvision,
# rich and nvidia-ml-py, and nothing installed from this project.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
PY=${PYTHON:-python}
STAMP=$(date -u +%Y-%m-%d-%H%M)
RES=benchmarks/results
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu; RES=$(mktemp -d); export OMP_NUM_THREADS=1
  NET=(--model resnet8 --K 4 --batch 16 --image 3,8,8)
  TRAIN_NET=(--model.name=resnet8 --model.K=4 --train.batch_size=16 --data.synthetic_image=[3,8,8])
  STEPS=(--steps 4 --warmup 2 --log-every 2); TABLE=(--batch 8 --imagenet-batch 2)
  PROJ=(--model resnet8 --K 4 --batch 16 --image 3,16,16 --stages 2 --steps 2 --warmup 1)
  BUSY_NET=(--model.name=resnet8 --model.K=4 --train.batch_size=16 --data.synthetic_image=[3,8,8])
else
  DEV=cuda
  NET=(--model resnet110 --K 55 --batch 1024 --image 3,32,32)
  TRAIN_NET=(--model.name=resnet32 --model.K=16 --train.batch_size=256 --data.synthetic_image=[3,32,32])
  STEPS=(--steps 16 --warmup 6 --log-every 2); TABLE=(--batch 1024 --imagenet-batch 128)
  PROJ=()
  BUSY_NET=(--model.name=resnet110 --model.K=55 --train.batch_size=1024 --data.synthetic_image=[3,32,32])
fi
mkdir -p "$RES"
export PIPEMLAAN_RESULTS=$RES      # where benchmarks/throughput.py writes
LOG=$RES/gpu-check-$STAMP.log
status=0
step() { echo; echo "=== [$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
run() { "$@" 2>&1 | tee -a "$LOG"; local rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { echo "FAILED ($rc): $*" | tee -a "$LOG"; status=1; }; }

step "device ($DEV)"
[ "$DEV" = cuda ] && run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))"

step "1/5 GPU tests"
if [ "$DEV" = cuda ]; then
  run timeout 240 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
else
  run timeout 60 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider   # all skip
fi

step "2/5 single-process throughput (${NET[*]})"
run timeout 150 $PY -m benchmarks.throughput --device $DEV --ranks 1 --methods bp,dgl,dgl+mlaan \
    "${NET[@]}" "${STEPS[@]}" --repeats 1

step "3/5 memory per device (Table 3 shape), 4-rank pipeline"
if [ "$DEV" = cuda ]; then
  run timeout 150 $PY -m pipemlaan.profile --table3 --ranks 4 "${TABLE[@]}" --device cuda \
      --json "$RES/memory-cuda-$STAMP.json"
else   # the same per-rank stage-alone path on CPU, one small network
  run timeout 60 $PY -c "from pipemlaan.profile import table3, METHODS; import torch
print(table3(2, 8, 2, methods=METHODS[:3], nets=[('ResNet-32 (K=16)', 'resnet8', 4, 'cifar')], alone=True, steps=1))"
fi

step "4/5 per-stage times and projected images/s on 2, 4, 8 GPUs (fp32, then bf16)"
run timeout 120 $PY -m benchmarks.gpu_projection --device $DEV "${PROJ[@]}" \
    --json "$RES/gpu-projection-fp32-$STAMP.json"
run timeout 90 $PY -m benchmarks.gpu_projection --device $DEV "${PROJ[@]}" --bf16 \
    --json "$RES/gpu-projection-bf16-$STAMP.json"

step "4b/5 GPU busy over traced steps of a single-process DGL+MLAAN run (defaults: bf16, NHWC)"
run timeout 120 $PY -m pipemlaan.train --data.name=synthetic --data.synthetic_size=16384 \
    "${BUSY_NET[@]}" --method.name=dgl --method.mlm=true --method.lam=true --train.epochs=1 \
    --train.max_steps=14 --train.device=$DEV --run.progress=false --run.log_every=7 \
    --run.profile_steps=[8,11] --run.overwrite=true --run.dir=/tmp/pipemlaan-gpu-check \
    --run.name=busy
run $PY -m benchmarks.gpu_busy /tmp/pipemlaan-gpu-check/busy/traces/rank0.json
run cp /tmp/pipemlaan-gpu-check/busy/traces/rank0.json "$RES/trace-dgl-mlaan-$STAMP.json"

step "5/5 a 4-rank async pipeline sharing the device"
run timeout 120 torchrun --standalone --nproc_per_node=4 -m pipemlaan.train \
    --data.name=synthetic --data.synthetic_size=2048 "${TRAIN_NET[@]}" --train.epochs=1 \
    --train.device=$DEV --run.progress=false --run.log_every=4 --run.overwrite=true \
    --run.dir=/tmp/pipemlaan-gpu-check --run.name=shared4
run cp /tmp/pipemlaan-gpu-check/shared4/summary.json "$RES/shared-device-4ranks-$STAMP.json"

if [ -n "${OUT:-}" ]; then cp "$RES"/*"$STAMP"* "$OUT"/ 2>/dev/null; cp "$RES"/throughput-$DEV-* "$OUT"/ 2>/dev/null; fi
step "done (status $status); results: $RES/*$STAMP*"
exit $status
