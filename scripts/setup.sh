#!/usr/bin/env bash
# Create .venv with mimkit and its test dependencies, and install Fashion-MNIST from Debian when possible.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -e ".[dev]"
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      || echo "note: could not apt-get install dataset-fashion-mnist; mimkit will try a torchvision download"
  else
    echo "note: run 'sudo apt-get install dataset-fashion-mnist' for offline Fashion-MNIST (else torchvision downloads it)"
  fi
fi
