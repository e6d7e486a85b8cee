"""Evaluation entry points of the official iBOT repository (frozen-feature protocols and tools).

Every script runs as ``python evaluation/<script>.py`` or ``torchrun ... evaluation/<script>.py`` and
exposes ``get_args_parser()`` and ``main(args)`` for programmatic use.
"""
