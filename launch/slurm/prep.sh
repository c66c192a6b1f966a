#!/bin/bash
# Submit a vlbert-prep command in N parts (a job array of launch/slurm/prep.sbatch) and `vlbert-prep
# finalize OUT` as a job that starts when every part succeeded (afterok; it is cancelled if one fails:
# resubmit that part, then finalize by hand or with this script again, which resumes the done parts).
#
#   launch/slurm/prep.sh 64 regions --img2dataset s3://b/cc3m --detector bua:W --out s3://b/cc3m-regions
#
# Extra sbatch options: VLBERT_SBATCH_ARGS (for the parts, e.g. "--partition=gpu --gres=gpu:1") and
# VLBERT_FINALIZE_ARGS (for the finalize job). Prints the two job ids.
set -euo pipefail
if [ $# -lt 2 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: launch/slurm/prep.sh N COMMAND [options] --out OUT   (N parts, a vlbert-prep command)" >&2
    exit 2
fi
PARTS=$1
shift
OUT=""
ARGS=("$@")
for ((i = 0; i < ${#ARGS[@]}; i++)); do
    case "${ARGS[$i]}" in
        --out) OUT=${ARGS[$((i + 1))]:-} ;;
        --out=*) OUT=${ARGS[$i]#--out=} ;;
    esac
done
if [ -z "$OUT" ]; then
    echo "prep.sh: the command needs --out OUT (finalize runs on it)" >&2
    exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${VLBERT_PYTHON:-$(pwd)/.venv/bin/python}
# shellcheck disable=SC2086  # the extra sbatch options are words on purpose
ARRAY=$(sbatch --parsable --array="0-$((PARTS - 1))" ${VLBERT_SBATCH_ARGS:-} "$HERE/prep.sbatch" "$@")
ARRAY=${ARRAY%%;*}
# shellcheck disable=SC2086
FINAL=$(sbatch --parsable --dependency="afterok:${ARRAY}" --kill-on-invalid-dep=yes --job-name=vlbert-prep-finalize \
    --ntasks=1 --output="vlbert-prep-finalize-%j.out" ${VLBERT_FINALIZE_ARGS:-} \
    --wrap="$(printf '%q ' "$PYTHON" -m vlbert_ds.prep.cli finalize "$OUT")")
FINAL=${FINAL%%;*}
echo "parts: job array ${ARRAY} (${PARTS} tasks); finalize: job ${FINAL} (after all parts succeed)"
