#!/usr/bin/env bash
# The test command: set up .venv, lint, run the whole suite (slow multi-process tests included).
# As root with apt (CI, fresh Debian/Ubuntu machines) it also installs slurm-wlm for the real-Slurm
# tests; elsewhere those tests skip and say why.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v slurmctld >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "== installing slurm-wlm (real Slurm for tests/test_slurm.py) =="
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm >/dev/null; } \
    || echo "slurm-wlm could not be installed: the Slurm tests will skip" >&2
fi
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q --durations=30 "$@"
