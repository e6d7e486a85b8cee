"""``MultiCropWrapper``: a backbone and its projection head, run over lists of crops.

``forward`` is the official one (head on every token). The trainer's fast path goes through the
same module (so that DDP sees one forward) with two keyword-only switches:
- ``masked_index``: student global crops — the head runs on the [CLS] tokens and on the masked
  patch tokens only; returns ``(cls_logits (n, K), patch_logits (M, Kp))``;
- ``cls_only``: student local crops — the head runs on the [CLS] tokens only; returns ``(n, K)``.
The teacher, never trained, uses ``teacher_outputs``.
"""
import torch
import torch.nn as nn


def _group_by_width(x):
    """End indices of runs of consecutive crops with the same width (official grouping, quirk Q28).

    Plain Python on the shapes (the official ``unique_consecutive``/``cumsum`` on a tensor, without
    creating tensors in the step).
    """
    widths = [inp.shape[-1] for inp in x]
    return [i for i in range(1, len(widths)) if widths[i] != widths[i - 1]] + [len(widths)]


class MultiCropWrapper(nn.Module):
    """Backbone + head; ``backbone.fc`` and ``backbone.head`` are replaced by identities (official)."""

    def __init__(self, backbone, head=None):
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone = backbone
        self.head = nn.Identity() if head is None else head

    def backbone_tokens(self, x, mask=None, **kwargs):
        """Run the backbone over a crop or a list of crops; returns outputs concatenated on dim 0."""
        if not isinstance(x, (list, tuple)):
            x = [x]
            mask = [mask] if mask is not None else None
        outputs, start = [], 0
        for end in _group_by_width(x):
            inp = torch.cat(x[start:end])
            if mask is not None:
                kwargs = dict(kwargs, mask=torch.cat(mask[start:end]))
            outputs.append(self.backbone(inp, **kwargs))
            start = end
        return torch.cat(outputs)

    def forward(self, x, mask=None, return_backbone_feat=False, *, masked_index=None, cls_only=False, **kwargs):
        """Official: head on every backbone output. See the module docstring for the fast switches."""
        output = self.backbone_tokens(x, mask=mask, **kwargs)
        if cls_only:
            return self.head.cls_logits(self.head.bottleneck(output[:, 0]))
        if masked_index is not None:
            n, dim = output.shape[0], output.shape[-1]
            patches = output[:, 1:].reshape(-1, dim).index_select(0, masked_index)
            h = self.head.bottleneck(torch.cat([output[:, 0], patches]))
            return self.head.cls_logits(h[:n]), self.head.patch_logits(h[n:])
        head_out = self.head(output)
        return (output, head_out) if return_backbone_feat else head_out

    @torch.no_grad()
    def teacher_outputs(self, x, masked_index):
        """Teacher logits for the fast path, from the global crops ``x`` (list of ``(B, 3, h, w)``).

        Returns ``cls (n, K)``, ``patch_masked (M, Kp)`` at ``masked_index`` and ``patch_mean (n, Kp)``
        = each image's mean logit over all its patch tokens (the official centre statistic). When the
        patch logits are linear in the bottleneck features (default head: no bias, no last norm), the
        mean is taken before the last layer, so the ``(n, Np, Kp)`` logits are never materialised.
        """
        output = self.backbone_tokens(x)
        n, dim = output.shape[0], output.shape[-1]
        h = self.head.bottleneck(output)                                  # (n, 1+Np, d)
        h_patch = h[:, 1:]
        patch_masked = self.head.patch_logits(h_patch.reshape(-1, h.shape[-1]).index_select(0, masked_index))
        if self.head.patch_logits_are_linear:
            patch_mean = self.head.patch_logits(h_patch.float().mean(1))
        else:
            patch_mean = self.head.patch_logits(h_patch).float().mean(1)
        return self.head.cls_logits(h[:, 0]), patch_masked, patch_mean
