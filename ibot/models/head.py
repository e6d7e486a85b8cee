"""Projection heads of iBOT (official ``models/head.py`` semantics, spec section 1.5).

The weight-normalised last layers use ``torch.nn.utils.parametrizations.weight_norm`` (the legacy
``nn.utils.weight_norm`` is deprecated). Its parameters are named
``<layer>.parametrizations.weight.original0`` (= official ``weight_g``, shape (K, 1)) and
``.original1`` (= ``weight_v``, (K, bottleneck)), registered in that order like the official
``weight_g``/``weight_v``. A state-dict post-hook on every such layer renames them back, so
``state_dict()`` emits exactly the official keys ``<layer>.weight_g`` / ``<layer>.weight_v`` (also
under both names of a shared head), and PyTorch's own load pre-hook maps ``weight_g``/``weight_v``
back on load. Use :func:`official_param_name` to translate ``named_parameters()`` names.

Norm flags (``--norm_in_head``, quirk Q20): ``None`` (default, faithful), ``'bn'``, ``'syncbn'``,
``'ln'`` and ``'csyncbn'`` are built like the official code (ONE norm instance shared by every hidden
layer). Note that the official ``main_ibot.py`` runs ``convert_sync_batchnorm`` which turns
``CSyncBatchNorm`` into a plain ``SyncBatchNorm``. ``'psyncbn'`` cannot be built by the official code
(missing ``bunch_size``) and raises ``NotImplementedError`` here. ``last_norm='ln'`` would crash in
the official code (``affine`` kwarg); here it builds ``LayerNorm(elementwise_affine=False)``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm
from .init import trunc_normal_init

__all__ = ["CustomSequential", "CSyncBatchNorm", "DINOHead", "iBOTHead", "official_param_name",
           "weight_norm_linear"]

_G = "parametrizations.weight.original0"
_V = "parametrizations.weight.original1"


def official_param_name(name):
    """Map a parameter/state-dict name to the official one (``...original0`` -> ``weight_g``,
    ``...original1`` -> ``weight_v``); other names are returned unchanged."""
    return name.replace(_G, "weight_g").replace(_V, "weight_v")


def _save_official_weight_norm_names(module, state_dict, prefix, local_metadata):
    """State-dict post-hook: rename ``prefix + parametrizations.weight.original0/1`` to
    ``prefix + weight_g/weight_v`` (in that order, at the end of this module's entries)."""
    for new, old in (("weight_g", _G), ("weight_v", _V)):
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


def weight_norm_linear(in_dim, out_dim, freeze_g=False):
    """Weight-normalised ``Linear(in_dim, out_dim, bias=False)`` (norm over dim 0).

    ``v`` keeps PyTorch's default Linear init, ``g`` (out_dim, 1) is filled with 1 and frozen if
    ``freeze_g``. Maps ``(..., in_dim) -> (..., out_dim)`` with row k of the weight
    ``g_k * v_k / ||v_k||``. State dicts use the official names ``weight_g`` / ``weight_v``.
    """
    layer = weight_norm(nn.Linear(in_dim, out_dim, bias=False), name="weight", dim=0)
    g = layer.parametrizations.weight.original0
    with torch.no_grad():
        g.fill_(1)
    if freeze_g:
        g.requires_grad = False
    layer.register_state_dict_post_hook(_save_official_weight_norm_names)
    return layer


class CustomSequential(nn.Sequential):
    """Sequential that applies BatchNorm modules channel-wise to token tensors.

    For BatchNorm1d/2d/3d/SyncBatchNorm and inputs with more than 2 dims, the last (feature) dim is
    moved to position 1 before the norm and back after it: ``(N, T, C)`` is normalised per channel
    over batch and tokens. Shapes: ``(..., C_in) -> (..., C_out)``.
    """

    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

    def forward(self, input):
        for module in self:
            dim = input.dim()
            if isinstance(module, self.bn_types) and dim > 2:
                perm = list(range(dim - 1))
                perm.insert(1, dim - 1)
                inv_perm = list(range(dim)) + [1]
                inv_perm.pop(1)
                input = module(input.permute(*perm)).permute(*inv_perm)
            else:
                input = module(input)
        return input


class CSyncBatchNorm(nn.SyncBatchNorm):
    """Official "centering" SyncBatchNorm: output normalised with running statistics only
    (running_var forced to 1 unless ``with_var``), then a second train-mode pass updates the running
    statistics. Shapes as ``SyncBatchNorm``. (Replaced by a plain SyncBatchNorm when the model goes
    through ``convert_sync_batchnorm``, as in the official main.)"""

    def __init__(self, *args, with_var=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.with_var = with_var

    def forward(self, x):
        self.training = False
        if not self.with_var:
            self.running_var = torch.ones_like(self.running_var)
        normed_x = super().forward(x)
        self.training = True
        super().forward(x)
        return normed_x


def _build_norm(norm, dim, **kwargs):
    """Norm module for the flag ``norm`` (None, 'bn', 'syncbn', 'csyncbn', 'ln') or None."""
    if norm is None:
        return None
    if norm == "bn":
        return nn.BatchNorm1d(dim, **kwargs)
    if norm == "syncbn":
        return nn.SyncBatchNorm(dim, **kwargs)
    if norm == "csyncbn":
        return CSyncBatchNorm(dim, **kwargs)
    if norm == "psyncbn":
        raise NotImplementedError(
            "--norm_in_head psyncbn is not supported: the official PSyncBatchNorm needs a "
            "'bunch_size' that the official head never passes, so it cannot be built there either "
            "(quirk Q20); use bn, syncbn, csyncbn, ln or None")
    if norm == "ln":
        if "affine" in kwargs:
            kwargs = dict(kwargs)
            kwargs["elementwise_affine"] = kwargs.pop("affine")
        return nn.LayerNorm(dim, **kwargs)
    raise ValueError(f"unknown norm type {norm!r} (--norm_in_head): expected None, bn, syncbn, "
                     f"csyncbn or ln")


def _build_act(act):
    if act == "relu":
        return nn.ReLU()
    if act == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {act!r} (--act_in_head): expected gelu or relu")


class DINOHead(nn.Module):
    """DINO projection head: MLP -> L2-normalise -> weight-normalised prototypes.

    ``forward(x (..., in_dim)) -> (..., out_dim)``. Submodules: ``mlp`` (CustomSequential, or a
    bare Linear when ``nlayers == 1``), ``last_layer`` (weight-normed Linear(bottleneck, out_dim);
    None when ``bottleneck_dim <= 0``), ``last_norm`` (None by default).
    """

    def __init__(self, in_dim, out_dim, norm=None, act="gelu", last_norm=None, nlayers=3,
                 hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True, **kwargs):
        super().__init__()
        norm = _build_norm(norm, hidden_dim)
        last_norm = _build_norm(last_norm, out_dim, affine=False, **kwargs)
        act = _build_act(act)

        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim if bottleneck_dim > 0 else out_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            if norm is not None:
                layers.append(norm)
            layers.append(act)
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if norm is not None:
                    layers.append(norm)
                layers.append(act)
            layers.append(nn.Linear(hidden_dim, bottleneck_dim if bottleneck_dim > 0 else out_dim))
            self.mlp = CustomSequential(*layers)
        self.apply(trunc_normal_init)

        if bottleneck_dim > 0:
            self.last_layer = weight_norm_linear(bottleneck_dim, out_dim, freeze_g=norm_last_layer)
        else:
            self.last_layer = None
        self.last_norm = last_norm

    def _hidden(self, x):
        """Part of the MLP before the output projection used when there is no last layer."""
        if isinstance(self.mlp, nn.Sequential):
            return self.mlp[:-1](x)
        return x

    def _out_proj(self):
        return self.mlp[-1] if isinstance(self.mlp, nn.Sequential) else self.mlp

    def bottleneck(self, x):
        """x (..., in_dim) -> h: ``L2normalize(mlp(x))`` (..., bottleneck_dim) when a last layer
        exists; for ``bottleneck_dim <= 0`` the hidden features before the MLP's last Linear."""
        if self.last_layer is not None:
            return F.normalize(self.mlp(x), dim=-1, p=2)
        return self._hidden(x)

    def cls_logits(self, h):
        """h (..., bottleneck) -> logits (..., out_dim): last_layer (+ last_norm)."""
        x = self.last_layer(h) if self.last_layer is not None else self._out_proj()(h)
        if self.last_norm is not None:
            x = self.last_norm(x)
        return x

    @property
    def cls_logits_are_linear(self):
        """True when ``cls_logits`` is linear in h without bias (mean of logits = logits of mean)."""
        return self.last_layer is not None and self.last_norm is None

    def forward(self, x):
        """x (..., in_dim) -> (..., out_dim)."""
        if self.last_layer is None:
            x = self.mlp(x)
            if self.last_norm is not None:
                x = self.last_norm(x)
            return x
        return self.cls_logits(self.bottleneck(x))


class iBOTHead(DINOHead):
    """iBOT head: a DINOHead for the CLS token plus ``last_layer2`` for patch tokens.

    2-D input ``(n, in_dim)`` -> ``(n, out_dim)`` (plain DINOHead). 3-D input ``(n, 1+T, in_dim)``
    -> ``(cls_out (n, out_dim), patch_out (n, T, patch_out_dim))`` (``out_dim`` instead of
    ``patch_out_dim`` when ``shared_head``). With ``shared_head`` the module object ``last_layer2``
    IS ``last_layer`` (state dicts hold both key sets, ``named_parameters`` only ``last_layer.*``).
    Fast-path pieces: :meth:`bottleneck`, :meth:`cls_logits`, :meth:`patch_logits`,
    :attr:`patch_logits_are_linear`.
    """

    def __init__(self, *args, patch_out_dim=8192, norm=None, act="gelu", last_norm=None, nlayers=3,
                 hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True, shared_head=False,
                 **kwargs):
        super().__init__(*args, norm=norm, act=act, last_norm=last_norm, nlayers=nlayers,
                         hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                         norm_last_layer=norm_last_layer, **kwargs)
        if bottleneck_dim > 0:
            if not shared_head:
                self.last_layer2 = weight_norm_linear(bottleneck_dim, patch_out_dim,
                                                      freeze_g=norm_last_layer)
            else:
                self.last_layer2 = self.last_layer
        else:
            if not shared_head:
                self.mlp2 = nn.Linear(hidden_dim, patch_out_dim)
            else:
                self.mlp2 = self._out_proj()
            self.last_layer2 = None

        if not shared_head:
            self.last_norm2 = _build_norm(last_norm, patch_out_dim, affine=False, **kwargs)
        else:
            self.last_norm2 = self.last_norm

    def patch_logits(self, h):
        """h (..., bottleneck) -> patch logits (..., patch_out_dim): last_layer2 (+ last_norm2), or
        ``mlp2`` for the ``bottleneck_dim <= 0`` variant."""
        x = self.last_layer2(h) if self.last_layer2 is not None else self.mlp2(h)
        if self.last_norm is not None:
            x = self.last_norm2(x)
        return x

    def cls_logits(self, h):
        """h (..., bottleneck) -> CLS logits (..., out_dim): last_layer (+ last_norm)."""
        return super().cls_logits(h)

    @property
    def patch_logits_are_linear(self):
        """True when ``patch_logits`` is linear in h without bias (default: bottleneck > 0 and no
        ``last_norm2``), so the mean of patch logits equals the logits of the mean of h."""
        return self.last_layer2 is not None and self.last_norm is None and self.last_norm2 is None

    def forward(self, x):
        """(n, in_dim) -> (n, out_dim); (n, 1+T, in_dim) -> ((n, out_dim), (n, T, patch_out_dim))."""
        if x.dim() == 2:
            return super().forward(x)
        h = self.bottleneck(x)
        return self.cls_logits(h[:, 0]), self.patch_logits(h[:, 1:])
