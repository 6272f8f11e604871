"""Argument checks shared by every public entry point.

Each helper raises :class:`TypeError` for a value of the wrong type and
:class:`ValueError` for a value out of range, and the message always names the
argument and says what is allowed, so the user knows what to change.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
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


def _same_choice(value: Any, choice: Any) -> bool:
    if isinstance(value, bool) != isinstance(choice, bool):
        return False  # True is not the choice 1
    if isinstance(choice, str) != isinstance(value, str):
        return False
    if isinstance(choice, numbers.Integral) and not isinstance(value, numbers.Integral):
        return False  # 4.0 is not the choice 4
    try:
        return bool(value == choice)
    except Exception:  # arrays, tensors and other objects without a plain truth value
        return False


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Check that ``value`` is one of ``choices`` (bools, ints and str are not mixed up).

    :raises ValueError: naming ``name`` and listing the choices.
    """
    choices = tuple(choices)
    if not any(_same_choice(value, c) for c in choices):
        shown = repr(value) if len(repr(value)) <= 80 else f"a {type(value).__name__}"
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {shown}")
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


# -- bools, strings, callables, paths, dtypes, devices, shapes, bit widths, sequences ------------


def check_bool(name: str, value: Any) -> bool:
    """Check that ``value`` is a bool (``0``/``1``, ``"yes"`` or ``None`` are refused).

    :raises TypeError: naming ``name``.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} ({_short(value)})")
    return bool(value)


def check_str(name: str, value: Any, *, nonempty: bool = True) -> str:
    """Check that ``value`` is a str (non-empty unless ``nonempty=False``)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__} ({_short(value)})")
    if nonempty and not value:
        raise ValueError(f"{name} must be a non-empty str")
    return value


def check_callable(name: str, value: Any, what: str = "a callable") -> Any:
    """Check that ``value`` can be called; ``what`` describes the expected signature."""
    if not callable(value):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} ({_short(value)})")
    return value


def check_path(name: str, value: Any, *, must_exist: bool = False, kind: str | None = None):
    """Check a filesystem path argument and return it as a :class:`pathlib.Path`.

    :param must_exist: require the path to exist.
    :param kind: ``"file"`` or ``"dir"`` to require that kind of path (implies ``must_exist``).
    :raises TypeError: for a value that is not ``str`` or ``os.PathLike``.
    :raises ValueError: for an empty path, a NUL character, or a missing/wrong kind of path.
    """
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__} ({_short(value)})")
    text = os.fspath(value)
    if not isinstance(text, str) or not text or "\x00" in text:
        raise ValueError(f"{name} must be a non-empty path without NUL characters, got {text!r}")
    path = Path(text).expanduser()
    if kind is not None:
        check_choice("kind", kind, ("file", "dir"))
        must_exist = True
    if must_exist and not path.exists():
        raise ValueError(f"{name} {str(path)!r} does not exist")
    if kind == "file" and not path.is_file():
        raise ValueError(f"{name} {str(path)!r} is not a file")
    if kind == "dir" and not path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is not a folder")
    return path


def check_dtype(name: str, value: Any, allowed: Iterable[torch.dtype] | None = None, *, floating: bool = False) -> torch.dtype:
    """Check a ``torch.dtype`` argument (e.g. ``dtype=torch.float32``).

    :raises TypeError: if ``value`` is not a torch.dtype (strings such as ``"float32"`` are refused).
    :raises ValueError: if it is not among ``allowed`` or not floating point when ``floating``.
    """
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype such as torch.float32, got {type(value).__name__} ({_short(value)})")
    if floating and not value.is_floating_point:
        raise ValueError(f"{name} must be a floating-point dtype (torch.float16/32/64, torch.bfloat16), got {value}")
    if allowed is not None:
        allowed = tuple(allowed)
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value}")
    return value


def check_device(name: str, value: Any) -> torch.device:
    """Check a device argument (``"cpu"``, ``"cuda:0"``, a ``torch.device``) and that it exists here.

    :raises TypeError: for a value that is neither str nor torch.device.
    :raises ValueError: for an unknown device string or a device this machine lacks.
    """
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"{name} must be a torch.device or a str such as 'cpu' or 'cuda:0', got {type(value).__name__} ({_short(value)})")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{name} must name a device such as 'cpu' or 'cuda:0', got {value!r}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} is {str(device)!r} but CUDA is not available on this machine; use 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{name} is {str(device)!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"{name} is 'mps' but MPS is not available on this machine; use 'cpu'")
    elif device.type not in ("cpu", "meta"):
        raise ValueError(f"{name} must be 'cpu', 'cuda[:i]' or 'mps', got {str(device)!r}")
    return device


def resolve_device(value: Any = "auto", *, name: str = "device") -> torch.device:
    """The ``torch.device`` that ``value`` asks for: ``"auto"`` (CUDA when available, else CPU),
    ``"cpu"``, ``"cuda"``, ``"cuda:i"``, ``"mps"`` or a ``torch.device``.

    ``"cuda"`` on a machine without a GPU raises a ``ValueError`` that says so
    here, before torch would fail deep inside a kernel call.

    :raises TypeError: for a value that is neither str nor torch.device.
    :raises ValueError: for an unknown device or one this machine lacks.

    Usage::

        device = resolve_device(args.device)     # --device auto|cpu|cuda
        net.to(device)
    """
    if isinstance(value, str) and value == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(value, str) and value.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{name} is {value!r} but no GPU is available on this machine (torch sees no CUDA device); "
                         "use 'cpu' or 'auto'")
    return check_device(name, value)


def check_shape(name: str, value: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Check a tensor's shape against ``shape``, where ``None`` entries match any size.

    :raises TypeError: if ``value`` is not a tensor.
    :raises ValueError: naming the expected and actual shapes.
    """
    check_tensor(name, value)
    if value.dim() != len(shape) or any(e is not None and e != a for e, a in zip(shape, value.shape)):
        shown = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
        raise ValueError(f"{name} must have shape {shown}, got {tuple(value.shape)}")
    return value


def check_int_sequence(name: str, value: Any, *, low: int | None = None, high: int | None = None, nonempty: bool = True) -> tuple[int, ...]:
    """Check a sequence of ints (e.g. layer sizes or per-layer bits); returns a tuple."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) or isinstance(value, torch.Tensor) and value.dim() != 1:
        raise TypeError(f"{name} must be a sequence of ints, got {type(value).__name__} ({_short(value)})")
    items = tuple(value.tolist() if isinstance(value, torch.Tensor) else value)
    if nonempty and not items:
        raise ValueError(f"{name} must not be empty")
    return tuple(check_int(f"{name}[{i}]", v, low=low, high=high) for i, v in enumerate(items))


def check_schedule(
    name: str, value: Any, *, length: int | None = None, low: float | None = None, high: float | None = None,
    monotone: str | None = None,
) -> tuple[float, ...]:
    """Check a schedule given as a sequence of finite numbers (e.g. a per-round threshold or a KL weight).

    :param length: required number of entries.
    :param monotone: ``"increasing"`` or ``"decreasing"`` (non-strict) to require an order.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(value).__name__} ({_short(value)})")
    items = tuple(value.tolist() if isinstance(value, torch.Tensor) else value)
    if not items:
        raise ValueError(f"{name} must not be empty")
    if length is not None and len(items) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(items)}")
    out = tuple(check_float(f"{name}[{i}]", v, low=low, high=high) for i, v in enumerate(items))
    if monotone is not None:
        check_choice("monotone", monotone, ("increasing", "decreasing"))
        pairs = list(zip(out[:-1], out[1:]))
        if any((b < a) if monotone == "increasing" else (b > a) for a, b in pairs):
            raise ValueError(f"{name} must be {monotone}, got {list(out)}")
    return out


def check_site_names(name: str, value: Any, known: Iterable[str], *, nonempty: bool = True) -> list[str]:
    """Check one site name or a collection of them against the ``known`` sites.

    :raises TypeError: if ``value`` is neither a str nor a collection of str.
    :raises ValueError: for an unknown name (the message lists the known ones) or a repeat.
    """
    known = list(known)
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, Iterable) and not isinstance(value, (bytes, torch.Tensor)):
        items = list(value)
    else:
        raise TypeError(f"{name} must be a site name or a list of site names, got {type(value).__name__} ({_short(value)})")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"{name}[{i}] must be a site name (str), got {type(item).__name__} ({_short(item)})")
    if nonempty and not items:
        raise ValueError(f"{name} must name at least one site; known sites: {known}")
    unknown = [s for s in items if s not in known]
    if unknown:
        raise ValueError(f"{name} names unknown site(s) {unknown}; known sites: {known}")
    if len(set(items)) != len(items):
        raise ValueError(f"{name} names a site more than once: {items}")
    return items


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
