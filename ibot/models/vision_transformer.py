"""Vision Transformer backbone of iBOT (official ``models/vision_transformer.py`` semantics).

Parameter names, registration order, shapes, initialisation and forward maths follow the official
code (spec sections 2.2-2.5), so official state dicts load with ``strict=True``. Building blocks come
from ``timm.layers`` where the names survive (``PatchEmbed`` -> ``patch_embed.proj.*``, ``Mlp`` ->
``mlp.fc1/fc2``, ``DropPath``, ``trunc_normal_``). Attention is our own module: the normal path uses
``F.scaled_dot_product_attention``; the explicit path (``softmax(q k^T * scale) v``, the official
maths) also returns the attention probabilities and can be selected for the whole model with
:meth:`VisionTransformer.set_fused_attn`. :meth:`VisionTransformer.set_grad_checkpointing` (timm's
convention) recomputes each block's forward in the backward pass of ``forward`` (activation
checkpointing: less memory, more compute; parameters and state-dict keys are unchanged).

Shapes: ``B`` images, ``D`` embed dim, ``ps`` patch size, ``h = H // ps``, ``w = W // ps``,
``T = h * w`` patch tokens, ``N = 1 + T`` tokens.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from .init import trunc_normal_init
from .registry import register_model

__all__ = ["Attention", "Block", "VisionTransformer", "vit_tiny", "vit_small", "vit_base",
           "vit_large"]


class Attention(nn.Module):
    """Multi-head self-attention with ``qkv`` and ``proj`` Linear layers.

    ``forward(x (B, N, D)) -> (B, N, D)``; with ``return_attention=True`` returns
    ``(out (B, N, D), attn (B, heads, N, N))`` computed by the explicit path.
    ``fused_attn`` (bool attribute) selects ``scaled_dot_product_attention`` (True) or the explicit
    official maths (False) for the normal forward.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.,
                 proj_drop=0.):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, return_attention=False):
        """x (B, N, D) -> out (B, N, D), or (out, attn (B, heads, N, N)) if return_attention."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = None
        if self.fused_attn and not return_attention:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0., scale=self.scale)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj_drop(self.proj(x))
        if return_attention:
            return x, attn
        return x


class Block(nn.Module):
    """Pre-norm transformer block: ``x + DropPath(attn(norm1(x)))`` then ``+ DropPath(mlp(norm2(x)))``.

    ``forward(x (B, N, D)) -> (B, N, D)``; ``return_attention=True`` returns the attention
    probabilities ``(B, heads, N, N)`` of this block instead. With ``init_values > 0`` the branches
    are scaled by the learnable ``gamma_1`` / ``gamma_2`` (D,) (LayerScale).
    """

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop=0.,
                 attn_drop=0., drop_path=0., act_layer=nn.GELU, norm_layer=nn.LayerNorm,
                 init_values=0):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                       drop=drop)
        if init_values > 0:
            self.gamma_1 = nn.Parameter(init_values * torch.ones((dim)), requires_grad=True)
            self.gamma_2 = nn.Parameter(init_values * torch.ones((dim)), requires_grad=True)
        else:
            self.gamma_1, self.gamma_2 = None, None

    def forward(self, x, return_attention=False):
        """x (B, N, D) -> (B, N, D), or attention (B, heads, N, N) if return_attention."""
        if return_attention:
            return self.attn(self.norm1(x), return_attention=True)[1]
        y = self.attn(self.norm1(x))
        if self.gamma_1 is None:
            x = x + self.drop_path(y)
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        else:
            x = x + self.drop_path(self.gamma_1 * y)
            x = x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))
        return x


class VisionTransformer(nn.Module):
    """iBOT Vision Transformer (official constructor, parameter names and forward semantics).

    ``forward(x (B, 3, H, W), return_all_tokens=None, mask=None)`` returns all tokens ``(B, N, D)``
    when ``return_all_tokens`` (argument, else the attribute) is true, otherwise the CLS token
    ``(B, D)``. When the attribute ``masked_im_modeling`` is true a bool ``mask (B, h, w)`` is
    required and masked patch embeddings are replaced by ``masked_embed``; when it is false any
    mask is ignored (the trainer switches it off for local crops). When the attribute
    ``grad_checkpointing`` is true (:meth:`set_grad_checkpointing`) and autograd is recording,
    ``forward`` runs each block through ``torch.utils.checkpoint`` (same values and gradients).
    """

    def __init__(self, img_size=[224], patch_size=16, in_chans=3, num_classes=0, embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop_rate=0.,
                 attn_drop_rate=0., drop_path_rate=0., norm_layer=partial(nn.LayerNorm, eps=1e-6),
                 return_all_tokens=False, init_values=0, use_mean_pooling=False,
                 masked_im_modeling=False):
        super().__init__()
        if isinstance(img_size, (list, tuple)):
            img_size = img_size[0]
        self.num_features = self.embed_dim = embed_dim
        self.return_all_tokens = return_all_tokens
        self.patch_size = patch_size
        self.depth = depth

        # img_size=None disables timm's size checks (any input size, conv floors like the
        # official PatchEmbed); the nominal grid is kept as attributes.
        self.patch_embed = PatchEmbed(img_size=None, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, flatten=False, strict_img_size=False)
        self.patch_embed.grid_size = (img_size // patch_size, img_size // patch_size)
        self.patch_embed.num_patches = num_patches = (img_size // patch_size) ** 2
        self.num_patches = num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)

        dpr = [v.item() for v in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i],
                  norm_layer=norm_layer, init_values=init_values)
            for i in range(depth)])

        self.norm = nn.Identity() if use_mean_pooling else norm_layer(embed_dim)
        self.fc_norm = norm_layer(embed_dim) if use_mean_pooling else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        self.apply(trunc_normal_init)

        self.masked_im_modeling = masked_im_modeling
        if masked_im_modeling:
            self.masked_embed = nn.Parameter(torch.zeros(1, embed_dim))
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable=True):
        """Activation checkpointing of every block in ``forward`` (timm's method name).

        With ``enable`` each block keeps only its input ``(B, N, D)`` for the backward pass and runs
        its forward again there (``checkpoint(blk, x, use_reentrant=False)``, which replays the RNG
        state, so drop-path draws the same paths): one more forward per block, ~1/3 more backbone
        compute (forward + backward ~ 3 forwards), instead of storing the blocks' inner
        activations. Only applies while ``torch.is_grad_enabled()``; ``get_last_selfattention``
        and ``get_intermediate_layers`` never checkpoint. Returns the model.
        """
        self.grad_checkpointing = bool(enable)
        return self

    def set_fused_attn(self, enabled=True):
        """Use ``scaled_dot_product_attention`` (True) or the explicit official maths (False)."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.fused_attn = bool(enabled)
        return self

    def interpolate_pos_encoding(self, x, h, w):
        """Position embeddings ``(1, N, D)`` for tokens ``x (B, N, D)`` of an ``h``x``w``-pixel image.

        Official rule (quirk Q29): the stored table is returned unchanged only when the token count
        matches AND the image is square; otherwise the patch grid is resized bicubically with
        ``scale_factor = ((h // ps + 0.1) / sqrt(Np), (w // ps + 0.1) / sqrt(Np))``.
        """
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and h == w:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, 0]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        h0 = h // self.patch_size + 0.1
        w0 = w // self.patch_size + 0.1
        side = int(math.sqrt(N))
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2),
            scale_factor=(h0 / math.sqrt(N), w0 / math.sqrt(N)),
            mode="bicubic",
        )
        if int(h0) != patch_pos_embed.shape[-2] or int(w0) != patch_pos_embed.shape[-1]:
            raise RuntimeError(
                f"position-embedding interpolation produced a {tuple(patch_pos_embed.shape[-2:])} "
                f"grid, expected ({int(h0)}, {int(w0)})")
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def mask_model(self, x, mask):
        """Replace masked positions of the patch map ``x (B, D, h, w)`` by ``masked_embed``.

        ``mask (B, h, w)`` bool; ``masked_embed`` is cast to ``x.dtype`` (fp16 under autocast,
        quirk Q35). Returns ``(B, D, h, w)``; gradients reach ``masked_embed`` only through masked
        positions and the patch embedding only through unmasked ones.
        """
        if mask.shape != (x.shape[0],) + tuple(x.shape[2:]):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the patch grid "
                             f"{(x.shape[0],) + tuple(x.shape[2:])} (B, h, w)")
        embed = self.masked_embed.to(x.dtype).reshape(1, -1, 1, 1)
        return torch.where(mask.to(torch.bool).unsqueeze(1), embed, x)

    def prepare_tokens(self, x, mask=None):
        """Image ``x (B, 3, H, W)`` (+ optional bool ``mask (B, h, w)``) -> tokens ``(B, N, D)``.

        Patch embedding, mask replacement (before the position embedding), CLS token, position
        embedding (interpolated when needed), dropout.
        """
        B, _, H, W = x.shape
        x = self.patch_embed(x)
        if mask is not None:
            x = self.mask_model(x, mask)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, H, W)
        return self.pos_drop(x)

    def forward(self, x, return_all_tokens=None, mask=None):
        """x (B, 3, H, W), mask (B, h, w) bool -> (B, N, D) if all tokens else (B, D)."""
        if self.masked_im_modeling:
            if mask is None:
                raise ValueError("VisionTransformer.masked_im_modeling is set, so forward() needs a "
                                 "bool mask of shape (B, H // patch_size, W // patch_size); switch "
                                 "the attribute off to run without masking")
            x = self.prepare_tokens(x, mask=mask)
        else:
            x = self.prepare_tokens(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for blk in self.blocks:
                x = checkpoint(blk, x, use_reentrant=False)
        else:
            for blk in self.blocks:
                x = blk(x)
        x = self.norm(x)
        if self.fc_norm is not None:
            x = torch.cat((self.fc_norm(x[:, 1:, :].mean(1)).unsqueeze(1), x[:, 1:]), dim=1)
        return_all_tokens = self.return_all_tokens if return_all_tokens is None else return_all_tokens
        if return_all_tokens:
            return x
        return x[:, 0]

    def get_last_selfattention(self, x):
        """x (B, 3, H, W) -> softmax attention of the last block (B, heads, N, N) (no mask)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1](x, return_attention=True)

    def get_intermediate_layers(self, x, n=1):
        """x (B, 3, H, W) -> list of ``norm(tokens)`` (B, N, D) after each of the last n blocks."""
        x = self.prepare_tokens(x)
        output = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                output.append(self.norm(x))
        return output

    def get_num_layers(self):
        """Number of transformer blocks (depth)."""
        return len(self.blocks)


@register_model(aliases=("deit_tiny",))
def vit_tiny(patch_size=16, **kwargs):
    """ViT-Tiny: D=192, depth 12, 3 heads, qkv bias, LayerNorm eps 1e-6."""
    return VisionTransformer(patch_size=patch_size, embed_dim=192, depth=12, num_heads=3,
                             mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                             **kwargs)


@register_model(aliases=("deit_small",))
def vit_small(patch_size=16, **kwargs):
    """ViT-Small: D=384, depth 12, 6 heads, qkv bias, LayerNorm eps 1e-6."""
    return VisionTransformer(patch_size=patch_size, embed_dim=384, depth=12, num_heads=6,
                             mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                             **kwargs)


@register_model
def vit_base(patch_size=16, **kwargs):
    """ViT-Base: D=768, depth 12, 12 heads, qkv bias, LayerNorm eps 1e-6."""
    return VisionTransformer(patch_size=patch_size, embed_dim=768, depth=12, num_heads=12,
                             mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                             **kwargs)


@register_model
def vit_large(patch_size=16, **kwargs):
    """ViT-Large: D=1024, depth 24, 16 heads, qkv bias, LayerNorm eps 1e-6."""
    return VisionTransformer(patch_size=patch_size, embed_dim=1024, depth=24, num_heads=16,
                             mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                             **kwargs)
