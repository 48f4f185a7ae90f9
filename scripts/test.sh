#!/usr/bin/env bash
# The whole test suite, slow tests included (pass -m "not slow" for the quick part).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the MLflow UI screenshot test drives a headless Chromium (Debian package)
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "test: installing chromium for the UI screenshot test"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
exec .venv/bin/python -m pytest -q "$@"
