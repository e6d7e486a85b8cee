"""The Fashion-MNIST teacher shared by the learning tests (pre-training, segmentation, detection).

:func:`pretrain_fmnist_teacher` runs the demo's small-image recipe (``ibot.demo.SMALL_IMAGE_RECIPE``,
vit_tiny/8 on 32-px Fashion-MNIST, 300 train / 100 val images per class) for ``CI_EPOCHS`` epochs
with the k-NN of the teacher after the last one, as the learning test of issues 3 and 9 did. The
conftest fixture ``fmnist_teacher`` calls it once per test session; ``IBOT_FMNIST_TEACHER=<path of a
checkpoint.pth made by it>`` reuses an earlier result (its ``log.txt`` beside it) while developing::

    python tests/pretrained_teacher.py /tmp/fmnist_teacher   # then IBOT_FMNIST_TEACHER=/tmp/fmnist_teacher/run/checkpoint.pth
"""
import argparse
import dataclasses
import json
import os
import sys

# CI budget of the small-image recipe (the demo runs it for 5 epochs): 3 epochs = 279 steps, about 4
# minutes on 2 cores; figures of the same budget in docs/small_image_recipe.md
CI_EPOCHS = 3
#: images per class of the data it trains on (train, val): the calibration set
PER_CLASS = (300, 100)


@dataclasses.dataclass
class PretrainedTeacher:
    """Where the run is: ``checkpoint`` (checkpoint.pth), ``data`` (ImageFolder root with train/ and
    val/), ``log`` (the per-epoch records of log.txt) and the architecture it was trained with."""
    checkpoint: str
    data: str
    log: list
    arch: str = "vit_tiny"
    patch_size: int = 8


def build_fmnist_300(root):
    """32-px Fashion-MNIST, 300 train / 100 val images per class (the calibration set), into ``root``
    (for runs outside pytest; the tests get the folder from the ``fmnist_folder`` fixture)."""
    from ibot.data.fmnist import build_fmnist_folder
    build_fmnist_folder(str(root), size=32, per_class_train=PER_CLASS[0], per_class_val=PER_CLASS[1])
    return str(root)


def read_log(run_dir):
    """The JSON records of ``run_dir/log.txt``, one per epoch."""
    with open(os.path.join(run_dir, "log.txt")) as f:
        return [json.loads(line) for line in f]


def pretrain_fmnist_teacher(workdir, data=None, epochs=CI_EPOCHS):
    """Pre-train under ``workdir`` (data in ``workdir/fmnist300`` unless ``data`` is given, run in
    ``workdir/run``) and return a :class:`PretrainedTeacher`."""
    from ibot.demo import SMALL_IMAGE_RECIPE
    from ibot.train.driver import train_ibot
    from ibot.train.flags import get_args_parser
    data = data or build_fmnist_300(os.path.join(workdir, "fmnist300"))
    out = os.path.join(workdir, "run")
    argv = SMALL_IMAGE_RECIPE + ["--arch", "vit_tiny", "--epochs", str(epochs), "--num_workers", "1",
                                 "--data_path", os.path.join(data, "train"), "--output_dir", out,
                                 "--eval_every", str(epochs), "--eval_keys", "teacher",
                                 "--eval_data_path", data, "--eval_resize_size", "32",
                                 "--eval_crop_size", "32", "--eval_num_workers", "0"]
    train_ibot(argparse.ArgumentParser(parents=[get_args_parser()]).parse_args(argv))
    return PretrainedTeacher(os.path.join(out, "checkpoint.pth"), data, read_log(out))


def reuse_fmnist_teacher(checkpoint, data):
    """A :class:`PretrainedTeacher` for an existing ``checkpoint`` trained on the folder ``data``."""
    return PretrainedTeacher(checkpoint, data, read_log(os.path.dirname(checkpoint)))


if __name__ == "__main__":
    os.makedirs(sys.argv[1], exist_ok=True)
    print(pretrain_fmnist_teacher(sys.argv[1]).checkpoint)
