#!/usr/bin/env bash
# The main job on the embedded default. Until `vlbert-pretrain` exists (issue 4) this runs a few
# optimisation steps of the MiniLM-initialised VL-BERT on a generated batch.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/vlbert-demo "$@"
