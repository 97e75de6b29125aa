"""Line-spread functions as banded resolution matrices in the DESI storage convention.

Storage ("diagonals", as in DESI coadd ``<ARM>_RESOLUTION`` HDUs and
``desispec.resolution.Resolution``): an array ``D`` of shape (ndiag, M), ndiag = 2 h + 1 odd,
holding the matrix diagonals with offsets ``h, h-1, ..., -h`` (``k = 0`` is the *upper*-most
diagonal) laid out as ``scipy.sparse.dia_matrix`` does, i.e. aligned by **column**:

    R[j - h + k, j] = D[k, j]        (entries with row index outside [0, M) are unused)

so column ``j`` of ``D`` is the response, in output pixels ``j-h .. j+h``, to input pixel ``j``,
and the model spectrum is ``R @ flux``:

    out[i] = sum_k D[k, i + h - k] * flux[i + h - k].

Real DESI matrices are normalised by row (each row sums to ~1; columns scatter by ~10 %).
Gaussian matrices built here are normalised by column so that every source pixel keeps its
flux exactly (a line keeps its flux); with slowly varying sigma the two agree to first order.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sedvae.physics.checks import as_tensor, check_finite, check_increasing, check_ndim
from sedvae.physics.resample import pixel_edges

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.3548: Gaussian FWHM / sigma
DESI_NDIAG = 11  # diagonals stored in DESI coadds (offsets +5 .. -5)


def sigma_from_resolution(wave: torch.Tensor, resolution: float) -> torch.Tensor:
    """Gaussian sigma (Angstrom) for a resolving power ``R = lambda / FWHM``.

    Parameters
    ----------
    wave : (M,) tensor, Angstrom
    resolution : float
        Resolving power R > 0.

    Returns
    -------
    sigma : (M,) tensor, Angstrom
    """
    if not resolution > 0:
        raise ValueError(f"resolution R must be > 0; got {resolution}")
    return as_tensor("wave", wave) / (resolution * FWHM_PER_SIGMA)


def _extend(x: torch.Tensor, h: int) -> torch.Tensor:
    """Extend a 1-D increasing grid by h samples each side with the end spacings."""
    if h == 0:
        return x
    steps = torch.arange(1, h + 1, dtype=x.dtype, device=x.device)
    left = x[0] - (x[1] - x[0]) * steps.flip(0)
    right = x[-1] + (x[-1] - x[-2]) * steps
    return torch.cat([left, x, right])


def gaussian_resolution_diagonals(
    wave: torch.Tensor,
    sigma: torch.Tensor,
    ndiag: int | None = None,
    *,
    n_sigma: float = 5.0,
) -> torch.Tensor:
    """Banded Gaussian resolution matrix, in the DESI diagonal layout.

    Column ``j`` is a Gaussian of width ``sigma[j]`` centred on pixel ``j``, sampled at the
    neighbouring pixel centres and normalised so that the flux ``sum_i out_i dlambda_i`` of
    pixel ``j`` is conserved (flux that would land beyond the grid ends is lost, as on a
    detector). Sampling (not pixel-integrating) the kernel is deliberate: the input is already
    a pixel average (see :mod:`sedvae.physics.resample`), so integrating again would add a
    second pixel boxcar; a sampled Gaussian with sigma >~ 0.7 pixel has the exact variance.

    Parameters
    ----------
    wave : (M,) tensor, Angstrom
        Pixel centres, strictly increasing.
    sigma : (M,) or (B, M) tensor, Angstrom
        Gaussian sigma of the line-spread function at each (source) pixel; 0 gives identity.
    ndiag : int, optional
        Number of diagonals (odd). Default: ``2 ceil(n_sigma max(sigma / dlambda)) + 1``.
    n_sigma : float
        Half-width of the band in units of sigma when ``ndiag`` is not given.

    Returns
    -------
    diagonals : (ndiag, M) or (B, ndiag, M) tensor, dimensionless
    """
    wave = as_tensor("wave", wave)
    check_ndim("wave", wave, (1,), "(M,)")
    check_increasing("wave", wave)
    sigma = as_tensor("sigma", sigma, dtype=wave.dtype, device=wave.device)
    check_ndim("sigma", sigma, (1, 2), "(M,) or (B, M)")
    if sigma.shape[-1] != wave.shape[0]:
        raise ValueError(
            f"sigma must have last dimension {wave.shape[0]}; got {tuple(sigma.shape)}"
        )
    check_finite("sigma", sigma)
    if bool((sigma < 0).any()):
        raise ValueError("sigma must be >= 0")
    width = torch.diff(pixel_edges(wave))  # (M,) Angstrom
    if ndiag is None:
        h = max(1, math.ceil(n_sigma * float((sigma / width).max())))
        ndiag = 2 * h + 1
    if ndiag < 1 or ndiag % 2 != 1:
        raise ValueError(f"ndiag must be a positive odd integer; got {ndiag}")
    h = ndiag // 2
    # rows_wave[j, k] = centre of output pixel i = j - h + k (extrapolated beyond the ends)
    rows_wave = _extend(wave, h).unfold(0, ndiag, 1)  # (M, ndiag)
    rows_width = _extend(width, h).unfold(0, ndiag, 1).clamp(min=0.0)  # (M, ndiag)
    # A floor on sigma turns sigma = 0 into a delta instead of 0/0.
    sig = torch.maximum(sigma, 1e-3 * width).unsqueeze(-1)  # (..., M, 1)
    g = torch.exp(-0.5 * ((rows_wave - wave.unsqueeze(-1)) / sig) ** 2)  # (..., M, ndiag)
    norm = (g * rows_width).sum(-1, keepdim=True)  # (..., M, 1) ~ sqrt(2 pi) sigma
    kernel = g * width.unsqueeze(-1) / norm  # K[i, j] = dlambda_j g_ij / sum_i g_ij dlambda_i
    return kernel.transpose(-1, -2).contiguous()  # (..., ndiag, M)


def check_diagonals(name: str, diagonals, npix: int | None = None) -> torch.Tensor:
    """Validate (ndiag, M) or (B, ndiag, M) diagonals; return them as a tensor."""
    d = as_tensor(name, diagonals)
    check_ndim(name, d, (2, 3), "(ndiag, M) or (B, ndiag, M)")
    if d.shape[-2] % 2 != 1:
        raise ValueError(f"{name} must have an odd number of diagonals; got {d.shape[-2]}")
    if npix is not None and d.shape[-1] != npix:
        raise ValueError(f"{name} must have {npix} pixels in its last dimension; got {d.shape}")
    check_finite(name, d)
    return d


def apply_resolution(diagonals: torch.Tensor, flux: torch.Tensor, *, repeat: int = 1,
                     checked: bool = False) -> torch.Tensor:  # fmt: skip
    """Multiply spectra by banded resolution matrices given as DESI-layout diagonals.

    Parameters
    ----------
    diagonals : (ndiag, M) or (B, ndiag, M) tensor
        Diagonals with offsets ``+h .. -h`` as stored in DESI coadds (see module docstring);
        one matrix for the batch or one per galaxy; with ``repeat``, (B / repeat, ndiag, M).
    flux : (B, M) tensor, any flux-density unit
    repeat : int
        Each matrix serves ``repeat`` consecutive rows of ``flux`` (several spectra of one
        galaxy, e.g. posterior draws): the same products as the matrices repeated, without
        the copies.
    checked : bool
        The caller has validated ``diagonals`` (shape and finiteness) already.

    Returns
    -------
    (B, M) tensor, same unit: ``R @ flux`` per galaxy.
    """
    flux = as_tensor("flux", flux)
    check_ndim("flux", flux, (2,), "(B, M)")
    if not checked:
        diagonals = check_diagonals("diagonals", diagonals, flux.shape[-1])
    d = diagonals.to(flux.device, flux.dtype)
    bsz = flux.shape[0]
    if repeat < 1 or bsz % repeat:
        raise ValueError(f"repeat must be >= 1 and divide the batch {bsz}; got {repeat}")
    if d.ndim == 3 and d.shape[0] not in (1, bsz // repeat):
        raise ValueError(f"diagonals batch {d.shape[0]} does not match flux batch {bsz}"
                         + (f" / repeat {repeat}" if repeat > 1 else ""))  # fmt: skip
    ndiag, m = d.shape[-2], flux.shape[-1]
    h = ndiag // 2
    if d.ndim == 3 and repeat > 1 and d.shape[0] > 1:  # (G, 1, ndiag, M) x (G, repeat, 1, M)
        prod = (d.unsqueeze(1) * flux.reshape(-1, repeat, 1, m)).reshape(bsz, ndiag, m)
    else:
        prod = d * flux.unsqueeze(-2)  # (B, ndiag, M): contribution of column j on its diagonals
    padded = nn.functional.pad(prod, (h, h))  # padded[..., n] = prod[..., n - h]
    # out[i] = sum_k prod[k, i + h - k] = sum_k padded[k, i + 2h - k]
    out = padded[:, 0, 2 * h : 2 * h + m]
    for k in range(1, ndiag):
        out = out + padded[:, k, 2 * h - k : 2 * h - k + m]
    return out


def diagonals_to_dense(diagonals: torch.Tensor) -> torch.Tensor:
    """Dense (M, M) matrix from (ndiag, M) DESI-layout diagonals (for tests and plots)."""
    d = check_diagonals("diagonals", diagonals)
    check_ndim("diagonals", d, (2,), "(ndiag, M)")
    ndiag, m = d.shape
    h = ndiag // 2
    dense = torch.zeros(m, m, dtype=d.dtype, device=d.device)
    j = torch.arange(m, device=d.device)
    for k in range(ndiag):
        i = j - h + k
        ok = (i >= 0) & (i < m)
        dense[i[ok], j[ok]] = d[k, ok]
    return dense


class ResolutionMatrix(nn.Module):
    """A fixed banded resolution matrix (a buffer) applied to (B, M) spectra.

    Parameters
    ----------
    diagonals : (ndiag, M) or (B, ndiag, M) array-like
        DESI-layout diagonals (e.g. a coadd ``<ARM>_RESOLUTION`` row).
    """

    def __init__(self, diagonals) -> None:
        super().__init__()
        self.register_buffer("diagonals", check_diagonals("diagonals", diagonals).clone())

    @property
    def npix(self) -> int:
        return self.diagonals.shape[-1]

    def forward(self, flux: torch.Tensor) -> torch.Tensor:
        """flux (B, M) -> (B, M), same unit."""
        return apply_resolution(self.diagonals, flux)


class GaussianLSF(ResolutionMatrix):
    """Gaussian broadening on a pixel grid, sigma per pixel or a constant resolving power.

    Parameters
    ----------
    wave : (M,) array-like, Angstrom
        Pixel centres.
    sigma : (M,) array-like or float, Angstrom, optional
        LSF sigma per pixel. Exactly one of ``sigma`` and ``resolution`` must be given.
    resolution : float, optional
        Constant resolving power R = lambda / FWHM.
    n_sigma : float
        Band half-width in sigma.
    """

    def __init__(
        self,
        wave,
        sigma=None,
        resolution: float | None = None,
        *,
        n_sigma: float = 5.0,
    ) -> None:
        wave_t = as_tensor("wave", wave, dtype=torch.float64)
        check_ndim("wave", wave_t, (1,), "(M,)")
        if (sigma is None) == (resolution is None):
            raise ValueError("give exactly one of sigma and resolution")
        if sigma is None:
            sigma_t = sigma_from_resolution(wave_t, resolution)
        else:
            sigma_t = as_tensor("sigma", sigma, dtype=torch.float64).expand_as(wave_t)
        diagonals = gaussian_resolution_diagonals(wave_t, sigma_t, n_sigma=n_sigma)
        super().__init__(diagonals.to(torch.get_default_dtype()))
        self.register_buffer("wave", wave_t.to(torch.get_default_dtype()))
        self.register_buffer("sigma", sigma_t.to(torch.get_default_dtype()))
