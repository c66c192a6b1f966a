#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md in one call, for an offline GPU host that is lent for
# minutes (../shared/gpu/README.md). Run from the project root with `.whl/` built by
# ../shared/gpu/wheelhouse.sh (+ torchvision and a bundled-BERT copy under .whl/site, see
# docs/performance.md). Logs and JSON go to $OUT (default /tmp/vlbert-gpu).
#
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh
set -u
OUT=${OUT:-/tmp/vlbert-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -3
export PYTHONPATH=/tmp/site:$PWD/.whl/site:$PWD
export TORCH_CUDA_ARCH_LIST=9.0   # the host's "9.0a" breaks DeepSpeed's op builder
export TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, torchvision, transformers, deepspeed, webdataset; print('torch', torch.__version__, \
'torchvision', torchvision.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" \
  > "$OUT/versions.txt" 2>&1
cat "$OUT/gpu.txt" "$OUT/versions.txt"

step() {  # name, time limit (s), command...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - start)) s"
  grep -E "^(ours|hf_|ratio|engine|base|mini)" "$OUT/$name.log" | head -8
  [ $rc -eq 0 ] || tail -5 "$OUT/$name.log"
}

step base_eager 150 python3 benchmarks/pretrain_step.py --device cuda --preset base --steps 10 --rounds 3 \
  --json "$OUT/pretrain_step_cuda_base.json"
step base_compile 240 python3 benchmarks/pretrain_step.py --device cuda --preset base --compile --steps 10 \
  --rounds 3 --json "$OUT/pretrain_step_cuda_base_compile.json"
step engine 150 env RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 \
  python3 benchmarks/pretrain_step.py --engine --device cuda --batch 256 --workers 6 --steps 60 \
  --work /tmp/engine-bench --json "$OUT/pretrain_engine_cuda.json"
