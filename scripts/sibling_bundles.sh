#!/usr/bin/env bash
# Sibling bundles (issue 16): export MiniLM with several quantizations and formats, train one patch on the int8
# bundle (the first 2,000 SST-2 train sentences, 200 steps), evaluate it on every sibling (SST-2 test, 872
# sentences), with and without the patch. Results: $OUT/results.jsonl, one JSON object per evaluation; exports the
# exporter refuses are listed in $OUT/refused.txt. One job at a time, one thread: slow, and that is fine.
# TFLite siblings need .venv-tflite (scripts/tflite_env.sh); they are skipped without it. `zoedge export` refuses
# int4 for encoders, so int4-exp is the fp32 sibling's graph quantized by the exporter's own int4 routine (MatMulNBits
# HQQ, block 32) outside the export command. A second patch, trained the same way on fp32, is the native reference.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TPY=${TPY:-.venv-tflite/bin/python}
OUT=${OUT:-out/siblings}
DATA=${DATA:-../shared/data/sst2}
# name:export options (the trained bundle, int8, first)
SIBLINGS=${SIBLINGS:-"int8:--quant,int8 fp32:--quant,fp32 fp16:--quant,fp16 int8-dynamic:--quant,int8-dynamic
int8-weight:--quant,int8-weight int4:--quant,int4 ort-int8:--quant,int8,--format,ort
tflite-int8:--quant,int8,--format,tflite tflite-fp32:--quant,fp32,--format,tflite"}
export ZOEDGE_THREADS=${ZOEDGE_THREADS:-1} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
head -n 2001 "$DATA/train.tsv" > "$OUT/train2000.tsv"
py_for() { case "$1" in tflite*) echo "$TPY" ;; *) echo "$PY" ;; esac; }
for s in $SIBLINGS; do
  name=${s%%:*}; IFS=, read -r -a opts <<< "${s#*:}"
  [ -f "$OUT/minilm-$name/manifest.json" ] && continue
  py=$(py_for "$name")
  if [ ! -x "$py" ]; then echo "$name: skipped ($py not found)" | tee -a "$OUT/refused.txt"; continue; fi
  if ! $py -m zoedge export minilm "${opts[@]}" --out "$OUT/minilm-$name" --force > "$OUT/export-$name.log" 2>&1; then
    echo "$name: export refused: $(tail -n 1 "$OUT/export-$name.log")" | tee -a "$OUT/refused.txt"
  fi
done
if [ ! -f "$OUT/minilm-int4-exp/manifest.json" ] && [ -f "$OUT/minilm-fp32/manifest.json" ]; then
  $PY - "$OUT/minilm-fp32" "$OUT/minilm-int4-exp" <<'PYEOF'
import shutil, sys, uuid
from pathlib import Path
from zoedge.export.quantize import quantize
from zoedge.manifest import MANIFEST_FILE, Manifest, sha256_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(src, dst)
m = Manifest.load(src)
details = quantize(src / m.model_file, dst / m.model_file, "int4", [t.name for t in m.trainables])
details.update(scheme="int4", note="quantized outside zoedge export, which refuses int4 for encoders")
m.quantization, m.quantization_details, m.bundle_id = "int4", details, uuid.uuid4().hex
m.files = {p.name: sha256_file(p) for p in sorted(dst.iterdir()) if p.is_file() and p.name != MANIFEST_FILE}
m.save(dst)
PYEOF
fi
SIBLINGS="$SIBLINGS int4-exp:"
for t in int8 fp32; do
  [ -f "$OUT/patch-$t/patch.json" ] && continue
  $PY -m zoedge train "$OUT/minilm-$t" --data "$OUT/train2000.tsv" --out "$OUT/patch-$t" \
    --steps 200 --json > "$OUT/train-$t.json" 2> "$OUT/train-$t.log"
done
: > "$OUT/results.jsonl"
for s in $SIBLINGS; do
  name=${s%%:*}
  [ -f "$OUT/minilm-$name/manifest.json" ] || continue
  py=$(py_for "$name")
  key=$($PY -c "import sys; from zoedge.manifest import Manifest; print(Manifest.load(sys.argv[1]).sibling_key)" \
        "$OUT/minilm-$name")
  patches="none int8"
  [ "$name" = fp32 ] && patches="none int8 fp32"
  [ "$name" = int8 ] && patches="none int8 fp32"
  for patch in $patches; do
    args=()
    [ "$patch" = none ] || args=(--patch "$OUT/patch-$patch")
    r=$($py -m zoedge eval "$OUT/minilm-$name" "${args[@]}" --data "$DATA/test.tsv" --json 2>/dev/null | tail -n 1)
    echo "{\"bundle\": \"$name\", \"sibling_key\": \"$key\", \"patch\": \"$patch\", \"eval\": $r}" \
      | tee -a "$OUT/results.jsonl"
  done
done
# Predictions of the int8 patch on every sibling, compared with its predictions on the int8 bundle itself.
for s in $SIBLINGS; do
  name=${s%%:*}
  [ -f "$OUT/minilm-$name/manifest.json" ] && [ ! -s "$OUT/pred-$name.jsonl" ] || continue
  $(py_for "$name") -m zoedge predict "$OUT/minilm-$name" --patch "$OUT/patch-int8" --data "$DATA/test.tsv" \
    > "$OUT/pred-$name.jsonl" 2>/dev/null
done
$PY - "$OUT" <<'PYEOF'
import json, os, sys
from zoedge.manifest import Manifest
out = sys.argv[1]
rows = [json.loads(line) for line in open(f"{out}/results.jsonl")]
acc = {(r["bundle"], r["patch"]): 100 * r["eval"]["accuracy"] for r in rows}
labels = lambda b: [json.loads(line)["label"] for line in open(f"{out}/pred-{b}.jsonl")]
ref = labels("int8")
print("| bundle | quantization | format | model file | sibling key | no patch | int8 patch | agrees with int8 | fp32 patch |")
print("|---|---|---|---:|---|---:|---:|---:|---:|")
for b in dict.fromkeys(r["bundle"] for r in rows):
    m = Manifest.load(f"{out}/minilm-{b}")
    scheme = m.quantization_details.get("scheme") or m.quantization
    mb = os.path.getsize(f"{out}/minilm-{b}/{m.model_file}") / 1e6
    mine = labels(b)
    agree = 100 * sum(x == y for x, y in zip(mine, ref)) / len(ref)
    fp32 = f"{acc[(b, 'fp32')]:.1f}%" if (b, "fp32") in acc else ""
    print(f"| {b} | {scheme} | {m.model_format} | {mb:.0f} MB | `{m.sibling_key[:12]}` | {acc[(b, 'none')]:.1f}% "
          f"| **{acc[(b, 'int8')]:.1f}%** | {agree:.1f}% | {fp32} |")
PYEOF
