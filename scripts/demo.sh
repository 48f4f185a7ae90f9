#!/usr/bin/env bash
# The main job on the built-in default (studies/quickstart.yaml): real ImageNet weights
# (EfficientNet-Lite0, installed offline with the package), few-shot Fashion-MNIST:
#   1. sweep naive / head_only / two_phase fine-tuning, 4 trials each,
#   2. compare each strategy's best recipe over 3 seeds on the held-out test split and
#      under two ImageNet-C corruptions (seed 0: the sweep's own model), every pair tested,
#   3. export the winning recipe as YAML (replay it with `harness train`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
H=.venv/bin/harness
STUDY=studies/quickstart.yaml
$H sweep "$STUDY"
$H compare "$STUDY"
$H export "$STUDY"    # each command ends with what to run next (the MLflow UI: harness ui)
