#!/usr/bin/env bash
# The whole test suite, slow tests included (pass -m "not slow" for the quick part), in two
# processes (pytest-xdist; most slow tests wait on subprocesses and services). Options pass
# through to pytest: -n 0 runs it in one process, -n 4 in four.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the MLflow UI screenshot test drives a headless Chromium (Debian package)
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "test: installing chromium for the UI screenshot test"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
exec .venv/bin/python -m pytest -q -n 2 "$@"
