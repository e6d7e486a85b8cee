"""ADE20K semantic segmentation with the official iBOT protocol, without mmcv / mmseg (evaluation.md §2.13).

- :mod:`.presets`: the official configs as named presets;
- :mod:`.dataset`, :mod:`.transforms`: the ADE20K layout and the mmseg train / test pipelines;
- :mod:`.heads`, :mod:`.segmentor`: UPerNet (PPM + FPN) with the auxiliary FCN head, the linear head,
  the losses and the sliding-window inference;
- :mod:`.metrics`: mIoU accumulated over the set as mmseg does;
- :mod:`.schedule`, :mod:`.trainer`: poly + warm-up, the iteration-based loop, checkpoints, resume, logs;
- :mod:`.visualize`: the PNG of validation predictions.
The backbone and the layer-decay groups live in :mod:`ibot.dense` (shared with detection).
"""
