"""Checks of the vfe-rpc verbs' parameters (bdev_*, controller_*): a missing
or mistyped one is refused with an InventoryError (-EINVAL) naming it."""
from __future__ import annotations

from typing import Any

from vfe.controller.kind import InventoryError


def int_param(p: dict, key: str, default: Any = None, *, lo: int | None = None, hi: int | None = None):
    """An integer (or a string of one, 0x allowed) in lo..hi; `default` when
    absent (required when there is no default)."""
    v = p.get(key, default)
    if v is None:
        if default is None:
            raise InventoryError(f"missing parameter {key}")
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        try:
            v = int(str(v), 0)
        except ValueError:
            raise InventoryError(f"{key} must be an integer, not {v!r}") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise InventoryError(f"{key} {v} out of range {lo}..{hi}")
    return v


def str_param(p: dict, key: str, default: str | None = None) -> str:
    """A non-empty string."""
    v = p.get(key, default)
    if v is None or v == "":
        raise InventoryError(f"missing parameter {key}")
    if not isinstance(v, str):
        raise InventoryError(f"{key} must be a string")
    return v


def bool_param(p: dict, key: str) -> bool:
    """true or false (absent: false)."""
    v = p.get(key, False)
    if not isinstance(v, bool):
        raise InventoryError(f"{key} must be true or false")
    return v
