#!/usr/bin/env bash
# The main job on the embedded default: prepare the default data (once, into data/default), then
# pretrain the MiniLM-initialised VL-BERT with 2 DeepSpeed ranks (gloo, ZeRO-2, precision auto: bf16 where
# the CPU computes it natively, else fp32) and print the
# final metrics, the visual-grounding check, and where the MLflow run and checkpoints are.
# Extra arguments are config overrides, e.g. `bash scripts/main.sh train.steps=100`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec bash launch/local.sh 2 configs/default.yaml "train.output_dir=runs/default-$(date +%Y%m%d-%H%M%S)" "$@"
