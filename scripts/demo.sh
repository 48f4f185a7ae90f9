#!/usr/bin/env bash
# The main job on the built-in default (studies/quickstart.yaml):
#   1. pretrain a ResNet-18 body on five Fashion-MNIST classes (skipped when already done),
#   2. sweep naive / head_only / two_phase fine-tuning on the other five classes, few-shot,
#   3. compare each strategy's best recipe over 3 seeds on the held-out test split,
#   4. export the winning recipe as YAML (replay it with `harness train`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
H=.venv/bin/harness
STUDY=studies/quickstart.yaml
$H pretrain studies/recipes/fashion-source-resnet18.yaml
$H sweep "$STUDY"
$H compare "$STUDY"
$H export "$STUDY"
echo
echo "next: .venv/bin/harness ui   # browse every trial's LR curves at http://127.0.0.1:5000"
