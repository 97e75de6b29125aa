"""Synthetic broad-band photometry of observed spectra, with errors from their ivar.

``spectrum_photometry(wave, flux, ivar, arm)`` integrates each spectrum through speclite
filters (photon-counting AB nanomaggies, the definition of :mod:`sedvae.physics.photometry`):

1. the arms (which may overlap, as DESI's b, r, z) are combined onto one ln-uniform grid as
   fine as the pixels, ivar-weighted (:class:`sedvae.physics.restframe.RestFrameBinner` at
   z = 0: a pixel counts in proportion to its overlap with a bin, so the flux integral is kept);
2. each bin gets the exact filter weight of a flux constant over it, int_bin R(l) l dl over the
   AB normalisation (the filter's quadrature bins of ``Photometry``, cumulated);
3. masked bins are filled by linear interpolation between their usable neighbours, and the part
   of a filter beyond the spectrum by the nearest usable bin's flux. Their share of the band's
   weight (``missing``) enters the error as 100 % of that share of the flux, and a band with
   more than ``max_missing`` of its weight missing is not measured (ivar 0): at DESI's 3600-9824
   A that leaves g and r (BASS, DECam); z (11 % beyond 9824 A for MzLS) and W1, W2 are out;
4. variance: the propagated pixel noise, sum_bin w_bin^2 / ivar_bin, plus (``calibration_floor``
   x flux)^2 for the spectrophotometric calibration, plus (missing x flux)^2.

The result is the photometry of the light the spectrum holds, in the same units as the
catalog's photometry; for a spectrum of the whole galaxy it is the galaxy's photometry in the
bands it covers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..physics.photometry import LS_NORTH, Photometry
from ..physics.restframe import RestFrameBinner

# Spectrophotometric calibration of survey spectra: DESI's is ~2-3 % in flux between the
# spectra and the imaging (Guy et al. 2023); 0.02 is the error floor added to every band.
CALIBRATION_FLOOR = 0.02
# a band is measured when at most this share of its weight is interpolated or extrapolated
MAX_MISSING = 0.01


def _cumulative(phot: Photometry, band: int) -> tuple[np.ndarray, np.ndarray]:
    """Knots and values of G(x), the band's weight below x for a flux of 1 everywhere: the
    filter's quadrature bins are contiguous and each carries a constant weight per Angstrom,
    so G is linear between the knots."""
    lo, hi = phot.bin_lo.numpy(), phot.bin_hi.numpy()
    sel = phot.matrix.numpy()[:, band] != 0
    m = phot.matrix.numpy()[sel, band]
    knots = np.concatenate([lo[sel], hi[sel][-1:]])
    return knots, np.concatenate([[0.0], np.cumsum(m * (hi[sel] - lo[sel]))])


def _band_weights(phot: Photometry, edges: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per band: (n_bins, nb) the weight of each bin for a flux constant over it (nanomaggies
    per flux unit), (nb,) the weight below the first edge and (nb,) the filter's total."""
    nb = phot.matrix.shape[1]
    weights, below, totals = np.zeros((len(edges) - 1, nb)), np.zeros(nb), np.zeros(nb)
    for b in range(nb):
        knots, cum = _cumulative(phot, b)
        g = np.interp(edges, knots, cum)
        weights[:, b], below[b], totals[b] = np.diff(g), g[0], cum[-1]
    return weights, below, totals


def spectrum_photometry(
    wave,
    flux,
    ivar,
    arm=None,
    bands: Sequence[str] = LS_NORTH,
    calibration_floor: float = CALIBRATION_FLOOR,
    max_missing: float = MAX_MISSING,
    curves: Mapping[str, tuple] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic photometry of spectra (see the module docstring).

    Parameters
    ----------
    wave : (M,) Angstrom, observed frame, increasing within each arm
    flux, ivar : (N, M), 1e-17 erg/s/cm^2/A and its inverse square (0 = masked)
    arm : (M,) int, optional; arms must be contiguous blocks of pixels
    bands : speclite filter names (default Legacy Surveys north, the networks' bands)
    calibration_floor : fractional error added in quadrature to every band
    max_missing : largest share of a band's weight that may be interpolated or extrapolated
    curves : filter curves instead of speclite's (``Photometry(curves=...)``)

    Returns
    -------
    photometry, photometry_ivar : (N, nb) nanomaggies and its inverse square (0 where the band
        is not measured); missing : (N, nb) the share of each band's weight filled in.
    """
    wave = np.asarray(wave, dtype=np.float64)
    flux = np.atleast_2d(np.asarray(flux, dtype=np.float64))
    ivar = np.atleast_2d(np.asarray(ivar, dtype=np.float64))
    if flux.shape != ivar.shape or flux.shape[-1] != wave.shape[0]:
        raise ValueError(
            f"flux {flux.shape} and ivar {ivar.shape} must have shape (N, {wave.shape[0]})"
        )
    ivar = np.where(np.isfinite(ivar) & np.isfinite(flux) & (ivar > 0), ivar, 0.0)
    flux = np.where(ivar > 0, flux, 0.0)
    order = np.sort(wave)
    dln = np.median(np.diff(np.log(order))[np.diff(order) > 0])
    lo_w, hi_w = float(order[0]), float(order[-1])
    n_bins = max(2, math.ceil(math.log(hi_w / lo_w) / dln))
    binner = RestFrameBinner(wave, arm, lo_w, hi_w, n_bins)
    f_bin, w_bin = binner(torch.from_numpy(flux), torch.from_numpy(ivar), torch.zeros(len(flux)))
    f_bin, w_bin = f_bin.numpy(), w_bin.numpy()
    edges = binner.edges.numpy()
    centres = np.sqrt(edges[1:] * edges[:-1])

    phot_model = Photometry(bands, curves=curves, strict=False)
    weights, g_lo, totals = _band_weights(phot_model, edges)
    g_hi = totals - g_lo - weights.sum(0)  # each band's weight beyond the grid's last edge

    n, nb = flux.shape[0], len(phot_model.bands)
    phot = np.zeros((n, nb))
    var = np.zeros((n, nb))
    missing = np.ones((n, nb))
    for i in range(n):
        good = w_bin[i] > 0
        if not good.any():
            continue
        filled = np.interp(centres, centres[good], f_bin[i, good])
        first, last = f_bin[i, good][0], f_bin[i, good][-1]
        phot[i] = filled @ weights + g_lo * first + g_hi * last
        var[i] = (weights[good] ** 2 / w_bin[i, good][:, None]).sum(0)
        missing[i] = 1.0 - weights[good].sum(0) / totals
    var += (calibration_floor * phot) ** 2 + (missing * phot) ** 2
    measured = (missing <= max_missing) & (var > 0) & np.isfinite(phot)
    pivar = np.where(measured, 1.0 / np.where(var > 0, var, 1.0), 0.0)
    return np.where(measured, phot, 0.0), pivar, missing


__all__ = ["CALIBRATION_FLOOR", "MAX_MISSING", "spectrum_photometry"]
