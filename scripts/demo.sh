#!/usr/bin/env bash
# The main job on the built-in default: pretrain a body on five Fashion-MNIST classes
# (skipped when already done), then fine-tune it few-shot on the other five.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
H=.venv/bin/harness
$H pretrain studies/recipes/fashion-source-resnet18.yaml
$H train studies/recipes/quickstart-train.yaml
echo "browse the runs: .venv/bin/mlflow ui --backend-store-uri sqlite:///$PWD/workspace/mlflow.db"
