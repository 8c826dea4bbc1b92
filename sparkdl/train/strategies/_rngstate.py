"""RNG states as weights_only-loadable values (tensors, numbers, lists) and back."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["numpy_state", "set_numpy_state", "python_state", "set_python_state"]


def numpy_state(rs: np.random.RandomState | None = None) -> dict[str, Any]:
    """The legacy MT19937 state of ``rs`` (or numpy's global one)."""
    name, keys, pos, has_gauss, cached = rs.get_state() if rs is not None else np.random.get_state()
    return {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_state(state: dict[str, Any], rs: np.random.RandomState | None = None) -> None:
    value = (state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
             state["cached_gaussian"])
    (rs.set_state if rs is not None else np.random.set_state)(value)


def python_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_python_state(state: list[Any]) -> None:
    random.setstate((state[0], tuple(state[1]), state[2]))
