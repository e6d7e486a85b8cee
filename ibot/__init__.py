"""Library behind the official iBOT entry points.

One concern per module; the official top-level files (``main_ibot.py``, ``utils.py``, ``loader.py``)
parse flags and re-export these names so that scripts written for the official repository keep working.
"""
