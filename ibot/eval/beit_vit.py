"""BEiT-style Vision Transformer for ImageNet fine-tuning (spec ``evaluation.md`` §2.5, "Model"); the
official ``evaluation/classification_layer_decay/modeling_finetune.py`` re-exports this module.

Options of the official ``modeling_finetune.py``: learned or sinusoidal absolute position
embedding (``use_abs_pos_emb`` / ``learned_abs_pos_emb``), per-block or shared relative position
bias (3 extra entries for cls→token, token→cls, cls↔cls), layer scale γ (``init_values``), mean
pooling + ``fc_norm`` or [CLS] + final norm, a ``head`` Linear(D, classes) initialised with
truncated normal 0.02 and multiplied by ``init_scale``, the √(2·layer_id) rescale of ``attn.proj`` /
``mlp.fc2`` at init, ``no_weight_decay() = {pos_embed, cls_token}``. The patch embedding asserts that
the input size equals ``img_size``.

With run.sh's flags (``--disable_rel_pos_bias --abs_pos_emb --layer_scale_init_value 0.0
--use_cls``) the parameter names and maths are exactly those of the iBOT backbone
(``ibot/models/vision_transformer.py``): ``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm`` (+ ``fc_norm``, ``head``).

Deviations from the reference:
- the attention uses one ``qkv`` Linear with bias (iBOT's layout, so ``attn.qkv.bias`` of an iBOT
  checkpoint loads) instead of BEiT's separate ``q_bias``/``v_bias``;
- models are kept in a local registry (``MODELS``/``create_model``) instead of being registered in
  timm's global registry under names that could shadow timm's own;
- relative position tables whose size differs from the target are resized with torch's bicubic
  interpolation over the offset grid, not with the geometric-progression resampling of the
  reference (which relied on ``scipy.interpolate.interp2d``, removed from SciPy). iBOT backbones have
  no relative bias, so the run.sh path never resizes one;
- loading is non-strict as in the reference but raises when backbone keys are missing (defect #12).
"""
import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath, Mlp, trunc_normal_

from ibot.utils.checkpoint import safe_load
from ibot.eval.weights import state_dict_by_model_key, strip_prefixes
from ibot.models.init import trunc_normal_init

__all__ = ["VisionTransformer", "MODELS", "create_model", "load_finetune_checkpoint", "vit_tiny", "vit_small",
           "vit_base", "vit_large"]


def get_sinusoid_encoding_table(n_position, d_hid):
    """Fixed sinusoidal table (1, n_position, d_hid)."""
    pos = np.arange(n_position)[:, None]
    i = np.arange(d_hid)[None, :]
    table = pos / np.power(10000, 2 * (i // 2) / d_hid)
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.tensor(table, dtype=torch.float32).unsqueeze(0)


def _relative_position_index(window_size):
    """Index (Wh*Ww+1, Wh*Ww+1) into a table of (2Wh-1)(2Ww-1)+3 entries (3 cls entries last)."""
    wh, ww = window_size
    num_relative_distance = (2 * wh - 1) * (2 * ww - 1) + 3
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    index = torch.zeros((wh * ww + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = num_relative_distance - 3
    index[0:, 0] = num_relative_distance - 2
    index[0, 0] = num_relative_distance - 1
    return index, num_relative_distance


class RelativePositionBias(nn.Module):
    """Shared relative position bias: ``forward() -> (heads, N, N)``."""

    def __init__(self, window_size, num_heads):
        super().__init__()
        self.window_size = window_size
        index, n = _relative_position_index(window_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n, num_heads))
        self.register_buffer("relative_position_index", index, persistent=True)
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def forward(self):
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous()


class Attention(nn.Module):
    """Multi-head attention with one ``qkv`` Linear and an optional per-block relative bias."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, qk_scale=None, attn_drop=0., proj_drop=0.,
                 window_size=None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.window_size = window_size
        if window_size is not None:
            index, n = _relative_position_index(window_size)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(n, num_heads))
            self.register_buffer("relative_position_index", index, persistent=True)
        else:
            self.relative_position_bias_table = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, rel_pos_bias=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        bias = None
        if self.relative_position_bias_table is not None:
            n = self.relative_position_index.shape[0]
            bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
            bias = bias.permute(2, 0, 1).unsqueeze(0)
        if rel_pos_bias is not None:
            bias = rel_pos_bias.unsqueeze(0) if bias is None else bias + rel_pos_bias.unsqueeze(0)
        if bias is not None:
            bias = bias.to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale,
                                           dropout_p=self.attn_drop.p if self.training else 0.)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=True, qk_scale=None, drop=0., attn_drop=0.,
                 drop_path=0., init_values=None, act_layer=nn.GELU, norm_layer=nn.LayerNorm, window_size=None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop, window_size=window_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        if init_values is not None and init_values > 0:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1, self.gamma_2 = None, None

    def forward(self, x, rel_pos_bias=None):
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias))
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        else:
            x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias))
            x = x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))
        return x


class PatchEmbed(nn.Module):
    """Conv patch embedding (``patch_embed.proj``) that asserts the input size equals ``img_size``."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.patch_shape = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.patch_shape[0] * self.patch_shape[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        _, _, H, W = x.shape
        if (H, W) != self.img_size:
            raise ValueError(f"input image size ({H}*{W}) does not match the model ({self.img_size[0]}*"
                             f"{self.img_size[1]}); set --input_size accordingly")
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """BEiT fine-tuning ViT; ``forward(x (B, 3, H, W)) -> logits (B, num_classes)``."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4., qkv_bias=True, qk_scale=None, drop_rate=0., attn_drop_rate=0.,
                 drop_path_rate=0., norm_layer=partial(nn.LayerNorm, eps=1e-6), init_values=None,
                 use_abs_pos_emb=True, learned_abs_pos_emb=True, use_rel_pos_bias=False,
                 use_shared_rel_pos_bias=False, use_mean_pooling=True, init_scale=0.001):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if use_abs_pos_emb:
            if learned_abs_pos_emb:
                self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
            else:
                self.pos_embed = nn.Parameter(get_sinusoid_encoding_table(num_patches + 1, embed_dim),
                                              requires_grad=False)
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(p=drop_rate)
        window = self.patch_embed.patch_shape
        self.rel_pos_bias = RelativePositionBias(window, num_heads) if use_shared_rel_pos_bias else None
        dpr = [v.item() for v in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, dpr[i],
                  init_values, norm_layer=norm_layer, window_size=window if use_rel_pos_bias else None)
            for i in range(depth)])
        self.norm = nn.Identity() if use_mean_pooling else norm_layer(embed_dim)
        self.fc_norm = norm_layer(embed_dim) if use_mean_pooling else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        if self.pos_embed is not None and learned_abs_pos_emb:
            trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        for blk in self.blocks:
            if blk.attn.relative_position_bias_table is not None:
                trunc_normal_(blk.attn.relative_position_bias_table, std=.02)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=.02)
        self.apply(trunc_normal_init)
        self.fix_init_weight()
        if isinstance(self.head, nn.Linear):
            self.head.weight.data.mul_(init_scale)
            self.head.bias.data.mul_(init_scale)

    def fix_init_weight(self):
        for layer_id, layer in enumerate(self.blocks):
            layer.attn.proj.weight.data.div_(math.sqrt(2.0 * (layer_id + 1)))
            layer.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (layer_id + 1)))

    def get_num_layers(self):
        return len(self.blocks)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def forward_features(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed.to(x.dtype)
        x = self.pos_drop(x)
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for blk in self.blocks:
            x = blk(x, rel_pos_bias=rel_pos_bias)
        x = self.norm(x)
        if self.fc_norm is not None:
            return self.fc_norm(x[:, 1:].mean(1))
        return x[:, 0]

    def forward(self, x):
        return self.head(self.forward_features(x))


def _vit(embed_dim, depth, num_heads):
    def build(pretrained=False, patch_size=16, **kwargs):
        if pretrained:
            raise ValueError("pretrained=True is not supported (no downloads); use --finetune")
        return VisionTransformer(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                 mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)
    return build


vit_tiny = _vit(192, 12, 3)
vit_small = _vit(384, 12, 6)
vit_base = _vit(768, 12, 12)
vit_large = _vit(1024, 24, 16)

MODELS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base, "vit_large": vit_large,
          # timm / DeiT names used by the reference's default --model
          "deit_tiny_patch16_224": vit_tiny, "deit_small_patch16_224": vit_small,
          "deit_base_patch16_224": vit_base, "beit_base_patch16_224": vit_base,
          "beit_large_patch16_224": vit_large}


def create_model(name, **kwargs):
    """Build one of ``MODELS`` (e.g. ``vit_base``) with the given keyword arguments."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)


def _resize_pos_embed(pos_embed_checkpoint, model):
    """Bicubically resize the patch part of an absolute position table to the model's grid."""
    num_extra = model.pos_embed.shape[-2] - model.patch_embed.num_patches
    orig = int(round((pos_embed_checkpoint.shape[-2] - num_extra) ** 0.5))
    new = model.patch_embed.patch_shape[0]
    if orig == new:
        return pos_embed_checkpoint
    print(f"Position interpolate from {orig}x{orig} to {new}x{new}")
    extra = pos_embed_checkpoint[:, :num_extra]
    tokens = pos_embed_checkpoint[:, num_extra:].float()
    dim = tokens.shape[-1]
    tokens = tokens.reshape(1, orig, orig, dim).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(new, new), mode="bicubic", align_corners=False)
    tokens = tokens.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed_checkpoint.dtype)
    return torch.cat((extra, tokens), dim=1)


def _resize_rel_table(table, dst_window):
    """Resize a (src_n + 3, heads) relative table to the offsets of ``dst_window`` (bicubic, torch)."""
    num_extra = 3
    src = int(round((table.shape[0] - num_extra) ** 0.5))
    dst = 2 * dst_window[0] - 1
    if src == dst:
        return table
    print(f"Relative position table interpolate from {src}x{src} to {dst}x{dst}")
    extra = table[-num_extra:]
    grid = table[:-num_extra].float().T.reshape(1, -1, src, src)
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=True)
    grid = grid.reshape(-1, dst * dst).T.to(table.dtype)
    return torch.cat((grid, extra), dim=0)


def load_finetune_checkpoint(model, path, model_key="model|module", model_prefix=""):
    """The ``--finetune`` loading of the reference (spec §2.5, "Checkpoint conversion").

    1. ``safe_load`` the file; take the first of ``model_key.split('|')`` present at top level; if
       none is present and the file has a ``state_dict`` entry, take that (extension: the reference
       needs ``--model_key state_dict``); else use the whole dict (flat backbone file).
    2. Keep only keys starting with ``model_prefix`` (prefix removed); also strip leading
       ``module.`` / ``backbone.`` wrapper prefixes (extension).
    3. Drop ``head.weight``/``head.bias`` when their shapes differ from the model's; copy a shared
       ``rel_pos_bias`` table to every block when the model uses per-block tables; drop
       ``relative_position_index``; resize relative tables and ``pos_embed`` when the grid differs.
    4. ``load_state_dict(strict=False)``; print missing / unexpected / ignored keys, and raise when a
       backbone key is missing (everything except ``head.*``, ``fc_norm.*``, relative position
       tables and layer-scale γ, which a plain iBOT backbone does not have).
    Returns ``(missing_keys, unexpected_keys)``.
    """
    print(f"Load ckpt from {path}")
    checkpoint = safe_load(path)
    keys = [k for k in model_key.split("|") if k]
    checkpoint_model, used = state_dict_by_model_key(checkpoint, keys)
    if used is None and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint_model, used = checkpoint["state_dict"], "state_dict"
    print(f"Load state_dict by model_key = {used}" if used else "Load the whole file as the state dict")
    if model_prefix:
        checkpoint_model = {k[len(model_prefix):]: v for k, v in checkpoint_model.items()
                            if k.startswith(model_prefix)}
    checkpoint_model = strip_prefixes(dict(checkpoint_model), ("module.", "backbone."))
    checkpoint_model = {k: v for k, v in checkpoint_model.items() if isinstance(v, torch.Tensor)}
    if not checkpoint_model:
        raise RuntimeError(f"no tensors found in {path} (model_key={model_key!r}, model_prefix={model_prefix!r})")

    state_dict = model.state_dict()
    for k in ("head.weight", "head.bias"):
        if k in checkpoint_model and (k not in state_dict or checkpoint_model[k].shape != state_dict[k].shape):
            print(f"Removing key {k} from pretrained checkpoint")
            del checkpoint_model[k]

    shared = "rel_pos_bias.relative_position_bias_table"
    if shared in checkpoint_model and getattr(model, "rel_pos_bias", None) is None:
        print("Expand the shared relative position embedding to each layer.")
        table = checkpoint_model.pop(shared)
        for i in range(model.get_num_layers()):
            checkpoint_model[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
    ignored = [k for k in checkpoint_model if "relative_position_index" in k]
    for k in ignored:
        checkpoint_model.pop(k)
    for k in list(checkpoint_model):
        if k.endswith("relative_position_bias_table") and k in state_dict:
            if checkpoint_model[k].shape != state_dict[k].shape:
                checkpoint_model[k] = _resize_rel_table(checkpoint_model[k], model.patch_embed.patch_shape)

    if "pos_embed" in checkpoint_model and getattr(model, "pos_embed", None) is not None:
        checkpoint_model["pos_embed"] = _resize_pos_embed(checkpoint_model["pos_embed"], model)

    result = model.load_state_dict(checkpoint_model, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing:
        print(f"Weights of {type(model).__name__} not initialized from pretrained model: {missing}")
    if unexpected:
        print(f"Weights from pretrained model not used in {type(model).__name__}: {unexpected}")
    if ignored:
        print(f"Ignored weights of {type(model).__name__} not initialized from pretrained model: {ignored}")

    def allowed(k):
        return (k.startswith("head.") or k.startswith("fc_norm.") or "relative_position" in k
                or k.startswith("rel_pos_bias.") or k.split(".")[-1] in ("gamma_1", "gamma_2"))

    bad = [k for k in missing if not allowed(k)]
    if bad:
        raise RuntimeError(
            f"{len(bad)} backbone parameters of the model were not found in {path} (e.g. {bad[:5]}); "
            f"check --model/--patch_size, --model_key (found: {used}) and --model_prefix")
    return missing, unexpected
