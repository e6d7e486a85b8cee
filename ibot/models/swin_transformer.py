"""Swin Transformer backbone for iBOT pre-training and evaluation.

Re-implementation of the behaviour of the official iBOT ``models/swin_transformer.py``
(see ``shared/reference/pretraining.md`` section 3):

* parameter / buffer names, shapes and state-dict order are those of the official model, so
  official checkpoints load with ``load_state_dict(strict=True)`` (the persistent
  ``relative_position_index`` buffers are included, there is no ``attn_mask`` buffer: the
  shifted-window mask is rebuilt for the runtime grid on every forward, quirk Q32);
* windows shrink to the nominal (``img_size``-based) resolution of a stage when that resolution is
  not larger than the window (the shift then becomes 0); odd blocks shift by ``window // 2``;
* the runtime token grid is zero-padded (after ``norm1``) to a multiple of the window, so small
  crops (96 px local crops, 32 px test inputs) run; padded tokens take part in attention;
* ``masked_embed`` replaces the normalised patch embeddings where the mask (given on the
  final-stage grid) is set, after nearest upsampling by ``repeat_interleave``;
* with ``return_all_tokens`` the output is ``cat([avg-pooled token, normed final tokens])`` so that
  token 0 plays the role of the [CLS] token.

Differences to the official code (all behaviour-preserving or crash fixes):

* the attention uses ``torch.nn.functional.scaled_dot_product_attention`` (relative position bias
  + shift mask passed as ``attn_mask``); an explicit softmax path (``fused_attn=False`` or
  :meth:`SwinTransformer.set_fused_attn`) is used when attention probabilities are requested;
* the token grid height/width are tracked explicitly instead of assuming ``H = W = sqrt(L)``, so
  non-square inputs also work (identical results for square inputs);
* giving a mask to a model built without ``masked_embed`` raises a ``ValueError`` instead of the
  official ``AttributeError`` (quirk Q14);
* the factories are not registered with timm's model registry;
* optional activation checkpointing of the blocks in ``forward``
  (:meth:`SwinTransformer.set_grad_checkpointing`, timm's method name); off by default.
"""

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_
from .init import trunc_normal_init
from .registry import register_model

__all__ = [
    "SwinTransformer",
    "swin_tiny",
    "swin_small",
    "swin_base",
    "swin_large",
    "check_swin_args",
    "SWIN_STRIDE",
]

# Pixel stride of one final-stage token of the standard 4-stage Swin (patch 4, three mergings).
SWIN_STRIDE = 32


# --------------------------------------------------------------------------------------------
# window helpers
# --------------------------------------------------------------------------------------------
def window_partition(x, window_size):
    """(B, H, W, C) -> (B * nW, window_size * window_size, C); H, W multiples of the window."""
    B, H, W, C = x.shape
    ws = window_size
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, C)


def window_reverse(windows, window_size, B, H, W):
    """Inverse of :func:`window_partition`: (B * nW, ws * ws, C) -> (B, H, W, C)."""
    ws = window_size
    C = windows.shape[-1]
    x = windows.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


def relative_position_index(window_size):
    """(ws*ws, ws*ws) index into the ((2ws-1)^2, heads) relative position bias table."""
    ws = window_size
    rows, cols = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    d_row = rows[:, None] - rows[None, :] + (ws - 1)
    d_col = cols[:, None] - cols[None, :] + (ws - 1)
    return d_row * (2 * ws - 1) + d_col


def shifted_window_mask(Hp, Wp, window_size, shift_size, device=None):
    """Additive SW-MSA mask (nW, ws*ws, ws*ws): 0 inside a region, -100 across regions.

    Regions are those of the official code: along each axis of the (padded) grid the positions
    ``[0, Hp-ws)``, ``[Hp-ws, Hp-shift)`` and ``[Hp-shift, Hp)`` form three bands.
    """
    ws, s = window_size, shift_size

    def bands(n):
        pos = torch.arange(n, device=device)
        return (pos >= n - ws).long() + (pos >= n - s).long()

    labels = bands(Hp)[:, None] * 3 + bands(Wp)[None, :]  # (Hp, Wp)
    labels = window_partition(labels[None, :, :, None], ws).squeeze(-1)  # (nW, ws*ws)
    different = labels[:, None, :] != labels[:, :, None]
    zeros = torch.zeros(different.shape, device=device)
    return zeros.masked_fill(different, -100.0)


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------
class WindowAttention(nn.Module):
    """Window multi-head self-attention with a learned relative position bias."""

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, qk_scale=None,
                 attn_drop=0.0, proj_drop=0.0, fused_attn=True):
        super().__init__()
        self.dim = dim
        self.window_size = to_2tuple(window_size)
        if self.window_size[0] != self.window_size[1]:
            raise ValueError("only square windows are supported")
        ws = self.window_size[0]
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.fused_attn = fused_attn

        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * ws - 1) * (2 * ws - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(ws))

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self):
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1)  # (heads, N, N)

    def forward(self, x, mask=None, return_attention=False):
        """x: (B*nW, N, C); mask: additive (nW, N, N) or None.

        Returns ``(out, attn)``; ``attn`` holds the softmax probabilities (B*nW, heads, N, N)
        before dropout when ``return_attention`` (computed explicitly), else ``None``.
        """
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B_, heads, N, hd)
        bias = self.relative_position_bias()

        attn = None
        if self.fused_attn and not return_attention:
            attn_mask = bias.unsqueeze(0)  # (1, heads, N, N)
            if mask is not None:
                nW = mask.shape[0]
                attn_mask = attn_mask + mask.unsqueeze(1)  # (nW, heads, N, N)
                attn_mask = attn_mask.unsqueeze(0).expand(B_ // nW, -1, -1, -1, -1)
                attn_mask = attn_mask.reshape(B_, self.num_heads, N, N)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask.to(q.dtype),
                dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale)
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)
            if mask is not None:
                nW = mask.shape[0]
                logits = logits.view(B_ // nW, nW, self.num_heads, N, N) + mask[None, :, None]
                logits = logits.view(B_, self.num_heads, N, N)
            attn = logits.softmax(dim=-1)
            out = self.attn_drop(attn) @ v

        out = out.transpose(1, 2).reshape(B_, N, C)
        out = self.proj_drop(self.proj(out))
        return out, attn

    def extra_repr(self):
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention block; the window shrinks for small nominal resolutions."""

    def __init__(self, dim, input_resolution, num_heads, window_size=7, shift_size=0,
                 mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm, fused_attn=True):
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.mlp_ratio = mlp_ratio
        if min(self.input_resolution) <= self.window_size:
            # the whole (nominal) map fits in one window: no partition, no shift
            self.shift_size = 0
            self.window_size = min(self.input_resolution)
        if not 0 <= self.shift_size < self.window_size:
            raise ValueError(f"shift_size must be in [0, window_size), got {self.shift_size} "
                             f"for window_size {self.window_size}")

        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, window_size=self.window_size, num_heads=num_heads,
                                    qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                                    proj_drop=drop, fused_attn=fused_attn)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio),
                       act_layer=act_layer, drop=drop)

    def forward(self, x, hw, return_attention=False):
        """x: (B, H*W, C) with ``hw = (H, W)``. Returns ``(x, attn)``."""
        H, W = hw
        B, L, C = x.shape
        if L != H * W:
            raise ValueError(f"token count {L} does not match the grid {H}x{W}")
        ws, s = self.window_size, self.shift_size

        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        pad_b, pad_r = (-H) % ws, (-W) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r

        if s > 0:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
            mask = shifted_window_mask(Hp, Wp, ws, s, device=x.device)
        else:
            mask = None

        windows, attn = self.attn(window_partition(x, ws), mask, return_attention)
        x = window_reverse(windows, ws, B, Hp, Wp)

        if s > 0:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        if pad_b or pad_r:
            x = x[:, :H, :W, :]
        x = x.reshape(B, H * W, C)

        x = shortcut + self.drop_path(x)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, attn

    def extra_repr(self):
        return (f"dim={self.dim}, input_resolution={self.input_resolution}, "
                f"num_heads={self.num_heads}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}, mlp_ratio={self.mlp_ratio}")


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat (order (0,0), (1,0), (0,1), (1,1)) -> LayerNorm(4C) -> Linear 2C."""

    def __init__(self, input_resolution, dim, norm_layer=nn.LayerNorm):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x, hw):
        H, W = hw
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)
        Ho, Wo = x.shape[1], x.shape[2]
        x = self.reduction(self.norm(x.reshape(B, Ho * Wo, 4 * C)))
        return x, (Ho, Wo)

    def extra_repr(self):
        return f"input_resolution={self.input_resolution}, dim={self.dim}"


class BasicLayer(nn.Module):
    """One Swin stage: ``depth`` blocks (odd ones shifted) and an optional PatchMerging."""

    def __init__(self, dim, input_resolution, depth, num_heads, window_size, mlp_ratio=4.0,
                 qkv_bias=True, qk_scale=None, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 norm_layer=nn.LayerNorm, downsample=None, fused_attn=True):
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.depth = depth
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(
                dim=dim, input_resolution=input_resolution, num_heads=num_heads,
                window_size=window_size, shift_size=0 if i % 2 == 0 else window_size // 2,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i] if isinstance(drop_path, (list, tuple)) else drop_path,
                norm_layer=norm_layer, fused_attn=fused_attn)
            for i in range(depth)])
        if downsample is not None:
            self.downsample = downsample(input_resolution, dim=dim, norm_layer=norm_layer)
        else:
            self.downsample = None

    def forward(self, x, hw, return_features=False, return_attention=False, grad_checkpointing=False):
        """x (B, H*W, C), ``hw = (H, W)`` -> ``(x, hw, features, attentions)``; ``x`` and ``hw``
        after the downsampling; the lists hold per-block outputs (before the downsampling) /
        attention probabilities when requested, else are empty. ``grad_checkpointing``: run each
        block through ``torch.utils.checkpoint`` (not with ``return_attention``)."""
        feats, attns = [], []
        for blk in self.blocks:
            if grad_checkpointing and not return_attention:
                x, attn = checkpoint(blk, x, hw, use_reentrant=False)
            else:
                x, attn = blk(x, hw, return_attention=return_attention)
            if return_features:
                feats.append(x)
            if return_attention:
                attns.append(attn)
        if self.downsample is not None:
            x, hw = self.downsample(x, hw)
        return x, hw, feats, attns

    def extra_repr(self):
        return f"dim={self.dim}, input_resolution={self.input_resolution}, depth={self.depth}"


class PatchEmbed(nn.Module):
    """Conv patch embedding (+ optional LayerNorm); returns the map as (B, C, H/p, W/p)."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None):
        super().__init__()
        img_size, patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        self.img_size = img_size
        self.patch_size = patch_size
        self.patches_resolution = [img_size[0] // patch_size[0], img_size[1] // patch_size[1]]
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x):
        x = self.proj(x)
        if self.norm is not None:
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x


class SwinTransformer(nn.Module):
    """Swin Transformer with the iBOT extensions (masked image modeling, all-token output).

    Constructor arguments are those of the official class; ``fused_attn`` (extra) selects
    ``scaled_dot_product_attention`` (True) or the explicit softmax (False). The attribute
    ``grad_checkpointing`` (:meth:`set_grad_checkpointing`, default False) makes ``forward``
    checkpoint every block while autograd is recording.
    """

    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96,
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0,
                 qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, norm_layer=partial(nn.LayerNorm, eps=1e-6), ape=False,
                 patch_norm=True, return_all_tokens=False, use_mean_pooling=True,
                 masked_im_modeling=False, fused_attn=True):
        super().__init__()
        depths, num_heads = list(depths), list(num_heads)
        if len(depths) != len(num_heads):
            raise ValueError("depths and num_heads must have the same length")
        self.num_classes = num_classes
        self.depths = depths
        self.num_heads = num_heads
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.window_size = window_size
        self.ape = ape
        self.patch_norm = patch_norm
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.mlp_ratio = mlp_ratio
        self.return_all_tokens = return_all_tokens
        self.use_mean_pooling = use_mean_pooling  # accepted for compatibility, unused (official)

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size,
                                      in_chans=in_chans, embed_dim=embed_dim,
                                      norm_layer=norm_layer if patch_norm else None)
        num_patches = self.patch_embed.num_patches
        patches_resolution = self.patch_embed.patches_resolution
        self.patches_resolution = patches_resolution

        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)

        dpr = [r.item() for r in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            self.layers.append(BasicLayer(
                dim=int(embed_dim * 2 ** i),
                input_resolution=(patches_resolution[0] // 2 ** i,
                                  patches_resolution[1] // 2 ** i),
                depth=depths[i], num_heads=num_heads[i], window_size=window_size,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                norm_layer=norm_layer,
                downsample=PatchMerging if i < self.num_layers - 1 else None,
                fused_attn=fused_attn))

        self.norm = norm_layer(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(trunc_normal_init)

        self.masked_im_modeling = masked_im_modeling
        if masked_im_modeling:
            self.masked_embed = nn.Parameter(torch.zeros(1, embed_dim))
        self.grad_checkpointing = False

    # ---------------------------------------------------------------- init / bookkeeping
    @torch.jit.ignore
    def no_weight_decay(self):
        return {"absolute_pos_embed"}

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        return {"relative_position_bias_table"}

    def get_num_layers(self):
        """Total number of transformer blocks (official: ``sum(depths)``)."""
        return sum(self.depths)

    def set_fused_attn(self, enabled=True):
        """Switch every block between SDPA (True) and the explicit softmax (False)."""
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.fused_attn = bool(enabled)
        return self

    def set_grad_checkpointing(self, enable=True):
        """Activation checkpointing of every block in ``forward`` (timm's method name).

        Each block keeps only its input ``(B, L, C)`` for the backward pass and recomputes its
        forward there (``use_reentrant=False``, RNG state replayed, so drop-path is unchanged):
        less activation memory for ~1/3 more backbone compute. Only while
        ``torch.is_grad_enabled()``; the attention / intermediate-layer helpers never checkpoint.
        Returns the model.
        """
        self.grad_checkpointing = bool(enable)
        return self

    # ---------------------------------------------------------------- embedding / masking
    def mask_model(self, x, mask):
        """Replace the (B, C, H, W) patch embeddings by ``masked_embed`` where ``mask`` is set.

        ``mask`` is (B, h, w) bool on a coarser grid (the final-stage grid in pre-training) and
        is upsampled by ``repeat_interleave`` with the integer factors ``H // h`` and ``W // w``.
        """
        if not hasattr(self, "masked_embed"):
            raise ValueError(
                "a mask was given to a SwinTransformer built without masked image modeling "
                "(masked_im_modeling=False, so it has no masked_embed); build it with "
                "masked_im_modeling=True or call it with mask=None")
        mask = torch.as_tensor(mask, device=x.device)
        if mask.dim() != 3 or mask.shape[0] != x.shape[0]:
            raise ValueError(f"mask must have shape (B, h, w) with B={x.shape[0]}, "
                             f"got {tuple(mask.shape)}")
        H, W = x.shape[-2:]
        h, w = mask.shape[-2:]
        if (h, w) != (H, W):
            if H % h or W % w:
                raise ValueError(
                    f"mask grid {h}x{w} does not divide the patch-embedding grid {H}x{W}; "
                    f"for Swin the mask cell must be the final-stage token "
                    f"({SWIN_STRIDE} px: use --patch_size 4 and crops that are multiples of "
                    f"{SWIN_STRIDE})")
            mask = mask.repeat_interleave(H // h, dim=-2).repeat_interleave(W // w, dim=-1)
        mask = mask.bool()[:, None]  # (B, 1, H, W)
        embed = self.masked_embed.to(x.dtype).view(1, -1, 1, 1)
        return torch.where(mask, embed, x)

    def _embed(self, x, mask=None):
        """Image (B, 3, H, W) -> tokens (B, L, C) and the token grid (h, w)."""
        x = self.patch_embed(x)
        if mask is not None:
            x = self.mask_model(x, mask)
        hw = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        if self.ape:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        return x, hw

    def _tokens_or_image(self, x):
        """Accept an image (B, 3, H, W) or, like the official helpers, already embedded tokens
        (B, L, C) of a square grid."""
        if x.dim() == 4:
            return self._embed(x)
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise ValueError("token input must come from a square grid; pass the image instead")
        return x, (side, side)

    # ---------------------------------------------------------------- forward
    def forward(self, x, return_all_tokens=None, mask=None):
        """Pooled features (B, num_features), or with ``return_all_tokens``
        (B, 1 + L, num_features) where token 0 is the average-pooled token."""
        x, hw = self._embed(x, mask)
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for layer in self.layers:
            x, hw, _, _ = layer(x, hw, grad_checkpointing=ckpt)

        x_region = self.norm(x)  # (B, L, C)
        pooled = torch.flatten(self.avgpool(x_region.transpose(1, 2)), 1)  # (B, C)

        if return_all_tokens is None:
            return_all_tokens = self.return_all_tokens
        if return_all_tokens:
            return torch.cat([pooled.unsqueeze(1), x_region], dim=1)
        return pooled

    def get_selfattention(self, x, n=1):
        """Attention probabilities of the last block (n == 1) or of all blocks (list)."""
        if n == 1:
            return self.get_last_selfattention(x)
        return self.get_all_selfattention(x)

    def get_last_selfattention(self, x):
        """Softmax attention of the last block, (B * nW, heads, N, N) with N = window²."""
        x, hw = self._tokens_or_image(x)
        for i, layer in enumerate(self.layers):
            if i < self.num_layers - 1:
                x, hw, _, _ = layer(x, hw)
            else:
                _, _, _, attns = layer(x, hw, return_attention=True)
                return attns[-1]

    def get_all_selfattention(self, x):
        """List of the attention probabilities of every block, in order."""
        x, hw = self._tokens_or_image(x)
        out = []
        for layer in self.layers:
            x, hw, _, attns = layer(x, hw, return_attention=True)
            out += attns
        return out

    def get_intermediate_layers(self, x, n=1, return_patch_avgpool=False):
        """Outputs of the last ``n`` blocks (across stages), each as (B, 1 + L_s, C_s) with the
        average-pooled token first (or only the pooled (B, C_s) with
        ``return_patch_avgpool``). The final ``norm`` is applied to blocks of the last stage only.
        """
        total = sum(self.depths)
        if not 1 <= n <= total:
            raise ValueError(f"n must be in [1, {total}], got {n}")
        first = total - n  # global index of the first returned block
        x, hw = self._embed(x)
        output = []
        offset = 0
        for i, layer in enumerate(self.layers):
            need = offset + layer.depth > first
            x_next, hw, feats, _ = layer(x, hw, return_features=need)
            for j, feat in enumerate(feats):
                if offset + j < first:
                    continue
                if i == self.num_layers - 1:
                    feat = self.norm(feat)
                avg = torch.flatten(self.avgpool(feat.transpose(1, 2)), 1)
                output.append(avg if return_patch_avgpool else torch.cat([avg[:, None], feat], 1))
            x = x_next
            offset += layer.depth
        return output


# --------------------------------------------------------------------------------------------
# factories
# --------------------------------------------------------------------------------------------
def _swin(embed_dim, depths, num_heads, default_drop_path, window_size=7, **kwargs):
    drop_path_rate = kwargs.pop("drop_path_rate", default_drop_path)
    return SwinTransformer(window_size=window_size, embed_dim=embed_dim, depths=depths,
                           num_heads=num_heads, mlp_ratio=4, qkv_bias=True,
                           drop_path_rate=drop_path_rate, **kwargs)


@register_model
def swin_tiny(window_size=7, **kwargs):
    return _swin(96, [2, 2, 6, 2], [3, 6, 12, 24], 0.1, window_size=window_size, **kwargs)


@register_model
def swin_small(window_size=7, **kwargs):
    return _swin(96, [2, 2, 18, 2], [3, 6, 12, 24], 0.2, window_size=window_size, **kwargs)


@register_model
def swin_base(window_size=7, **kwargs):
    return _swin(128, [2, 2, 18, 2], [4, 8, 16, 32], 0.2, window_size=window_size, **kwargs)


@register_model
def swin_large(window_size=7, **kwargs):
    return _swin(192, [2, 2, 18, 2], [6, 12, 24, 48], 0.2, window_size=window_size, **kwargs)


# --------------------------------------------------------------------------------------------
# command-line sanity check
# --------------------------------------------------------------------------------------------
def check_swin_args(patch_size, window_size, global_crops_size=224, local_crops_size=96,
                    local_crops_number=None):
    """Return a list of error messages (empty when fine) for Swin pre-training flags.

    * ``--patch_size`` must be 4: it is not passed to Swin (always patch 4) but sets the mask cell
      to ``8 * patch_size`` pixels, which must be the 32-px final-stage token (with the default
      16 the official code silently trains with a 1x1 mask grid, quirk Q14);
    * ``--window_size`` must be a positive integer;
    * crop sizes must be positive multiples of 32 (global crops: the mask grid must tile the
      patch grid and match the final-stage tokens; local crops likewise, as masks are drawn for
      them too). ``local_crops_number == 0`` skips the local-crop check.
    """
    errors = []
    if patch_size != 4:
        errors.append(
            f"--patch_size {patch_size} is invalid for Swin: Swin always uses 4x4 patches, and "
            f"--patch_size only sets the mask cell to 8*patch_size = {8 * patch_size} px, which "
            f"must equal the {SWIN_STRIDE}-px final-stage token; use --patch_size 4")
    if not isinstance(window_size, int) or isinstance(window_size, bool) or window_size < 1:
        errors.append(f"--window_size must be a positive integer for Swin, got {window_size!r}")
    checks = [("--global_crops_size", global_crops_size)]
    if local_crops_number is None or local_crops_number > 0:
        checks.append(("--local_crops_size", local_crops_size))
    for flag, size in checks:
        if size is None:
            continue
        for s in (size if isinstance(size, (list, tuple)) else [size]):
            if not isinstance(s, int) or s < SWIN_STRIDE or s % SWIN_STRIDE:
                errors.append(
                    f"{flag} {s} is invalid for Swin: crop sizes must be positive multiples of "
                    f"{SWIN_STRIDE} (the final-stage token / mask cell in pixels)")
    return errors
