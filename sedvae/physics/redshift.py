"""Rest frame -> observed frame: wavelength stretch and luminosity-distance dimming.

Convention for z = 0: a galaxy at z = 0 has no luminosity distance (d_L = 0), so
:func:`redshift_spectrum` raises ``ValueError`` for ``z <= 0`` instead of inventing a 10 pc
distance. The pure wavelength map :func:`redshift_wavelength` is defined at z = 0 (identity).
"""

from __future__ import annotations

import math

import torch

from sedvae.physics.checks import as_tensor, check_finite, check_increasing, check_ndim
from sedvae.physics.cosmology import L_SUN_ERG_S, MPC_CM, luminosity_distance_mpc

FLUX_UNIT = 1e-17  # erg/s/cm^2/A: the DESI/SDSS flux unit used for every observed spectrum
# L_sun/A at 1 Mpc -> 1e-17 erg/s/cm^2/A. Folding 4 pi Mpc^2 into a constant keeps d_L in Mpc,
# so d_L^2 (~1e10 at most) stays far from float32 overflow (4 pi d_L^2 in cm^2 is ~1e56).
LSUN_PER_MPC2_IN_FLUX_UNIT = L_SUN_ERG_S / (4.0 * math.pi * MPC_CM**2) / FLUX_UNIT


def _check_z(z, batch: int | None, *, allow_zero: bool, like: torch.Tensor) -> torch.Tensor:
    """``z`` as a (B,) tensor in ``like``'s dtype/device; a scalar is broadcast to the batch."""
    z_t = as_tensor("z", z, dtype=like.dtype, device=like.device)
    if z_t.ndim == 0:
        z_t = z_t.expand(batch or 1)
    check_ndim("z", z_t, (1,), "(B,)")
    if batch is not None and z_t.shape[0] != batch:
        raise ValueError(f"z must have shape ({batch},) to match the batch; got {tuple(z_t.shape)}")
    check_finite("z", z_t)
    if allow_zero and bool((z_t < 0).any()):
        raise ValueError(f"z must be >= 0; got min {float(z_t.min()):.4g}")
    if not allow_zero and bool((z_t <= 0).any()):
        raise ValueError(
            f"z must be > 0 for fluxes (d_L(0) = 0: no flux convention at z = 0); "
            f"got min {float(z_t.min()):.4g}"
        )
    return z_t


def redshift_wavelength(wave_rest: torch.Tensor, z: torch.Tensor | float) -> torch.Tensor:
    """Observed-frame wavelengths ``lambda_obs = lambda_rest (1 + z)``.

    Parameters
    ----------
    wave_rest : (L,) tensor, Angstrom
        Rest-frame wavelengths shared by the batch.
    z : (B,) tensor or float
        Redshifts, ``z >= 0`` (z = 0 is the identity).

    Returns
    -------
    wave_obs : (B, L) tensor, Angstrom
    """
    wave_rest = as_tensor("wave_rest", wave_rest)
    check_ndim("wave_rest", wave_rest, (1,), "(L,)")
    z_t = _check_z(z, None, allow_zero=True, like=wave_rest)
    return wave_rest.unsqueeze(0) * (1.0 + z_t).unsqueeze(1)


def redshift_spectrum(
    wave_rest: torch.Tensor, lum_rest: torch.Tensor, z: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Redshift rest-frame spectra and dim them by the Planck18 luminosity distance.

    ``f_lambda(lambda_obs) = L_lambda(lambda_obs / (1 + z)) L_sun / (4 pi d_L^2 (1 + z))``,
    which conserves energy: ``int f_lambda d lambda_obs = L_bol / (4 pi d_L^2)``.

    Parameters
    ----------
    wave_rest : (L,) tensor, Angstrom
        Rest-frame wavelengths, strictly increasing.
    lum_rest : (B, L) tensor, L_sun/A
        Rest-frame luminosity densities.
    z : (B,) tensor or float
        Redshifts, ``0 < z <= 10`` (the cosmology table's range). ``z <= 0`` raises.

    Returns
    -------
    wave_obs : (B, L) tensor, Angstrom
        Observed-frame wavelengths (one grid per galaxy).
    flux : (B, L) tensor, 1e-17 erg/s/cm^2/A
        Observed-frame flux densities, in the dtype of ``lum_rest``; differentiable with
        respect to ``lum_rest`` and ``z``.

    Raises
    ------
    ValueError
        Wrong shapes, non-finite values, non-increasing ``wave_rest`` or ``z <= 0``.
    """
    lum_rest = as_tensor("lum_rest", lum_rest)
    check_ndim("lum_rest", lum_rest, (2,), "(B, L)")
    wave_rest = as_tensor("wave_rest", wave_rest, dtype=lum_rest.dtype, device=lum_rest.device)
    check_ndim("wave_rest", wave_rest, (1,), "(L,)")
    if wave_rest.shape[0] != lum_rest.shape[1]:
        raise ValueError(
            f"lum_rest must have shape (B, {wave_rest.shape[0]}) to match wave_rest; "
            f"got {tuple(lum_rest.shape)}"
        )
    check_finite("wave_rest", wave_rest)
    check_increasing("wave_rest", wave_rest)
    check_finite("lum_rest", lum_rest)
    z_t = _check_z(z, lum_rest.shape[0], allow_zero=False, like=lum_rest)

    d_l = luminosity_distance_mpc(z_t)  # (B,) Mpc, differentiable in z
    scale = LSUN_PER_MPC2_IN_FLUX_UNIT / (d_l**2 * (1.0 + z_t))  # (B,)
    wave_obs = wave_rest.unsqueeze(0) * (1.0 + z_t).unsqueeze(1)  # (B, L)
    flux = lum_rest * scale.unsqueeze(1)  # (B, L)
    return wave_obs, flux
