"""The one batch type every network reads (:class:`SpectrumBatch`), the one flag enum
(:class:`Flag`) and the one supported redshift range (:data:`Z_RANGE`; the networks' training
range is :data:`TRAINING_Z_RANGE`).

A batch is built from observed spectra (:meth:`SpectrumBatch.from_spectra`, also
``Spectra.to_batch()``), from simulated sets (:meth:`SpectrumBatch.from_items` collates the
per-galaxy dicts of the mock datasets) or from a plain dict (:meth:`SpectrumBatch.coerce`).
:meth:`SpectrumBatch.clean` is the only place where a spectrum is checked: the readers
(``Spectra.validate``), the posterior (``Posterior.check``) and the autoencoder
(``SpectrumAutoencoder.check_batch``) all call it, so one bad pixel, galaxy or redshift means
the same thing everywhere.

Units (DESIGN.md): flux in 1e-17 erg/s/cm^2/A, ivar its inverse square, photometry in
nanomaggies, wavelengths in Angstrom (observed frame, vacuum). ``mask`` is True for a bad pixel.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

# The one supported redshift range, 0.001 <= z <= 0.6. The shipped networks (autoencoder and
# posterior) were trained on mocks with TRAINING_Z_RANGE = 0.01-0.6 (a BGS-like n(z)); at
# z = 0.6 DESI's blue edge (3600 A) is 2250 A in the rest frame, where the decoder's rest-frame
# grid and the emulator start, and the SPS/cosmology tables (``SEDModel(z_max=...)``) cover it.
# Below 0.01 nothing in the pipeline changes: the rest-frame grids (2200-9900 A binned, 2200-
# 60000 A decoder) cover DESI and SDSS down to z = 0, the cosmology table starts at z = 0 and
# the only z clamp (d_L at z >= 1e-3 in the embedding) sits at the lower edge. The posterior's
# logM* at 0.001 <= z < 0.01 is measured in docs/results.md ("Nearby galaxies"). Two caveats for
# users: (1) below z ~ 0.01 a peculiar velocity of ~300 km/s (dz = 0.001) is a large part of
# cz, and logM* inherits the error of the Hubble-flow distance, sigma ~ 2 * 0.434 * v_pec / (cz)
# dex (0.087 dex at z = 0.01, 0.87 dex at z = 0.001 for 300 km/s); (2) a galaxy this close is
# much larger than a fibre, so a fibre spectrum without photometry misses most of the light (see
# the declarable aperture, ``SpectraSource(aperture=...)``). Below 0.001 (v < 300 km/s) the
# redshift says nothing about the distance, so such galaxies are flagged BAD_Z, as are z > 0.6
# ones (an extrapolation of every network).
Z_RANGE = (0.001, 0.6)
# The redshifts the shipped networks were trained on (and the mock generators' default).
TRAINING_Z_RANGE = (0.01, 0.6)

# Outlier-pixel clipping (``clean(clip=True)``): a pixel is clipped when its residual from a
# running median, in units of its noise, is beyond CLIP_SIGMA robust standard deviations AND
# CLIP_RATIO times larger than both neighbours' residuals. The second test spares emission
# lines: they are resolved (DESI's LSF has FWHM ~2.2 pixels, so a line's neighbours carry
# >= ~40 % of its peak), while a cosmic ray or a bad pixel stands alone.
CLIP_SIGMA = 10.0
CLIP_RATIO = 5.0
CLIP_WINDOW = 21  # pixels per block of the running median (~17 A on DESI; lines are narrower)
# A galaxy with more clipped pixels than this fraction of its usable ones is flagged
# OUTLIER_PIXELS: its reduction is suspect even after the clipping.
OUTLIER_FRACTION = 0.005
# NO_SIGNAL: the S/N of the inverse-variance weighted mean flux, sum(ivar f) / sqrt(sum(ivar)),
# below this. A blank or sky fibre (zero or negative flux) has S/N ~ N(0, 1); BGS-like mocks
# have 150-600 (the lowest of 256 is 145).
NO_SIGNAL_SNR = 5.0
# Fallback line-spread function for a resolution matrix with NaN/inf: DESI's typical FWHM of
# 1.8 A on 0.8 A pixels (sedvae.physics.instruments.DESI_DEFAULT_FWHM).
FALLBACK_SIGMA_PIX = 1.8 / (2 * math.sqrt(2 * math.log(2))) / 0.8


class Flag(enum.IntFlag):
    """Bits of a galaxy's ``flags`` (0 = no known problem), shared by the readers, the posterior
    and the catalog (whose ``flags`` column is their OR). Bits in :data:`FATAL` remove a galaxy
    (no posterior: NaN); the others are warnings a selection may act on."""

    NONFINITE = 1  # some flux/ivar pixels were NaN or inf (now masked, flux set to 0)
    ALL_MASKED = 2  # no usable pixel left (all masked or ivar <= 0)
    BAD_Z = 4  # z missing (NaN), non-finite, or outside the supported range (Z_RANGE)
    ZWARN = 8  # redshift pipeline warning: DESI ZWARN != 0, SDSS ZWARNING != 0
    NOT_GALAXY = 16  # pipeline class is not GALAXY (DESI SPECTYPE, SDSS CLASS)
    NO_Z_MATCH = 32  # the target was not found in the redshift table or catalog
    BAD_FIBER = 64  # DESI COADD_FIBERSTATUS != 0 (fibre or positioner problem)
    BAD_RESOLUTION = 128  # resolution matrix had NaN/inf: replaced by a Gaussian LSF
    NO_PHOTOMETRY = 256  # no usable band: the posterior is from the spectrum alone (wider)
    PARTIAL_PHOTOMETRY = 512  # some bands unusable (ivar <= 0 or NaN)
    NO_SIGNAL = 1024  # no significant positive flux (S/N of the mean flux < NO_SIGNAL_SNR)
    OUTLIER_PIXELS = 2048  # more than OUTLIER_FRACTION of the pixels clipped as outliers
    PRIOR_EDGE = 4096  # the posterior sits at a prior boundary (logM*, n_dust, Z(t))
    MISFIT = 8192  # posterior-predictive check failed: no draw (+ solved lines, calibration) fits
    OOD = 16384  # the head's summary is outside its training distribution (sedvae.posterior.ood)

    @classmethod
    def describe(cls, value: int) -> str:
        """Names of the bits set in ``value``, e.g. ``"ALL_MASKED|BAD_Z"`` (``"OK"`` for 0)."""
        names = [f.name for f in cls if int(value) & f.value]
        return "|".join(names) if names else "OK"


# A galaxy with any of these bits gets no posterior (NaN) and no fit.
FATAL = Flag.ALL_MASKED | Flag.BAD_Z | Flag.NO_SIGNAL

_PIXEL_KEYS = ("flux", "ivar", "mask")
_GALAXY_KEYS = ("z", "photometry", "photometry_ivar", "mw_ebv", "flags")
_TRUTH_KEYS = ("theta", "logU", "sigma_v", "aperture")


def _tensor(x: Any, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x if dtype is None else x.to(dtype)
    arr = np.asarray(x)
    if arr.dtype.byteorder not in "=|":  # FITS data are big-endian; torch refuses them
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return torch.as_tensor(np.ascontiguousarray(arr), dtype=dtype)


def fallback_diagonals(ndiag: int, npix: int, dtype=torch.float32) -> torch.Tensor:
    """(ndiag, npix) resolution diagonals of a Gaussian LSF of ``FALLBACK_SIGMA_PIX`` pixels,
    each column summing to 1 (the DESI diagonal layout, see ``sedvae.physics.lsf``)."""
    h = ndiag // 2
    k = torch.arange(h, -h - 1, -1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (k / FALLBACK_SIGMA_PIX) ** 2)
    return (kernel / kernel.sum())[:, None].expand(ndiag, npix).to(dtype)


@dataclasses.dataclass(repr=False)
class SpectrumBatch:
    """B galaxies on one grid of M pixels, as torch tensors.

    Parameters
    ----------
    flux, ivar : (B, M) float
        1e-17 erg/s/cm^2/A and its inverse square (0 = no information).
    z : (B,) float
    mask : (B, M) bool, optional
        True = bad pixel.
    wave : (M,) float64, optional
        Observed-frame pixel centres, Angstrom (None: the model's own grid).
    arm : (M,) int64, optional
        Arm of each pixel (DESI b, r, z = 0, 1, 2).
    resolution : (B, ndiag, M) float, optional
        Per-galaxy resolution diagonals, arms concatenated (DESI).
    lsf_sigma : (B, M) float, optional
        Per-galaxy Gaussian LSF sigma, Angstrom (SDSS ``wdisp``, a table's resolution column).
    photometry, photometry_ivar : (B, nb) float, optional
        Nanomaggies and its inverse square (0 = band missing).
    mw_ebv : (B,) float, optional
        Milky-Way E(B-V).
    ids : (B,) numpy array, optional
        TARGETID or names.
    flags : (B,) int64, optional
        :class:`Flag` bits already known (e.g. from the reader).
    declared_aperture : (B,) float, optional
        The fraction of the galaxy's light the spectrum holds, when the user knows it (1: the
        spectrum covers the whole galaxy, e.g. a summed IFU cube, a long slit or a stack); NaN
        or None = unknown (a fibre). The posterior uses it for galaxies without photometry
        (:meth:`sedvae.posterior.Posterior.sample`).
    luminosity_distance : (B,) float, optional
        Mpc, when the user knows it better than the Hubble flow (nearby galaxies, whose
        peculiar velocities are a large part of cz); NaN or None = Planck18's d_L(z).
    theta, logU, sigma_v, aperture : optional
        The truth, for simulated galaxies: theta (B, 12) in ``sedvae.sps.PARAM_NAMES`` order.
    extra : dict
        Any other entry (``shard``, ``flux_true``, ...), carried along unchanged.
    n_clipped : (B,) int64, optional
        Pixels masked as outliers by :meth:`clean`.
    """

    flux: torch.Tensor
    ivar: torch.Tensor
    z: torch.Tensor
    mask: torch.Tensor | None = None
    wave: torch.Tensor | None = None
    arm: torch.Tensor | None = None
    resolution: torch.Tensor | None = None
    lsf_sigma: torch.Tensor | None = None
    photometry: torch.Tensor | None = None
    photometry_ivar: torch.Tensor | None = None
    mw_ebv: torch.Tensor | None = None
    ids: np.ndarray | None = None
    flags: torch.Tensor | None = None
    declared_aperture: torch.Tensor | None = None
    luminosity_distance: torch.Tensor | None = None
    theta: torch.Tensor | None = None
    logU: torch.Tensor | None = None  # noqa: N815 (the mocks' name)
    sigma_v: torch.Tensor | None = None
    aperture: torch.Tensor | None = None
    n_clipped: torch.Tensor | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def coerce(cls, batch: SpectrumBatch | dict) -> SpectrumBatch:
        """A :class:`SpectrumBatch` from itself or from a dict with the same keys (the form
        the data modules and catalog sources give); unknown keys go to ``extra``."""
        if isinstance(batch, cls):
            return batch
        for key in ("flux", "ivar", "z"):
            if key not in batch:
                raise ValueError(f"batch is missing {key!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in batch.items() if k in names}
        extra = {k: v for k, v in batch.items() if k not in names}
        floats = ("flux", "ivar", "z", "photometry", "photometry_ivar", "lsf_sigma",
                  "declared_aperture", "luminosity_distance")  # fmt: skip
        for key in floats:
            if known.get(key) is not None and not isinstance(known[key], torch.Tensor):
                known[key] = _tensor(known[key], torch.float32)
        for key in ("mask", "wave", "arm", "mw_ebv", "theta", "logU", "sigma_v", "aperture"):
            if known.get(key) is not None:
                known[key] = _tensor(known[key])
        if known.get("resolution") is not None:
            res = known["resolution"]
            if isinstance(res, list | tuple):  # per arm, as in Spectra.resolution
                res = torch.cat([_tensor(r) for r in res], -1)
            known["resolution"] = _tensor(res)
        if known.get("flags") is not None:
            known["flags"] = _tensor(known["flags"], torch.int64)
            if known["flags"].ndim == 0:
                known["flags"] = known["flags"].expand(known["flux"].shape[0]).clone()
        if known.get("ids") is not None:
            known["ids"] = np.asarray(known["ids"])
        return cls(**known, extra=extra)

    @classmethod
    def from_spectra(cls, spectra, dtype: torch.dtype = torch.float32) -> SpectrumBatch:
        """The batch of a ``sedvae.io.Spectra`` (arms and their resolutions concatenated)."""
        t = spectra.to_torch(dtype=dtype)
        res = t.get("resolution")
        return cls(
            flux=t["flux"],
            ivar=t["ivar"],
            z=t["z"],
            mask=t["mask"],
            wave=t["wave"],
            arm=t.get("arm"),
            resolution=None if res is None else torch.cat(list(res), -1),
            lsf_sigma=t.get("lsf_sigma"),
            photometry=t.get("photometry"),
            photometry_ivar=t.get("photometry_ivar"),
            ids=np.asarray(spectra.ids),
            flags=t["flags"],
        )

    @classmethod
    def from_items(cls, items: Sequence[dict]) -> SpectrumBatch:
        """Collate per-galaxy dicts (the items of the mock datasets) into one batch; usable
        as a DataLoader ``collate_fn``."""
        if not items:
            raise ValueError("from_items needs at least one item")
        out = {}
        for key in items[0]:
            vals = [it[key] for it in items]
            if isinstance(vals[0], torch.Tensor):
                out[key] = torch.stack(vals)
            elif isinstance(vals[0], int | float | np.number | np.ndarray):
                out[key] = torch.as_tensor(np.stack(vals))
            else:
                out[key] = vals
        return cls.coerce(out)

    # ---- dict-like access (the networks read ``batch["flux"]``) -----------------------
    def keys(self) -> list[str]:
        names = [f.name for f in dataclasses.fields(self) if f.name != "extra"]
        return [k for k in names if getattr(self, k) is not None] + list(self.extra)

    def __getitem__(self, key: str) -> Any:
        if key in self.extra:
            return self.extra[key]
        if key != "extra" and hasattr(self, key) and getattr(self, key) is not None:
            return getattr(self, key)
        raise KeyError(key)

    def __setitem__(self, key: str, value: Any) -> None:
        if key != "extra" and key in {f.name for f in dataclasses.fields(self)}:
            setattr(self, key, value)
        else:
            self.extra[key] = value

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def items(self):
        return [(k, self[k]) for k in self.keys()]

    def to_dict(self) -> dict[str, Any]:
        """The entries that are set, as a plain dict."""
        return dict(self.items())

    def __len__(self) -> int:
        return self.flux.shape[0]

    def __repr__(self) -> str:
        n_bad = 0 if self.flags is None else int((self.flags != 0).sum())
        return f"SpectrumBatch(B={len(self)}, M={self.flux.shape[-1]}, n_flagged={n_bad})"

    def replace(self, **changes: Any) -> SpectrumBatch:
        return dataclasses.replace(self, **changes)

    def select(self, index: Any) -> SpectrumBatch:
        """The galaxies ``index`` (bool mask or integer indices); per-pixel grids are shared."""
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:
            idx = torch.nonzero(idx).flatten()
        idx = idx.reshape(-1)
        changes = {}
        for f in dataclasses.fields(self):
            val = getattr(self, f.name)
            if f.name in ("wave", "arm", "extra") or val is None:
                continue
            changes[f.name] = val[idx.numpy()] if isinstance(val, np.ndarray) else val[idx]
        return self.replace(**changes)

    # ---- the one validator -------------------------------------------------------------
    def clean(
        self,
        z_range: tuple[float, float] = Z_RANGE,
        npix: int | None = None,
        n_bands: int | None = None,
        clip: bool = False,
        keep_masked_flux: bool = False,
    ) -> SpectrumBatch:
        """A new batch with bad pixels masked and problems flagged (never raises for a galaxy).

        - flux/ivar NaN or inf, ivar <= 0: the pixel is masked (NONFINITE for non-finite ones);
          masked pixels get ivar = 0 and flux = 0 (``keep_masked_flux``: only non-finite flux
          becomes 0, as the readers keep the file's values), so chi^2 sums need no masking;
        - no usable pixel: ALL_MASKED; z NaN or outside ``z_range``: BAD_Z;
        - ``clip``: isolated outlier pixels are masked (module constants CLIP_*), counted in
          ``n_clipped``; more than OUTLIER_FRACTION of them: OUTLIER_PIXELS;
        - S/N of the weighted mean flux below NO_SIGNAL_SNR: NO_SIGNAL;
        - resolution diagonals with NaN/inf: those pixels' columns replaced by a Gaussian LSF
          (``fallback_diagonals``), BAD_RESOLUTION;
        - photometry: NaN/inf or ivar <= 0 gives ivar 0; with ``n_bands`` (a model that reads
          photometry) NO_PHOTOMETRY / PARTIAL_PHOTOMETRY, and zeros when the batch has none.

        Flags already in ``flags`` are kept (OR). Shapes are checked with a ValueError
        (expected vs got): ``npix`` pixels, ``n_bands`` bands.
        """
        flux = self.flux.float() if not torch.is_floating_point(self.flux) else self.flux
        ivar = self.ivar.to(flux.dtype)
        z = self.z if torch.is_floating_point(self.z) else self.z.to(flux.dtype)
        if flux.ndim != 2 or (npix is not None and flux.shape[1] != npix):
            m = npix if npix is not None else "M"
            raise ValueError(f"flux must have shape (B, {m}); got {tuple(flux.shape)}")
        if self.wave is not None and tuple(self.wave.shape) != (flux.shape[1],):
            raise ValueError(
                f"wave must have shape ({flux.shape[1]},) like flux's pixels; got "
                f"{tuple(self.wave.shape)}"
            )
        b = flux.shape[0]
        if ivar.shape != flux.shape:
            raise ValueError(f"ivar must have shape {tuple(flux.shape)}; got {tuple(ivar.shape)}")
        if z.shape != (b,):
            raise ValueError(f"z must have shape ({b},); got {tuple(z.shape)}")
        mask = torch.zeros(flux.shape, dtype=torch.bool, device=flux.device)
        if self.mask is not None:
            if self.mask.shape != flux.shape:
                raise ValueError(
                    f"mask must have shape {tuple(flux.shape)}; got {tuple(self.mask.shape)}"
                )
            mask = self.mask.bool()
        flags = torch.zeros(b, dtype=torch.int64, device=flux.device)
        if self.flags is not None:
            flags = flags | self.flags.to(torch.int64).to(flux.device)

        finite = torch.isfinite(flux) & torch.isfinite(ivar)
        flags |= (~finite).any(-1).long() * int(Flag.NONFINITE)
        mask = mask | ~finite | ~(ivar > 0)
        n_clipped = torch.zeros(b, dtype=torch.int64, device=flux.device)
        if clip:
            clipped = outlier_pixels(
                torch.where(mask, 0.0, flux), torch.where(mask, 0.0, ivar), self.arm
            )
            n_clipped = clipped.sum(-1)
            n_usable = (~mask).sum(-1)
            many = n_clipped > OUTLIER_FRACTION * n_usable
            flags |= many.long() * int(Flag.OUTLIER_PIXELS)
            mask = mask | clipped
        dead = mask.all(-1)
        flags |= dead.long() * int(Flag.ALL_MASKED)
        zero = ~torch.isfinite(flux) if keep_masked_flux else mask
        flux = torch.where(zero, torch.zeros_like(flux), flux)
        ivar = torch.where(mask, torch.zeros_like(ivar), ivar)
        snr = signal_to_noise(flux, ivar)
        flags |= ((snr < NO_SIGNAL_SNR) & ~dead).long() * int(Flag.NO_SIGNAL)
        lo, hi = z_range
        bad_z = ~torch.isfinite(z) | (z < lo) | (z > hi)
        flags |= bad_z.long() * int(Flag.BAD_Z)

        changes: dict[str, Any] = dict(flux=flux, ivar=ivar, mask=mask, z=z, n_clipped=n_clipped)
        if self.resolution is not None:
            res = self.resolution
            # (B, M) pixels whose LSF is broken: NaN/inf survive the sum over the diagonals,
            # which reads the (B, ndiag, M) array once (an isfinite of it costs 5x more)
            bad_cols = ~torch.isfinite(res.sum(-2))
            if bool(bad_cols.any()):
                gauss = fallback_diagonals(res.shape[-2], res.shape[-1], res.dtype)
                res = torch.where(bad_cols[:, None, :], gauss.to(res.device), res)
                flags |= bad_cols.any(-1).long() * int(Flag.BAD_RESOLUTION)
            changes["resolution"] = res
        phot, pivar = self.photometry, self.photometry_ivar
        if n_bands is not None and n_bands > 0 and (phot is None or pivar is None):
            phot = flux.new_zeros(b, n_bands)
            pivar = flux.new_zeros(b, n_bands)
        if phot is not None:
            if pivar is None:
                raise ValueError("photometry given without photometry_ivar")
            phot, pivar = phot.to(flux.dtype), pivar.to(flux.dtype)
            nb = n_bands if n_bands else phot.shape[-1]
            if phot.shape != (b, nb) or pivar.shape != (b, nb):
                raise ValueError(
                    f"photometry and photometry_ivar must have shape ({b}, {nb}); got "
                    f"{tuple(phot.shape)} and {tuple(pivar.shape)}"
                )
            ok = torch.isfinite(phot) & torch.isfinite(pivar) & (pivar > 0)
            if n_bands:
                flags |= (~ok).all(-1).long() * int(Flag.NO_PHOTOMETRY)
                flags |= ((~ok).any(-1) & ok.any(-1)).long() * int(Flag.PARTIAL_PHOTOMETRY)
            changes["photometry"] = torch.where(ok, phot, torch.zeros_like(phot))
            changes["photometry_ivar"] = torch.where(ok, pivar, torch.zeros_like(pivar))
        changes["flags"] = flags
        return self.replace(**changes, extra=dict(self.extra))

    def validate(self, **kwargs: Any) -> torch.Tensor:
        """(B,) :class:`Flag` bits of the batch (:meth:`clean`'s, same arguments)."""
        return self.clean(**kwargs).flags

    @property
    def fatal(self) -> torch.Tensor:
        """(B,) bool: galaxies with a :data:`FATAL` flag (after :meth:`clean`)."""
        flags = self.flags if self.flags is not None else torch.zeros(len(self), dtype=torch.long)
        return (flags & int(FATAL)) != 0


def signal_to_noise(flux: torch.Tensor, ivar: torch.Tensor) -> torch.Tensor:
    """(B,) S/N of the inverse-variance weighted mean flux: sum(ivar f) / sqrt(sum(ivar)), in
    float64 (flux up to float32's limit must not overflow); 0 without usable pixels."""
    f, w = flux.double(), ivar.double()
    num = (w * f).sum(-1)
    den = w.sum(-1).sqrt()
    snr = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return torch.nan_to_num(snr, nan=0.0)


def outlier_pixels(
    flux: torch.Tensor, ivar: torch.Tensor, arm: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, M) bool: isolated outlier pixels (see CLIP_SIGMA, CLIP_RATIO, CLIP_WINDOW).

    The first and last pixel of the grid (and of each arm, given ``arm`` (M,)) are never
    clipped: a resolution matrix cut at the detector edge makes a real one-pixel drop there.

    The running median is taken in blocks of CLIP_WINDOW pixels and interpolated between block
    centres (a per-pixel window costs 20 times more for the same continuum); residuals are in
    units of each pixel's noise, scaled by their robust standard deviation (1.4826 MAD, at
    least 1). Pixels with ivar = 0 are ignored and never clipped.
    """
    f = flux if torch.is_floating_point(flux) else flux.float()
    w = ivar.to(f.dtype)
    good = w > 0
    b, m = f.shape
    nblock = max(1, math.ceil(m / CLIP_WINDOW))
    vals = torch.where(good, f, torch.nan)
    vals = torch.nn.functional.pad(vals, (0, nblock * CLIP_WINDOW - m), value=math.nan)
    med = torch.nanmedian(vals.reshape(b, nblock, CLIP_WINDOW), -1).values  # (B, nblock)
    if not bool(torch.isfinite(med).all()):  # blocks without data: the previous (next) block's
        idx = torch.arange(nblock, device=f.device).expand(b, nblock)
        have = torch.isfinite(med)
        prev = torch.where(have, idx, 0).cummax(-1).values
        med = torch.where(have, med, med.gather(1, prev))
        nxt = torch.where(torch.isfinite(med), idx, nblock - 1).flip(-1).cummin(-1).values.flip(-1)
        med = torch.where(torch.isfinite(med), med, med.gather(1, nxt))
        med = torch.nan_to_num(med, nan=0.0)
    # linear between block centres, constant beyond the first and last (align_corners=False)
    smooth = torch.nn.functional.interpolate(
        med[:, None], scale_factor=CLIP_WINDOW, mode="linear", align_corners=False
    )[:, 0, :m]
    r = torch.where(good, (f - smooth) * w.sqrt(), 0.0).abs()
    r = torch.nan_to_num(r, nan=0.0, posinf=torch.finfo(r.dtype).max)
    # the larger residual of the usable neighbours (one at the ends of the grid); a pixel
    # without usable neighbours cannot be told from a feature and is never clipped
    ninf = torch.tensor(-math.inf, dtype=r.dtype, device=r.device)
    nb = torch.nn.functional.pad(torch.where(good, r, ninf), (1, 1), value=-math.inf)
    neighbours = torch.maximum(nb[:, :-2], nb[:, 2:])
    neighbours = torch.where(torch.isfinite(neighbours), neighbours, torch.inf)
    inner = torch.ones(m, dtype=torch.bool, device=flux.device)
    inner[[0, -1]] = False
    if arm is not None and m > 1:
        change = arm[1:] != arm[:-1]
        inner[1:] &= ~change
        inner[:-1] &= ~change
    out = good & inner & (r > CLIP_SIGMA) & (r > CLIP_RATIO * neighbours)
    rows = out.any(-1)  # the robust scale (>= 1) only matters where a candidate exists
    if bool(rows.any()):
        sub = torch.where(good[rows], r[rows], torch.nan)
        scale = 1.4826 * torch.nanmedian(sub, -1).values
        scale = torch.nan_to_num(scale, nan=1.0).clamp_min(1.0)
        out[rows] &= r[rows] > CLIP_SIGMA * scale[:, None]
    return out


__all__ = [
    "CLIP_RATIO",
    "CLIP_SIGMA",
    "FATAL",
    "Flag",
    "NO_SIGNAL_SNR",
    "OUTLIER_FRACTION",
    "SpectrumBatch",
    "TRAINING_Z_RANGE",
    "Z_RANGE",
    "fallback_diagonals",
    "outlier_pixels",
    "signal_to_noise",
]
