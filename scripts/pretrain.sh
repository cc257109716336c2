#!/usr/bin/env bash
# Launch `rapidnlp pretrain` with torchrun, on one node or many (run it once per node).
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node01 bash scripts/pretrain.sh --parallel.tp 2   # on node01
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node01 bash scripts/pretrain.sh --parallel.tp 2   # on node02
#
# Environment (defaults): CONFIG (configs/base.toml), NNODES (1), NODE_RANK (0),
# NPROC_PER_NODE (the GPU count, or 1 without GPUs), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500),
# RESUME (auto: continue from the run's latest checkpoint if there is one).
# Extra arguments are `--section.field value` overrides. DRY_RUN=1 prints the command instead.
set -euo pipefail
cd "$(dirname "$0")/.."

gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
[ "$gpus" -gt 0 ] || gpus=1
cmd=(torchrun
  --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${NPROC_PER_NODE:-$gpus}"
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}"
  -m rapidnlp.cli pretrain --config "${CONFIG:-configs/base.toml}" --resume "${RESUME:-auto}" "$@")

if [ -n "${DRY_RUN:-}" ]; then
  echo "${cmd[*]}"
  exit 0
fi
exec "${cmd[@]}"
