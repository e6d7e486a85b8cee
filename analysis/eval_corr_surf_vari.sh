#!/usr/bin/env bash
# ImageNet-C errors and unnormalised mCE (official analysis/eval_corr_surf_vari.sh). The classifier is
# $CHECKPOINT (a combined backbone + linear file; unset = random init, with a warning); every argument is
# passed on.
#   CHECKPOINT=combined.pth bash analysis/eval_corr_surf_vari.sh [--use_cuda false]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" "$ROOT/analysis/corruptions_surf_variations/eval.py" \
    --arch vit_small ${CHECKPOINT:+--checkpoint "$CHECKPOINT"} --data data/imnet_c "$@"
