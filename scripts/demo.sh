#!/usr/bin/env bash
# The main job end-to-end on the embedded default (MiniLM + SST-2). Called by `make demo`.
set -euo pipefail
OUT=${1:-demo-out}
SST2=${2:-../shared/data/sst2}
for f in train.tsv dev.tsv test.tsv; do
  [ -f "$SST2/$f" ] || { echo "demo: $SST2/$f not found (make demo SST2=DIR)" >&2; exit 2; }
done
rm -rf "$OUT" && mkdir -p "$OUT"
head -n 2001 "$SST2/train.tsv" > "$OUT/train-2000.tsv"   # the device's local data: 2,000 labelled sentences
head -n 501 "$SST2/dev.tsv" > "$OUT/dev-500.tsv"          # held out for checkpoint selection

echo "== 1. workstation: export minilm (int8 base; LoRA r=8 on q,v + head as graph inputs)"
zoedge export minilm --quant int8 --out "$OUT/bundle"
zoedge inspect "$OUT/bundle"
echo
echo "== 2. workstation: verify the bundle against torch (random non-zero trainables)"
zoedge verify "$OUT/bundle" --data "$SST2/test.tsv" --n 64
echo
echo "== 3. device: zeroth-order training, forward passes only (onnxruntime + numpy, no torch)"
zoedge train "$OUT/bundle" --data "$OUT/train-2000.tsv" --eval "$OUT/dev-500.tsv" --out "$OUT/patch" --plot "$OUT/training.png"
echo
echo "== 4. device: accuracy on SST-2 test.tsv (872 sentences), before and after"
before=$(zoedge eval "$OUT/bundle" --data "$SST2/test.tsv" --json | tail -n 1)
after=$(zoedge eval "$OUT/bundle" --patch "$OUT/patch" --data "$SST2/test.tsv" --json | tail -n 1)
python3 - "$before" "$after" "$OUT/patch" <<'PY'
import json, os, sys
b, a, patch = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
meta = json.load(open(os.path.join(patch, "patch.json")))
size = lambda n: os.path.getsize(os.path.join(patch, n))
print(f"test accuracy: base bundle {b['accuracy']:.4f} -> patched {a['accuracy']:.4f}  (n={a['n']})")
print(f"head start (linear probe) on dev: {meta['metrics']['eval_accuracy_head_start']}, "
      f"after ZO (best of {meta['steps_run']} steps, kept step {meta['steps']}): {meta['metrics']['eval_accuracy']}")
print(f"patch: adapter {size('adapter_model.safetensors'):,} bytes, trajectory {size('trajectory.npy'):,} bytes"
      f" + head start {size('start.safetensors') if os.path.exists(os.path.join(patch, 'start.safetensors')) else 0:,} bytes")
PY
