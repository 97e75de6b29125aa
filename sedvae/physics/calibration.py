"""Smooth multiplicative flux-calibration nuisance and Milky-Way extinction for model spectra.

Calibration: ``flux_obs = flux_model exp(sum_k c_k P_k(x))`` with Legendre polynomials
P_1..P_K of x = 2 (lambda - lambda_lo) / (lambda_hi - lambda_lo) - 1 over the instrument's
range. The constant P_0 is left out on purpose: an overall scale is the stellar mass.

Milky Way: O'Donnell (1994) optical / Cardelli, Clayton & Mathis (1989) IR-UV curve with
R_V = 3.1, applied to the *model* (data are not de-reddened; DESIGN.md section 3).
"""

from __future__ import annotations

import torch
from torch import nn

from sedvae.physics.checks import as_tensor, check_ndim


def legendre_basis(x: torch.Tensor, order: int) -> torch.Tensor:
    """Legendre polynomials P_1..P_order at x in [-1, 1]: (order, M)."""
    p_prev, p = torch.ones_like(x), x
    out = []
    for k in range(1, order + 1):
        out.append(p)
        # Bonnet recursion: (k+1) P_{k+1} = (2k+1) x P_k - k P_{k-1}
        p_prev, p = p, ((2 * k + 1) * x * p - k * p_prev) / (k + 1)
    return torch.stack(out) if out else x.new_zeros(0, x.shape[0])


class SmoothCalibration(nn.Module):
    """Multiplicative calibration exp(sum_k c_k P_k) on a fixed pixel grid.

    Parameters
    ----------
    wave : (M,) array-like, Angstrom
        Pixel wavelengths (need not be monotonic, e.g. concatenated DESI arms).
    order : int
        Highest Legendre order K (number of coefficients); 0 disables the nuisance.
    """

    def __init__(self, wave, order: int = 2) -> None:
        super().__init__()
        if order < 0:
            raise ValueError(f"order must be >= 0; got {order}")
        w = as_tensor("wave", wave, dtype=torch.float64)
        check_ndim("wave", w, (1,), "(M,)")
        x = 2.0 * (w - w.min()) / (w.max() - w.min()) - 1.0
        self.order = int(order)
        self.register_buffer("basis", legendre_basis(x, order).float(), persistent=False)

    def forward(self, flux: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        """flux (B, M), coeffs (B, K) -> calibrated flux (B, M), same unit."""
        if self.order == 0:
            return flux
        if coeffs.shape != (flux.shape[0], self.order):
            raise ValueError(
                f"coeffs must have shape ({flux.shape[0]}, {self.order}); got {tuple(coeffs.shape)}"
            )
        return flux * torch.exp(coeffs.to(flux.dtype) @ self.basis.to(flux.dtype))


def _odonnell_a_b(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a(x), b(x) of CCM89 with O'Donnell (1994) optical coefficients; x = 1/micron."""
    a = torch.zeros_like(x)
    b = torch.zeros_like(x)
    ir = (x >= 0.3) & (x < 1.1)
    a = torch.where(ir, 0.574 * x**1.61, a)
    b = torch.where(ir, -0.527 * x**1.61, b)
    opt = (x >= 1.1) & (x < 3.3)
    y = x - 1.82
    ca = [1.0, 0.104, -0.609, 0.701, 1.137, -1.718, -0.827, 1.647, -0.505]
    cb = [0.0, 1.952, 2.908, -3.989, -7.985, 11.102, 5.491, -10.805, 3.347]
    pa = sum(c * y**k for k, c in enumerate(ca))
    pb = sum(c * y**k for k, c in enumerate(cb))
    a = torch.where(opt, pa, a)
    b = torch.where(opt, pb, b)
    uv = (x >= 3.3) & (x <= 8.0)
    fa = torch.where(x >= 5.9, -0.04473 * (x - 5.9) ** 2 - 0.009779 * (x - 5.9) ** 3, 0.0 * x)
    fb = torch.where(x >= 5.9, 0.2130 * (x - 5.9) ** 2 + 0.1207 * (x - 5.9) ** 3, 0.0 * x)
    a = torch.where(uv, 1.752 - 0.316 * x - 0.104 / ((x - 4.67) ** 2 + 0.341) + fa, a)
    b = torch.where(uv, -3.090 + 1.825 * x + 1.206 / ((x - 4.62) ** 2 + 0.263) + fb, b)
    return a, b


def milky_way_transmission(wave_obs, ebv, r_v: float = 3.1) -> torch.Tensor:
    """Galactic transmission 10^(-0.4 A_lambda) for E(B-V) (SFD, as in DESI's ``EBV``).

    Parameters
    ----------
    wave_obs : (M,) tensor, Angstrom (observed frame), 1250 A - 3.3 micron
    ebv : (B,) tensor or float, mag
    r_v : float

    Returns
    -------
    (B, M) tensor, dimensionless, in (0, 1].
    """
    wave = as_tensor("wave_obs", wave_obs, dtype=torch.float64)
    check_ndim("wave_obs", wave, (1,), "(M,)")
    ebv_t = as_tensor("ebv", ebv, dtype=torch.float64).reshape(-1, 1)
    if not bool(torch.isfinite(ebv_t).all()) or bool((ebv_t < 0).any()):
        raise ValueError("ebv must be finite and >= 0")
    x = 1e4 / wave.clamp(1250.0, 33000.0)
    a, b = _odonnell_a_b(x)
    a_lambda = ebv_t * r_v * (a + b / r_v)  # (B, M) mag
    return torch.pow(10.0, -0.4 * a_lambda).float()
