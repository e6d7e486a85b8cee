"""Training / evaluation loops of the fine-tuning recipe (official ``engine_for_finetuning.py``).

The loops are shared by all fine-tuning scripts and live in :mod:`ibot.eval.finetune`; this module
re-exports them under the official names. Native ``torch.autocast`` + ``torch.amp.GradScaler``
replace apex / DeepSpeed.
"""
from ibot.eval.finetune import GradScalerWithNorm, evaluate, train_one_epoch

__all__ = ["train_one_epoch", "evaluate", "GradScalerWithNorm"]
