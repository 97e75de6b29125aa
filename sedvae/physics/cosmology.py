"""Planck18 cosmology tabulated for torch, so that z can be a (batched) tensor.

One cosmology everywhere: ``astropy.cosmology.Planck18``. Distances and ages are computed by
astropy once on a dense grid in z and linearly interpolated in torch (relative interpolation
error < 1e-6 over the table range). Where astropy is not installed (a device that receives the
exported simulator tables), the same table comes from that file (:func:`set_cosmology_tables`,
called by ``SEDModel(tables=...)``).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

Z_MAX_TABLE = 10.0  # the table covers 0 <= z <= 10; models restrict z further
_N_TABLE = 20001  # dz = 5e-4: linear interpolation error of d_L and age < 1e-6 (relative)
MPC_CM = 3.0856775814913673e24  # cm per Mpc
L_SUN_ERG_S = 3.828e33  # IAU 2015 nominal solar luminosity (erg/s)


_FALLBACK: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


def set_cosmology_tables(z: np.ndarray, d_l_mpc: np.ndarray, age_gyr: np.ndarray) -> None:
    """The table to use where astropy is not installed (astropy's own numbers, exported by
    ``python -m sedvae.sps export-tables``); with astropy installed it is not consulted."""
    global _FALLBACK
    z = np.asarray(z, dtype=np.float64)
    if z.shape != (_N_TABLE,) or abs(z[-1] - Z_MAX_TABLE) > 1e-12:
        raise ValueError(f"a cosmology table needs {_N_TABLE} redshifts from 0 to {Z_MAX_TABLE}")
    _FALLBACK = (z, np.asarray(d_l_mpc, np.float64), np.asarray(age_gyr, np.float64))


@functools.lru_cache(maxsize=1)
def _astropy_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from astropy.cosmology import Planck18

    z = np.linspace(0.0, Z_MAX_TABLE, _N_TABLE)
    d_l = Planck18.luminosity_distance(z).to_value("Mpc")
    age = Planck18.age(z).to_value("Gyr")
    return z, d_l, age


def cosmology_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z, d_L in Mpc, age in Gyr) from astropy, else from :func:`set_cosmology_tables`."""
    if _has_astropy():
        return _astropy_tables()
    if _FALLBACK is None:
        raise ModuleNotFoundError(
            "astropy is not installed and no exported cosmology table was given: build "
            "SEDModel(tables=...) first, or install astropy"
        )
    return _FALLBACK


@functools.lru_cache(maxsize=1)
def _has_astropy() -> bool:
    import importlib.util

    return importlib.util.find_spec("astropy") is not None


def _interp(z: torch.Tensor | float, column: int) -> torch.Tensor:
    z_t = torch.as_tensor(z)
    if not torch.is_floating_point(z_t):
        z_t = z_t.to(torch.get_default_dtype())
    if torch.any(~torch.isfinite(z_t)) or torch.any(z_t < 0) or torch.any(z_t > Z_MAX_TABLE):
        raise ValueError(
            f"z must be finite and within [0, {Z_MAX_TABLE}]; got {z_t.min()}..{z_t.max()}"
        )
    table = cosmology_tables()
    grid = torch.as_tensor(table[0], dtype=torch.float64, device=z_t.device)
    values = torch.as_tensor(table[column], dtype=torch.float64, device=z_t.device)
    zz = z_t.to(torch.float64)
    idx = torch.clamp(torch.searchsorted(grid, zz.detach(), right=True) - 1, 0, len(grid) - 2)
    w = (zz - grid[idx]) / (grid[idx + 1] - grid[idx])
    return (values[idx] * (1 - w) + values[idx + 1] * w).to(z_t.dtype)


def luminosity_distance_mpc(z: torch.Tensor | float) -> torch.Tensor:
    """Planck18 luminosity distance (Mpc) at redshift ``z`` (any shape)."""
    return _interp(z, 1)


def age_of_universe_gyr(z: torch.Tensor | float) -> torch.Tensor:
    """Planck18 age of the universe (Gyr) at redshift ``z`` (any shape)."""
    return _interp(z, 2)


def age_of_universe_now_gyr() -> float:
    """Planck18 age of the universe today (Gyr), 13.79."""
    return float(cosmology_tables()[2][0])
