"""Classifiers of the robustness tools (official ``analysis/imagenet_models``, evaluation.md §3.6).

``vit_{tiny,small,base,large}(pretrained, patch_size=16, linear_eval=True, num_classes=1000)``:

* ``linear_eval=True``: the ViT plus ``linear`` on the §1.4 frozen features; tiny/small use
  n=4, a=0 (4·D), base/large n=1, a=2 (2·D), as run.sh's linear defaults (the merged checkpoint of
  ``analysis/combine_ckpt.py`` must have been trained with the same setting);
* ``linear_eval=False``: the plain backbone with its classification ``head`` (a fine-tuned model).

``pretrained``: a file holding ``model`` or ``state_dict`` (``module.`` prefixes removed); every
backbone and head key must match (a ``masked_embed`` is ignored). ``num_classes=None`` takes the
number of classes from the checkpoint. ``analysis/imagenet_models.py`` re-exports this module under
its official name; backbones come from the registry (``ibot.models.create_backbone``).
"""
import torch
from torch import nn

from ibot.eval.features import frozen_features
from ibot.eval.weights import PretrainedWeightsError, strip_prefixes
from ibot.models import create_backbone
from ibot.utils.checkpoint import safe_load

__all__ = ["LinearEvalViT", "FEATURE_SETTINGS", "load_classifier_state", "build_classifier", "vit_tiny", "vit_small", "vit_base",
           "vit_large", "predict"]

# (n_last_blocks, avgpool_patchtokens) per architecture
FEATURE_SETTINGS = {"vit_tiny": (4, 0), "vit_small": (4, 0), "vit_base": (1, 2), "vit_large": (1, 2)}


class LinearEvalViT(nn.Module):
    """Frozen-feature classifier: ``forward(x (B, 3, H, W)) -> logits (B, num_classes)``.

    Attributes: ``backbone`` (ViT), ``linear`` (nn.Linear(D·(n·[a≠1] + [a>0]), num_classes)).
    State-dict keys: backbone keys at top level plus ``linear.weight``/``linear.bias`` (merged format).
    """

    def __init__(self, backbone, n_last_blocks, avgpool, num_classes):
        super().__init__()
        self.backbone = backbone
        self.n_last_blocks, self.avgpool = n_last_blocks, avgpool
        dim = backbone.embed_dim * (n_last_blocks * (avgpool != 1) + (avgpool > 0))
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x):
        """x (B, 3, H, W) -> logits (B, num_classes)."""
        return self.linear(frozen_features(self.backbone, x, self.n_last_blocks, self.avgpool))

    def state_dict(self, *args, **kwargs):
        """Merged layout: backbone keys without prefix + ``linear.weight`` (C, d) / ``linear.bias`` (C,)."""
        sd = super().state_dict(*args, **kwargs)
        return {(k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in sd.items()}

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Load the merged layout written by ``analysis/combine_ckpt.py`` (see :meth:`state_dict`)."""
        sd = {(k if k.startswith("linear.") else "backbone." + k): v for k, v in state_dict.items()}
        return super().load_state_dict(sd, strict=strict, assign=assign)


def load_classifier_state(path):
    """State dict of a classifier file: ``ckpt['model']`` if present else ``ckpt['state_dict']`` (else the
    file itself), ``module.`` removed, ``masked_embed`` dropped. Returns ``(state_dict, checkpoint)``."""
    ckpt = safe_load(path)
    sd = ckpt.get("model", ckpt.get("state_dict", ckpt)) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise PretrainedWeightsError(f"{path}: no 'model' / 'state_dict' entry")
    sd = strip_prefixes(sd, ("module.", "_orig_mod."))
    sd.pop("masked_embed", None)
    return sd, ckpt


def build_classifier(arch, pretrained=None, patch_size=16, linear_eval=True, num_classes=1000, img_size=224):
    """Classifier ``arch`` (a registered ViT): ``linear_eval`` -> :class:`LinearEvalViT` with the features of
    :data:`FEATURE_SETTINGS`, else the backbone with its ``head``; weights of ``pretrained`` loaded strictly
    (``num_classes=None``: from the file). Returns the model in eval mode."""
    if linear_eval and arch not in FEATURE_SETTINGS:
        raise ValueError(f"no linear-eval feature setting for {arch!r}; known: {sorted(FEATURE_SETTINGS)}")
    sd = None
    if pretrained:
        sd, ckpt = load_classifier_state(pretrained)
        if "epoch" in ckpt:
            print(f"Classifier {pretrained}: epoch {ckpt['epoch']}")
        if num_classes is None:
            key = "linear.weight" if linear_eval else "head.weight"
            if key not in sd:
                raise PretrainedWeightsError(f"{pretrained} has no {key}: is it a combined (linear_eval) "
                                             f"or fine-tuned classifier?")
            num_classes = sd[key].shape[0]
    num_classes = 1000 if num_classes is None else num_classes
    if linear_eval:
        n, a = FEATURE_SETTINGS[arch]
        backbone = create_backbone(arch, patch_size=patch_size, img_size=img_size, num_classes=0,
                                   use_mean_pooling=(a == 1))
        model = LinearEvalViT(backbone, n, a, num_classes)
    else:
        model = create_backbone(arch, patch_size=patch_size, img_size=img_size, num_classes=num_classes)
    if sd is not None:
        model.load_state_dict(sd, strict=True)
    return model.eval()


def vit_tiny(pretrained=None, patch_size=16, linear_eval=True, num_classes=1000, **kw):
    """ViT-Tiny classifier (features n=4, a=0 with ``linear_eval``); see the module docstring."""
    return build_classifier("vit_tiny", pretrained, patch_size, linear_eval, num_classes, **kw)


def vit_small(pretrained=None, patch_size=16, linear_eval=True, num_classes=1000, **kw):
    """ViT-Small classifier (features n=4, a=0 with ``linear_eval``)."""
    return build_classifier("vit_small", pretrained, patch_size, linear_eval, num_classes, **kw)


def vit_base(pretrained=None, patch_size=16, linear_eval=True, num_classes=1000, **kw):
    """ViT-Base classifier (features n=1, a=2 with ``linear_eval``)."""
    return build_classifier("vit_base", pretrained, patch_size, linear_eval, num_classes, **kw)


def vit_large(pretrained=None, patch_size=16, linear_eval=True, num_classes=1000, **kw):
    """ViT-Large classifier (features n=1, a=2 with ``linear_eval``)."""
    return build_classifier("vit_large", pretrained, patch_size, linear_eval, num_classes, **kw)


@torch.no_grad()
def predict(model, images, linear_eval=True):
    """Arg-max class of ``images (B, 3, H, W)``: (B,) long (``head`` applied for non-linear-eval models)."""
    out = model(images)
    if not linear_eval and not isinstance(model, LinearEvalViT):
        out = model.head(out)
    return out.argmax(-1)
