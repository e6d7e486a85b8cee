"""``MultiCropWrapper``: a backbone and its projection head, run over lists of crops.

``forward`` is the official one (head on every token). The trainer's fast path goes through the
same module (so that DDP sees one forward) with two keyword-only switches:
- ``masked_index``: student global crops — the head runs on the [CLS] tokens and on the masked
  patch tokens only; returns ``(cls_logits (n, K), patch_logits (M, Kp))``, plus the backbone's
  [CLS] features ``(n, D)`` as a third item with ``return_cls_feat=True``;
- ``cls_only``: student local crops — the head runs on the [CLS] tokens only; returns ``(n, K)``.
The teacher, never trained, uses ``teacher_outputs``.
"""
import contextlib

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

    def backbone_groups(self, x, mask=None, **kwargs):
        """Backbone outputs of ``x`` (a crop or a list of crops), one tensor per run of equal widths.

        ``mask``: one mask per crop, or (fast path) masks for the first crops only: the crops after
        them run with the backbone's ``masked_im_modeling`` off, as the official local crops.
        """
        if not isinstance(x, (list, tuple)):
            x = [x]
            mask = [mask] if mask is not None else None
        outputs, start = [], 0
        for end in _group_by_width(x):
            inp = torch.cat(x[start:end]) if end - start > 1 else x[start]
            if mask is not None and end <= len(mask):
                outputs.append(self.backbone(inp, **dict(kwargs, mask=torch.cat(mask[start:end]))))
            elif mask is not None and start < len(mask):
                raise ValueError("the masked crops must form whole groups of equal width")
            elif mask is not None:
                with unmasked(self.backbone):
                    outputs.append(self.backbone(inp, **kwargs))
            else:
                outputs.append(self.backbone(inp, **kwargs))
            start = end
        return outputs

    def backbone_tokens(self, x, mask=None, **kwargs):
        """Run the backbone over a crop or a list of crops; returns outputs concatenated on dim 0."""
        outputs = self.backbone_groups(x, mask=mask, **kwargs)
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _logits(self, h, n):
        """``(cls_logits(h[:n]), patch_logits(h[n:]))``, one matmul when the head shares a linear last layer."""
        head = self.head
        if head.last_layer is not None and head.last_layer2 is head.last_layer and head.patch_logits_are_linear:
            out = head.last_layer(h)
            return out[:n], out[n:]
        return head.cls_logits(h[:n]), head.patch_logits(h[n:])

    def forward(self, x, mask=None, return_backbone_feat=False, *, masked_index=None, cls_only=False,
                return_cls_feat=False, **kwargs):
        """Official: head on every backbone output. See the module docstring for the fast switches."""
        if masked_index is not None:
            groups = self.backbone_groups(x, mask=mask, **kwargs)
            n_masked = sum(m.shape[0] for m in mask) if isinstance(mask, (list, tuple)) else groups[0].shape[0]
            masked_groups, seen = [], 0
            for g in groups:
                if seen < n_masked:
                    masked_groups.append(g)
                    seen += g.shape[0]
            glob = torch.cat(masked_groups) if len(masked_groups) > 1 else masked_groups[0]
            cls = torch.cat([g[:, 0] for g in groups])
            patches = glob.reshape(-1, glob.shape[-1]).index_select(0, _masked_rows(glob, masked_index))
            logits = self._logits(self.head.bottleneck(torch.cat([cls, patches])), cls.shape[0])
            return (*logits, cls) if return_cls_feat else logits
        output = self.backbone_tokens(x, mask=mask, **kwargs)
        if cls_only:
            return self.head.cls_logits(self.head.bottleneck(output[:, 0]))
        head_out = self.head(output)
        return (output, head_out) if return_backbone_feat else head_out

    @torch.no_grad()
    def teacher_outputs(self, x, masked_index, patch_mean=True):
        """Teacher logits for the fast path, from the global crops ``x`` (list of ``(B, 3, h, w)``).

        Returns ``cls (n, K)``, ``patch_masked (M, Kp)`` at ``masked_index`` and ``patch_mean (n, Kp)``
        = each image's mean logit over all its patch tokens (the official centre statistic; None with
        ``patch_mean=False``, then the head runs on the [CLS] and masked tokens only). When the patch
        logits are linear in the bottleneck features (default head: no bias, no last norm), the mean
        is taken before the last layer, so the ``(n, Np, Kp)`` logits are never materialised.
        """
        output = self.backbone_tokens(x)
        n = output.shape[0]
        rows = torch.cat([torch.arange(n, device=output.device) * output.shape[1], _masked_rows(output, masked_index)])
        if not patch_mean:
            selected = output.reshape(-1, output.shape[-1]).index_select(0, rows)
            cls, patch_masked = self._logits(self.head.bottleneck(selected), n)
            return cls, patch_masked, None
        h = self.head.bottleneck(output)                                  # (n, 1+Np, d)
        selected = h.reshape(-1, h.shape[-1]).index_select(0, rows)
        if self.head.patch_logits_are_linear:
            mean = h[:, 1:].float().mean(1).to(selected.dtype)
            cls, patch = self._logits(torch.cat([selected, mean]), n)
            return cls, patch[:-n], patch[-n:].float()
        cls, patch_masked = self._logits(selected, n)
        return cls, patch_masked, self.head.patch_logits(h[:, 1:]).float().mean(1)


@contextlib.contextmanager
def unmasked(backbone):
    """Official: the student's local crops are never masked (the backbone's flag is off meanwhile)."""
    previous = backbone.masked_im_modeling
    backbone.masked_im_modeling = False
    try:
        yield
    finally:
        backbone.masked_im_modeling = previous


def _masked_rows(output, masked_index):
    """Rows of ``output.reshape(-1, dim)`` (output ``(n, 1+Np, dim)``) of the masked patch tokens,
    ``masked_index`` being positions in the ``(n·Np)`` patch-token list (device arithmetic, no sync)."""
    return masked_index + torch.div(masked_index, output.shape[1] - 1, rounding_mode="floor") + 1
