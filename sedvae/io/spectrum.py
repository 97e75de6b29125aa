"""The common container for observed spectra: :class:`Spectra`, a batch of N galaxies on one
wavelength grid, plus the file-error exceptions shared by every reader (the flag bits and the
redshift range are :mod:`sedvae.io.batch`'s).

Conventions (DESIGN.md): wavelengths in Angstrom (vacuum, observed frame), flux densities in
1e-17 erg/s/cm^2/A (the DESI/SDSS convention), inverse variances in the inverse square of that,
photometry in nanomaggies. ``mask`` is True for a *bad* pixel. After :meth:`Spectra.validate`
(which every reader calls) every flux value is finite and ``ivar == 0`` wherever ``mask`` is
True, so a chi^2 of ``ivar * (flux - model)**2`` needs no extra masking and never meets a NaN.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from .batch import FATAL, Z_RANGE, Flag

# The readers' flags are the one enum of sedvae.io.batch (kept under its old name).
SpecFlag = Flag


class SpectrumFileError(ValueError):
    """A spectrum file is unreadable or does not follow its data model.

    The message names the file and, where it applies, the HDU or column.
    """


class MissingHDUError(SpectrumFileError, KeyError):
    """A required HDU (or table column) is absent; also a ``KeyError``."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SpectrumFileNotFoundError(SpectrumFileError, FileNotFoundError):
    """The spectrum file does not exist; also a ``FileNotFoundError``."""


def _as_ids(ids: Any, n: int) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"ids: expected shape ({n},), got {arr.shape}")
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind in "USO":
        # bytes come from FITS string columns; str(b"x") would give "b'x'"
        text = [v.decode() if isinstance(v, bytes) else str(v) for v in arr.tolist()]
        return np.asarray([t.strip() for t in text], dtype=str)
    raise ValueError(f"ids must be integers (e.g. DESI TARGETID) or strings, got dtype {arr.dtype}")


def _check_shape(name: str, arr: np.ndarray | None, shape: tuple[int, ...]) -> None:
    if arr is not None and arr.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {arr.shape}")


@dataclasses.dataclass(repr=False)
class Spectra:
    """A batch of N galaxy spectra on one observed-frame wavelength grid of M pixels.

    Multi-arm instruments (DESI b/r/z) keep their arms concatenated, overlaps included:
    ``wave`` is increasing within each arm but not across arm boundaries, and ``arm`` says
    which arm each pixel belongs to. Nothing is resampled, so the data stay exactly as in the
    file and the observation model can apply each arm's resolution matrix separately
    (:meth:`split_arms` returns one :class:`Spectra` per arm).

    Parameters
    ----------
    wave : (M,) float64
        Observed-frame vacuum wavelength of each pixel centre, Angstrom.
    flux : (N, M) float32
        Flux density, 1e-17 erg/s/cm^2/A.
    ivar : (N, M) float32
        Inverse variance of ``flux``, (1e-17 erg/s/cm^2/A)^-2; 0 = no information.
    mask : (N, M) bool, optional
        True = bad pixel. Default: no pixel masked (``validate`` still masks ivar <= 0).
    z : (N,) float64
        Redshift (NaN = unknown; flagged ``BAD_Z`` by ``validate``).
    ids : (N,) int64 or str
        Object identifiers (DESI TARGETID, SDSS SPECOBJID, ...).
    arm : (M,) int64, optional
        Arm index of each pixel into ``arm_names``; None for single-arm data.
    arm_names : tuple of str
        Name of each arm, e.g. ``("B", "R", "Z")``; empty when ``arm`` is None.
    resolution : list of (N, ndiag, M_arm) float32, optional
        Per-arm DESI resolution-matrix diagonals, M_arm = number of pixels of that arm, in the
        desispec convention: ``resolution[a][i, k, j]`` is the matrix element at row
        ``j - offset_k``, column ``j``, with ``offsets = ndiag//2, ..., -(ndiag//2)``
        (see :func:`sedvae.io.desi.desi_resolution_matrix`). observed = R @ true.
    wdisp : (N, M) float32, optional
        SDSS wavelength dispersion: Gaussian LSF sigma in pixels of 1e-4 dex (as in the file).
    lsf_sigma : (N, M) float32, optional
        Gaussian line-spread-function sigma in Angstrom (SDSS: from ``wdisp``; tables: from a
        sigma or resolving-power column). None where the instrument gives a matrix instead.
    photometry : (N, nb) float32, optional
        Broad-band fluxes, nanomaggies, as in the source catalog (DESI: *not* corrected for
        Milky-Way extinction; see ``mw_transmission``).
    photometry_ivar : (N, nb) float32, optional
        Inverse variance of ``photometry``, nanomaggies^-2; 0 = band missing.
    bands : tuple of str
        Name of each photometric band (``("G", "R", "Z", "W1", "W2")`` for DESI).
    mw_transmission : (N, nb) float32, optional
        Milky-Way transmission per band, when the source provides it (the model flux is
        multiplied by it, or the data divided).
    flags : (N,) int64
        Bitmask of :class:`sedvae.io.batch.Flag` values; 0 = no known problem.
    extra : dict of str -> (N, ...) arrays
        Further per-galaxy columns (``EBV``, ``PHOTSYS``, ``ZWARN``, RA/Dec, ...); sliced by
        :meth:`select` like every other per-galaxy array.
    meta : dict
        Per-batch information: ``instrument``, ``source`` (file path or list of paths), ...
    """

    wave: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    z: np.ndarray
    ids: np.ndarray
    mask: np.ndarray | None = None
    arm: np.ndarray | None = None
    arm_names: tuple[str, ...] = ()
    resolution: list[np.ndarray] | None = None
    wdisp: np.ndarray | None = None
    lsf_sigma: np.ndarray | None = None
    photometry: np.ndarray | None = None
    photometry_ivar: np.ndarray | None = None
    bands: tuple[str, ...] = ()
    mw_transmission: np.ndarray | None = None
    flags: np.ndarray | None = None
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # Native-endian float32 copies: FITS data are big-endian, which torch.from_numpy rejects.
        self.wave = np.asarray(self.wave, dtype=np.float64)
        if self.wave.ndim != 1:
            raise ValueError(f"wave: expected shape (M,), got {self.wave.shape}")
        m = self.wave.shape[0]
        self.flux = np.asarray(self.flux, dtype=np.float32)
        if self.flux.ndim != 2 or self.flux.shape[1] != m:
            raise ValueError(f"flux: expected shape (N, {m}), got {self.flux.shape}")
        n = self.flux.shape[0]
        self.ivar = np.asarray(self.ivar, dtype=np.float32)
        _check_shape("ivar", self.ivar, (n, m))
        self.mask = (
            np.zeros((n, m), dtype=bool) if self.mask is None else np.asarray(self.mask, dtype=bool)
        )
        _check_shape("mask", self.mask, (n, m))
        z = np.asarray(self.z, dtype=np.float64)
        self.z = np.full(n, float(z)) if z.ndim == 0 else z  # a scalar z applies to all N
        _check_shape("z", self.z, (n,))
        self.ids = _as_ids(self.ids, n)
        self.flags = (
            np.zeros(n, dtype=np.int64) if self.flags is None else np.asarray(self.flags, np.int64)
        )
        _check_shape("flags", self.flags, (n,))

        self.arm_names = tuple(str(a) for a in self.arm_names)
        if self.arm is not None:
            self.arm = np.asarray(self.arm, dtype=np.int64)
            _check_shape("arm", self.arm, (m,))
            if m and (self.arm.min() < 0 or self.arm.max() >= len(self.arm_names)):
                raise ValueError(
                    f"arm: indices must lie in [0, {len(self.arm_names)}) to index "
                    f"arm_names={self.arm_names}"
                )
        elif self.arm_names:
            raise ValueError("arm_names given without the per-pixel arm index")
        if self.resolution is not None:
            if self.arm is None:
                raise ValueError("resolution is per arm: give arm and arm_names too")
            if len(self.resolution) != len(self.arm_names):
                raise ValueError(
                    f"resolution: expected one array per arm ({len(self.arm_names)}), "
                    f"got {len(self.resolution)}"
                )
            res = []
            for a, r in enumerate(self.resolution):
                r = np.asarray(r, dtype=np.float32)
                m_arm = int(np.count_nonzero(self.arm == a))
                if r.ndim != 3 or r.shape[0] != n or r.shape[2] != m_arm:
                    raise ValueError(
                        f"resolution[{a}] ({self.arm_names[a]}): expected shape "
                        f"({n}, ndiag, {m_arm}), got {r.shape}"
                    )
                res.append(r)
            self.resolution = res

        for name in ("wdisp", "lsf_sigma"):
            val = getattr(self, name)
            if val is not None:
                val = np.asarray(val, dtype=np.float32)
                _check_shape(name, val, (n, m))
                setattr(self, name, val)

        self.bands = tuple(str(b) for b in self.bands)
        if self.photometry is not None:
            self.photometry = np.asarray(self.photometry, dtype=np.float32)
            nb = len(self.bands)
            _check_shape("photometry", self.photometry, (n, nb))
            if self.photometry_ivar is None:
                raise ValueError("photometry given without photometry_ivar")
        for name in ("photometry_ivar", "mw_transmission"):
            val = getattr(self, name)
            if val is not None:
                if self.photometry is None:
                    raise ValueError(f"{name} given without photometry")
                val = np.asarray(val, dtype=np.float32)
                _check_shape(name, val, (n, len(self.bands)))
                setattr(self, name, val)

        self.extra = dict(self.extra)
        for key, val in self.extra.items():
            val = np.asarray(val)
            if val.ndim == 0 or val.shape[0] != n:
                raise ValueError(f"extra[{key!r}]: expected leading dimension {n}, got {val.shape}")
            self.extra[key] = val
        self.meta = dict(self.meta)

    # ------------------------------------------------------------------ basic properties
    def __len__(self) -> int:
        return self.flux.shape[0]

    @property
    def n_pixels(self) -> int:
        """Number of pixels M (all arms together)."""
        return self.wave.shape[0]

    @property
    def good(self) -> np.ndarray:
        """(N,) bool: galaxies with no :data:`FATAL` flag bit (fit-able)."""
        return (self.flags & int(FATAL)) == 0

    def __repr__(self) -> str:
        arms = f", arms={self.arm_names}" if self.arm_names else ""
        bands = f", bands={self.bands}" if self.bands else ""
        span = f"{self.wave.min():.1f}-{self.wave.max():.1f} A" if self.n_pixels else "empty"
        return (
            f"Spectra(N={len(self)}, M={self.n_pixels}, wave={span}{arms}{bands}, "
            f"n_flagged={int(np.count_nonzero(self.flags))}, "
            f"instrument={self.meta.get('instrument')!r})"
        )

    def arm_pixels(self, arm: int | str) -> np.ndarray:
        """Pixel indices (into the M axis) of one arm, given by index or name."""
        if self.arm is None:
            raise ValueError("these spectra have no arms")
        a = self.arm_names.index(arm) if isinstance(arm, str) else int(arm)
        return np.flatnonzero(self.arm == a)

    def split_arms(self) -> dict[str, Spectra]:
        """One single-arm :class:`Spectra` per arm, each with its own resolution.

        Returns
        -------
        dict of str -> Spectra
            Keyed by arm name, in arm order; per-galaxy fields are shared copies.
        """
        if self.arm is None:
            raise ValueError("these spectra have no arms")
        out = {}
        for a, name in enumerate(self.arm_names):
            pix = self.arm_pixels(a)
            out[name] = dataclasses.replace(
                self,
                wave=self.wave[pix],
                flux=self.flux[:, pix],
                ivar=self.ivar[:, pix],
                mask=self.mask[:, pix],
                arm=np.zeros(len(pix), dtype=np.int64),
                arm_names=(name,),
                resolution=None if self.resolution is None else [self.resolution[a]],
                wdisp=None if self.wdisp is None else self.wdisp[:, pix],
                lsf_sigma=None if self.lsf_sigma is None else self.lsf_sigma[:, pix],
                flags=self.flags.copy(),
                extra={k: v.copy() for k, v in self.extra.items()},
                meta={**self.meta, "arm": name},
            )
        return out

    # ------------------------------------------------------------------ validation
    def validate(self, strict: bool = False, z_range: tuple[float, float] = Z_RANGE) -> Spectra:
        """Mask bad pixels and flag bad galaxies (batch mode), or raise (strict mode).

        The checks are :meth:`sedvae.io.batch.SpectrumBatch.clean`'s (the one validator):
        pixels with non-finite flux or ivar, or ivar <= 0, become masked with ``ivar = 0`` and
        flux 0, so downstream arithmetic stays finite; galaxies get :class:`Flag` bits
        (``NONFINITE``, ``ALL_MASKED``, ``NO_SIGNAL``, ``BAD_Z`` outside ``z_range``,
        ``BAD_RESOLUTION`` with a Gaussian LSF put in place of a matrix with NaN/inf).
        Unusable photometry gets ``photometry_ivar = 0``. Flags already set are kept.

        Parameters
        ----------
        strict : bool
            If True (the single-galaxy path), raise ``ValueError`` naming the object and the
            problem when any galaxy has a :data:`FATAL` flag, instead of only flagging it.
        z_range : (float, float)
            Supported redshift interval, inclusive.

        Returns
        -------
        Spectra
            ``self`` (arrays are replaced, never modified in place, so arrays the caller
            passed in are left untouched).
        """
        import torch

        from .batch import SpectrumBatch

        res, phot = self.resolution, self.photometry
        clean = SpectrumBatch(
            flux=torch.from_numpy(self.flux),
            ivar=torch.from_numpy(self.ivar),
            z=torch.from_numpy(self.z),
            mask=torch.from_numpy(self.mask),
            resolution=None if res is None else torch.from_numpy(np.concatenate(res, -1)),
            photometry=None if phot is None else torch.from_numpy(phot),
            photometry_ivar=None if phot is None else torch.from_numpy(self.photometry_ivar),
            flags=torch.from_numpy(self.flags),
        ).clean(z_range=z_range, keep_masked_flux=True)
        self.flux = clean.flux.numpy()
        self.ivar = clean.ivar.numpy()
        self.mask = clean.mask.numpy()
        flags = clean.flags.numpy()
        self.flags = flags
        if self.resolution is not None and (flags & int(Flag.BAD_RESOLUTION)).any():
            sizes = [r.shape[-1] for r in self.resolution]
            self.resolution = np.split(clean.resolution.numpy(), np.cumsum(sizes)[:-1], -1)
        if self.photometry is not None:
            self.photometry = clean.photometry.numpy()
            self.photometry_ivar = clean.photometry_ivar.numpy()

        if strict:
            fatal = np.flatnonzero(flags & int(FATAL))
            if len(fatal):
                src = self.meta.get("source", "<memory>")
                lines = []
                for i in fatal[:10]:
                    why = []
                    if flags[i] & SpecFlag.ALL_MASKED:
                        why.append("every pixel is masked or has ivar <= 0")
                    if flags[i] & Flag.NO_SIGNAL:
                        why.append("no significant positive flux (NO_SIGNAL)")
                    if flags[i] & SpecFlag.BAD_Z:
                        why.append(
                            f"z={float(self.z[i])} is not within the supported range {z_range}"
                        )
                    lines.append(f"  object {self.ids[i].item()!r}: " + "; ".join(why))
                more = f"\n  ... and {len(fatal) - 10} more" if len(fatal) > 10 else ""
                raise ValueError(f"unusable spectrum in {src}:\n" + "\n".join(lines) + more)
        return self

    # ------------------------------------------------------------------ batching
    def select(self, indices: Any) -> Spectra:
        """A new :class:`Spectra` with the galaxies ``indices`` (int, slice, int array, or
        (N,) bool array), in that order. Per-pixel and per-batch fields are copied."""
        idx = np.arange(len(self))[indices]
        idx = np.atleast_1d(idx)

        def take(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx]

        return Spectra(
            wave=self.wave.copy(),
            flux=self.flux[idx],
            ivar=self.ivar[idx],
            z=self.z[idx],
            ids=self.ids[idx],
            mask=self.mask[idx],
            arm=None if self.arm is None else self.arm.copy(),
            arm_names=self.arm_names,
            resolution=None if self.resolution is None else [r[idx] for r in self.resolution],
            wdisp=take(self.wdisp),
            lsf_sigma=take(self.lsf_sigma),
            photometry=take(self.photometry),
            photometry_ivar=take(self.photometry_ivar),
            bands=self.bands,
            mw_transmission=take(self.mw_transmission),
            flags=self.flags[idx],
            extra={k: v[idx] for k, v in self.extra.items()},
            meta=dict(self.meta),
        )

    @classmethod
    def concatenate(cls, items: Sequence[Spectra]) -> Spectra:
        """Stack batches that share one wavelength grid (and arms and bands) into one.

        Optional fields are kept only when every batch has them; ``extra`` keeps the keys
        common to all. ``meta["source"]`` becomes the list of all sources.
        """
        items = list(items)
        if not items:
            raise ValueError("concatenate needs at least one Spectra")
        first = items[0]
        for k, s in enumerate(items[1:], start=1):
            if s.wave.shape != first.wave.shape or not np.array_equal(s.wave, first.wave):
                raise ValueError(
                    f"item {k} has a different wavelength grid; sedvae does not resample "
                    "silently (bring them onto one grid first)"
                )
            if s.arm_names != first.arm_names or (
                s.arm is not None and not np.array_equal(s.arm, first.arm)
            ):
                raise ValueError(f"item {k} has different arms: {s.arm_names} vs {first.arm_names}")
            if s.bands != first.bands:
                raise ValueError(f"item {k} has different bands: {s.bands} vs {first.bands}")

        def cat(name: str) -> np.ndarray | None:
            vals = [getattr(s, name) for s in items]
            return None if any(v is None for v in vals) else np.concatenate(vals)

        res = None
        if all(s.resolution is not None for s in items):
            res = [
                np.concatenate([s.resolution[a] for s in items])
                for a in range(len(first.arm_names))
            ]
        keys = set(first.extra).intersection(*(s.extra for s in items[1:]))
        sources: list[Any] = []
        for s in items:
            src = s.meta.get("source")
            sources.extend(src if isinstance(src, list) else [src])
        instruments = {s.meta.get("instrument") for s in items}
        ids = [s.ids for s in items]
        if len({i.dtype.kind for i in ids}) > 1:  # mixing int and str ids: fall back to str
            ids = [i.astype(str) for i in ids]
        return cls(
            wave=first.wave.copy(),
            flux=cat("flux"),
            ivar=cat("ivar"),
            z=cat("z"),
            ids=np.concatenate(ids),
            mask=cat("mask"),
            arm=None if first.arm is None else first.arm.copy(),
            arm_names=first.arm_names,
            resolution=res,
            wdisp=cat("wdisp"),
            lsf_sigma=cat("lsf_sigma"),
            photometry=cat("photometry") if all(s.photometry is not None for s in items) else None,
            photometry_ivar=(
                cat("photometry_ivar") if all(s.photometry is not None for s in items) else None
            ),
            bands=first.bands if all(s.photometry is not None for s in items) else (),
            mw_transmission=cat("mw_transmission"),
            flags=cat("flags"),
            extra={k: np.concatenate([s.extra[k] for s in items]) for k in sorted(keys)},
            meta={
                "instrument": instruments.pop() if len(instruments) == 1 else "mixed",
                "source": sources,
            },
        )

    # ------------------------------------------------------------------ torch
    def to_batch(self, dtype: Any = None):
        """The :class:`sedvae.io.batch.SpectrumBatch` of these spectra (float32 by default)."""
        import torch

        from .batch import SpectrumBatch

        return SpectrumBatch.from_spectra(self, dtype=dtype or torch.float32)

    def to_torch(self, dtype: Any = None, device: Any = None) -> dict[str, Any]:
        """The arrays as torch tensors (imported lazily: ``sedvae.io`` itself needs no torch).

        Parameters
        ----------
        dtype : torch.dtype, optional
            Floating dtype of flux-like tensors; default ``torch.get_default_dtype()``.
        device : torch.device or str, optional

        Returns
        -------
        dict
            ``wave`` (M,), ``flux``/``ivar`` (N, M), ``mask`` (N, M) bool, ``z`` (N,),
            ``flags`` (N,) int64, and when present ``arm`` (M,) int64, ``resolution`` (list of
            (N, ndiag, M_arm)), ``lsf_sigma`` (N, M), ``photometry``/``photometry_ivar``
            (N, nb), ``mw_transmission`` (N, nb). ``wave`` is float64: float32 has only
            ~0.001 A precision at 9000 A, and the model redshifts this grid.
        """
        import torch

        dtype = dtype or torch.get_default_dtype()

        def t(a: np.ndarray, dt: Any = dtype) -> Any:
            return torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=device)

        out: dict[str, Any] = {
            "wave": t(self.wave, torch.float64),
            "flux": t(self.flux),
            "ivar": t(self.ivar),
            "mask": t(self.mask, torch.bool),
            "z": t(self.z),
            "flags": t(self.flags, torch.int64),
        }
        if self.arm is not None:
            out["arm"] = t(self.arm, torch.int64)
        if self.resolution is not None:
            out["resolution"] = [t(r) for r in self.resolution]
        if self.lsf_sigma is not None:
            out["lsf_sigma"] = t(self.lsf_sigma)
        for name in ("photometry", "photometry_ivar", "mw_transmission"):
            if getattr(self, name) is not None:
                out[name] = t(getattr(self, name))
        return out
