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
echo "== 4. fleet: a patch server on loopback; device A pushes, device B pulls"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
zoedge serve --host 127.0.0.1 --port "$PORT" --data-dir "$OUT/server" --admin-token demo-admin > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do python3 -c "import urllib.request; urllib.request.urlopen('$URL/v1/health', timeout=1)" 2>/dev/null && break; sleep 0.2; done
bundle_id=$(zoedge bundle publish "$OUT/bundle" --server "$URL" --admin-token demo-admin --json | tail -n 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["bundle_id"])')
token_a=$(zoedge device register --server "$URL" --admin-token demo-admin --name device-a --json | tail -n 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
token_b=$(zoedge device register --server "$URL" --admin-token demo-admin --name device-b --json | tail -n 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
traj=$(zoedge push "$OUT/patch" --server "$URL" --token "$token_a" --format trajectory --outbox "$OUT/outbox-a" --json | tail -n 1)
adapter=$(zoedge push "$OUT/patch" --server "$URL" --token "$token_a" --format adapter --outbox "$OUT/outbox-a" --json | tail -n 1)
echo "device A pushed: trajectory $traj"
echo "                 adapter    $adapter"
patch_id=$(echo "$traj" | python3 -c 'import json,sys; print(json.load(sys.stdin)["patch_id"])')
# A device's patch is private to it; the admin folds device patches (FedAvg) into a global version.
global=$(zoedge bundle aggregate "$bundle_id" --patches "$patch_id" --server "$URL" --admin-token demo-admin --json | tail -n 1)
echo "server: global patch $global"
global_id=$(echo "$global" | python3 -c 'import json,sys; print(json.load(sys.stdin)["patch_id"])')
zoedge pull --server "$URL" --token "$token_b" --patch "$global_id" --out "$OUT/device-b-patch" --json | tail -n 1
echo "(the server rebuilt device A's tensors from its trajectory, averaged them into a global patch; device B pulled it)"
echo
echo "== 5. device B: accuracy on SST-2 test.tsv (872 sentences), before and after"
before=$(zoedge eval "$OUT/bundle" --data "$SST2/test.tsv" --json | tail -n 1)
after=$(zoedge eval "$OUT/bundle" --patch "$OUT/device-b-patch" --data "$SST2/test.tsv" --json | tail -n 1)
python3 - "$before" "$after" "$OUT/patch" "$traj" "$adapter" <<'PY'
import json, os, sys
b, a, patch = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
traj, adapter = json.loads(sys.argv[4]), json.loads(sys.argv[5])
meta = json.load(open(os.path.join(patch, "patch.json")))
size = lambda n: os.path.getsize(os.path.join(patch, n))
print(f"test accuracy: base bundle {b['accuracy']:.4f} -> patched {a['accuracy']:.4f}  (n={a['n']})")
print(f"head start (linear probe) on dev: {meta['metrics']['eval_accuracy_head_start']}, "
      f"after ZO (best of {meta['steps_run']} steps, kept step {meta['steps']}): {meta['metrics']['eval_accuracy']}")
print(f"patch on the wire: adapter {adapter['bytes']:,} bytes vs trajectory {traj['bytes']:,} bytes "
      f"({adapter['bytes'] / traj['bytes']:.0f}x smaller); files: adapter_model.safetensors "
      f"{size('adapter_model.safetensors'):,} B, trajectory.npy {size('trajectory.npy'):,} B")
PY
