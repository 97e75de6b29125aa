"""Design matrices of the linear parts of the model: emission lines and flux calibration.

Lines. A line of rest wavelength lambda_0 and flux F (1e-17 erg/s/cm^2) in a galaxy at
redshift z with velocity offset v and intrinsic dispersion sigma_v (km/s) is, before the
spectrograph, the Gaussian

    f(lambda) = F N(lambda; mu, s),   mu = lambda_0 (1 + z) exp(v / c),   s = mu sigma_v / c,

in the observed frame (exp(v/c): velocities on ln(lambda) as in pPXF). It then takes the
continuum's path through the instrument (:mod:`sedvae.physics.instruments`): averaged over the
instrument's model pixels, then the same banded resolution matrix (DESI: per arm, per galaxy
if given; Gaussian instruments: on the padded grid, then cropped). The pixel average is exact,
the difference of two erfs over the pixel edges, so a line narrower than a pixel keeps its flux
(no aliasing) and the result does not depend on a rest-frame sampling. For a spectrum given on
a rest-frame grid the instrument computes the same pixel integral of its piecewise-linear
interpolant, so the two paths agree as the rest grid resolves the line (tested).

Rows are in 1e-17 erg/s/cm^2/A per unit line flux: sum_m row_m dlambda_m = 1 for a line well
inside the grid under a flux-conserving (column-normalised) LSF, and the amplitudes that
multiply the rows are line fluxes.

Calibration. Per spectrograph arm a (DESI b, r, z; one segment otherwise), Legendre
polynomials P_0..P_K of x = 2 (lambda - lambda_lo,a) / (lambda_hi,a - lambda_lo,a) - 1 on the
arm's pixels and zero elsewhere: the model's calibration factor is 1 + sum c_{a,k} P_k(x).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sedvae.linear.lines import LineList
from sedvae.physics._checks import as_tensor, check_finite, check_ndim
from sedvae.physics.calibration import legendre_basis
from sedvae.physics.instruments import DESIInstrument, GenericInstrument
from sedvae.physics.lsf import check_diagonals

C_KMS = 299792.458  # speed of light, km/s
N_SIGMA = 6.0  # profile window half-width in Gaussian sigma: flux beyond it is < 2e-9
MIN_SIGMA_A = 1e-3  # Angstrom: floor on the observed width, so sigma_v = 0 is a delta line


def _segments(instrument: nn.Module) -> list[tuple[int, int]]:
    """(start, length) of each monotonic run of model pixels (DESI arms; one otherwise)."""
    if isinstance(instrument, DESIInstrument):
        starts = [0, *torch.tensor(instrument.arm_npix).cumsum(0)[:-1].tolist()]
        return list(zip(starts, instrument.arm_npix, strict=True))
    if isinstance(instrument, GenericInstrument):
        return [(0, instrument.model_lo.shape[0])]
    raise TypeError(f"unsupported instrument {type(instrument).__name__}")


def _crop(instrument: nn.Module) -> slice:
    """Model pixels -> output pixels."""
    if isinstance(instrument, GenericInstrument):
        return slice(instrument.pad, instrument.model_lo.shape[0] - instrument.pad)
    return slice(None)


def model_diagonals(instrument: nn.Module, *, resolution=None, lsf_sigma=None) -> torch.Tensor:
    """The resolution diagonals the instrument's ``forward`` applies, on its model pixels.

    Parameters
    ----------
    instrument : DESIInstrument or GenericInstrument (SDSSInstrument)
    resolution : (B, ndiag, M) or (ndiag, M) tensor or a b, r, z list, optional
        DESI only: per-galaxy diagonals, as ``DESIInstrument.forward(resolution=...)``.
    lsf_sigma : (B, M) or (M,) tensor, Angstrom, optional
        Gaussian instruments only: per-galaxy LSF sigma, as
        ``GenericInstrument.forward(sigma=...)``.

    Returns
    -------
    (ndiag, M_model) or (B, ndiag, M_model) tensor
    """
    if isinstance(instrument, DESIInstrument):
        if lsf_sigma is not None:
            raise ValueError("lsf_sigma is for Gaussian instruments; DESI takes resolution")
        if resolution is None:
            return instrument.resolution
        if isinstance(resolution, list | tuple):
            resolution = torch.cat([as_tensor("resolution", r) for r in resolution], dim=-1)
        return check_diagonals("resolution", resolution, instrument.npix).to(instrument.wave.device)
    if resolution is not None:
        raise ValueError("resolution matrices are for DESI; Gaussian instruments take lsf_sigma")
    if lsf_sigma is None:
        return instrument.diagonals
    sigma_t = as_tensor("lsf_sigma", lsf_sigma, dtype=torch.float64, device=instrument.wave.device)
    check_ndim("lsf_sigma", sigma_t, (1, 2), f"(M,) or (B, M) with M={instrument.npix}")
    if sigma_t.shape[-1] != instrument.npix:
        raise ValueError(f"lsf_sigma must have {instrument.npix} pixels; got {sigma_t.shape}")
    return instrument._diagonals(sigma_t)


def _window_profiles(lo, hi, mu, sig, n_sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-averaged unit Gaussians in a window of contiguous pixels around each centre.

    lo, hi (N,) float64 sorted edges of one segment; mu, sig (B, L) float64 Angstrom.
    Returns the first pixel of each window (B, L) long and the values (B, L, W) float64, 1/A.
    """
    n = lo.shape[0]
    width = (hi - lo).min()
    w = min(n, 2 * math.ceil(n_sigma * float(sig.max()) / float(width)) + 3)
    centre = torch.searchsorted(lo.contiguous(), mu.contiguous()) - 1  # (B, L)
    start = (centre - w // 2).clamp(0, n - w)  # (B, L)
    idx = start.unsqueeze(-1) + torch.arange(w, device=lo.device)  # (B, L, W)
    e_lo, e_hi = lo[idx], hi[idx]
    mu3, s3 = mu.unsqueeze(-1), sig.unsqueeze(-1) * math.sqrt(2.0)
    # 0.5 [erf((hi - mu) / (sqrt 2 s)) - erf((lo - mu) / (sqrt 2 s))] / (hi - lo)
    val = 0.5 * (torch.erf((e_hi - mu3) / s3) - torch.erf((e_lo - mu3) / s3)) / (e_hi - e_lo)
    return start, val


def _lsf_window(diag: torch.Tensor, start: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """Apply DESI-layout diagonals of one segment to values living in a window of columns.

    diag (B0, ndiag, N); start (B, L); val (B, L, W). out[i] = sum_k D[k, j] v[j] with
    j = i + h - k, exactly as :func:`sedvae.physics.lsf.apply_resolution`; the output window
    covers rows start - h .. start + W + h - 1. Returns (B, L, W + 2h).
    """
    ndiag = diag.shape[-2]
    h = ndiag // 2
    b, n_l, w = val.shape
    cols = start.unsqueeze(-1) + torch.arange(w, device=val.device)  # (B, L, W)
    if diag.shape[0] == 1:
        d = diag[0][:, cols]  # (ndiag, B, L, W)
    else:
        d = diag.transpose(0, 1)[:, torch.arange(b, device=val.device)[:, None, None], cols]
    prod = d * val.unsqueeze(0)  # (ndiag, B, L, W): column j's contribution on diagonal k
    # Row i = j - h + k sits at window position (j - start) + k in a window starting at -h.
    out = val.new_zeros(b, n_l, w + 2 * h)
    for k in range(ndiag):
        out[..., k : k + w] += prod[k]
    return out


def line_design(
    instrument: nn.Module,
    lines: LineList,
    z,
    velocity,
    sigma,
    *,
    sigma_broad=None,
    velocity_broad=None,
    resolution=None,
    lsf_sigma=None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Every line of ``lines`` for unit flux, observed through ``instrument``.

    Parameters
    ----------
    instrument : DESIInstrument, SDSSInstrument or GenericInstrument
    lines : LineList
    z : (B,) tensor, > 0
    velocity : (B,) tensor, km/s
        Velocity offset of the narrow lines from z.
    sigma : (B,) tensor, km/s
        Intrinsic (pre-instrument) Gaussian dispersion of the narrow lines.
    sigma_broad, velocity_broad : (B,) tensors, km/s, optional
        Width (required when ``lines`` has broad lines) and offset (default ``velocity``) of
        the broad Balmer lines.
    resolution, lsf_sigma : optional
        Per-galaxy LSF, as :func:`model_diagonals`.
    dtype : torch.dtype, optional
        Output dtype (default: torch's default dtype). Positions are computed in float64.

    Returns
    -------
    design : (B, L, M) tensor, 1e-17 erg/s/cm^2/A per 1e-17 erg/s/cm^2 of line flux
        Differentiable with respect to z, velocity and the widths.
    """
    dtype = dtype or torch.get_default_dtype()
    dev = instrument.wave.device
    z_t = as_tensor("z", z, dtype=torch.float64, device=dev).reshape(-1)
    b = z_t.shape[0]

    def per_galaxy(name, x):
        t = as_tensor(name, x, dtype=torch.float64, device=dev).reshape(-1).expand(b)
        check_finite(name, t)
        return t

    if bool((z_t <= -1).any()):
        raise ValueError("z must be > -1")
    v_n = per_galaxy("velocity", velocity)
    s_n = per_galaxy("sigma", sigma)
    broad = torch.tensor(lines.broad, device=dev)
    if bool(broad.any()):
        if sigma_broad is None:
            raise ValueError("lines has broad components: give sigma_broad (km/s)")
        s_b = per_galaxy("sigma_broad", sigma_broad)
        v_b = v_n if velocity_broad is None else per_galaxy("velocity_broad", velocity_broad)
    else:
        s_b, v_b = s_n, v_n
    if bool((s_n < 0).any()) or bool((s_b < 0).any()):
        raise ValueError("line widths must be >= 0 km/s")
    wave0 = torch.tensor(lines.wave, dtype=torch.float64, device=dev)  # (L,)
    vel = torch.where(broad, v_b.unsqueeze(1), v_n.unsqueeze(1))  # (B, L)
    sig_v = torch.where(broad, s_b.unsqueeze(1), s_n.unsqueeze(1))  # (B, L)
    mu = wave0 * (1.0 + z_t).unsqueeze(1) * torch.exp(vel / C_KMS)  # (B, L) Angstrom
    sig = (mu * sig_v / C_KMS).clamp(min=MIN_SIGMA_A)  # (B, L) Angstrom

    diag = model_diagonals(instrument, resolution=resolution, lsf_sigma=lsf_sigma)
    diag = (diag if diag.ndim == 3 else diag.unsqueeze(0)).to(dtype=torch.float64, device=dev)
    if diag.shape[0] not in (1, b):
        raise ValueError(f"resolution batch {diag.shape[0]} does not match z batch {b}")
    h = diag.shape[-2] // 2
    m_model = instrument.model_lo.shape[0]
    out = torch.zeros(b, lines.n_lines, m_model, dtype=dtype, device=dev)
    groups = [broad, ~broad] if bool(broad.any()) else [~broad]
    for group in groups:
        gi = group.nonzero().squeeze(1)
        if gi.numel() == 0:
            continue
        for s0, n in _segments(instrument):
            lo = instrument.model_lo[s0 : s0 + n]
            hi = instrument.model_hi[s0 : s0 + n]
            start, val = _window_profiles(lo, hi, mu[:, gi], sig[:, gi], N_SIGMA)
            conv = _lsf_window(diag[..., s0 : s0 + n], start, val)  # (B, G, W + 2h)
            rows = start.unsqueeze(-1) - h + torch.arange(conv.shape[-1], device=dev)
            inside = (rows >= 0) & (rows < n)  # rows beyond the segment fall off the detector
            conv = torch.where(inside, conv, torch.zeros_like(conv)).to(dtype)
            seg = torch.zeros(b, gi.numel(), n, dtype=dtype, device=dev)
            seg = seg.scatter_add(2, rows.clamp(0, n - 1), conv)
            out[:, gi, s0 : s0 + n] = out[:, gi, s0 : s0 + n] + seg
    return out[..., _crop(instrument)]


def component_design(design: torch.Tensor, lines: LineList) -> torch.Tensor:
    """Line design (B, L, M) -> component design (B, K, M): tied lines summed with their ratios.

    An amplitude that multiplies a component row is the flux of the component's primary line.
    """
    tie = lines.tie_matrix(dtype=design.dtype, device=design.device)  # (K, L)
    return torch.einsum("kl,blm->bkm", tie, design)


def arm_index(instrument: nn.Module) -> torch.Tensor:
    """(M,) long: the calibration segment of every output pixel (DESI arms 0, 1, 2; else 0)."""
    if isinstance(instrument, DESIInstrument):
        return instrument.arm
    return torch.zeros(instrument.npix, dtype=torch.long, device=instrument.wave.device)


def default_calibration_degree(instrument: nn.Module) -> int:
    """Highest Legendre order per segment: 2 per DESI arm (~2000 A each), 4 for one segment
    spanning the whole optical range (SDSS/BOSS 3600-10400 A): about one order per 1000-1500 A,
    smooth enough that it cannot imitate lines or stellar absorption features."""
    return 2 if isinstance(instrument, DESIInstrument) else 4


def calibration_basis(wave, arm, degree: int) -> torch.Tensor:
    """Per-arm Legendre basis P_0..P_degree, each zero outside its arm.

    Parameters
    ----------
    wave : (M,) tensor, Angstrom
        Output pixel wavelengths (DESI: arms concatenated).
    arm : (M,) long tensor
        Segment of every pixel, 0 .. n_arm - 1.
    degree : int >= 0

    Returns
    -------
    basis : (n_arm (degree + 1), M) tensor in ``wave``'s dtype, ordered arm-major
        (arm 0: P_0..P_degree, arm 1: ...).
    """
    if degree < 0:
        raise ValueError(f"degree must be >= 0; got {degree}")
    wave64 = as_tensor("wave", wave, dtype=torch.float64)
    arm = torch.as_tensor(arm, device=wave64.device)
    rows = []
    for a in range(int(arm.max()) + 1):
        on = arm == a
        w = wave64[on]
        x = 2.0 * (wave64 - w.min()) / (w.max() - w.min()) - 1.0
        p = torch.cat([torch.ones_like(x).unsqueeze(0), legendre_basis(x, degree)])
        rows.append(torch.where(on, p, torch.zeros_like(p)))
    return torch.cat(rows).to(as_tensor("wave", wave).dtype)
