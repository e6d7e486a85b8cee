"""Recipes as files: YAML configs of ``main_ibot.py`` flags (``--config FILE``).

A config is a YAML mapping ``flag: value`` with the flags' ``dest`` names (``batch_size_per_gpu:
64``; lists for ``nargs`` flags, ``true``/``false`` for boolean flags). It is read with
``yaml.safe_load`` (no code execution) and becomes the parser's defaults, so flags given on the
command line override it. Unknown keys and values the flag refuses are errors naming the file and
the key. The repository's recipes live in ``ibot/configs/`` (``configs/`` at the repository root
points there); :func:`recipe_argv` turns one into command-line flags.
"""
import argparse
import os

import yaml

__all__ = ["ConfigFileError", "load_config", "parse_with_config", "recipe_path", "recipe_argv", "list_recipes"]

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class ConfigFileError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


def _actions(parser):
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}


def _convert(action, value, path, key):
    """``value`` from YAML as the flag would parse it (``type`` applied to each item, choices checked)."""
    def one(v):
        if action.type is not None and (isinstance(v, str) or action.type in (int, float)):
            try:
                v = action.type(str(v)) if action.type not in (int, float) else action.type(v)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
                raise ConfigFileError(f"{path}: {key}: {v!r} is not accepted by --{action.dest} ({err})") from None
        if action.choices is not None and v not in action.choices:
            raise ConfigFileError(f"{path}: {key}: {v!r} is not one of the choices of --{action.dest}: "
                                  f"{list(action.choices)}")
        return v
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        return [one(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if isinstance(value, (list, tuple)):
        raise ConfigFileError(f"{path}: {key}: --{action.dest} takes one value, got a list {value!r}")
    return one(value)


def load_config(path, parser):
    """``{dest: value}`` of the YAML config at ``path``, checked against ``parser``'s flags."""
    if not os.path.isfile(path):
        raise ConfigFileError(f"--config {path}: no such file")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigFileError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: a config is a mapping 'flag: value', got {type(data).__name__}")
    actions = _actions(parser)
    unknown = sorted(k for k in data if k not in actions)
    if unknown:
        raise ConfigFileError(f"{path}: unknown flag(s) {', '.join(unknown)} (use the names of "
                              f"main_ibot.py --help without the dashes)")
    return {k: _convert(actions[k], v, path, k) for k, v in data.items()}


def parse_with_config(parser, argv=None):
    """Parse ``argv``; when it names ``--config FILE``, that file's values become the defaults first,
    so that the command line overrides the file. Returns the Namespace (``args.config`` = the path)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            parser.set_defaults(**load_config(known.config, parser))
        except ConfigFileError as err:
            parser.error(str(err))
    return parser.parse_args(argv)


def recipe_path(name):
    """Path of the repository recipe ``name`` (file name in ``ibot/configs`` without ``.yaml``)."""
    path = os.path.join(RECIPES, name + ".yaml")
    if not os.path.isfile(path):
        raise ConfigFileError(f"no recipe {name!r}; available: {', '.join(list_recipes())}")
    return path


def list_recipes():
    """Names of the recipes shipped in ``ibot/configs``."""
    return sorted(f[:-5] for f in os.listdir(RECIPES) if f.endswith(".yaml"))


def recipe_argv(name):
    """The recipe ``name`` as ``main_ibot.py`` command-line flags (``["--flag", "value", ...]``)."""
    with open(recipe_path(name)) as f:
        data = yaml.safe_load(f) or {}
    argv = []
    for key, value in data.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        argv += [f"--{key}"] + [str(v).lower() if isinstance(v, bool) else str(v) for v in values]
    return argv
