#!/usr/bin/env bash
# Chinese vocabulary extension end to end on the bundled corpus: base → vocab train/merge/report →
# pt (embeddings grown) → merge → sft → GGUF with the extended vocabulary, checked against transformers.
# Usage: examples/zh-vocab.sh [OUT_DIR]   (default runs/zh-vocab; the config expects that default)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LF="$PY -m loraforge"
OUT=${1:-runs/zh-vocab}
[ -e "$OUT/base/model.safetensors" ] || $PY -m loraforge.vocab.small_base "$OUT/base"
$LF vocab train --corpus examples/data/zh_corpus.txt --vocab-size 3000 -o "$OUT/zh.model"
rm -rf "$OUT/tokenizer" "$OUT/pt-merged"
$LF vocab merge --base "$OUT/base" --add "$OUT/zh.model" -o "$OUT/tokenizer"
$LF vocab report --base "$OUT/base" --new "$OUT/tokenizer" --text examples/data/zh_heldout.txt
CFG=examples/configs/zh-vocab-pt-sft.yaml
$LF train $CFG model.path="$OUT/base" model.tokenizer="$OUT/tokenizer" train.output_dir="$OUT/pt" \
    train.overwrite_output_dir=true
$LF merge --base "$OUT/base" --adapter "$OUT/pt" -o "$OUT/pt-merged"
$LF train $CFG stage=sft model.path="$OUT/pt-merged" model.tokenizer=null data.datasets=alpaca_zh_demo \
    lora.modules_to_save=[] train.output_dir="$OUT/sft" train.epochs=8 train.overwrite_output_dir=true
$LF export gguf --base "$OUT/base" --adapter "$OUT/pt,$OUT/sft" --quant q8_0 -o "$OUT/zh.gguf" --verify
echo "report: $OUT/tokenizer/vocab_report.png   model: $OUT/zh.gguf"
