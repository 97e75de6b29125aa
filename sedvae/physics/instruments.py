"""Spectrographs as ``nn.Module``s: rest-frame model -> flux on the instrument's pixels.

Every instrument has the same call, ``forward(wave_rest, lum_rest, z) -> flux (B, M)``:

1. :func:`~sedvae.physics.redshift.redshift_spectrum` (per-galaxy observed grid and d_L),
2. flux-conserving integration over the pixels (:mod:`sedvae.physics.resample`),
3. the line-spread function as a banded resolution matrix (:mod:`sedvae.physics.lsf`).

Grids, pixel edges and resolution diagonals are buffers, so ``.to(device)`` moves them and
``state_dict`` carries them. Pixel edges are kept in float64 (wavelengths of ~1e4 A must be
known to far better than float32's 1e-3 A); casting the whole module to a low-precision dtype
(e.g. ``bf16-true``) would break that, so keep instruments in float32/float64.

Gaussian instruments are computed on the output grid padded by the LSF half-width on each
side and then cropped, so edge pixels receive the light from just beyond the grid. DESI
matrices are applied on each arm's own pixels, exactly as the DESI pipeline defines them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from sedvae.physics.checks import as_tensor, check_finite, check_increasing, check_ndim
from sedvae.physics.lsf import (
    DESI_NDIAG,
    FWHM_PER_SIGMA,
    apply_resolution,
    check_diagonals,
    gaussian_resolution_diagonals,
    sigma_from_resolution,
)
from sedvae.physics.redshift import redshift_spectrum
from sedvae.physics.resample import integrate_bins, pixel_edges

DESI_PIXEL = 0.8  # Angstrom, linear pixels of every DESI arm
# Arm grids of the DESI coadd files (fuji/iron; the bundled data/desi_example coadd has exactly
# these: 2751, 2326, 2881 pixels). The CCDs see a little more (b 3600-5930, r 5660-7720 A);
# the pipeline trims the arms to these ranges, and mocks must share the grid of the data.
DESI_ARM_RANGES = {"b": (3600.0, 5800.0), "r": (5760.0, 7620.0), "z": (7520.0, 9824.0)}
# Default LSF without a resolution matrix: DESI's resolving power rises from ~2000 (3600 A) to
# ~5100 (9800 A), which is a nearly constant FWHM of ~1.8 A (~2.2 pixels) over all three arms.
DESI_DEFAULT_FWHM = 1.8  # Angstrom
SDSS_DLOGLAM = 1e-4  # dex per pixel, SDSS/BOSS coadds
SDSS_DEFAULT_R = 2000.0  # BOSS resolving power, ~1560 (blue) to ~2650 (red)


class _Spectrograph(nn.Module):
    """Shared pipeline: redshift, integrate over model pixels, resolution matrix, crop."""

    wave: torch.Tensor
    model_lo: torch.Tensor
    model_hi: torch.Tensor

    def _register_grid(self, wave: torch.Tensor, model_lo, model_hi) -> None:
        self.register_buffer("wave", wave.to(torch.get_default_dtype()))  # (M,) Angstrom
        # (M_model,) float64 edges of the pixels the model is integrated over
        self.register_buffer("model_lo", model_lo.to(torch.float64))
        self.register_buffer("model_hi", model_hi.to(torch.float64))

    @property
    def npix(self) -> int:
        """Number of output pixels M."""
        return self.wave.shape[0]

    def _observe(self, wave_rest, lum_rest, z) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel-averaged flux (B, M_model) and coverage mask on the model pixels."""
        lum_rest = as_tensor("lum_rest", lum_rest)
        _, flux = redshift_spectrum(wave_rest, lum_rest, z)  # validates all three
        # Integrate in the rest frame: the rest grid is shared by the batch (one sorted
        # sequence to search) and exact in float64, while the pixel edges move with 1 + z.
        # int f d lambda_obs = (1 + z) int f d lambda_rest over the de-redshifted pixel.
        wave64 = as_tensor("wave_rest", wave_rest).to(device=flux.device, dtype=torch.float64)
        onepz = 1.0 + as_tensor("z", z, device=flux.device).to(torch.float64).reshape(-1, 1)
        onepz = onepz.expand(flux.shape[0], 1)  # (B, 1)
        integral, covered = integrate_bins(
            wave64, flux, self.model_lo / onepz, self.model_hi / onepz
        )
        pix = (integral * onepz / (self.model_hi - self.model_lo)).to(flux.dtype)
        return torch.where(covered, pix, torch.zeros_like(pix)), covered

    def coverage(self, wave_rest, z) -> torch.Tensor:
        """(B, M) bool: True where an output pixel is fully modelled.

        A pixel is valid when the redshifted rest-frame grid covers it and every model pixel
        that the resolution matrix mixes into it. ``forward`` treats uncovered model pixels as
        zero flux, so mask invalid pixels in any likelihood.

        Parameters
        ----------
        wave_rest : (L,) tensor, Angstrom
        z : (B,) tensor
        """
        wave_rest = as_tensor("wave_rest", wave_rest, dtype=torch.float64, device=self.wave.device)
        check_ndim("wave_rest", wave_rest, (1,), "(L,)")
        z_t = as_tensor("z", z, dtype=torch.float64, device=self.wave.device).reshape(-1, 1)
        covered = (self.model_lo >= wave_rest[0] * (1.0 + z_t)) & (
            self.model_hi <= wave_rest[-1] * (1.0 + z_t)
        )  # (B, M_model)
        return self._crop_mask(covered)

    def _crop_mask(self, covered: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _erode(covered: torch.Tensor, h: int) -> torch.Tensor:
    """(B, N) bool -> False within h pixels of any False (pixels beyond the ends don't count)."""
    if h == 0:
        return covered
    bad = (~covered).to(torch.float32).unsqueeze(1)
    # max_pool1d pads with -inf, so the array ends are not treated as uncovered.
    return nn.functional.max_pool1d(bad, 2 * h + 1, stride=1, padding=h).squeeze(1) == 0


class GenericInstrument(_Spectrograph):
    """Any wavelength grid with a Gaussian LSF (e.g. MaNGA-like cubes or a custom survey).

    Parameters
    ----------
    wave : (M,) array-like, Angstrom
        Pixel centres, strictly increasing (edges are midpoints).
    sigma : (M,) array-like or float, Angstrom, optional
        LSF Gaussian sigma per pixel. Exactly one of ``sigma`` and ``resolution``.
    resolution : float, optional
        Constant resolving power R = lambda / FWHM.
    n_sigma : float
        Half-width of the banded matrix in sigma (also sets the edge padding).
    """

    def __init__(
        self,
        wave,
        sigma=None,
        resolution: float | None = None,
        *,
        n_sigma: float = 5.0,
    ) -> None:
        super().__init__()
        wave_t = as_tensor("wave", wave, dtype=torch.float64)
        check_ndim("wave", wave_t, (1,), "(M,)")
        check_finite("wave", wave_t)
        check_increasing("wave", wave_t)
        if (sigma is None) == (resolution is None):
            raise ValueError("give exactly one of sigma and resolution")
        if sigma is None:
            sigma_t = sigma_from_resolution(wave_t, resolution)
        else:
            sigma_t = as_tensor("sigma", sigma, dtype=torch.float64).expand_as(wave_t)
        width = torch.diff(pixel_edges(wave_t))
        self.pad = max(1, math.ceil(n_sigma * float((sigma_t / width).max())))
        wave_model = _extend_grid(wave_t, self.pad)  # (M + 2 pad,)
        edges = pixel_edges(wave_model)
        self._register_grid(wave_t, edges[:-1], edges[1:])
        self.register_buffer("sigma", sigma_t.to(torch.get_default_dtype()))  # (M,) Angstrom
        self.register_buffer("wave_model", wave_model)  # (M + 2 pad,) float64
        self.register_buffer(
            "diagonals",
            self._diagonals(sigma_t).to(torch.get_default_dtype()),  # (2 pad + 1, M + 2 pad)
        )

    def _diagonals(self, sigma: torch.Tensor) -> torch.Tensor:
        """Gaussian diagonals on the padded grid; sigma (M,) or (B, M), Angstrom."""
        # Beyond the grid ends the LSF is taken equal to that of the end pixels.
        sig = sigma if sigma.ndim == 2 else sigma.unsqueeze(0)
        sig_model = nn.functional.pad(sig.unsqueeze(1), (self.pad, self.pad), mode="replicate")
        sig_model = sig_model.squeeze(1) if sigma.ndim == 2 else sig_model[0, 0]
        return gaussian_resolution_diagonals(self.wave_model, sig_model, 2 * self.pad + 1)

    def _crop_mask(self, covered: torch.Tensor) -> torch.Tensor:
        return _erode(covered, self.pad)[:, self.pad : -self.pad]

    def forward(self, wave_rest, lum_rest, z, sigma=None, *, repeat: int = 1) -> torch.Tensor:
        """Model spectra on the instrument pixels.

        Parameters
        ----------
        wave_rest : (L,) tensor, Angstrom
            Rest-frame wavelengths of the model (shared by the batch).
        lum_rest : (B, L) tensor, L_sun/A
            Rest-frame luminosity densities.
        z : (B,) tensor
            Redshifts, 0 < z <= 10.
        sigma : (B, M) or (M,) tensor, Angstrom, optional
            Per-galaxy LSF sigma overriding the instrument's (same band width, so keep it
            below the sigma the instrument was built with times ~1); (B / repeat, M) with
            ``repeat``.
        repeat : int
            Each row of ``sigma`` serves ``repeat`` consecutive spectra (several models of one
            galaxy): its matrix is built once, the same numbers as ``sigma`` repeated.

        Returns
        -------
        flux : (B, M) tensor, 1e-17 erg/s/cm^2/A
            Zero where the redshifted model does not cover a pixel (see :meth:`coverage`).
        """
        pix, _ = self._observe(wave_rest, lum_rest, z)  # (B, M + 2 pad)
        if sigma is None:
            diagonals = self.diagonals
        else:
            sigma_t = as_tensor("sigma", sigma, dtype=torch.float64, device=self.wave.device)
            check_ndim("sigma", sigma_t, (1, 2), f"(M,) or (B, M) with M={self.npix}")
            if sigma_t.shape[-1] != self.npix:
                raise ValueError(f"sigma must have {self.npix} pixels; got {tuple(sigma_t.shape)}")
            diagonals = self._diagonals(sigma_t)
        out = apply_resolution(diagonals, pix, repeat=repeat)
        return out[:, self.pad : -self.pad]


def _extend_grid(wave: torch.Tensor, n: int) -> torch.Tensor:
    """Extend pixel centres by n pixels each side, geometrically or linearly."""
    steps = torch.arange(1, n + 1, dtype=wave.dtype, device=wave.device)
    diff, ratio = torch.diff(wave), wave[1:] / wave[:-1]
    # Keep log grids logarithmic (SDSS) and linear ones linear (DESI, MaNGA LINWAVE).
    is_log = float(ratio.max() - ratio.min()) < float(diff.max() - diff.min()) / float(wave.mean())
    if is_log:
        left = wave[0] * ratio[0] ** (-steps.flip(0))
        right = wave[-1] * ratio[-1] ** steps
    else:
        left = wave[0] - diff[0] * steps.flip(0)
        right = wave[-1] + diff[-1] * steps
    return torch.cat([left, wave, right])


class SDSSInstrument(GenericInstrument):
    """SDSS/BOSS: log-lambda pixels of 1e-4 dex; LSF from ``wdisp`` or R ~ 2000.

    Parameters
    ----------
    loglam : (M,) array-like, log10(Angstrom), optional
        Pixel centres as in SDSS ``loglam`` columns. Default: a 1e-4 dex grid covering
        ``wave_min .. wave_max``, aligned to multiples of 1e-4 dex as in SDSS coadds.
    wdisp : (M,) array-like, optional
        LSF Gaussian sigma in pixels (SDSS ``wdisp``). Default: constant ``resolution``.
    resolution : float
        Resolving power used when ``wdisp`` is not given.
    wave_min, wave_max : float, Angstrom
        Range of the default grid (BOSS: 3600-10400 A).
    """

    def __init__(
        self,
        loglam=None,
        wdisp=None,
        *,
        resolution: float = SDSS_DEFAULT_R,
        wave_min: float = 3600.0,
        wave_max: float = 10400.0,
        n_sigma: float = 5.0,
    ) -> None:
        if loglam is None:
            n0 = round(math.log10(wave_min) / SDSS_DLOGLAM)
            n1 = round(math.log10(wave_max) / SDSS_DLOGLAM)
            loglam = np.arange(n0, n1 + 1) * SDSS_DLOGLAM
        loglam_t = as_tensor("loglam", loglam, dtype=torch.float64)
        check_ndim("loglam", loglam_t, (1,), "(M,)")
        wave = 10.0**loglam_t
        if wdisp is None:
            super().__init__(wave, resolution=resolution, n_sigma=n_sigma)
        else:
            super().__init__(wave, sigma=self.wdisp_to_sigma(wave, wdisp), n_sigma=n_sigma)

    @staticmethod
    def wdisp_to_sigma(wave, wdisp) -> torch.Tensor:
        """SDSS ``wdisp`` (sigma in 1e-4 dex pixels) -> sigma in Angstrom.

        Parameters
        ----------
        wave : (M,) array-like, Angstrom
        wdisp : (M,) or (B, M) array-like, pixels

        Returns
        -------
        sigma : same shape as ``wdisp``, Angstrom
        """
        wave_t = as_tensor("wave", wave, dtype=torch.float64)
        wdisp_t = as_tensor("wdisp", wdisp, dtype=torch.float64)
        check_finite("wdisp", wdisp_t)
        if bool((wdisp_t < 0).any()):
            raise ValueError("wdisp must be >= 0")
        return wdisp_t * wave_t * (math.log(10.0) * SDSS_DLOGLAM)


def _arm_key(arms: Mapping | Sequence, arm: str):
    """Arm ``arm`` of a mapping (keys b/r/z or B/R/Z) or a sequence in b, r, z order."""
    if not isinstance(arms, Mapping):
        if len(arms) != len(DESIInstrument.arm_names):
            raise ValueError(f"expected 3 arms (b, r, z); got {len(arms)}")
        return arms[DESIInstrument.arm_names.index(arm)]
    for key in (arm, arm.upper()):
        if key in arms:
            return arms[key]
    raise ValueError(f"missing DESI arm {arm!r}; got keys {sorted(arms)}")


class DESIInstrument(_Spectrograph):
    """DESI: three arms (b, r, z) of 0.8 A pixels, each with its own resolution matrix.

    Output spectra are the three arms concatenated (b, then r, then z; the overlaps appear in
    both arms, as in coadd files). ``wave`` (M,) and ``arm`` (M,) (0, 1, 2 for b, r, z) label
    every output pixel; :meth:`split` returns the per-arm pieces.

    Parameters
    ----------
    waves : mapping arm -> (N_arm,) array-like, Angstrom, optional
        Per-arm pixel centres (``b``/``r``/``z`` or ``B``/``R``/``Z`` keys, or a sequence in
        b, r, z order), e.g. a coadd's ``<ARM>_WAVELENGTH``. Default: the coadd grids in
        ``DESI_ARM_RANGES`` at 0.8 A.
    resolutions : mapping (or b, r, z sequence) arm -> (11, N_arm) or (B0, 11, N_arm), optional
        DESI-layout diagonals (a coadd's ``<ARM>_RESOLUTION``, one target or several). Default:
        Gaussian with FWHM ``fwhm``.
    fwhm : float, Angstrom
        FWHM of the default Gaussian LSF.
    """

    arm_names = ("b", "r", "z")

    def __init__(
        self,
        waves: Mapping | Sequence | None = None,
        resolutions: Mapping | Sequence | None = None,
        *,
        fwhm: float = DESI_DEFAULT_FWHM,
    ) -> None:
        super().__init__()
        if waves is None:
            waves = {
                arm: np.round(np.arange(lo, hi + 0.5 * DESI_PIXEL, DESI_PIXEL), 4)
                for arm, (lo, hi) in DESI_ARM_RANGES.items()
            }
        arm_waves = []
        for arm in self.arm_names:
            w = as_tensor(f"waves[{arm!r}]", _arm_key(waves, arm), dtype=torch.float64)
            check_ndim(f"waves[{arm!r}]", w, (1,), "(N_arm,)")
            check_finite(f"waves[{arm!r}]", w)
            check_increasing(f"waves[{arm!r}]", w)
            arm_waves.append(w)
        self.arm_npix = tuple(w.shape[0] for w in arm_waves)
        wave = torch.cat(arm_waves)
        arm_index = torch.cat(
            [torch.full((n,), i, dtype=torch.long) for i, n in enumerate(self.arm_npix)]
        )
        edges = [pixel_edges(w) for w in arm_waves]
        self._register_grid(
            wave, torch.cat([e[:-1] for e in edges]), torch.cat([e[1:] for e in edges])
        )
        self.register_buffer("arm", arm_index)  # (M,) 0, 1, 2 = b, r, z

        if resolutions is None:
            sigma = fwhm / FWHM_PER_SIGMA
            # 11 diagonals (as in the coadds) reach +-5.2 sigma at the default FWHM.
            ndiag = max(DESI_NDIAG, 2 * math.ceil(5.0 * sigma / DESI_PIXEL) + 1)
            resolution = torch.cat(
                [
                    gaussian_resolution_diagonals(w, torch.full_like(w, sigma), ndiag)
                    for w in arm_waves
                ],
                dim=-1,
            )
        else:
            resolution = torch.cat(
                [
                    check_diagonals(f"resolutions[{arm!r}]", _arm_key(resolutions, arm), n)
                    for arm, n in zip(self.arm_names, self.arm_npix, strict=True)
                ],
                dim=-1,
            )
        # (ndiag, M) or (B0, ndiag, M): arms concatenated along pixels
        self.register_buffer("resolution", resolution.to(torch.get_default_dtype()))

    @classmethod
    def from_coadd_arrays(
        cls, waves: Mapping | Sequence, resolutions: Mapping | Sequence, index: int | None = None
    ) -> DESIInstrument:
        """Build from arrays read out of a DESI coadd (no file I/O here).

        Parameters
        ----------
        waves : mapping arm -> (N_arm,) array, Angstrom
            ``<ARM>_WAVELENGTH`` HDUs (keys ``B``/``R``/``Z`` or ``b``/``r``/``z``, or a
            sequence in b, r, z order).
        resolutions : mapping arm -> (ntarget, 11, N_arm) or (11, N_arm) array
            ``<ARM>_RESOLUTION`` HDUs, in their on-disk (big-endian) form if you like, or
            ``sedvae.io.Spectra.resolution`` (a b, r, z list).
        index : int, optional
            Keep only target ``index``; by default all targets are kept and the instrument's
            batch must then match them.
        """
        res = {}
        for arm in cls.arm_names:
            r = np.asarray(_arm_key(resolutions, arm))
            if index is not None:
                if r.ndim != 3:
                    raise ValueError(f"index needs (ntarget, 11, N) resolutions; got {r.shape}")
                r = r[index]
            res[arm] = r
        return cls({arm: _arm_key(waves, arm) for arm in cls.arm_names}, res)

    def _crop_mask(self, covered: torch.Tensor) -> torch.Tensor:
        h = self.resolution.shape[-2] // 2
        return torch.cat([_erode(c, h) for c in torch.split(covered, self.arm_npix, dim=-1)], -1)

    def split(self, flux: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, M) concatenated arms -> {arm: (B, N_arm)}."""
        return dict(zip(self.arm_names, torch.split(flux, self.arm_npix, dim=-1), strict=True))

    def forward(self, wave_rest, lum_rest, z, resolution=None, *, repeat: int = 1) -> torch.Tensor:
        """Model DESI spectra, arms concatenated.

        Parameters
        ----------
        wave_rest : (L,) tensor, Angstrom
            Rest-frame wavelengths of the model.
        lum_rest : (B, L) tensor, L_sun/A
            Rest-frame luminosity densities.
        z : (B,) tensor
            Redshifts, 0 < z <= 10.
        resolution : (B, 11, M) or (11, M) tensor, or a b, r, z list of (B, 11, N_arm), optional
            Per-galaxy resolution diagonals (arms concatenated like the output, or per arm as
            in ``sedvae.io.Spectra.resolution``), overriding the instrument's; this is how real
            spectra, each with its own matrix, are fitted.
        repeat : int
            Each of the B / ``repeat`` matrices of ``resolution`` serves ``repeat``
            consecutive rows (several models of one galaxy: posterior draws, trial widths),
            the same as the matrices repeated, without the copies.

        Returns
        -------
        flux : (B, M) tensor, 1e-17 erg/s/cm^2/A
            Zero where the redshifted model does not cover a pixel (see :meth:`coverage`).
        """
        pix, _ = self._observe(wave_rest, lum_rest, z)  # (B, M)
        if resolution is None:
            resolution = self.resolution
        else:
            if isinstance(resolution, list | tuple):
                resolution = torch.cat(
                    [as_tensor("resolution", r, device=pix.device) for r in resolution], dim=-1
                )
            resolution = check_diagonals("resolution", resolution, self.npix).to(pix.device)
        out = []
        start = 0
        for n in self.arm_npix:
            # Arms are separate detectors: the matrix never couples pixels across arms.
            arm_slice = slice(start, start + n)
            out.append(apply_resolution(resolution[..., arm_slice], pix[:, arm_slice],
                                        repeat=repeat, checked=True))  # fmt: skip
            start += n
        return torch.cat(out, dim=-1)


# LSF assumed for a grid that comes without one (no wdisp, no resolution column): R = 2000, the
# resolving power of SDSS/BOSS (1560-2650) and MaNGA (~2000) around their middle.
DEFAULT_GRID_R = 2000.0


def instrument_for_grid(wave, arm=None, lsf_sigma=None, *, resolving_power=DEFAULT_GRID_R,
                        n_sigma: float = 5.0) -> tuple[nn.Module, torch.Tensor | None]:  # fmt: skip
    """An instrument that observes models on a batch's own pixels.

    Parameters
    ----------
    wave : (M,) tensor, Angstrom
        Pixel centres (arms concatenated for DESI).
    arm : (M,) int tensor, optional
        Three arms (b, r, z): a :class:`DESIInstrument` on those arm grids, to be called with
        the galaxies' own resolution matrices. One arm (or None): a :class:`GenericInstrument`.
    lsf_sigma : (B, M) tensor, Angstrom, optional
        The galaxies' Gaussian LSF sigma (SDSS ``wdisp``, a table's resolution column);
        pixels where it is not finite and > 0, and grids without it, get
        ``resolving_power`` (R = lambda / FWHM).

    Returns
    -------
    (instrument, sigma): the instrument, built with the per-pixel largest sigma of the batch
    (its banded matrix then reaches ``n_sigma`` of every galaxy's LSF), and the per-galaxy
    sigma (B, M) Angstrom to pass as ``instrument(..., sigma=sigma)`` (None for DESI).
    """
    wave = torch.as_tensor(wave, dtype=torch.float64)
    arms = 1 if arm is None else int(torch.as_tensor(arm).max()) + 1
    if arms == 3:
        a = torch.as_tensor(arm).cpu()
        return DESIInstrument([wave.cpu()[a == k] for k in range(3)]).to(wave.device), None
    if arms != 1:
        raise ValueError(f"grids of {arms} arms are not supported (one arm, or DESI's three)")
    default = sigma_from_resolution(wave, resolving_power)  # (M,)
    if lsf_sigma is None:
        return GenericInstrument(wave, sigma=default, n_sigma=n_sigma), None
    sig = torch.as_tensor(lsf_sigma, dtype=torch.float64, device=wave.device)
    sig = torch.where(torch.isfinite(sig) & (sig > 0), sig, default)
    inst = GenericInstrument(wave, sigma=sig.max(0).values, n_sigma=n_sigma)
    return inst, sig
