"""Official module path ``models.vision_transformer``: re-exports :mod:`ibot.models.vision_transformer`."""
from ibot.models.vision_transformer import *  # noqa: F401,F403
