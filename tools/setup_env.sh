#!/usr/bin/env bash
# Create ./.venv with the locked dependencies and make sure the Fashion-MNIST files are present.
# Idempotent: a second call only checks. Used by the README commands and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    echo "Installing Debian's dataset-fashion-mnist (Fashion-MNIST IDX files)..."
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null
fi
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# (re)install when the lock file changed since the last install (its hash is kept in the environment)
LOCK_HASH=$(sha256sum requirements-lock.txt | cut -d' ' -f1)
if [ "$(cat "$VENV/.requirements-lock.sha256" 2>/dev/null)" != "$LOCK_HASH" ] \
        || ! "$VENV/bin/python" -c "import torch, torchvision, timm, sklearn, tensorboard, matplotlib, pytest, yaml, cv2, pycocotools" 2>/dev/null; then
    echo "Installing the locked dependencies into $VENV (about a minute)..."
    "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements-lock.txt
    echo "$LOCK_HASH" > "$VENV/.requirements-lock.sha256"
fi
# the ibot package itself, editable: the scripts (python evaluation/eval_knn.py ...) import it from here
PY_ABS=$(cd "$VENV/bin" && pwd)/python
if ! (here=$(pwd) && cd / && "$PY_ABS" -c "import ibot, os, sys; sys.exit(os.path.dirname(os.path.dirname(os.path.abspath(ibot.__file__))) != sys.argv[1])" "$here") 2>/dev/null; then
    echo "Installing the ibot package (editable) into $VENV..."
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e . \
        || "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e .
fi
"$VENV/bin/python" -c "import torch, torchvision, timm; print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}')"
