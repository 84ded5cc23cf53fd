"""Method registry: every module in this package registers its classes with ``@register``.

Modules are imported automatically, so adding a method means adding one file here.  Besides its
classes, a module may define:

* ``add_arguments(parser)``: its flags.  Only the module's classes and their subclasses read
  them; ``argparser`` refuses them for any other ``--method``.
* ``FLAG_NEEDS = {flag: (switch, values)}``: flags that act only through another one, refused
  while that switch is off (``values`` empty: any set value, e.g. a non-zero weight) or takes
  none of ``values``.  ``{"threshold": ("pseudo", ())}``: no pseudo-labels, no threshold.
  ``values`` may be ``AnythingBut(v)`` for a switch that is on unless it equals ``v`` (unset
  included): ``{"adaptive_alpha": ("loss_weights_lr", AnythingBut(0.0))}``.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

from .base import Method, MethodStateError, StepContext  # noqa: F401

_REGISTRY: dict[str, type[Method]] = {}


@dataclass(frozen=True)
class AnythingBut:
    """``FLAG_NEEDS`` values of a switch that is on at every value but ``off``."""

    off: float

    def __contains__(self, value) -> bool:
        return value != self.off

    def __str__(self) -> str:
        return f"anything but {self.off:g}"


def register(name: str, *aliases: str):
    """Class decorator: make a Method available as ``--method name`` (case-insensitive)."""

    def wrap(cls):
        cls.name = name
        for key in (name, *aliases):
            _REGISTRY[key.lower()] = cls
        return cls

    return wrap


def _import_all():
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def method_names() -> list[str]:
    _import_all()
    return sorted({cls.name for cls in _REGISTRY.values()})


def get_method_class(name: str) -> type[Method]:
    _import_all()
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise KeyError(f"unknown method '{name}'; choose one of {', '.join(method_names())}") from None


def all_method_classes() -> list[type[Method]]:
    _import_all()
    return list(dict.fromkeys(_REGISTRY.values()))
