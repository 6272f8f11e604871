"""Argument checks shared by every public entry point.

Each helper raises :class:`TypeError` for a value of the wrong type and
:class:`ValueError` for a value out of range, and the message always names the
argument and says what is allowed, so the user knows what to change.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

import torch


def check_type(name: str, value: Any, types, what: str | None = None) -> Any:
    if not isinstance(value, types):
        expected = what or (
            " or ".join(t.__name__ for t in types) if isinstance(types, tuple) else types.__name__
        )
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    return value


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    value = int(value)
    _check_range(name, value, low, high)
    return value


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    _check_range(name, value, low, high, low_open, high_open)
    return value


def check_positive(name: str, value: Any) -> float:
    return check_float(name, value, low=0.0, low_open=True)


def check_probability(name: str, value: Any, *, open_interval: bool = False) -> float:
    return check_float(name, value, low=0.0, high=1.0, low_open=open_interval, high_open=open_interval)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_module(name: str, value: Any) -> torch.nn.Module:
    if not isinstance(value, torch.nn.Module):
        raise TypeError(
            f"{name} must be a torch.nn.Module (for example an nn.Sequential or one of "
            f"pyro_bq.models' networks), got {type(value).__name__}"
        )
    return value


def check_tensor(
    name: str,
    value: Any,
    *,
    ndim: int | tuple[int, ...] | None = None,
    floating: bool = False,
) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            raise ValueError(
                f"{name} must have {' or '.join(map(str, allowed))} dimensions, "
                f"got shape {tuple(value.shape)}"
            )
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def _check_range(name, value, low, high, low_open=False, high_open=False) -> None:
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must lie in {left}{lo}, {hi}{right}, got {value}")
