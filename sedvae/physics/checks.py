"""Boundary checks shared by the observation model: raise ``ValueError`` naming the argument.

Shape checks are free; value checks (finite, monotone) cost one host sync each, which is
negligible next to the spectra they guard and catches NaNs where they enter, not three
modules later.
"""

from __future__ import annotations

import numpy as np
import torch


def as_tensor(name: str, x, *, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """Convert array-likes (including big-endian FITS arrays) to a floating tensor."""
    if isinstance(x, torch.Tensor):
        t = x
    else:
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"{name} must be numeric; got dtype {arr.dtype}")
        # FITS data are big-endian and torch refuses non-native byte order.
        arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
        t = torch.as_tensor(arr)
    if not torch.is_floating_point(t):
        t = t.to(torch.get_default_dtype())
    if dtype is not None or device is not None:
        t = t.to(dtype=dtype or t.dtype, device=device)
    return t


def check_ndim(name: str, t: torch.Tensor, ndims: tuple[int, ...], shape_doc: str) -> None:
    if t.ndim not in ndims:
        raise ValueError(f"{name} must have shape {shape_doc}; got {tuple(t.shape)}")


def check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_increasing(name: str, t: torch.Tensor) -> None:
    """``t`` (..., L) must be strictly increasing along its last axis."""
    if t.shape[-1] < 2:
        raise ValueError(f"{name} needs at least 2 samples; got {t.shape[-1]}")
    if not bool((torch.diff(t, dim=-1) > 0).all()):
        raise ValueError(f"{name} must be strictly increasing")
