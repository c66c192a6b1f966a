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
# Two workers, a test file each at a time, longest files first (tests/conftest.py: LONGEST_FIRST): the
# multi-process tests leave about half of a 2-core machine idle (start-up, waits, single-rank runs), so a
# second worker fills it. VLBERT_TEST_WORKERS=0 runs everything in this one process (e.g. to use -s/pdb).
workers=${VLBERT_TEST_WORKERS:-2}
exec .venv/bin/python -m pytest -q --durations=30 -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
