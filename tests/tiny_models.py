"""Tiny networks for step-level tests, registered in the architecture registry under a test-only name."""
from functools import partial

import torch
import torch.nn as nn

from ibot.models import register_model, unregister_model
from ibot.models.vision_transformer import VisionTransformer


def tiny_vit(depth=2, patch_size=8, **kwargs):
    """A ``depth``-block, 48-dim, 3-head ViT with the official block structure (qkv bias, LayerNorm 1e-6)."""
    return VisionTransformer(patch_size=patch_size, embed_dim=48, depth=depth, num_heads=3, mlp_ratio=4,
                             qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def register_tiny_arch(name, factory):
    """Make ``--arch name`` build ``factory`` for the duration of a test (through the registry), with one
    torch thread (tiny models run faster on one, and are robust on a shared machine). A generator: yield
    from it in a fixture."""
    register_model(factory, name=name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        unregister_model(name)


#: The tiny pre-training recipe of the tests: vit_tiny/8 on 32-px images (16-px local crops), small
#: heads, no loader workers. ``tiny_pretrain_flags`` adds or replaces flags on top of it.
TINY_PRETRAIN = {"arch": "vit_tiny", "patch_size": 8, "global_crops_size": 32, "local_crops_size": 16,
                 "out_dim": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16, "num_workers": 0}


def tiny_pretrain_flags(**flags):
    """``main_ibot.py`` command-line flags: :data:`TINY_PRETRAIN` updated with ``flags`` (``name=value``;
    lists/tuples for several values, None drops a flag), in insertion order."""
    values = {**TINY_PRETRAIN, **flags}
    argv = []
    for name, value in values.items():
        if value is None:
            continue
        argv.append(f"--{name}")
        argv += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return argv
