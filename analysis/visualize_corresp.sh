#!/usr/bin/env bash
# Patch correspondences (official analysis/visualize_corresp.sh); every argument is passed on.
#   bash analysis/visualize_corresp.sh --pretrained_weights backbone.pth --sample_type instance
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" "$ROOT/analysis/correspondence/visualize_correspondence.py" --arch vit_small --patch_size 16 \
    --data_path data/imagenet/val "$@"
