"""COCO detection and instance segmentation with an iBOT ViT (evaluation.md §2.12).

- :mod:`ibot.detection.assign`: mmdet's MaxIoU assignment and random sampling;
- :mod:`ibot.detection.rpn`: torchvision's RPN with mmdet's anchors, border rule and low-quality matches;
- :mod:`ibot.detection.heads`: aligned multi-level RoIAlign, ``ConvFCBBoxHead``, ``FCNMaskHead``;
- :mod:`ibot.detection.cascade`: the three-stage cascade (or one-stage Mask R-CNN) heads;
- :mod:`ibot.detection.model`: backbone + FPN + RPN + heads, and mapping results to the image;
- :mod:`ibot.detection.dataset` / :mod:`ibot.detection.transforms`: COCO reading and pipelines;
- :mod:`ibot.detection.coco_eval`: pycocotools box / mask AP;
- :mod:`ibot.detection.presets`: named settings; :mod:`ibot.detection.trainer`: train / test.
"""
