#!/usr/bin/env bash
# Random patch drop, then saliency-based fore/background removal (official analysis/eval_occlusion.sh);
# every argument is passed on to both runs.
#   bash analysis/eval_occlusion.sh --pretrained_weights combined.pth
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" "$ROOT/analysis/occlusion/eval.py" --model_name vit_small --test_data data/imagenet/val \
    --random_drop "$@"
"$PYTHON" "$ROOT/analysis/occlusion/eval.py" --model_name vit_small --test_data data/imagenet/val \
    --dino "$@"
