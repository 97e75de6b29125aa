"""Noise for mock observations: real DESI inverse-variance shapes, BGS-like S/N, masks.

Model (per galaxy, per arm ``a``, pixel ``j``)::

    ivar_j = shape_j / sigma_a^2,       sigma_a = median_j(flux_true_j sqrt(shape_j)) / SNR_a
    ln SNR_a = ln SNR0_a + e_gal + e_arm,   e_gal ~ N(0, snr_scatter^2), e_arm ~ N(0, arm_scatter^2)

``shape`` is a real spectrum's ivar normalised to a median of 1 in each arm (it carries the sky
lines, the dichroic edges and the throughput), so the median S/N per pixel of arm ``a`` is
``SNR_a``. Default SNR0 = (3.9, 7.0, 6.9) for DESI b, r, z: the bundled BGS example
(``data/desi_example/README.md``), and a galaxy-to-galaxy scatter of 0.5 in ln S/N (68 % of
galaxies within x/ 1.65). Photometry: nanomaggy errors from a per-band S/N drawn the same way
around the example's (g 75, r 79, z 62, W1 14, W2 6.3), sharing the galaxy's ``e_gal``.

Masks: pixels whose template ivar is zero, plus ``mask_segments`` (Poisson mean) contiguous
runs of ``mask_length`` pixels per galaxy (cosmic rays, bad columns). Optional unmasked
outliers (``outlier_rate``) test robustness. Noise is Gaussian with the drawn ivar.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from sedvae.physics.checks import as_tensor, check_ndim

DESI_BGS_SNR = (3.9, 7.0, 6.9)  # median S/N per pixel, b/r/z, of the bundled BGS example
LS_PHOT_SNR = (75.0, 79.0, 62.0, 14.0, 6.3)  # its g, r, z, W1, W2 photometric S/N


class SpectralNoiseModel(nn.Module):
    """Draw noise, ivar and masks for noiseless mock spectra on an instrument's pixels.

    Parameters
    ----------
    ivar_shape : (M,) array-like
        Template inverse variance (any scale; e.g. a real coadd's ``ivar``); zeros are masked.
    arm : (M,) int array-like, optional
        Arm index of each pixel (``DESIInstrument.arm``); one arm if None.
    snr : sequence of float
        Median S/N per pixel of each arm (SNR0 above).
    snr_scatter : float
        Galaxy-to-galaxy scatter of ln S/N.
    arm_scatter : float
        Extra per-arm scatter of ln S/N.
    phot_snr : sequence of float, optional
        Median photometric S/N per band; None for no photometry.
    phot_scatter : float
        Per-band extra scatter of ln S/N (on top of the galaxy's).
    mask_segments : float
        Mean number (Poisson) of masked runs per spectrum.
    mask_length : (int, int)
        Run length range in pixels (uniform).
    outlier_rate : float
        Fraction of unmasked pixels given an unflagged 10-sigma outlier (0 = none).
    """

    def __init__(
        self,
        ivar_shape,
        arm=None,
        snr: Sequence[float] = DESI_BGS_SNR,
        snr_scatter: float = 0.5,
        arm_scatter: float = 0.1,
        phot_snr: Sequence[float] | None = LS_PHOT_SNR,
        phot_scatter: float = 0.2,
        mask_segments: float = 1.0,
        mask_length: tuple[int, int] = (5, 40),
        outlier_rate: float = 0.0,
    ) -> None:
        super().__init__()
        shape = as_tensor("ivar_shape", ivar_shape, dtype=torch.float32)
        check_ndim("ivar_shape", shape, (1,), "(M,)")
        shape = torch.where(torch.isfinite(shape) & (shape > 0), shape, torch.zeros_like(shape))
        arm_t = torch.zeros(shape.shape, dtype=torch.long) if arm is None else torch.as_tensor(arm)
        if arm_t.shape != shape.shape:
            raise ValueError(f"arm must have shape {tuple(shape.shape)}; got {tuple(arm_t.shape)}")
        n_arms = int(arm_t.max()) + 1
        if len(snr) != n_arms:
            raise ValueError(f"snr needs one value per arm ({n_arms}); got {len(snr)}")
        for a in range(n_arms):
            sel = (arm_t == a) & (shape > 0)
            if not bool(sel.any()):
                raise ValueError(f"arm {a} has no pixel with ivar_shape > 0")
            shape[arm_t == a] /= shape[sel].median()
        self.register_buffer("shape", shape)  # (M,) median 1 per arm
        self.register_buffer("arm", arm_t.long())  # (M,)
        self.register_buffer("log_snr", torch.log(torch.as_tensor(snr, dtype=torch.float32)))
        self.register_buffer(
            "log_phot_snr",
            torch.log(
                torch.as_tensor(phot_snr if phot_snr is not None else [], dtype=torch.float32)
            ),
        )
        self.n_arms = n_arms
        self.snr_scatter = float(snr_scatter)
        self.arm_scatter = float(arm_scatter)
        self.phot_scatter = float(phot_scatter)
        self.mask_segments = float(mask_segments)
        self.mask_length = (int(mask_length[0]), int(mask_length[1]))
        self.outlier_rate = float(outlier_rate)

    @classmethod
    def from_spectra(cls, spectra, index: int = 0, **kwargs) -> SpectralNoiseModel:
        """Use galaxy ``index`` of a :class:`sedvae.io.Spectra` as the ivar template."""
        return cls(spectra.ivar[index], arm=spectra.arm, **kwargs)

    def draw_snr(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Median S/N per pixel (n, n_arms) and photometric S/N (n, n_bands)."""
        e_gal = self.snr_scatter * torch.randn(n, 1, generator=generator)
        e_arm = self.arm_scatter * torch.randn(n, self.n_arms, generator=generator)
        snr = torch.exp(self.log_snr.cpu() + e_gal + e_arm)
        nb = self.log_phot_snr.shape[0]
        e_band = self.phot_scatter * torch.randn(n, nb, generator=generator)
        phot = torch.exp(self.log_phot_snr.cpu() + e_gal + e_band)
        return snr, phot

    def forward(
        self,
        flux_true: torch.Tensor,
        photometry_true: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Noisy observations of noiseless spectra (CPU; the generator fixes the draw).

        Parameters
        ----------
        flux_true : (B, M) tensor, 1e-17 erg/s/cm^2/A
        photometry_true : (B, nb) tensor, nanomaggies, optional
        generator : torch.Generator, optional

        Returns
        -------
        dict with ``flux``, ``ivar`` (B, M), ``mask`` (B, M) bool (True = bad), ``snr``
        (B, n_arms) and, with photometry, ``photometry``, ``photometry_ivar`` (B, nb).
        """
        flux_true = as_tensor("flux_true", flux_true, dtype=torch.float32).cpu()
        check_ndim("flux_true", flux_true, (2,), "(B, M)")
        if flux_true.shape[1] != self.shape.shape[0]:
            raise ValueError(
                f"flux_true must have {self.shape.shape[0]} pixels; got {tuple(flux_true.shape)}"
            )
        b, m = flux_true.shape
        shape, arm = self.shape.cpu(), self.arm.cpu()
        snr, phot_snr = self.draw_snr(b, generator)
        ivar = torch.zeros_like(flux_true)
        for a in range(self.n_arms):
            sel = arm == a
            level = (flux_true[:, sel].abs() * shape[sel].sqrt()).median(-1).values  # (B,)
            # a galaxy with no flux in an arm gets the noise of a tiny one (never ivar = inf)
            sigma = level.clamp_min(1e-6) / snr[:, a]
            ivar[:, sel] = shape[sel] / sigma[:, None] ** 2
        mask = (ivar <= 0).expand(b, m).clone()
        n_seg = (
            torch.poisson(torch.full((b,), self.mask_segments), generator=generator).long().tolist()
        )
        lo, hi = self.mask_length
        for i, k in enumerate(n_seg):
            for _ in range(k):
                length = int(torch.randint(lo, hi + 1, (1,), generator=generator))
                start = int(torch.randint(0, max(1, m - length), (1,), generator=generator))
                mask[i, start : start + length] = True
        noise = torch.randn(b, m, generator=generator) / ivar.clamp_min(1e-30).sqrt()
        flux = flux_true + torch.where(ivar > 0, noise, torch.zeros_like(noise))
        if self.outlier_rate > 0:
            hit = torch.rand(b, m, generator=generator) < self.outlier_rate
            kick = (
                10.0 * torch.randn(b, m, generator=generator).abs() / ivar.clamp_min(1e-30).sqrt()
            )
            flux = torch.where(hit & ~mask, flux + kick, flux)
        ivar = torch.where(mask, torch.zeros_like(ivar), ivar)
        flux = torch.where(mask, torch.zeros_like(flux), flux)
        out = {"flux": flux, "ivar": ivar, "mask": mask, "snr": snr}
        if photometry_true is not None:
            phot = as_tensor("photometry_true", photometry_true, dtype=torch.float32).cpu()
            if phot.shape != (b, phot_snr.shape[1]):
                raise ValueError(
                    f"photometry_true must have shape ({b}, {phot_snr.shape[1]}); "
                    f"got {tuple(phot.shape)}"
                )
            sigma = phot.abs().clamp_min(1e-6) / phot_snr
            out["photometry"] = phot + sigma * torch.randn(b, phot.shape[1], generator=generator)
            out["photometry_ivar"] = 1.0 / sigma**2
        return out


def rng_for(seed: int, index: int) -> torch.Generator:
    """A torch generator that depends on (seed, index) only: reproducible per-galaxy noise."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] % (2**63)))
