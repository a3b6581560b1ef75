#!/usr/bin/env bash
# The device side on aarch64 under emulation (issue 17). Called by `make test-arm64`; needs root (debootstrap,
# chroot, binfmt) and the x86 .venv (`make install`). On a fresh Debian / Ubuntu machine it installs debootstrap and
# qemu-user-static, builds an arm64 bookworm rootfs under .arm64/rootfs (kept between runs), a venv in it with the
# device extra from aarch64 wheels (the versions of the x86 .venv) and zoedge (a wheel of the checkout, --no-deps),
# then: trains tiny-bert and MiniLM int8 bundles exported on x86; pushes the trajectories to a zoedge server on
# x86 (loopback), which accepts one only when its replay rebuilds the device's adapter_sha256; replays them on x86
# and compares bytes; compares per-item predictions on ARM and x86; runs the TFLite bundle with ai-edge-litert
# (when .venv-tflite exists: scripts/tflite_env.sh; a tiny-bert TFLite bundle trained, pushed, replayed and predicted
# like the ONNX ones); measures the footprint; SmolLM2 int4 when ARM64_PARTS names smollm2.
# Results: .arm64/rootfs/work/report.jsonl.
# Heavy steps run under $ZOEDGE_HEAVY_LOCK (default /tmp/zoedge-heavy.lock; set it empty for none).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
ARM=$REPO/.arm64
ROOT=$ARM/rootfs
W=$ROOT/work                # seen as /work inside the rootfs
SST2=${SST2:-$REPO/../shared/data/sst2}
PY=$REPO/.venv/bin/python
LOCK=${ZOEDGE_HEAVY_LOCK-/tmp/zoedge-heavy.lock}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEVICE_DISTS="numpy onnxruntime tokenizers safetensors httpx typer rich"
REPORT=$W/report.jsonl
T0=$SECONDS

die() { echo "arm64_check: $*" >&2; exit 2; }
say() { echo "== [$((SECONDS - T0)) s] $*"; }
# The emulated part (pip installs, training, eval) keeps a core busy: it runs holding $LOCK once, from
# take_lock on (the rootfs download and unpack before it do not); the wait for it is reported.
LOCK_WAIT=0
take_lock() {
  [ -n "$LOCK" ] || return 0
  local t=$SECONDS
  exec 9>"$LOCK"; flock 9; LOCK_WAIT=$((SECONDS - t))
  echo "   waited $LOCK_WAIT s for $LOCK"
}
record() { echo "$1" >> "$REPORT"; echo "   $1"; }
# ARM64_PARTS: which parts run (default tiny-bert minilm tflite footprint; smollm2 is opt-in: one 2-row SmolLM2 int4
# forward takes many minutes under qemu). Lets a kept rootfs rerun some of them.
part() { [[ " ${ARM64_PARTS:-tiny-bert minilm tflite footprint} " == *" $1 "* ]]; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, binfmt_misc)"
[ -x "$PY" ] || die "no x86 venv at .venv: run make install first"
[ -f "$SST2/train.tsv" ] || die "$SST2/train.tsv not found (SST2=DIR)"

say "host tools"
if ! command -v debootstrap >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap qemu-user-static binfmt-support >/dev/null
fi
# binfmt: lets the kernel run aarch64 ELF files through qemu (debootstrap's second stage and every subprocess).
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || true
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64 2>/dev/null || true
if grep -qs enabled /proc/sys/fs/binfmt_misc/qemu-aarch64; then QEMU=""; MODE=binfmt
else QEMU=/usr/bin/qemu-aarch64-static; MODE=qemu-direct; fi
echo "   aarch64 runs by: $MODE"

if [ ! -f "$ROOT/.zoedge-rootfs" ]; then
  [ "$MODE" = binfmt ] || die "building the rootfs runs its packages' scripts: it needs binfmt_misc (could not register qemu-aarch64)"
  say "debootstrap arm64 bookworm (about 100 MB of packages)"
  rm -rf "$ROOT"; mkdir -p "$ARM"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOT" "$MIRROR" \
      > "$ARM/debootstrap.log" 2>&1 || { tail -5 "$ARM/debootstrap.log"; die "debootstrap failed (log: $ARM/debootstrap.log)"; }
  touch "$ROOT/.zoedge-rootfs"
fi
# The host's CAs (a TLS-intercepting proxy's among them) and resolver, so pip inside reaches PyPI as the host does.
cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/" 2>/dev/null || true
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
[ -z "$QEMU" ] || cp /usr/bin/qemu-aarch64-static "$ROOT$QEMU"
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
# No /sys: with the host's /sys bound in, onnxruntime's cpuinfo reads the x86 topology and the process dies
# (qemu: SIGSEGV); without it cpuinfo warns that it failed and onnxruntime runs.
SERVER=""
cleanup() { [ -z "$SERVER" ] || kill "$SERVER" 2>/dev/null || true; umount "$ROOT/proc" 2>/dev/null || true; }
trap cleanup EXIT

# arm VENV PYTHON-ARGS...: run the venv's python inside the rootfs (one thread per engine, as a small device)
arm() {
  local venv=$1; shift
  env -i PATH=$venv/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 ZOEDGE_THREADS=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
      ${QEMU_CPU:+QEMU_CPU=$QEMU_CPU} ${QEMU:+ARM64_QEMU=$QEMU} /usr/sbin/chroot "$ROOT" $QEMU "$venv/bin/python" "$@"
}
PIPWHL=$(ls "$ROOT"/usr/share/python-wheels/pip-*.whl | head -1); PIPWHL=${PIPWHL#$ROOT}
arm_pip() { local venv=$1; shift; arm "$venv" "$PIPWHL/pip" install -q "$@"; }   # pip from Debian's wheel
PINS=$($PY - $DEVICE_DISTS <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{d}=={version(d)}" for d in sys.argv[1:]))
PY
)
echo "   device extra, pinned to the x86 .venv: $PINS"

venv_for() {  # venv_for DIR PIP-ARGS...: create once, keyed by what it holds
  local venv=$1; shift
  if [ "$(cat "$ROOT$venv/.zoedge-pins" 2>/dev/null)" != "$*" ]; then
    rm -rf "$ROOT$venv"
    env -i /usr/sbin/chroot "$ROOT" $QEMU /usr/bin/python3 -m venv --without-pip "$venv"
    arm_pip "$venv" "$@" && echo "$*" > "$ROOT$venv/.zoedge-pins"
  fi
}
say "the emulated part: under $LOCK"
take_lock
say "aarch64 venv /opt/zoedge: the device extra from aarch64 wheels"
venv_for /opt/zoedge $PINS
mkdir -p "$W"; rm -f "$REPORT"
say "zoedge wheel of the checkout's tracked files, installed --no-deps"
rm -rf "$ARM/src" "$W/wheels"; mkdir -p "$ARM/src" "$W/wheels"
git ls-files -z | xargs -0 tar -cf - | tar -xf - -C "$ARM/src"
"$PY" -m pip wheel -q --no-deps --no-build-isolation "$ARM/src" -w "$W/wheels" >/dev/null
WHL=/work/wheels/$(basename "$(ls "$W"/wheels/zoedge-*.whl)")
arm_pip /opt/zoedge --no-deps --force-reinstall "$WHL"
cp scripts/arm64_probe.py scripts/arm64_measure.py "$W/"

say "float32 z stream and optimizer updates: digests on aarch64 and x86"
a=$(arm /opt/zoedge /work/arm64_probe.py 64); x=$("$PY" scripts/arm64_probe.py 64)
record "{\"probe\": {\"aarch64\": $a, \"x86_64\": $x}}"
[ "$(echo "$a" | sed 's/aarch64//')" = "$(echo "$x" | sed 's/x86_64//')" ] || die "the float32 z stream / updates differ between aarch64 and x86"

EXPORT_KEY=$(git ls-files -s zoedge/export zoedge/models zoedge/manifest.py | sha256sum | cut -c1-16)
mkdir -p "$W/bundles"
# export_once NAME ZOEDGE MODEL ARGS...: an x86 export into .arm64/rootfs/work/bundles, kept until the export code changes
export_once() {
  local name=$1 z=$2; shift 2
  if [ "$(cat "$W/bundles/$name.key" 2>/dev/null)" != "$EXPORT_KEY" ]; then
    say "x86: zoedge export $* ($name)"
    "$z" export "$@" --out "$W/bundles/$name" --force >/dev/null 2>"$W/export-$name.log" \
        || { tail -n 5 "$W/export-$name.log"; die "zoedge export $* failed on x86"; }
    echo "$EXPORT_KEY" > "$W/bundles/$name.key"
  fi
}
part tiny-bert && export_once tiny-bert "$REPO/.venv/bin/zoedge" tiny-bert
part minilm && export_once minilm-int8 "$REPO/.venv/bin/zoedge" minilm --quant int8
head -n 65 "$SST2/train.tsv" > "$W/train-64.tsv"
head -n 49 "$SST2/dev.tsv" > "$W/dev-48.tsv"

say "x86 patch server on loopback"
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
rm -rf "$W/server"
"$REPO/.venv/bin/zoedge" serve --host 127.0.0.1 --port "$PORT" --data-dir "$W/server" --admin-token arm-admin > "$W/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 150); do "$PY" -c "import urllib.request; urllib.request.urlopen('$URL/v1/health', timeout=1)" 2>/dev/null && break; sleep 0.2; done
jf() { "$PY" -c "import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])['$1'])"; }
TOKEN=$("$REPO/.venv/bin/zoedge" device register --server "$URL" --admin-token arm-admin --name arm64-qemu --json | jf token)

X86Z=$REPO/.venv/bin/zoedge
# train_push NAME STEPS BATCH VENV X86-ZOEDGE PREDICT [TRAIN-ARGS...]: train bundle NAME on ARM with VENV's python,
# push the trajectory to the x86 server, replay it on x86 and compare bytes, compare per-item predictions of ARM and
# x86 (PREDICT=yes), train the same run on x86. X86-ZOEDGE opens the bundle on x86 (.venv's; .venv-tflite's for TFLite).
train_push() {
  local name=$1 steps=$2 batch=$3 venv=$4 xz=$5 predict=$6 b=/work/bundles/$1 p=/work/patch-$1; shift 6
  "$X86Z" bundle publish "$W/bundles/$name" --server "$URL" --admin-token arm-admin --json >/dev/null
  rm -rf "$W/patch-$name" "$W/outbox"
  say "aarch64: zoedge train $name, $steps steps of $batch"
  local tr
  tr=$(arm "$venv" -m zoedge train "$b" --data /work/train-64.tsv --steps "$steps" --batch-size "$batch" --keep last \
       --out "$p" --json "$@" 2>"$W/train-$name.log" | tail -n 1) \
       || { tail -n 5 "$W/train-$name.log"; die "training $name on aarch64 failed"; }
  record "{\"train\": \"$name\", \"arch\": \"aarch64\", \"result\": $tr}"
  [ "$(echo "$tr" | jf steps)" = "$steps" ] || die "the $name patch does not keep its $steps ZO steps: nothing to replay"
  say "aarch64 -> x86: zoedge push --format trajectory (the server replays it and checks adapter_sha256)"
  local push
  push=$(arm "$venv" -m zoedge push "$p" --server "$URL" --token "$TOKEN" --format trajectory --outbox /work/outbox --json \
         2>"$W/push-$name.log" | tail -n 1) || { cat "$W/push-$name.log"; die "the server refused the ARM trajectory of $name"; }
  record "{\"push\": \"$name\", \"result\": $push}"
  rm -rf "$W/replay-$name"
  "$X86Z" patch replay "$W/patch-$name" --bundle "$W/bundles/$name" --out "$W/replay-$name" --json >/dev/null
  if cmp -s "$W/patch-$name/adapter_model.safetensors" "$W/replay-$name/adapter_model.safetensors"; then exact=true; else exact=false; fi
  record "{\"replay\": \"$name\", \"x86_replay_bytes_equal_arm_adapter\": $exact}"
  [ "$exact" = true ] || die "the x86 replay of the ARM trajectory of $name is not bit-exact"
  if [ "$predict" = yes ]; then
    say "predictions of bundle + patch on aarch64 and x86 (dev-48)"
    arm "$venv" -m zoedge predict "$b" --patch "$p" --data /work/dev-48.tsv --batch-size 16 > "$W/pred-$name-arm.jsonl" 2>/dev/null
    "$xz" predict "$W/bundles/$name" --patch "$W/patch-$name" --data "$W/dev-48.tsv" --batch-size 16 > "$W/pred-$name-x86.jsonl" 2>/dev/null
    record "{\"predictions\": \"$name\", \"result\": $("$PY" scripts/arm64_measure.py same-predictions "$W/pred-$name-arm.jsonl" "$W/pred-$name-x86.jsonl")}"
  fi
  # the same training on x86 from the same seed: how far the two architectures' losses (so g) drift apart
  rm -rf "$W/patch-$name-x86"
  local xargs=() a
  for a in "$@"; do xargs+=("${a/#\/work/$W}"); done   # the rootfs's /work paths, seen from x86
  tr=$("$xz" train "$W/bundles/$name" --data "$W/train-64.tsv" --steps "$steps" --batch-size "$batch" --keep last \
       --out "$W/patch-$name-x86" --json "${xargs[@]}" 2>/dev/null | tail -n 1)
  record "{\"train\": \"$name\", \"arch\": \"x86_64\", \"result\": $tr}"
  record "{\"trajectory_arm_vs_x86\": \"$name\", \"result\": $("$PY" - "$W/patch-$name" "$W/patch-$name-x86" <<'PY'
import json, sys
import numpy as np
a, b = (np.load(f"{d}/trajectory.npy") for d in sys.argv[1:3])
print(json.dumps({"rows": len(a), "bytes_equal": a.tobytes() == b.tobytes(),
                  "max_abs_g_diff": float(np.max(np.abs(a.astype(np.float64) - b))) if a.shape == b.shape and a.size else None}))
PY
)}"
}
# inference_s VENV BUNDLE BATCH: emulated seconds of one BATCH-row forward, (eval of 3 batches - eval of 1) / 2
inference_s() {
  local t1 t2 t3
  t1=$(date +%s.%N); arm "$1" -m zoedge eval "$2" --data /work/train-64.tsv --limit "$3" --batch-size "$3" >/dev/null 2>&1
  t2=$(date +%s.%N); arm "$1" -m zoedge eval "$2" --data /work/train-64.tsv --limit $((3 * $3)) --batch-size "$3" >/dev/null 2>&1
  t3=$(date +%s.%N); "$PY" -c "print(round(($t3 - $t2 - ($t2 - $t1)) / 2, 3))"
}
# cost NAME VENV BATCH: emulated seconds of a ZO step (the training log's step lines; the final eval of dev-48,
# 48 / BATCH forwards, taken off when it is in the last line) against one inference forward of the same rows: the
# only emulated timing reported, as a ratio
cost() {
  record "{\"cost\": \"$1 aarch64\", \"result\": $("$PY" scripts/arm64_measure.py step-seconds "$W/train-$1.log" "$(inference_s "$2" "/work/bundles/$1" "$3")" $((48 / $3)))}"
}
EVAL=(--eval /work/dev-48.tsv)
if part tiny-bert; then
  train_push tiny-bert 10 16 /opt/zoedge "$X86Z" yes "${EVAL[@]}" --eval-every 10
  cost tiny-bert /opt/zoedge 16
fi
if part minilm; then
  train_push minilm-int8 3 16 /opt/zoedge "$X86Z" yes "${EVAL[@]}" --eval-every 3
  cost minilm-int8 /opt/zoedge 16
fi
if part smollm2; then  # SmolLM2-135M int4 (MatMulNBits; a decoder, label words): peak RSS of 2 ZO steps of 1 row
  export_once smollm2-int4 "$X86Z" smollm2-135m --quant int4
  train_push smollm2-int4 2 1 /opt/zoedge "$X86Z" no --head-init none
fi

TRAIN_PATH="zoedge.cli zoedge.runtime.trainer zoedge.runtime.forward"
TFL_PATH="zoedge.runtime.tflite_forward ai_edge_litert.interpreter"
if ! part tflite; then :
elif [ ! -x .venv-tflite/bin/zoedge ]; then
  record "{\"litert\": \"not run: no .venv-tflite to export a TFLite bundle (bash scripts/tflite_env.sh builds it, 2.6 GB)\"}"
else
  LITERT=$(.venv-tflite/bin/python -c 'from importlib.metadata import version; print(version("ai-edge-litert"))')
  say "TFLite: ai-edge-litert==$LITERT from PyPI's aarch64 wheel, a tiny-bert TFLite bundle exported on x86 (.venv-tflite)"
  if venv_for /opt/zoedge-litert $PINS "ai-edge-litert==$LITERT" 2>"$W/litert-pip.log"; then
    arm_pip /opt/zoedge-litert --no-deps --force-reinstall "$WHL"
    export_once tiny-bert-tfl .venv-tflite/bin/zoedge tiny-bert --format tflite --quant fp32
    train_push tiny-bert-tfl 10 16 /opt/zoedge-litert "$REPO/.venv-tflite/bin/zoedge" yes "${EVAL[@]}" --eval-every 10
    cost tiny-bert-tfl /opt/zoedge-litert 16
    record "{\"footprint\": \"aarch64 + ai-edge-litert\", \"size\": $(arm /opt/zoedge-litert /work/arm64_measure.py size $DEVICE_DISTS ai-edge-litert), \"import\": $(arm /opt/zoedge-litert /work/arm64_measure.py import $TRAIN_PATH $TFL_PATH)}"
  else
    record "{\"litert\": \"no ai-edge-litert==$LITERT wheel installs for aarch64 / cp311 (TFLite not run on aarch64): $(tail -n 1 "$W/litert-pip.log" | tr -d '"\\')\"}"
  fi
  say "x86 LiteRT: MiniLM int8 TFLite, 3 ZO steps (the phone row's peak RSS, on x86's ai-edge-litert)"
  export_once minilm-tfl-int8 .venv-tflite/bin/zoedge minilm --format tflite --quant int8
  rm -rf "$W/patch-minilm-tfl-int8-x86"
  record "{\"train\": \"minilm-tfl-int8\", \"arch\": \"x86_64\", \"result\": $(.venv-tflite/bin/zoedge train "$W/bundles/minilm-tfl-int8" \
      --data "$W/train-64.tsv" --eval "$W/dev-48.tsv" --eval-every 3 --steps 3 --batch-size 16 --keep last \
      --out "$W/patch-minilm-tfl-int8-x86" --json 2>/dev/null | tail -n 1)}"
  record "{\"footprint\": \"x86_64 + ai-edge-litert (.venv-tflite)\", \"size\": $(.venv-tflite/bin/python scripts/arm64_measure.py size $DEVICE_DISTS ai-edge-litert), \"import\": $(.venv-tflite/bin/python scripts/arm64_measure.py import $TRAIN_PATH $TFL_PATH)}"
fi

if part footprint; then
say "footprint: installed MB of the device extra and import time of the train path"
record "{\"footprint\": \"aarch64\", \"size\": $(arm /opt/zoedge /work/arm64_measure.py size $DEVICE_DISTS), \"import\": $(arm /opt/zoedge /work/arm64_measure.py import $TRAIN_PATH)}"
XV=$ARM/x86-device
if [ "$(cat "$XV/.zoedge-pins" 2>/dev/null)" != "$PINS" ]; then
  rm -rf "$XV"; python3 -m venv "$XV" && "$XV/bin/pip" install -q $PINS && "$XV/bin/pip" install -q --no-deps "$W"/wheels/zoedge-*.whl \
      && echo "$PINS" > "$XV/.zoedge-pins"
fi
record "{\"footprint\": \"x86_64\", \"size\": $("$XV/bin/python" scripts/arm64_measure.py size $DEVICE_DISTS), \"import\": $("$XV/bin/python" scripts/arm64_measure.py import $TRAIN_PATH)}"
record "{\"footprint\": \"torch x86_64\", \"size\": $("$PY" scripts/arm64_measure.py size torch), \"import\": $("$PY" scripts/arm64_measure.py import torch)}"
ORTV=${XDG_CACHE_HOME:-$HOME/.cache}/zoedge/venv-ort-training
if [ -x "$ORTV/bin/python" ]; then
  record "{\"footprint\": \"onnxruntime-training x86_64\", \"size\": $("$ORTV/bin/python" scripts/arm64_measure.py size onnxruntime-training-cpu), \"import\": $("$ORTV/bin/python" scripts/arm64_measure.py import onnxruntime.training.api)}"
else
  echo "   (no $ORTV: python -m bench.sidebyside builds it; onnxruntime-training not measured)"
fi
fi
waited=$LOCK_WAIT
record "{\"wall_s\": $((SECONDS - T0)), \"lock_wait_s\": $waited, \"rootfs\": \"$MODE\"}"
say "done in $((SECONDS - T0)) s ($waited s of it waiting for $LOCK); results in $REPORT"
