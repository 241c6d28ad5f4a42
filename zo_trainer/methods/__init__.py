"""The ZO methods, one small module each, over the shared engine; ``register_method`` adds one."""

from __future__ import annotations

from .base import MethodConfig, ZOMethod
from .mezo import MeZO
from .qzo import QZO, QZOConfig
from .sparse_mezo import SparseMeZO

ZO_METHODS: dict[str, type[ZOMethod]] = {}


def register_method(method: type[ZOMethod], overwrite: bool = False) -> type[ZOMethod]:
    """Make ``method`` an ``optim`` choice (``--optim <method.name>``); refuses to replace one unless asked.

    Mirrors ``zo_trainer.tasks.register_task``; usable as a class decorator.
    """
    if method.name in ZO_METHODS and not overwrite:
        raise ValueError(f"ZO method {method.name!r} is already registered; pass overwrite=True")
    ZO_METHODS[method.name] = method
    return method


for _method in (MeZO, SparseMeZO, QZO):
    register_method(_method)


def get_method(name: str) -> type[ZOMethod]:
    try:
        return ZO_METHODS[str(name)]
    except KeyError:
        raise ValueError(f"Unknown zeroth-order optimizer {name!r}; choose one of {sorted(ZO_METHODS)}.") from None


__all__ = [
    "ZOMethod",
    "MethodConfig",
    "MeZO",
    "SparseMeZO",
    "QZO",
    "QZOConfig",
    "ZO_METHODS",
    "get_method",
    "register_method",
]
