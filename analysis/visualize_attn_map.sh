#!/usr/bin/env bash
# Attention maps of the last layer (official analysis/visualize_attn_map.sh). Run from the repository root;
# every argument is passed on (a repeated flag overrides the defaults below, e.g. --arch vit_base).
#   bash analysis/visualize_attn_map.sh --pretrained_weights ckpt.pth --output_dir attn/
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" "$ROOT/analysis/attention_map/visualize_attention.py" --arch vit_small --patch_size 16 \
    --data_path data/imagenet/val "$@"
