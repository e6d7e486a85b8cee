"""Official name of the robustness tools' classifiers; they live in :mod:`ibot.eval.classifiers`."""
from ibot.eval.classifiers import (FEATURE_SETTINGS, LinearEvalViT, build_classifier, load_classifier_state, predict,
                                   vit_base, vit_large, vit_small, vit_tiny)

__all__ = ["LinearEvalViT", "FEATURE_SETTINGS", "load_classifier_state", "build_classifier", "vit_tiny",
           "vit_small", "vit_base", "vit_large", "predict"]
