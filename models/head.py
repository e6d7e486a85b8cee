"""Official module path ``models.head``: re-exports :mod:`ibot.models.head`."""
from ibot.models.head import *  # noqa: F401,F403
