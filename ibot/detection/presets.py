"""Named settings of the COCO detection runs (evaluation.md §2.12).

``vit_small_1x`` / ``vit_base_1x`` are the README runs (the 3x configs with the README's
``--cfg-options``: 12 epochs, steps 8 and 11, layer decay 0.8 / 0.75, 4 / 2 images per GPU on 8
GPUs); ``vit_small_3x`` / ``vit_base_3x`` are the configs as written (36 epochs, steps 27 and 33,
decay 0.75 / 0.65, 2 images per GPU). ``fmnist_tiny`` is the CPU setting of the tests on the
Fashion-MNIST COCO set: the same detector with narrower heads, fewer RoIs and smaller anchors (the
garments are 16-32 px). Command-line flags override fields (:func:`get_config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from ibot.detection.cascade import OFFICIAL_STAGE_IOUS, OFFICIAL_STAGE_STDS, OFFICIAL_STAGE_WEIGHTS

__all__ = ["DetectionConfig", "PRESETS", "get_config", "train_scales", "crop_scales", "eval_scale"]

DETECTORS = ("cascade_mask_rcnn", "mask_rcnn")


@dataclass
class DetectionConfig:
    """Every setting of a detection run (defaults: the official ViT-S/16 3x config)."""
    arch: str = "vit_small"
    patch_size: int = 16
    backbone_img_size: Tuple[int, int] = (800, 1008)
    out_indices: Tuple[int, ...] = (3, 5, 7, 11)
    out_with_norm: bool = False
    drop_path: float = 0.1
    use_checkpoint: bool = False
    frozen_stages: int = -1          # -1 trains the whole backbone (official); k freezes patch embed + k blocks
    detector: str = "cascade_mask_rcnn"
    fpn_channels: int = 256
    anchor_scale: float = 8.0
    anchor_ratios: Tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_strides: Tuple[int, ...] = (4, 8, 16, 32, 64)
    rpn_train_pre_nms: int = 2000
    rpn_train_post_nms: int = 2000
    rpn_test_pre_nms: int = 1000
    rpn_test_post_nms: int = 1000
    rpn_nms_iou: float = 0.7
    stage_ious: Tuple[float, ...] = OFFICIAL_STAGE_IOUS
    stage_weights: Tuple[float, ...] = OFFICIAL_STAGE_WEIGHTS
    stage_stds: Tuple[Tuple[float, ...], ...] = OFFICIAL_STAGE_STDS
    rcnn_samples: int = 512
    rcnn_pos_fraction: float = 0.25
    head_num_convs: int = 4
    head_conv_channels: int = 256
    head_fc_channels: int = 1024
    mask_channels: int = 256
    giou_weight: float = 10.0
    test_score_thr: float = 0.05
    test_nms_iou: float = 0.5
    test_max_dets: int = 100
    mask_threshold: float = 0.5
    img_scale: int = 800             # short side of the test resize; train scales follow it
    flip_ratio: float = 0.5
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.75
    epochs: int = 36
    lr_steps: Tuple[int, ...] = (27, 33)
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    batch_size_per_gpu: int = 2
    reference_gpus: int = 8           # GPUs of the official run (information only: no lr scaling)
    amp: str = "fp16"                 # fp16 | bf16 | none (autocast on CUDA only)
    notes: str = field(default="", compare=False)

    def to_dict(self) -> Dict[str, object]:
        """Plain dict (tuples become lists), loadable with weights-only ``torch.load``."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Dict[str, object]) -> "DetectionConfig":
        """Inverse of :meth:`to_dict` (unknown keys raise ``ValueError`` naming them)."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"unknown detection config keys: {unknown}")
        fixed = {}
        for k, v in values.items():
            if isinstance(v, list):
                v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
            fixed[k] = v
        return cls(**fixed)


_S = dict(arch="vit_small", backbone_img_size=(800, 1008), drop_path=0.1)
_B = dict(arch="vit_base", backbone_img_size=(672, 1092), drop_path=0.2)
PRESETS: Dict[str, Dict[str, object]] = {
    "vit_small_1x": dict(_S, epochs=12, lr_steps=(8, 11), layer_decay=0.8, batch_size_per_gpu=4,
                         notes="README: ViT-S/16 49.4 box AP / 42.6 mask AP (1x, 8 GPUs x 4)"),
    "vit_base_1x": dict(_B, epochs=12, lr_steps=(8, 11), layer_decay=0.75, batch_size_per_gpu=2,
                        notes="README: ViT-B/16 51.2 box AP / 44.2 mask AP (1x, 8 GPUs x 2)"),
    "vit_small_3x": dict(_S, epochs=36, lr_steps=(27, 33), layer_decay=0.75, batch_size_per_gpu=2,
                         notes="config vit_small_giou_4conv1f_coco_3x.py as written"),
    "vit_base_3x": dict(_B, epochs=36, lr_steps=(27, 33), layer_decay=0.65, batch_size_per_gpu=2,
                        notes="config vit_base_giou_4conv1f_coco_3x.py as written"),
    "fmnist_tiny": dict(arch="vit_tiny", patch_size=8, backbone_img_size=(64, 64), drop_path=0.0,
                        fpn_channels=32, anchor_scale=4.0, rpn_train_pre_nms=300, rpn_train_post_nms=300,
                        rpn_test_pre_nms=200, rpn_test_post_nms=200, rcnn_samples=32, head_conv_channels=32,
                        head_fc_channels=256, mask_channels=32, img_scale=64, lr=1e-3, layer_decay=0.65,
                        epochs=12, lr_steps=(8, 11), warmup_iters=50, batch_size_per_gpu=2, amp="none",
                        notes="CPU tests on the Fashion-MNIST COCO set (64-px canvases)"),
}


def get_config(preset: str, **overrides) -> DetectionConfig:
    """The preset ``preset`` with ``overrides`` (None values are ignored).

    Raises ``ValueError`` naming an unknown preset, field or detector.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown --preset {preset!r}; choose one of {sorted(PRESETS)}")
    values = dict(PRESETS[preset])
    names = {f.name for f in dataclasses.fields(DetectionConfig)}
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in names:
            raise ValueError(f"unknown detection setting {key!r}")
        values[key] = tuple(value) if isinstance(value, list) else value
    cfg = DetectionConfig(**values)
    if cfg.detector not in DETECTORS:
        raise ValueError(f"--detector must be one of {DETECTORS}, got {cfg.detector!r}")
    if cfg.amp not in ("fp16", "bf16", "none"):
        raise ValueError(f"--amp must be fp16, bf16 or none, got {cfg.amp!r}")
    return cfg


def _scaled(values, img_scale: int):
    return tuple(int(round(v * img_scale / 800)) for v in values)


def train_scales(img_scale: int) -> Tuple[Tuple[int, ...], int]:
    """Branch (a) of the training resize: short sides 480..800 step 32 scaled by ``img_scale / 800``,
    and the long-side cap ``round(5 * img_scale / 3)`` (1333 for 800)."""
    return _scaled(range(480, 801, 32), img_scale), int(round(5 * img_scale / 3))


def crop_scales(img_scale: int) -> Tuple[Tuple[int, ...], Tuple[int, int]]:
    """Branch (b): first short sides (400, 500, 600) and the crop side range (384, 600), scaled."""
    return _scaled((400, 500, 600), img_scale), _scaled((384, 600), img_scale)


def eval_scale(img_scale: int) -> Tuple[int, int]:
    """Test resize ``(short side, long-side cap)``: (800, 1333) for 800."""
    return img_scale, int(round(5 * img_scale / 3))


def describe(cfg: DetectionConfig, max_iters: Optional[int] = None) -> str:
    """One line naming the detector, backbone and schedule (printed at start-up)."""
    sched = f"{max_iters} iterations" if max_iters else f"{cfg.epochs} epochs, steps {cfg.lr_steps}"
    return (f"{cfg.detector} on {cfg.arch}/{cfg.patch_size} (pos_embed grid for {cfg.backbone_img_size}), "
            f"AdamW lr {cfg.lr} wd {cfg.weight_decay} layer decay {cfg.layer_decay}, {sched}, "
            f"{cfg.batch_size_per_gpu} images per process, img_scale {cfg.img_scale}")
