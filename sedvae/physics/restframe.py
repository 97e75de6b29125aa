"""Rest-frame binning of observed spectra: the fixed ln(lambda) grid that the autoencoder's
encoder and the posterior's embedding both read (a spectral feature lands in the same bin at
every redshift)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .checks import as_tensor
from .resample import pixel_edges


class RestFrameBinner(nn.Module):
    """Observed pixels -> ivar-weighted rest-frame bins (no gradients; data only).

    Pixels are treated as piecewise constant over their edges (what a detector measures), so
    a bin receives each pixel in proportion to the overlap. Output: the ivar-weighted mean
    flux and the summed ivar (the ivar of that mean) per bin.

    Parameters
    ----------
    wave_obs : (M,) array-like, Angstrom
        Instrument pixel centres; increasing within each arm.
    arm : (M,) int array-like, optional
        Arm of each pixel (arms may overlap, e.g. DESI b/r/z); each arm a contiguous block.
    wave_min, wave_max : float, Angstrom
        Rest-frame range of the bins.
    n_bins : int
        Number of ln-uniform bins.
    """

    def __init__(
        self, wave_obs, arm=None, wave_min: float = 2200.0, wave_max: float = 9900.0, n_bins=2048
    ) -> None:
        super().__init__()
        wave = as_tensor("wave_obs", wave_obs, dtype=torch.float64)
        arm_t = torch.zeros(wave.shape, dtype=torch.long) if arm is None else torch.as_tensor(arm)
        self.arm_slices = []
        for a in range(int(arm_t.max()) + 1):
            idx = torch.nonzero(arm_t == a).flatten()
            if len(idx) < 2 or not bool((torch.diff(idx) == 1).all()):
                raise ValueError("each arm must be a contiguous block of >= 2 pixels")
            sl = slice(int(idx[0]), int(idx[-1]) + 1)
            self.register_buffer(f"edges_{a}", pixel_edges(wave[sl]), persistent=False)
            self.arm_slices.append(sl)
        edges = torch.exp(torch.linspace(math.log(wave_min), math.log(wave_max), n_bins + 1))
        self.n_bins = int(n_bins)
        self.register_buffer("edges", edges.to(torch.float64), persistent=False)  # (N + 1,)

    @staticmethod
    def cumulative(pix_edges, values, x):
        """Integral of piecewise-constant ``values`` (B, M) from the first edge to x (B, X)."""
        width = torch.diff(pix_edges)
        cum = F.pad(torch.cumsum(values * width, -1), (1, 0))  # (B, M + 1)
        k = (torch.searchsorted(pix_edges, x.contiguous(), right=True) - 1).clamp(0, len(width) - 1)
        xc = x.clamp(pix_edges[0], pix_edges[-1])
        return cum.gather(1, k) + values.gather(1, k) * (xc - pix_edges[k]).clamp_min(0.0)

    @torch.no_grad()
    def forward(self, flux, ivar, z) -> tuple[torch.Tensor, torch.Tensor]:
        """flux, ivar (B, M) (ivar = 0 where masked), z (B,) -> rest-frame flux and summed
        ivar, each (B, N); bins without data have ivar 0 and flux 0."""
        x = self.edges[None, :] * (1.0 + z.to(torch.float64))[:, None]  # (B, N + 1) observed
        num = torch.zeros(flux.shape[0], self.n_bins, dtype=torch.float64, device=flux.device)
        den = torch.zeros_like(num)
        for a, sl in enumerate(self.arm_slices):
            e = getattr(self, f"edges_{a}")
            w = ivar[:, sl].to(torch.float64)
            width = torch.diff(e)
            # per Angstrom, so that integrating over a whole pixel gives back that pixel
            both = torch.cat([w * flux[:, sl].to(torch.float64), w], 0) / width
            cum = self.cumulative(e, both, x.repeat(2, 1))
            integral = torch.diff(cum, dim=-1)
            num += integral[: flux.shape[0]]
            den += integral[flux.shape[0] :]
        good = den > 0
        f = torch.where(good, num / den.clamp_min(1e-300), torch.zeros_like(num))
        return f.to(flux.dtype), den.clamp_min(0.0).to(flux.dtype)


# Two grids are one when they have the same pixels, arms and centres to within this fraction of
# a pixel: a coadd's float32 wavelengths differ from the float64 grid they were written from by
# ~4e-4 A (5e-4 of a DESI pixel), which must not count as another grid.
SAME_GRID_TOL = 0.01  # pixels


def _arm_or_zeros(wave: torch.Tensor, arm) -> torch.Tensor:
    if arm is None:
        return torch.zeros(wave.shape, dtype=torch.long, device=wave.device)
    return torch.as_tensor(arm, device=wave.device).long()


def same_grid(wave, arm, ref_wave, ref_arm, tol: float = SAME_GRID_TOL) -> bool:
    """True when pixel centres ``wave`` (M,) (arms ``arm``, None = one arm) are the grid
    ``ref_wave``, ``ref_arm`` up to ``tol`` of the smallest reference pixel width."""
    wave = torch.as_tensor(wave, dtype=torch.float64)
    ref = torch.as_tensor(ref_wave, dtype=torch.float64).to(wave.device)
    if wave.shape != ref.shape:
        return False
    if not torch.equal(_arm_or_zeros(wave, arm), _arm_or_zeros(ref, ref_arm)):
        return False
    width = torch.diff(ref).abs()
    width = width[width > 0].min() if bool((width > 0).any()) else torch.tensor(1.0)
    return bool(((wave - ref).abs() <= tol * width).all())


def grid_key(wave, arm=None) -> tuple:
    """A hashable key of a pixel grid (centres to 1e-6 A, and arms), for caches."""
    w = torch.as_tensor(wave, dtype=torch.float64).detach().cpu()
    a = _arm_or_zeros(w, arm).cpu()
    rounded = torch.round(w * 1e6).to(torch.int64)
    return (int(w.shape[0]), hash(rounded.numpy().tobytes()), hash(a.numpy().tobytes()))


def check_grid(wave, arm, npix: int) -> None:
    """ValueError unless ``wave`` (M,) with M = ``npix`` finite pixel centres, strictly
    increasing within each arm (``arm`` (M,) int, None = one arm; each arm one contiguous
    block of >= 2 pixels): the consistency of a batch's flux and its grid."""
    wave = torch.as_tensor(wave)
    if wave.ndim != 1 or wave.shape[0] != npix:
        raise ValueError(
            f"wave must have shape ({npix},) like flux's pixels; got {tuple(wave.shape)}"
        )
    if not bool(torch.isfinite(wave).all()):
        raise ValueError("wave has NaN or inf pixel centres")
    a = _arm_or_zeros(wave, arm)
    if a.shape != wave.shape:
        raise ValueError(f"arm must have shape ({npix},); got {tuple(a.shape)}")
    for k in torch.unique(a).tolist():
        idx = torch.nonzero(a == k).flatten()
        if len(idx) < 2 or not bool((torch.diff(idx) == 1).all()):
            raise ValueError(f"arm {k} must be one contiguous block of >= 2 pixels")
        if not bool((torch.diff(wave[idx].double()) > 0).all()):
            raise ValueError(f"wave must increase strictly within arm {k}")


class GridCache:
    """A few objects built for pixel grids (binners, instruments), keyed by :func:`grid_key`
    plus anything else that fixes them; the least recently used is dropped beyond ``size``.
    A plain attribute, not a submodule: what it holds is rebuilt from the data, never saved."""

    def __init__(self, size: int = 8) -> None:
        self.size = int(size)
        self._items: dict = {}

    def get(self, key, build):
        item = self._items.pop(key, None)
        if item is None:
            item = build()
        self._items[key] = item  # most recent last
        while len(self._items) > self.size:
            self._items.pop(next(iter(self._items)))
        return item

    def __len__(self) -> int:
        return len(self._items)
