#!/usr/bin/env bash
# One machine, one pipeline stage per process (GPUs: one per rank, NCCL; CPU: gloo).
#   launch/single_node.sh NPROC CONFIG [--section.key=value ...]
#   launch/single_node.sh 4 configs/paper/cifar10_dgl_mlaan.toml --data.root=/data/cifar10
# On CPU, each rank gets one thread unless OMP_NUM_THREADS says otherwise.
set -euo pipefail
nproc=${1:?usage: launch/single_node.sh NPROC CONFIG [overrides...]}
config=${2:?usage: launch/single_node.sh NPROC CONFIG [overrides...]}
shift 2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${TORCHRUN:-torchrun}" --standalone --nproc_per_node="$nproc" \
    -m pipemlaan.train --config "$config" "$@"
