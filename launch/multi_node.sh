#!/usr/bin/env bash
# Several machines through torchrun's own c10d rendezvous: run this on every node.
#   NNODES=2 NODE_RANK=0 RDZV=node0.example:29500 launch/multi_node.sh 8 CONFIG [overrides...]
#   NNODES=2 NODE_RANK=1 RDZV=node0.example:29500 launch/multi_node.sh 8 CONFIG [overrides...]
# Ranks are numbered node by node, so consecutive pipeline stages share a node and only the
# stage boundaries between nodes cross the network. RUN_ID must be the same on every node.
set -euo pipefail
nproc=${1:?usage: launch/multi_node.sh NPROC_PER_NODE CONFIG [overrides...]}
config=${2:?usage: launch/multi_node.sh NPROC_PER_NODE CONFIG [overrides...]}
shift 2
: "${NNODES:?set NNODES (number of machines)}"
: "${NODE_RANK:?set NODE_RANK (0..NNODES-1, this machine)}"
: "${RDZV:?set RDZV=host:port of the rendezvous (node 0)}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${TORCHRUN:-torchrun}" --nnodes="$NNODES" --node_rank="$NODE_RANK" \
    --nproc_per_node="$nproc" --rdzv_backend=c10d --rdzv_endpoint="$RDZV" \
    --rdzv_id="${RUN_ID:-pipemlaan}" --max-restarts="${MAX_RESTARTS:-0}" \
    -m pipemlaan.train --config "$config" "$@"
