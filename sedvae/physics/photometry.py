"""Broad-band photometry in nanomaggies from observed-frame spectra, as a torch matrix.

Same definition as ``speclite`` (photon-counting AB maggies):

    maggies = int f_lambda R(lambda) lambda dlambda / int f_AB(lambda) R(lambda) lambda dlambda,
    f_AB(lambda) = 3631 Jy * c / lambda^2,        nanomaggies = 1e9 maggies (m = 22.5 - 2.5 log10).

Each filter's support is cut into quadrature bins (its own tabulation points, subdivided so
that no bin is wider than lambda / ``bin_resolution``). The spectrum is integrated *exactly*
over every bin (:func:`~sedvae.physics.resample.integrate_bins`, so narrow emission lines are
neither missed nor aliased), and ``R lambda`` is taken at the bin centre. Photometry is then a
single (B, n_bins) @ (n_bins, n_bands) product, for any per-galaxy wavelength grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from sedvae.physics.checks import as_tensor
from sedvae.physics.redshift import FLUX_UNIT
from sedvae.physics.resample import integrate_bins

C_ANGSTROM_S = 2.99792458e18  # speed of light, Angstrom/s (exact)
AB_ZERO_JY = 3631.0  # AB magnitude zero point, Jy
JY_CGS = 1e-23  # erg/s/cm^2/Hz per Jy
NANOMAGGIES_PER_MAGGY = 1e9

# Legacy Surveys DR9/DR10 bands: DECam (south, DECaLS/DES) and BASS+MzLS (north), plus unWISE.
LS_SOUTH = ("decam2014-g", "decam2014-r", "decam2014-z", "wise2010-W1", "wise2010-W2")
LS_NORTH = ("BASS-g", "BASS-r", "MzLS-z", "wise2010-W1", "wise2010-W2")


def nanomaggies_to_mag(nmgy: torch.Tensor) -> torch.Tensor:
    """AB magnitude ``22.5 - 2.5 log10(f / nmgy)`` (NaN for f <= 0)."""
    return 22.5 - 2.5 * torch.log10(nmgy)


def mag_to_nanomaggies(mag: torch.Tensor | float) -> torch.Tensor:
    """Nanomaggies ``10^(-0.4 (m - 22.5))`` for AB magnitude ``m``."""
    return 10.0 ** (-0.4 * (torch.as_tensor(mag) - 22.5))


def _quadrature_bins(wave: np.ndarray, bin_resolution: float) -> np.ndarray:
    """Edges: the filter's tabulation points, each interval split into equal sub-bins."""
    n_sub = np.maximum(1, np.ceil(np.diff(wave) * bin_resolution / wave[:-1]).astype(int))
    pieces = [
        np.linspace(a, b, n + 1)[:-1] for a, b, n in zip(wave[:-1], wave[1:], n_sub, strict=True)
    ]
    return np.concatenate([*pieces, wave[-1:]])


class Photometry(nn.Module):
    """Model photometry (nanomaggies) of observed-frame spectra through speclite filters.

    Parameters
    ----------
    bands : sequence of str
        speclite filter names (shipped with speclite, nothing is downloaded), e.g.
        ``LS_SOUTH`` or ``LS_NORTH``.
    bin_resolution : float
        Quadrature bins are no wider than lambda / bin_resolution (R lambda must be nearly
        constant inside a bin; 1000 agrees with speclite to ~5e-5).
    strict : bool
        Raise if a spectrum does not cover a filter's full response; otherwise the missing part
        counts as zero flux.
    curves : mapping name -> (wavelength in A, response), optional
        The filter curves themselves (e.g. ``sedvae.sps.tables.SPSTables.filter_curves()``,
        speclite's tabulations exported for a machine without speclite); default: speclite.
    """

    def __init__(
        self,
        bands: Sequence[str] = LS_SOUTH,
        *,
        bin_resolution: float = 1000.0,
        strict: bool = True,
        curves: Mapping[str, tuple] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(bands, str) or len(bands) == 0:
            raise ValueError(f"bands must be a non-empty sequence of filter names; got {bands!r}")
        self.bands = tuple(bands)
        self.strict = strict
        if curves is None:
            import speclite.filters  # heavy import (astropy), only where filters are built

            filters = speclite.filters.load_filters(*self.bands)
            curves = {
                b: (f.wavelength, f.response) for b, f in zip(self.bands, filters, strict=True)
            }
        missing = [b for b in self.bands if b not in curves]
        if missing:
            raise ValueError(f"no filter curves for {missing}")
        los, his, cols, weights, ranges = [], [], [], [], []
        for b, name in enumerate(self.bands):
            wave = np.asarray(curves[name][0], dtype=np.float64)
            resp = np.asarray(curves[name][1], dtype=np.float64)
            edges = _quadrature_bins(wave, bin_resolution)
            lo, hi = edges[:-1], edges[1:]
            centre = 0.5 * (lo + hi)
            r_lambda = np.interp(centre, wave, resp) * centre  # photon-counting weight
            # AB normalisation with the same quadrature: int_bin lambda^-2 = 1/lo - 1/hi exactly.
            ab = AB_ZERO_JY * JY_CGS * C_ANGSTROM_S * np.sum(r_lambda * (1.0 / lo - 1.0 / hi))
            los.append(lo)
            his.append(hi)
            cols.append(np.full(lo.shape, b))
            weights.append(r_lambda * FLUX_UNIT * NANOMAGGIES_PER_MAGGY / ab)
            ranges.append((wave[0], wave[-1]))
        lo, hi = np.concatenate(los), np.concatenate(his)
        matrix = np.zeros((lo.size, len(self.bands)))
        matrix[np.arange(lo.size), np.concatenate(cols)] = np.concatenate(weights)
        # float64: the matrix is small, and it is paired with float64 bin integrals.
        self.register_buffer("bin_lo", torch.as_tensor(lo))  # (n_bins,) Angstrom
        self.register_buffer("bin_hi", torch.as_tensor(hi))  # (n_bins,) Angstrom
        self.register_buffer("matrix", torch.as_tensor(matrix))  # (n_bins, n_bands)
        self.register_buffer("band_range", torch.as_tensor(np.array(ranges)))  # (n_bands, 2) A

    def forward(self, wave_obs: torch.Tensor, flux: torch.Tensor) -> torch.Tensor:
        """Photometry of observed-frame spectra.

        Parameters
        ----------
        wave_obs : (L,) or (B, L) tensor, Angstrom
            Observed-frame wavelengths, strictly increasing (per galaxy if 2-D).
        flux : (B, L) tensor, 1e-17 erg/s/cm^2/A
            Observed-frame flux densities (piecewise linear between samples).

        Returns
        -------
        (B, n_bands) tensor, nanomaggies, in the dtype of ``flux``; differentiable.

        Raises
        ------
        ValueError
            Bad shapes or values, or (``strict``) a spectrum not covering a filter.
        """
        flux_t = as_tensor("flux", flux)
        integral, covered = integrate_bins(wave_obs, flux_t, self.bin_lo, self.bin_hi)
        if self.strict and not bool(covered.all()):
            bad = (~covered).any(0).to(torch.float64) @ (self.matrix > 0).to(torch.float64)
            names = [b for b, m in zip(self.bands, bad.tolist(), strict=True) if m > 0]
            raise ValueError(
                f"wave_obs does not cover the response of {names}; pass strict=False to "
                "treat the missing range as zero flux"
            )
        return (integral @ self.matrix.to(integral.dtype)).to(flux_t.dtype)
