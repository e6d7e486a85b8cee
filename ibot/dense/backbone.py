"""ViT backbone for dense prediction: the official mmseg / mmdet ``VisionTransformer`` wrapper.

The official segmentation and detection code (``mmcv_custom/register_backbone.py``, evaluation.md
§2.12-2.13) subclasses the iBOT ViT so that it returns feature maps instead of a [CLS] token.
:class:`DenseViT` reproduces it on top of :func:`ibot.models.create_model`:

* the patch tokens after the blocks ``out_indices`` (default 3, 5, 7, 11) are reshaped to maps
  ``(B, D, H/p, W/p)``; with ``out_with_norm`` the final LayerNorm is applied to each tap, otherwise
  the model has no final norm (official default);
* ``with_fpn`` builds the pyramid of the UperNet / Mask R-CNN configs. Patch 16: ``fpn1`` = ConvT 2x2
  -> BatchNorm -> GELU -> ConvT 2x2 (stride 4), ``fpn2`` = ConvT 2x2 (stride 8), ``fpn3`` = identity
  (stride 16), ``fpn4`` = max-pool 2 (stride 32). Patch 8: ConvT (4), identity (8), max-pool 2 (16),
  max-pool 4 (32). Without it (linear protocol) every map stays at stride ``p``;
* ``frozen_stages = k >= 0`` freezes (``requires_grad=False`` and eval mode, re-applied by
  :meth:`train`) the patch embedding, ``cls_token`` and ``pos_embed``, then blocks ``0..k-1``, and the
  final norm when ``k == depth``;
* ``use_checkpoint`` recomputes each block in the backward pass (activation checkpointing);
* ``img_size`` may be non-square ``(H, W)``: ``pos_embed`` holds ``(H/p)*(W/p) + 1`` entries, a
  checkpoint's square table is resized to that grid bicubically when loading
  (:meth:`load_pretrained`), and at run time an input whose grid differs gets the table resized
  bicubically to its grid (the DINO ``+0.1`` rule of the official code).

Parameter names equal the official ones (``patch_embed.proj.*``, ``cls_token``, ``pos_embed``,
``blocks.i.*``, ``norm.*``, ``fpn1.0.*`` ...), so under a segmentor attribute ``backbone`` the layer
ids of :mod:`ibot.dense.layer_decay` and official state dicts line up. The pyramid's BatchNorm is a
plain ``nn.BatchNorm2d`` (the official ``SyncBatchNorm`` needs a process group even on one process);
trainers convert it with ``nn.SyncBatchNorm.convert_sync_batchnorm`` when several GPU processes run.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ibot.eval.weights import load_pretrained_weights
from ibot.models import create_model, model_family

__all__ = ["DenseViT", "pyramid_strides", "parse_img_size"]


def parse_img_size(img_size):
    """``512``, ``[512]`` or ``(800, 1008)`` -> ``(H, W)`` in pixels (a single value means square)."""
    if isinstance(img_size, int):
        return (img_size, img_size)
    size = tuple(int(s) for s in img_size)
    if len(size) == 1:
        return (size[0], size[0])
    if len(size) != 2:
        raise ValueError(f"img_size must be one value or (H, W), got {img_size!r}")
    return size


def pyramid_strides(patch_size, with_fpn=True):
    """Output strides (pixels) of the four maps: ``(4, 8, 16, 32)`` with the pyramid, else ``(p,)*4``."""
    if not with_fpn:
        return (patch_size,) * 4
    if patch_size not in (8, 16):
        raise ValueError(f"the dense pyramid (with_fpn) exists for patch sizes 8 and 16 only, got {patch_size}")
    return (4, 8, 16, 32)


def _build_pyramid(dim, patch_size, norm_layer):
    """The four official pyramid operators (``fpn1..fpn4``) for patch 16 or 8."""
    if patch_size == 16:
        return (nn.Sequential(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2), norm_layer(dim), nn.GELU(),
                              nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)),
                nn.Sequential(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)),
                nn.Identity(),
                nn.MaxPool2d(kernel_size=2, stride=2))
    return (nn.Sequential(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)),
            nn.Identity(),
            nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2)),
            nn.Sequential(nn.MaxPool2d(kernel_size=4, stride=4)))


class DenseViT(nn.Module):
    """iBOT ViT returning a tuple of 4 feature maps (official dense backbone, see the module docstring).

    Args:
        arch: registered ViT name (``vit_small``...; tests register tiny ones).
        patch_size: ViT patch size p.
        img_size: nominal input ``(H, W)`` (or one value): the grid of ``pos_embed``; must be
            multiples of p.
        out_indices: 0-based blocks whose outputs are tapped.
        out_with_norm: apply the final LayerNorm to every tap (else the model has no final norm).
        with_fpn: build the stride-4/8/16/32 pyramid (patch 8 or 16).
        frozen_stages: -1 (train all) or k in 0..depth (see the module docstring).
        drop_path_rate: stochastic depth of the last block (linear in depth).
        use_checkpoint: activation checkpointing of every block while autograd records.
        norm_layer: normalisation of the patch-16 ``fpn1`` (``nn.BatchNorm2d``).
        **vit_kwargs: other keyword arguments of the ViT factory.
    ``forward(x (B, 3, H, W))`` -> tuple of 4 tensors ``(B, D, H/s, W/s)`` for the strides of
    :func:`pyramid_strides` (H, W floored to multiples of p first, as the patch embedding does).
    """

    def __init__(self, arch="vit_small", patch_size=16, img_size=(512, 512), out_indices=(3, 5, 7, 11),
                 out_with_norm=False, with_fpn=True, frozen_stages=-1, drop_path_rate=0.0,
                 use_checkpoint=False, norm_layer=nn.BatchNorm2d, **vit_kwargs):
        super().__init__()
        if model_family(arch) != "vit":
            raise ValueError(f"DenseViT wraps Vision Transformers; {arch!r} is not one")
        height, width = parse_img_size(img_size)
        if height % patch_size or width % patch_size:
            raise ValueError(f"img_size {(height, width)} (the crop size) must be a multiple of the patch "
                             f"size {patch_size}")
        vit = create_model(arch, patch_size=patch_size, img_size=[height], drop_path_rate=drop_path_rate,
                           **vit_kwargs)
        depth = len(vit.blocks)
        out_indices = tuple(int(i) for i in out_indices)
        if len(out_indices) != 4 and with_fpn:
            raise ValueError(f"the pyramid needs 4 tapped blocks, got out_indices={out_indices}")
        if any(i < 0 or i >= depth for i in out_indices):
            raise ValueError(f"out_indices {out_indices} outside the {depth} blocks of {arch}")
        if not -1 <= frozen_stages <= depth:
            raise ValueError(f"frozen_stages must be in -1..{depth}, got {frozen_stages}")
        self.arch, self.patch_size, self.embed_dim, self.depth = arch, patch_size, vit.embed_dim, depth
        self.img_size = (height, width)
        self.grid_size = (height // patch_size, width // patch_size)
        self.out_indices, self.out_with_norm, self.with_fpn = out_indices, bool(out_with_norm), bool(with_fpn)
        self.frozen_stages, self.use_checkpoint = int(frozen_stages), bool(use_checkpoint)
        self.out_strides = pyramid_strides(patch_size, with_fpn)
        self.out_channels = (vit.embed_dim,) * len(out_indices)

        self.patch_embed = vit.patch_embed
        self.patch_embed.grid_size = self.grid_size
        self.patch_embed.num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = vit.cls_token
        if vit.pos_embed.shape[1] == self.patch_embed.num_patches + 1:
            self.pos_embed = vit.pos_embed
        else:  # non-square grid: a fresh table, initialised as the ViT initialises its own
            self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, vit.embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=.02)
        self.pos_drop = vit.pos_drop
        self.blocks = vit.blocks
        self.norm = vit.norm if out_with_norm else nn.Identity()
        # a checkpoint always holds the final norm; without out_with_norm it is loaded here and unused
        self._checkpoint_norm = vit.norm
        if with_fpn:
            self.fpn1, self.fpn2, self.fpn3, self.fpn4 = _build_pyramid(vit.embed_dim, patch_size, norm_layer)
        self._freeze_stages()

    def __setattr__(self, name, value):
        if name == "_checkpoint_norm":  # keep it out of the module tree (no state-dict keys)
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ------------------------------------------------------------------ freezing
    def _freeze_stages(self):
        if self.frozen_stages >= 0:
            self.patch_embed.eval()
            for param in self.patch_embed.parameters():
                param.requires_grad = False
            self.cls_token.requires_grad = False
            self.pos_embed.requires_grad = False
            self.pos_drop.eval()
        for i in range(1, self.frozen_stages + 1):
            if i == self.depth:
                self.norm.eval()
                for param in self.norm.parameters():
                    param.requires_grad = False
            block = self.blocks[i - 1]
            block.eval()
            for param in block.parameters():
                param.requires_grad = False

    def train(self, mode=True):
        """Set the training mode, keeping frozen stages in eval mode (no dropout / drop path)."""
        super().train(mode)
        self._freeze_stages()
        return self

    # ------------------------------------------------------------------ position embedding
    def position_embedding(self, grid_h, grid_w):
        """Table ``(1, 1 + grid_h * grid_w, D)`` for an input grid; bicubic (``+0.1`` rule) when it differs."""
        if (grid_h, grid_w) == self.grid_size:
            return self.pos_embed
        gh, gw = self.grid_size
        dim = self.pos_embed.shape[-1]
        patch_pos = self.pos_embed[:, 1:].reshape(1, gh, gw, dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, scale_factor=((grid_h + 0.1) / gh, (grid_w + 0.1) / gw),
                                  mode="bicubic")
        if patch_pos.shape[-2:] != (grid_h, grid_w):
            raise RuntimeError(f"position-embedding interpolation produced {tuple(patch_pos.shape[-2:])}, "
                               f"expected {(grid_h, grid_w)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat((self.pos_embed[:, :1], patch_pos), dim=1)

    # ------------------------------------------------------------------ forward
    def forward(self, x):
        """x (B, 3, H, W) -> tuple of 4 maps (B, D, H/s, W/s), s in ``self.out_strides``."""
        batch = x.shape[0]
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1), tokens), dim=1)
        tokens = self.pos_drop(tokens + self.position_embedding(grid_h, grid_w))
        recompute = self.use_checkpoint and torch.is_grad_enabled()
        taps = {}
        for i, block in enumerate(self.blocks[:max(self.out_indices) + 1]):
            tokens = checkpoint(block, tokens, use_reentrant=False) if recompute else block(tokens)
            if i in self.out_indices:
                patch = self.norm(tokens[:, 1:])
                taps[i] = patch.transpose(1, 2).reshape(batch, -1, grid_h, grid_w).contiguous()
        features = [taps[i] for i in self.out_indices]  # in out_indices order (official: block order)
        if self.with_fpn:
            features = [op(f) for op, f in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), features)]
        return tuple(features)

    # ------------------------------------------------------------------ weights
    def vit_modules(self):
        """An ``nn.Module`` sharing this backbone's ViT parts, named as in a ViT state dict (no pyramid).

        Its ``state_dict()`` is what a pre-training checkpoint holds (``norm`` included even without
        ``out_with_norm``); loading into it loads into this backbone.
        """
        parts = nn.Module()
        parts.patch_embed = self.patch_embed
        parts.cls_token = self.cls_token
        parts.pos_embed = self.pos_embed
        parts.blocks = self.blocks
        parts.norm = self.norm if self.out_with_norm else self._checkpoint_norm
        return parts

    def load_pretrained(self, pretrained_weights, checkpoint_key="teacher"):
        """Load ViT weights (pre-training checkpoint or backbone file) with the repository's loader.

        ``pos_embed`` is resized bicubically from the checkpoint's square grid to ``self.grid_size``;
        ``''``/None keeps the random initialisation. Returns the report of
        :func:`ibot.eval.weights.load_pretrained_weights`; raises its ``PretrainedWeightsError``
        (listing the keys) when the file does not fit the architecture.
        """
        return load_pretrained_weights(self.vit_modules(), pretrained_weights, checkpoint_key,
                                       self.arch, self.patch_size)

    def extra_repr(self):
        return (f"arch={self.arch}, patch_size={self.patch_size}, img_size={self.img_size}, "
                f"out_indices={self.out_indices}, out_with_norm={self.out_with_norm}, "
                f"with_fpn={self.with_fpn}, frozen_stages={self.frozen_stages}, "
                f"use_checkpoint={self.use_checkpoint}")

