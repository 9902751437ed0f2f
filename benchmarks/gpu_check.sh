#!/usr/bin/env bash
# The GPU check: one command on a one-GPU machine, at most about 8 minutes on one H100.
#   bash benchmarks/gpu_check.sh          (or `make gpu-check`)
# 1. the GPU tests (tests/test_gpu.py: ranks sharing the GPU equal the single process, async,
#    replicas, bf16 + channels-last, a dead rank);
# 2. single-process throughput on the GPU, BP and the local methods side by side
#    (benchmarks/throughput.py --device cuda);
# 3. memory per device in the paper's Table 3 shape, one process and each rank of a 4-rank
#    pipeline, measured on the GPU (python -m pipemlaan.profile --table3 --device cuda);
# 4. per-stage step times on the GPU and the images/s they project for 2, 4 and 8 GPUs,
#    beside BP's 1F1B (benchmarks/gpu_projection.py), in fp32 and bf16;
# 5. a 4-rank async pipeline on the one GPU (ranks share it through host memory).
# Results land in benchmarks/results/*-cuda-<date>.* and, when $OUT is set, in $OUT too.
# Runs from the source tree (PYTHONPATH=.), so the GPU machine needs torch, torchvision,
# rich and nvidia-ml-py, and nothing installed from this project.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=4
PY=${PYTHON:-python}
STAMP=$(date -u +%Y-%m-%d-%H%M)
RES=benchmarks/results
mkdir -p "$RES"
LOG=$RES/gpu-check-$STAMP.log
status=0
step() { echo; echo "=== [$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
run() { "$@" 2>&1 | tee -a "$LOG"; local rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { echo "FAILED ($rc): $*" | tee -a "$LOG"; status=1; }; }

step "device"
run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

step "1/5 GPU tests"
run timeout 240 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider

step "2/5 single-process throughput on the GPU (ResNet-110 K=55, batch 1024, 3x32x32)"
run timeout 150 $PY -m benchmarks.throughput --device cuda --ranks 1 --methods bp,dgl,dgl+mlaan \
    --model resnet110 --K 55 --batch 1024 --image 3,32,32 --steps 16 --warmup 6 \
    --log-every 2 --repeats 1

step "3/5 memory per device (Table 3 shape), 4-rank pipeline, on the GPU"
run timeout 150 $PY -m pipemlaan.profile --table3 --ranks 4 --batch 1024 --imagenet-batch 128 \
    --device cuda --json "$RES/memory-cuda-$STAMP.json"

step "4/5 per-stage GPU times and projected images/s on 2, 4, 8 GPUs (fp32, then bf16)"
run timeout 120 $PY -m benchmarks.gpu_projection --json "$RES/gpu-projection-fp32-$STAMP.json"
run timeout 90 $PY -m benchmarks.gpu_projection --bf16 --json "$RES/gpu-projection-bf16-$STAMP.json"

step "5/5 a 4-rank async pipeline sharing the GPU"
run timeout 120 torchrun --standalone --nproc_per_node=4 -m pipemlaan.train \
    --data.name=synthetic --data.synthetic_image=[3,32,32] --data.synthetic_size=8192 \
    --model.name=resnet32 --model.K=16 --train.batch_size=256 --train.epochs=1 \
    --train.device=cuda --run.progress=false --run.log_every=4 --run.overwrite=true \
    --run.dir=/tmp/pipemlaan-gpu-check --run.name=shared4
run cp /tmp/pipemlaan-gpu-check/shared4/summary.json "$RES/shared-gpu-4ranks-$STAMP.json"

if [ -n "${OUT:-}" ]; then cp "$RES"/*"$STAMP"* "$OUT"/ 2>/dev/null; cp "$RES"/throughput-cuda-* "$OUT"/ 2>/dev/null; fi
step "done (status $status); results: $RES/*$STAMP*"
exit $status
