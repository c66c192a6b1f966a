#!/usr/bin/env bash
# One machine, N processes, with the DeepSpeed launcher:
#   launch/local.sh NPROC CONFIG [section.key=value ...]
# On a machine without a GPU the ranks use DeepSpeed's CPU accelerator and gloo.
set -euo pipefail
cd "$(dirname "$0")/.."
nproc=${1:?usage: launch/local.sh NPROC CONFIG [overrides]}; config=${2:?config file}; shift 2
python=.venv/bin/python
[ -x "$python" ] || python=python3
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu
fi
port=${MASTER_PORT:-$(( 29500 + RANDOM % 1000 ))}
exec "$python" -m deepspeed.launcher.runner --num_gpus "$nproc" --master_port "$port" \
  --module vlbert_ds.cli.pretrain --config "$config" "$@"
