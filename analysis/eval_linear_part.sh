#!/usr/bin/env bash
# Part-wise linear probing on 8 GPUs (official analysis/eval_linear_part.sh, with torchrun); GPUS (8)
# sets the number of processes; every argument is passed on.
#   bash analysis/eval_linear_part.sh --pretrained_weights ckpt.pth --topk 4
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" -m torch.distributed.run --nproc_per_node "${GPUS:-8}" "$ROOT/analysis/linear_part/eval.py" \
    --arch vit_small --output_dir .linear_part --data_path data/imagenet "$@"
