"""Official module path ``models.swin_transformer``: re-exports :mod:`ibot.models.swin_transformer`."""
from ibot.models.swin_transformer import *  # noqa: F401,F403
