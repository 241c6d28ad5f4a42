"""The ZO methods, one small module each, over the shared engine."""

from __future__ import annotations

from .base import ZOMethod
from .mezo import MeZO
from .qzo import QZO
from .sparse_mezo import SparseMeZO

ZO_METHODS: dict[str, type[ZOMethod]] = {m.name: m for m in (MeZO, SparseMeZO, QZO)}


def get_method(name: str) -> type[ZOMethod]:
    try:
        return ZO_METHODS[str(name)]
    except KeyError:
        raise ValueError(f"Unknown zeroth-order optimizer {name!r}; choose one of {sorted(ZO_METHODS)}.") from None


__all__ = ["ZOMethod", "MeZO", "SparseMeZO", "QZO", "ZO_METHODS", "get_method"]
