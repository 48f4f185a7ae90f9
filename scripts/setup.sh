#!/usr/bin/env bash
# Idempotent set-up: Fashion-MNIST (Debian package), a virtualenv with the pinned stack.
# Re-running is cheap: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

FASHION=/usr/share/datasets/fashion-mnist
if [ ! -f "$FASHION/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Fashion-MNIST (apt package dataset-fashion-mnist)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST missing; run 'sudo apt-get install dataset-fashion-mnist'" \
         "or put the four idx .gz files in workspace/data/fashion-mnist/" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.harness-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  echo "setup: installing the package and its pinned dependencies (first time: a few minutes)"
  # (pip's warnings about index locations configured on this machine are noise: dropped)
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | { grep -v "is ignored" || true; }
  .venv/bin/python -m pip install -q -c constraints.txt -e '.[dev,ray]' 2>&1 | { grep -v "is ignored" || true; }
  .venv/bin/python -c "import harness, torch, torchvision, mlflow, optuna" \
    || { echo "setup: the install is incomplete (see pip's output above)" >&2; exit 1; }
  touch "$stamp"
fi
