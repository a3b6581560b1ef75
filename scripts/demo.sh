#!/usr/bin/env bash
# The main job end-to-end on the embedded default (MiniLM + SST-2). Called by `make demo`.
set -euo pipefail
OUT=${1:-demo-out}
SST2=${2:-../shared/data/sst2}
mkdir -p "$OUT"
echo "== 1. export minilm (int8 base, LoRA r=8 on q,v + head as graph inputs)"
zoedge export minilm --quant int8 --out "$OUT/bundle" --force
zoedge inspect "$OUT/bundle"
echo "== 2. verify: onnxruntime bundle vs torch source, random non-zero trainables"
zoedge verify "$OUT/bundle" --data "$SST2/test.tsv" --n 64
