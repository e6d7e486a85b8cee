#!/usr/bin/env bash
# Patch shuffle on grids 2x2 ... 16x16 (official analysis/eval_shuffle.sh); every argument is passed on.
#   bash analysis/eval_shuffle.sh --pretrained_weights combined.pth
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" "$ROOT/analysis/occlusion/eval.py" --model_name vit_small --test_data data/imagenet/val --shuffle \
    --shuffle_h 2 2 4 4 8 14 16 --shuffle_w 2 4 4 8 8 14 16 "$@"
