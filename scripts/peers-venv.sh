#!/usr/bin/env bash
# Build (once, cached) the virtual environments of the quantization peers that
# bench/quantization_peers.py runs as subprocesses. They stay OUT of the project's .venv:
# aimet-onnx pulls its own torch, nncf and neural-compressor bring their own pins.
#
# One venv per peer, so one that fails to install does not take the others with it:
#   $CACHE/peers-venv/aiq    ai-edge-quantizer 0.10.0 (Google, LiteRT)
#   $CACHE/peers-venv/nncf   nncf 3.4.0 (OpenVINO; its ONNX backend)
#   $CACHE/peers-venv/aimet  aimet-onnx 2.42.0 (Qualcomm; torch 2.13.0 CPU instead of the 2.14.1 + CUDA it pulls)
#   $CACHE/peers-venv/inc    onnx-neural-compressor 1.0 (Intel Neural Compressor for ONNX Runtime; the
#                            neural-compressor 3.10 wheel has only torch/tensorflow/jax backends;
#                            it takes numpy 1.26 in its own venv)
#   $CACHE/peers-venv/olive  olive-ai 0.13 (Microsoft Olive; torch 2.13.0 CPU; it imports requests undeclared)
# $CACHE is $EDGEKIT_PEERS_CACHE, default /var/cache/edgekit (outside the checkout).
# Each venv gets a stamp file holding the hash of its requirement line; a venv whose stamp
# matches is left alone, so a second run is a no-op. A peer that fails leaves
# $CACHE/peers-venv/<peer>.failed with pip's last lines, which the benchmark reports.
#
#   scripts/peers-venv.sh [peer ...]     (default: all five); prints one line per peer
set -uo pipefail

CACHE=${EDGEKIT_PEERS_CACHE:-/var/cache/edgekit}
BASE=$CACHE/peers-venv
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}

declare -A REQS=(
  [aiq]="ai-edge-quantizer==0.10.0 ai-edge-litert==2.3.0"
  [nncf]="nncf==3.4.0 onnx==1.23.2 onnxruntime==1.32.0"
  [aimet]="aimet-onnx==2.42.0 torch==2.13.0 onnx==1.23.2 onnxruntime==1.32.0"
  [olive]="olive-ai[cpu]==0.13.0 torch==2.13.0 requests onnx==1.23.2 onnxruntime==1.32.0"
  [inc]="onnx-neural-compressor==1.0 onnx==1.23.2 onnxruntime==1.32.0 prettytable py-cpuinfo psutil scipy"
)
ORDER=(aiq nncf aimet inc olive)

mkdir -p "$BASE" || { echo "Error: cannot create $BASE" >&2; echo "Hint: set EDGEKIT_PEERS_CACHE to a writable directory." >&2; exit 1; }
exec 9>"$BASE/.lock"
flock 9

build() {
  local peer=$1 reqs=${REQS[$1]} venv=$BASE/$1
  local want
  want=$(printf '%s\n%s\n' "$reqs" "$("$PYTHON" -c 'import platform; print(platform.python_version())')" | sha256sum | cut -c1-16)
  if [ -f "$venv/.stamp" ] && [ "$(cat "$venv/.stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
    echo "$peer: ready ($venv)"
    return 0
  fi
  rm -rf "$venv" "$BASE/$peer.failed"
  local t0=$SECONDS log=$BASE/$peer.log
  # shellcheck disable=SC2086  # the requirement list is meant to split into words
  if "$PYTHON" -m venv "$venv" >"$log" 2>&1 \
     && "$venv/bin/python" -m pip install --disable-pip-version-check -q $reqs >>"$log" 2>&1; then
    echo "$want" >"$venv/.stamp"
    echo "$peer: built in $((SECONDS - t0)) s ($venv)"
  else
    tail -n 15 "$log" >"$BASE/$peer.failed"
    rm -rf "$venv"
    echo "$peer: FAILED after $((SECONDS - t0)) s (see $BASE/$peer.failed)"
  fi
}

peers=("$@")
[ ${#peers[@]} -gt 0 ] || peers=("${ORDER[@]}")
for p in "${peers[@]}"; do
  [ -n "${REQS[$p]:-}" ] || { echo "Error: unknown peer '$p'" >&2; echo "Hint: choose from ${ORDER[*]}" >&2; exit 2; }
  build "$p"
done
