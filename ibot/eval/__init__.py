"""Evaluation: frozen features (``features``), weight loading (``weights``), k-NN (``knn``), linear probes
(``linear``), fine-tuning (``finetune``: loop, sampler, checkpoints; ``layer_decay``; ``transfer``: the
DeiT recipe; ``beit_vit``: the BEiT recipe's ViT), clustering, export, the robustness classifiers
(``classifiers``) and the scripts' parent parsers (``flags``)."""
