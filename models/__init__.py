"""Official ``models`` package: a door onto :mod:`ibot.models` (``models.vit_small``,
``models.__dict__[args.arch]``, ``models.vision_transformer.VisionTransformer`` and
``models.head.iBOTHead`` keep working for scripts written for the official repository)."""
from ibot.models import *  # noqa: F401,F403
from ibot.models import __all__  # noqa: F401

from . import head, swin_transformer, vision_transformer  # noqa: F401,E402
