#!/usr/bin/env bash
# Backgrounds challenge, then every ImageNet-9 variation with the BG-Gap (official analysis/eval_bg_challenge.sh).
# The classifier is $CHECKPOINT. Every argument is passed on to both scripts (the official wrapper dropped
# the first one, ${@:2}, which did not match its README).
#   CHECKPOINT=combined.pth bash analysis/eval_bg_challenge.sh [--use_cuda false]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" "$ROOT/analysis/backgrounds_challenge/challenge_eval.py" \
    --arch vit_small ${CHECKPOINT:+--checkpoint "$CHECKPOINT"} --data-path data/imnet_bg/bg_challenge "$@"
"$PYTHON" "$ROOT/analysis/backgrounds_challenge/in9_eval.py" \
    --arch vit_small ${CHECKPOINT:+--checkpoint "$CHECKPOINT"} --data-path data/imnet_bg/bg_challenge "$@"
