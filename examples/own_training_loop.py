"""iBOT in your own PyTorch loop, from the package's pieces (no main_ibot.py, no driver).

    python examples/own_training_loop.py --data data/fmnist32/train --steps 50

The pieces: the multi-crop transform and the masked image folder (``ibot.data``), a registered
backbone with the iBOT head in the multi-crop wrapper (``ibot.models``), the loss with its centres
(``ibot.train.loss``) and the training-step object that owns student, teacher and the EMA
(``ibot.train.step``). The loop itself, the optimiser and the schedules are plain PyTorch.
"""
import argparse
import copy
import os

import torch

from ibot.data.augment import DataAugmentationiBOT
from ibot.data.fmnist import build_fmnist_folder
from ibot.data.folders import ImageFolderMask
from ibot.models import MultiCropWrapper, create_model, iBOTHead
from ibot.train.loss import iBOTLoss
from ibot.train.step import StepConfig, iBOTTrainStep


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/fmnist32/train", help="image folder (built from Fashion-MNIST if missing)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch_size", type=int, default=32)
    args = p.parse_args(argv)
    if not os.path.isdir(args.data):
        build_fmnist_folder(os.path.dirname(args.data.rstrip("/")), size=32, per_class_train=30, per_class_val=10)

    # data: 2 global 32-px crops (masked for the student) + 2 local 16-px crops per image
    transform = DataAugmentationiBOT((0.5, 1.0), (0.2, 0.5), 2, 2, global_crops_size=32, local_crops_size=16)
    dataset = ImageFolderMask(args.data, transform, patch_size=8, pred_ratio=[0.0, 0.3], pred_ratio_var=[0.0, 0.2],
                              mask_crops=2, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)

    # networks: the teacher starts as a copy of the student and is never trained by the optimiser
    backbone = create_model("vit_tiny", patch_size=8, img_size=32, drop_path_rate=0.1, masked_im_modeling=True,
                            return_all_tokens=True)
    student = MultiCropWrapper(backbone, iBOTHead(192, 256, patch_out_dim=256, shared_head=True, hidden_dim=256,
                                                  bottleneck_dim=64, norm_last_layer=False))
    teacher = copy.deepcopy(student)
    teacher.backbone.masked_im_modeling = False
    for param in teacher.parameters():
        param.requires_grad = False
    loss = iBOTLoss(256, 256, 2, 2, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp2=0.04,
                    teacher_temp2=0.07, warmup_teacher_temp_epochs=0, nepochs=1)
    step = iBOTTrainStep(student, teacher, teacher, loss, config=StepConfig(clip_grad=3.0, freeze_last_layer=0))
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.04)
    lr_at = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

    it, history = 0, []
    while it < args.steps:
        for crops, _labels, masks in loader:
            optimizer.zero_grad()
            losses, _, _ = step.forward_backward(crops, masks, epoch=0)
            step.clip_and_step(optimizer, epoch=0)
            step.update_teacher(momentum=0.99)
            lr_at.step()
            history.append({k: float(v.detach()) for k, v in losses.items()})
            if it % 10 == 0:
                print(f"step {it}: loss {history[-1]['loss']:.3f} (cls {history[-1]['cls']:.3f}, "
                      f"patch {history[-1]['patch']:.3f})", flush=True)
            it += 1
            if it == args.steps:
                break
    return history, step


if __name__ == "__main__":
    main()
