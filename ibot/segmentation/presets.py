"""The official ADE20K configs as named presets (``evaluation/semantic_segmentation/configs``, evaluation.md §2.13).

A preset is the flat set of values an official config resolves to after its ``_base_`` files are
merged: ``linear/vit_base_512`` is ``configs/linear/vit_base_512_ade20k_160k.py``,
``upernet/vit_small_512_ms`` is ``configs/upernet/vit_small_512_ade20k_160k_ms.py``. Twenty configs
exist officially (no ``vit_small`` 640 configs, and no ``linear`` ``_ms`` / ``_pt2ft`` ones).

Quirks of the official files, resolved as the official code resolves them:

* the ``_ms`` configs (except ViT-B 640) assign ``data`` twice, so their ``samples_per_gpu=2`` is
  lost and the base value 4 applies; the ViT-S/B ``_ms`` 512 configs also fall back to the plain ``IterBasedRunner``
  and an empty ``optimizer_config``, i.e. fp32 (no apex);
* the 640 ViT-L configs use the 320k schedule with ``samples_per_gpu=1`` and
  ``update_interval=2`` (two iterations per optimiser step, 160k steps), warm-up 3000;
* ``linear/vit_large_512`` declares ``channels=2048`` for a 4x1024-channel input, which the
  official ``FCNHead(num_convs=0)`` rejects; the linear head here always has ``4 * D`` inputs.

``scaled_to_crop(preset, crop)`` gives the pipeline for another crop size S: resize scale
``(4S, S)``, crop and window S, stride ``floor(2S / 3)`` (512 -> 341, 640 -> 426).
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple

__all__ = ["SegPreset", "PRESETS", "get_preset", "preset_names", "scaled_to_crop"]

MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
_ARCH = {"vit_small": (384, 12), "vit_base": (768, 12), "vit_large": (1024, 24)}


@dataclass(frozen=True)
class SegPreset:
    """Every value the trainer and the tester read from an official config (units in the names)."""
    name: str
    head: str                      # 'linear' (frozen backbone + FCNHead 1x1) or 'upernet'
    arch: str
    patch_size: int = 16
    crop_size: int = 512           # training crop = backbone img_size = sliding window
    train_scale: Tuple[int, int] = (2048, 512)     # Resize img_scale (long, short) before ratio
    ratio_range: Tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    eval_scale: Tuple[int, int] = (2048, 512)
    test_stride: int = 341
    test_ratios: Tuple[float, ...] = (1.0,)
    test_flip: bool = False
    setr_resize: bool = False      # _ms: short side max(crop, ratio * scale) (SETR_Resize)
    num_classes: int = 150
    reduce_zero_label: bool = True
    out_indices: Tuple[int, ...] = (3, 5, 7, 11)
    out_with_norm: bool = False
    drop_path_rate: float = 0.1
    frozen_stages: int = -1
    with_fpn: bool = True
    channels: int = 384            # UPerHead channels (= D officially)
    pool_scales: Tuple[int, ...] = (1, 2, 3, 6)
    dropout_ratio: float = 0.1
    aux_channels: int = 256
    aux_in_index: int = 2
    aux_loss_weight: float = 0.4
    lr: float = 3e-5
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.999)
    layer_decay_rate: Optional[float] = 0.9        # None: one plain AdamW group (linear configs)
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    poly_power: float = 1.0
    min_lr: float = 0.0
    max_iters: int = 160000
    checkpoint_interval: int = 64000
    eval_interval: int = 64000
    batch_size_per_gpu: int = 2
    update_interval: int = 1
    fp16: bool = True              # apex O1 officially; native autocast here
    config_file: str = field(default="", compare=False)

    @property
    def embed_dim(self):
        return _ARCH[self.arch][0]

    @property
    def depth(self):
        return _ARCH[self.arch][1]


def _make(head, arch, crop, variant=""):
    dim, depth = _ARCH[arch]
    large = arch == "vit_large"
    size = "512" if crop == 512 else "640"
    name = f"{head}/{arch}_{size}{'_' + variant if variant else ''}"
    config = f"configs/{head}/{arch}_{size}_ade20k_160k{'_' + variant if variant else ''}.py"
    values = dict(name=name, head=head, arch=arch, crop_size=crop, train_scale=(4 * crop, crop),
                  eval_scale=(4 * crop, crop), test_stride=(2 * crop) // 3, channels=dim,
                  out_indices=(7, 11, 15, 23) if large else (3, 5, 7, 11),
                  drop_path_rate=0.2 if large else 0.1, config_file=config)
    if large and crop == 640:
        values.update(max_iters=320000, checkpoint_interval=128000, eval_interval=128000,
                      warmup_iters=3000, batch_size_per_gpu=1, update_interval=2)
    if head == "linear":
        lr = {("vit_small", 512): 3e-5, ("vit_base", 512): 7e-4, ("vit_base", 640): 3e-5,
              ("vit_large", 512): 2e-5, ("vit_large", 640): 2e-5}[(arch, crop)]
        values.update(lr=lr, layer_decay_rate=None, frozen_stages=depth, with_fpn=False,
                      channels=4 * dim, dropout_ratio=0.0, aux_loss_weight=0.0)
    else:
        if large:
            lr, rate = 2e-5, 0.95
        elif arch == "vit_base" and crop == 512 and not variant:
            lr, rate = 7e-4, 0.65
        else:
            lr, rate = 3e-5, 0.9
        values.update(lr=lr, layer_decay_rate=rate)
    if variant == "ms":
        values.update(test_ratios=MS_RATIOS, test_flip=True, setr_resize=True,
                      batch_size_per_gpu=2 if (arch, crop) == ("vit_base", 640) else 4)
        if crop == 512 and not large:
            values.update(fp16=False)
    return SegPreset(**values)


_CONFIGS = ([("linear", a, c, "") for a, c in (("vit_small", 512), ("vit_base", 512), ("vit_base", 640),
                                               ("vit_large", 512), ("vit_large", 640))]
            + [("upernet", "vit_small", 512, v) for v in ("", "ms", "pt2ft")]
            + [("upernet", a, c, v) for a in ("vit_base", "vit_large") for c in (512, 640)
               for v in ("", "ms", "pt2ft")])
PRESETS = {p.name: p for p in (_make(*c) for c in _CONFIGS)}


def preset_names():
    """Names of the official presets, e.g. ``['linear/vit_small_512', ..., 'upernet/vit_large_640_pt2ft']``."""
    return list(PRESETS)


def get_preset(name):
    """The preset ``name`` (``linear/vit_base_512`` or the config file name ``vit_base_512_ade20k_160k``
    under ``linear/``); ``KeyError`` listing the choices otherwise."""
    key = name.replace("_ade20k_160k", "").removesuffix(".py")
    key = key.split("configs/")[-1]
    if key not in PRESETS:
        raise KeyError(f"unknown segmentation preset {name!r}; choices: {', '.join(PRESETS)}")
    return PRESETS[key]


def scaled_to_crop(preset, crop_size):
    """``preset`` with the pipeline scaled to crop ``S``: scales ``(4S, S)``, window S, stride ``2S // 3``."""
    crop_size = int(crop_size)
    return dataclasses.replace(preset, crop_size=crop_size, train_scale=(4 * crop_size, crop_size),
                               eval_scale=(4 * crop_size, crop_size), test_stride=(2 * crop_size) // 3)
