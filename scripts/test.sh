#!/usr/bin/env bash
# The whole test suite, slow tests included (pass -m "not slow" for the quick part).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
