"""Official ``utils`` names, re-exported from the modules of the ``ibot`` package that hold them.

Scripts written for the official repository (``import utils; utils.MultiCropWrapper(...)``) keep
working; new code should import from ``ibot.*`` directly.
"""
from ibot.data.augment import GaussianBlur, Solarization
from ibot.utils.checkpoint import atomic_save, restart_from_checkpoint, safe_load
from ibot.utils.distributed import (concat_all_gather, get_rank, get_world_size, init_distributed_mode,
                              is_dist_avail_and_initialized, is_main_process, save_on_master,
                              setup_for_distributed)
from ibot.utils.metric_logger import MetricLogger, SmoothedValue
from ibot.utils.misc import bool_flag, fix_random_seeds, get_sha
from ibot.train.optim import (LARS, cancel_gradients_last_layer, clip_gradients, get_params_groups,
                        has_batchnorms)
from ibot.eval.weights import load_pretrained_weights
from ibot.eval.finetune import accuracy
from ibot.eval.retrieval_metrics import PCA, compute_ap, compute_map
from ibot.train.schedules import cosine_scheduler
from ibot.models.wrapper import MultiCropWrapper

__all__ = [
    "GaussianBlur", "Solarization", "atomic_save", "restart_from_checkpoint", "safe_load",
    "concat_all_gather", "get_rank", "get_world_size", "init_distributed_mode", "is_dist_avail_and_initialized",
    "is_main_process", "save_on_master", "setup_for_distributed", "MetricLogger", "SmoothedValue", "bool_flag",
    "fix_random_seeds", "get_sha", "LARS", "cancel_gradients_last_layer", "clip_gradients", "get_params_groups",
    "has_batchnorms", "load_pretrained_weights", "cosine_scheduler", "MultiCropWrapper",
    "accuracy", "PCA", "compute_ap", "compute_map",
]
