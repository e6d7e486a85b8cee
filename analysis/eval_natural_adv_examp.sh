#!/usr/bin/env bash
# ImageNet-A accuracy, RMS calibration error and AURRA (official analysis/eval_natural_adv_examp.sh).
# The classifier is $CHECKPOINT; every argument is passed on.
#   CHECKPOINT=combined.pth bash analysis/eval_natural_adv_examp.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" "$ROOT/analysis/natural_adv_examples/eval.py" \
    --arch vit_small ${CHECKPOINT:+--checkpoint "$CHECKPOINT"} --data data/imnet_a/imagenet-a "$@"
