"""The decoder's rest-frame wavelength grid and velocity broadening on it.

The grid is uniform in ln(lambda) from ``wave_min`` to ``wave_split`` (the part a DESI-like
spectrograph sees at 0 < z < 0.6, where lines and absorption features live), then a coarse
ln-uniform tail to ``wave_max`` that only broad-band photometry (z, W1, W2) needs. On the
uniform part a velocity dispersion is a convolution with one Gaussian in ln(lambda), done by
FFT; the coarse tail (pixels >> any sigma_v) is left unbroadened.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

C_KMS = 299792.458


class LogGrid(nn.Module):
    """Rest-frame grid: fine ln-uniform part plus a coarse tail.

    Parameters
    ----------
    wave_min, wave_split, wave_max : float, Angstrom
        Fine part [wave_min, wave_split), coarse part [wave_split, wave_max].
    dlnlam : float
        Fine spacing in ln(lambda) (1.5e-4 = 45 km/s, about a BC03+MILES 0.9 A pixel at 6000 A).
    dlnlam_coarse : float
        Coarse spacing (the tail only feeds broad-band filters).
    sigma_max : float, km/s
        Largest dispersion the FFT padding is sized for.
    """

    def __init__(
        self,
        wave_min: float = 2200.0,
        wave_split: float = 10000.0,
        wave_max: float = 60000.0,
        dlnlam: float = 1.5e-4,
        dlnlam_coarse: float = 5e-3,
        sigma_max: float = 600.0,
    ) -> None:
        super().__init__()
        if not 0 < wave_min < wave_split < wave_max:
            raise ValueError("need 0 < wave_min < wave_split < wave_max")
        n_fine = math.ceil(math.log(wave_split / wave_min) / dlnlam)
        fine = wave_min * torch.exp(dlnlam * torch.arange(n_fine, dtype=torch.float64))
        start = math.log(float(fine[-1])) + dlnlam_coarse
        n_coarse = math.ceil((math.log(wave_max) - start) / dlnlam_coarse) + 1
        coarse = torch.exp(start + dlnlam_coarse * torch.arange(n_coarse, dtype=torch.float64))
        self.n_fine = n_fine
        self.dlnlam = float(dlnlam)
        self.sigma_max = float(sigma_max)
        self.pad = math.ceil(6.0 * sigma_max / C_KMS / dlnlam)  # 6 sigma of the widest kernel
        # float64: redshifted pixel edges at ~1e4 A need better than float32's 1e-3 A
        self.register_buffer("wave", torch.cat([fine, coarse]), persistent=False)  # (L,) A

    @property
    def n_wave(self) -> int:
        return self.wave.shape[0]

    @property
    def wave_fine(self) -> torch.Tensor:
        return self.wave[: self.n_fine]

    def broaden(self, lum: torch.Tensor, sigma_v: torch.Tensor) -> torch.Tensor:
        """Gaussian line-of-sight velocity broadening of the fine part (flux conserving).

        Parameters
        ----------
        lum : (B, L) or (B, n_fine) tensor, any flux-density unit
        sigma_v : (B,) tensor, km/s, in [0, sigma_max]

        Returns
        -------
        (B, same) tensor; pixels of the coarse tail are returned unchanged.
        """
        n = self.n_fine
        fine = lum[:, :n]
        n_fft = n + 2 * self.pad
        n_fft += (-n_fft) % 256  # a smooth FFT length
        padded = F.pad(fine.unsqueeze(1), (self.pad, n_fft - n - self.pad), mode="replicate")
        spec = torch.fft.rfft(padded.squeeze(1), n=n_fft)
        freq = torch.fft.rfftfreq(n_fft, d=1.0, device=lum.device).to(lum.dtype)  # cycles/pixel
        sig = (sigma_v.to(lum.dtype) / C_KMS / self.dlnlam).clamp_min(0.0)  # (B,) pixels
        # Fourier transform of a unit Gaussian of sigma s: exp(-2 pi^2 s^2 f^2)
        kernel = torch.exp(-2.0 * (math.pi * freq[None, :] * sig[:, None]) ** 2)
        out = torch.fft.irfft(spec * kernel, n=n_fft)[:, self.pad : self.pad + n]
        return torch.cat([out, lum[:, n:]], -1) if lum.shape[1] > n else out

    def deposit_matrix(self, line_wave: torch.Tensor) -> torch.Tensor:
        """(N, n_fine) matrix placing unit-luminosity lines on the fine grid.

        Each line is split between its two neighbouring pixels (keeping its centroid) and
        divided by the pixel width, so ``sum(row * width) = 1``: L_sun -> L_sun/A.
        """
        wave = self.wave_fine
        line_wave = torch.as_tensor(line_wave, dtype=torch.float64)
        inside = (line_wave > wave[0]) & (line_wave < wave[-1])
        x = (torch.log(line_wave.clamp(wave[0], wave[-1])) - math.log(float(wave[0]))) / self.dlnlam
        k = x.floor().long().clamp(0, self.n_fine - 2)
        w = x - k
        width = wave * self.dlnlam  # ln-uniform: width ~ lambda dlnlam
        mat = torch.zeros(len(line_wave), self.n_fine, dtype=torch.float64)
        rows = torch.arange(len(line_wave))
        mat[rows, k] = (1 - w) / width[k]
        mat[rows, k + 1] = w / width[k + 1]
        return mat * inside[:, None]
