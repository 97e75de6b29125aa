"""The same mock galaxies observed on other instruments' pixels (SDSS/BOSS, MaNGA-like grids):
what tests and ``bench/grids.py`` use to check that the networks, trained on DESI pixels, read
any grid alike.

The noiseless spectrum goes through the other instrument (its pixels and LSF) at the galaxy's
fibre aperture; the noise keeps the DESI mock's information per Angstrom: the ivar per unit
wavelength of the DESI observation (ivar / pixel width, its masked pixels left out) is
interpolated onto the new pixels and multiplied by their widths, so the two observations
differ only in coverage, sampling and resolution, not in depth. The photometry is the DESI
mock's (the same galaxy).
"""

from __future__ import annotations

import numpy as np
import torch

from ..physics.resample import pixel_edges


def per_angstrom_ivar(wave, arm, ivar: torch.Tensor, new_wave) -> torch.Tensor:
    """ivar (B, M) on pixels ``wave`` (arms ``arm``) -> ivar (B, M') on ``new_wave`` (M',)
    with the same inverse variance per Angstrom (see the module docstring); zero outside
    the old pixels' range."""
    wave = torch.as_tensor(wave, dtype=torch.float64)
    arm = torch.zeros(wave.shape, dtype=torch.long) if arm is None else torch.as_tensor(arm)
    width = torch.empty_like(wave)
    for a in torch.unique(arm).tolist():
        sel = arm == a
        width[sel] = torch.diff(pixel_edges(wave[sel]))
    new_wave = torch.as_tensor(new_wave, dtype=torch.float64)
    new_width = torch.diff(pixel_edges(new_wave)).numpy()
    order = torch.argsort(wave).numpy()
    w, x = wave.numpy()[order], new_wave.numpy()
    dens = (ivar.double() / width).numpy()[:, order]
    out = np.zeros((ivar.shape[0], len(x)))
    for i in range(ivar.shape[0]):
        good = dens[i] > 0
        inside = (x >= w[good][0]) & (x <= w[good][-1])
        out[i, inside] = np.interp(x[inside], w[good], dens[i, good]) * new_width[inside]
    return torch.as_tensor(out, dtype=ivar.dtype)


@torch.no_grad()
def observe_on_grid(wave_rest, lum_rest, z, aperture, instrument, desi, generator=None,
                    lsf_sigma=None) -> dict:  # fmt: skip
    """Mock galaxies on another instrument (module docstring).

    Parameters
    ----------
    wave_rest : (L,) tensor, Angstrom
    lum_rest : (B, L) tensor, L_sun/A (mass, nebular emission and broadening included)
    z, aperture : (B,) tensors
    instrument : e.g. :class:`sedvae.physics.SDSSInstrument` or ``GenericInstrument``
    desi : dict with ``wave`` (M,), ``arm`` (M,), ``ivar`` (B, M): the DESI observation whose
        depth per Angstrom is kept
    generator : torch.Generator, optional
    lsf_sigma : (M',) or (B, M') tensor, Angstrom, optional: returned for the batch

    Returns
    -------
    dict: ``flux``, ``ivar``, ``flux_true`` (B, M') float32, ``mask`` (B, M') bool, ``wave``
    (M',) float64, and ``lsf_sigma`` (B, M') when given.
    """
    dt = lum_rest.dtype
    flux_true = instrument(wave_rest, lum_rest, z.to(dt)) * aperture.to(dt)[:, None]
    wave = instrument.wave.double()
    ivar = per_angstrom_ivar(desi["wave"], desi.get("arm"), desi["ivar"], wave).float()
    noise = torch.randn(ivar.shape, generator=generator) / ivar.clamp_min(1e-30).sqrt()
    flux = torch.where(ivar > 0, flux_true.float() + noise, torch.zeros_like(noise))
    out = {"flux": flux, "ivar": ivar, "mask": ivar <= 0, "wave": wave,
           "flux_true": flux_true.float()}  # fmt: skip
    if lsf_sigma is not None:
        out["lsf_sigma"] = torch.as_tensor(lsf_sigma, dtype=torch.float32).expand_as(flux).clone()
    return out


__all__ = ["observe_on_grid", "per_angstrom_ivar"]
