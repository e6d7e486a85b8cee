"""The one architecture registry (timm's shape: ``register_model`` / ``create_model`` / ``list_models``).

Every backbone factory of the repository is registered here under its official name
(``vit_small``, ``swin_tiny``, ...); builders and every script's ``--arch`` choices read this
registry, and tests register their tiny networks through it. ``deit_tiny`` / ``deit_small`` are
aliases of the ViTs (as in the official ``main_ibot.py``, which rewrites ``deit`` to ``vit``).
"""
import fnmatch
from typing import Callable, Dict, List, Optional

_FACTORIES: Dict[str, Callable] = {}
_FAMILY: Dict[str, str] = {}
_ALIASES: Dict[str, str] = {}

__all__ = ["register_model", "unregister_model", "create_model", "list_models", "is_model",
           "model_family", "resolve_name", "arch_choices", "create_backbone"]


def register_model(fn: Optional[Callable] = None, *, name: Optional[str] = None, family: Optional[str] = None,
                   aliases=()):
    """Register a factory ``fn(**kwargs) -> nn.Module`` (usable as a bare decorator).

    ``name`` defaults to ``fn.__name__``; ``family`` (``"vit"`` or ``"swin"``: which keyword arguments the
    factory takes) defaults to the name's prefix. A name registered twice is an error.
    """
    def decorate(f):
        key = name or f.__name__
        if key in _FACTORIES or key in _ALIASES:
            raise ValueError(f"architecture {key!r} is registered already")
        _FACTORIES[key] = f
        _FAMILY[key] = family or ("swin" if key.startswith("swin") else "vit")
        for alias in aliases:
            _ALIASES[alias] = key
        return f
    return decorate(fn) if fn is not None else decorate


def unregister_model(name: str) -> None:
    """Remove ``name`` (and the aliases pointing at it); used by tests that register temporary models."""
    _FACTORIES.pop(name, None)
    _FAMILY.pop(name, None)
    for alias in [a for a, target in _ALIASES.items() if target == name]:
        del _ALIASES[alias]


def resolve_name(name: str) -> str:
    """The registered name behind ``name`` (aliases resolved); ``KeyError`` naming the choices if unknown."""
    key = _ALIASES.get(name, name)
    if key not in _FACTORIES:
        raise KeyError(f"unknown architecture {name!r}; registered: {', '.join(arch_choices())}")
    return key


def is_model(name: str) -> bool:
    """True when ``name`` (or an alias) is registered."""
    return _ALIASES.get(name, name) in _FACTORIES


def model_family(name: str) -> str:
    """``"vit"`` or ``"swin"``: the keyword arguments the factory of ``name`` accepts."""
    return _FAMILY[resolve_name(name)]


def create_model(name: str, **kwargs):
    """Build architecture ``name`` with the factory's keyword arguments (random initialisation)."""
    return _FACTORIES[resolve_name(name)](**kwargs)


def list_models(pattern: str = "*", family: Optional[str] = None) -> List[str]:
    """Registered names (no aliases) matching the glob ``pattern``, optionally of one ``family``, sorted."""
    return sorted(n for n in _FACTORIES
                  if fnmatch.fnmatch(n, pattern) and (family is None or _FAMILY[n] == family))


def arch_choices(family: Optional[str] = None, aliases: bool = False) -> List[str]:
    """``--arch`` choices for a parser: the registered names (and aliases if asked) in registration order."""
    names = [n for n in _FACTORIES if family is None or _FAMILY[n] == family]
    if aliases:
        names += [a for a, target in _ALIASES.items() if target in names]
    return names


def create_backbone(name: str, *, patch_size: int = 16, window_size: int = 7, img_size=224, **kwargs):
    """Build backbone ``name`` with the keyword arguments its family takes.

    ViTs get ``patch_size`` and ``img_size`` (the grid the position embedding is created for; other
    sizes are interpolated at run time); Swins get ``window_size`` and always embed 4-pixel patches
    at the nominal 224 px. ``kwargs`` go to the factory (``num_classes``, ``drop_path_rate``, ...).
    """
    if model_family(name) == "swin":
        return create_model(name, window_size=window_size, **kwargs)
    return create_model(name, patch_size=patch_size, img_size=img_size, **kwargs)
