#!/usr/bin/env bash
# GPU check on one CUDA device, BERT-base-sized encoder (random init: the timing does not
# depend on the weights), Rotten Tomatoes sentences, bf16 autocast:
#   1. AutoFreeze on vs off, whole runs side by side;
#   2. epoch time with and without AutoCache at several frozen counts (cache_epochs.py).
# Usage: bash benchmarks/gpu_check.sh TOKENIZER_DIR RT_CSV OUT_DIR [freeze|cache|all]
# Env: FROZEN (frozen counts for the cache part, default 0,3,6,9,12); BASELINE (a folder that
# holds an older `pipetransformer` package, e.g. from `git archive REV pipetransformer`: its
# cache part runs right after this tree's, on the same warm card).
set -euo pipefail
TOK=$1; CSV=$2; OUT=$3; PART=${4:-all}
PY=${PY:-python3}
$PY - "$TOK" "$OUT/bert-base" <<'PYEOF'
import sys, torch, transformers
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
torch.manual_seed(0)
cfg = transformers.BertConfig(vocab_size=tok.vocab_size, num_labels=2)  # 12 x 768, BERT-base
transformers.BertForSequenceClassification(cfg).save_pretrained(sys.argv[2])
tok.save_pretrained(sys.argv[2])
PYEOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "$PART" != cache ]; then
for mode in off adaptive; do
  $PY -m pipetransformer train --model "$OUT/bert-base" --data "$CSV" --freeze $mode --alpha 0.333 \
      --epochs 5 --train-samples 0 --batch-size 64 --max-length 64 --lr 5e-5 \
      --run-dir "$OUT/freeze-$mode" 2>&1 | grep -v "step/s\|it/s"
done
$PY - "$OUT" <<'PYEOF'
import json, sys
rows = {m: [json.loads(l) for l in open(f"{sys.argv[1]}/freeze-{m}/metrics.jsonl")] for m in ("off", "adaptive")}
print("epoch  frozen  off_s  adaptive_s  ratio")
for a, b in zip(rows["off"], rows["adaptive"]):
    print(f"{a['epoch']:5d}  {b['frozen_layers']:6d}  {a['epoch_seconds']:5.2f}  {b['epoch_seconds']:10.2f}  {a['epoch_seconds']/b['epoch_seconds']:5.2f}")
t_off = sum(r["epoch_seconds"] for r in rows["off"]); t_on = sum(r["epoch_seconds"] for r in rows["adaptive"])
print(f"training time: off {t_off:.1f} s, adaptive {t_on:.1f} s, speedup {t_off/t_on:.2f}x; "
      f"val acc off {rows['off'][-1]['val_accuracy']:.4f}, adaptive {rows['adaptive'][-1]['val_accuracy']:.4f}")
PYEOF
fi
if [ "$PART" != freeze ]; then
  for root in "$PWD" ${BASELINE:+"$BASELINE"}; do
    tag=$([ "$root" = "$PWD" ] && echo this || echo baseline)
    echo "== cache part, $tag engine ($root)"
    PYTHONPATH="$root:$PWD${PYTHONPATH:+:$PYTHONPATH}" $PY benchmarks/cache_epochs.py --model "$OUT/bert-base" \
        --data "$CSV" --train-samples 4096 --batch-size 128 --max-length 128 --frozen "${FROZEN:-0,3,6,9,12}" \
        --out "$OUT/cache_epochs_$tag.json"
  done
fi
