"""DESI coadd spectra (``coadd-*.fits``) with redrock redshifts (``redrock-*.fits``).

A coadd holds N targets: ``FIBERMAP`` (one row per target, Legacy Surveys photometry) and, per
arm B/R/Z, ``<ARM>_WAVELENGTH`` (M_arm,) Angstrom vacuum, ``<ARM>_FLUX`` (N, M_arm)
1e-17 erg/s/cm^2/A, ``<ARM>_IVAR``, ``<ARM>_MASK`` (non-zero = bad) and ``<ARM>_RESOLUTION``
(N, ndiag=11, M_arm). The arms overlap (b/r near 5800 A, r/z near 7560 A); they are kept
concatenated and unresampled with a per-pixel arm index (see :class:`~sedvae.io.Spectra`).

Milky-Way dust: neither DESI spectra nor the FIBERMAP fluxes are corrected for Galactic
extinction. ``MW_TRANSMISSION_<band>`` columns are read into ``Spectra.mw_transmission`` when
the FIBERMAP has them (early target files did); newer ones only carry ``EBV`` (SFD E(B-V)),
which is kept in ``Spectra.extra["EBV"]`` so that the observation model can redden the *model*
(spectrum and photometry) rather than de-redden noisy data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table

from sedvae.io.fits import column, hdu_data, native, open_fits
from sedvae.io.spectrum import (
    Z_RANGE,
    SpecFlag,
    Spectra,
    SpectrumFileError,
    SpectrumFileNotFoundError,
)

# Redshifts: scalar, (N,) array, {TARGETID: z}, or a catalog (Table or table file).
ZLike = float | Sequence[float] | np.ndarray | Mapping[int, float] | Table | str | Path | None

DESI_ARMS = ("B", "R", "Z")
DESI_BANDS = ("G", "R", "Z", "W1", "W2")  # FIBERMAP FLUX_<band>, nanomaggies

# speclite filter names per Legacy Surveys photometric system (FIBERMAP PHOTSYS): north (N) is
# BASS g, r + MzLS z, south (S) is DECam; WISE is common to both.
_FILTERS = {
    "N": ("BASS-g", "BASS-r", "MzLS-z", "wise2010-W1", "wise2010-W2"),
    "S": ("decam2014-g", "decam2014-r", "decam2014-z", "wise2010-W1", "wise2010-W2"),
}

# Extra per-target FIBERMAP columns kept when present (positions, dust, survey bookkeeping).
_FIBERMAP_EXTRA = (
    "TARGET_RA", "TARGET_DEC", "EBV", "PHOTSYS", "MORPHTYPE", "COADD_FIBERSTATUS", "OBJTYPE",
    "BGS_TARGET", "DESI_TARGET", "SV1_BGS_TARGET", "TILEID",
)  # fmt: skip


def desi_filter_names(photsys: str) -> tuple[str, ...]:
    """speclite filter names of :data:`DESI_BANDS` for one target's ``PHOTSYS`` ("N" or "S")."""
    key = str(photsys).strip().upper()
    if key not in _FILTERS:
        raise ValueError(f"PHOTSYS must be 'N' (BASS/MzLS) or 'S' (DECam), got {photsys!r}")
    return _FILTERS[key]


def desi_resolution_matrix(diagonals: np.ndarray):
    """The sparse (M, M) resolution matrix of one DESI spectrum from its stored diagonals.

    Parameters
    ----------
    diagonals : (ndiag, M) array
        One target's ``<ARM>_RESOLUTION`` slice (ndiag odd, 11 in coadds).

    Returns
    -------
    scipy.sparse.dia_array
        R with ``observed_flux = R @ true_flux`` (both on the arm's pixels). desispec's
        convention: ``diagonals[k]`` holds the diagonal with offset ``ndiag//2 - k``, stored
        by column, so rows of R sum to ~1 (flux is conserved).
    """
    import scipy.sparse

    diagonals = np.asarray(diagonals)
    if diagonals.ndim != 2 or diagonals.shape[0] % 2 != 1:
        raise ValueError(f"diagonals: expected shape (ndiag odd, M), got {diagonals.shape}")
    ndiag, m = diagonals.shape
    offsets = np.arange(ndiag // 2, -(ndiag // 2) - 1, -1)
    return scipy.sparse.dia_array((diagonals, offsets), shape=(m, m))


def _redshift_catalog(source: Any, redrock: bool) -> tuple[str, Table]:
    """(label, table with TARGETID and Z) from a redrock file or a redshift catalog.

    ``source``: a path (a redrock file when ``redrock``, whose REDSHIFTS HDU is required;
    otherwise any table astropy reads: FITS, ECSV, CSV) or an astropy Table. Column names are
    matched case-insensitively and returned upper-case.
    """
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise SpectrumFileNotFoundError(f"redshift file not found: {path}")
        if redrock:
            with open_fits(path) as hdul:
                table = Table(hdu_data(hdul, "REDSHIFTS", path))
        else:
            table = Table.read(path)
        label = f"{path} (REDSHIFTS)" if redrock else str(path)
    elif isinstance(source, Table):
        table, label = source, "redshift table"
    else:
        raise TypeError(f"expected a path or an astropy Table of redshifts, got {type(source)}")
    table = Table({c.upper(): table[c] for c in table.colnames})
    for need in ("TARGETID", "Z"):
        if need not in table.colnames:
            raise SpectrumFileError(f"{label}: no {need} column (columns: {table.colnames})")
    return label, table


def _native_column(col: np.ndarray) -> np.ndarray:
    """FITS column -> native-endian numbers or stripped str."""
    if col.dtype.kind in "SU":
        return np.char.strip(col.astype(str))
    return native(col, col.dtype.newbyteorder("="))


def read_desi_coadd(
    path: str | Path,
    redrock: str | Path | Table | None = None,
    *,
    z: ZLike = None,
    targetids: Sequence[int] | np.ndarray | None = None,
    zwarn_ok: bool = True,
    galaxies_only: bool = False,
    arms: Sequence[str] = DESI_ARMS,
    bands: Sequence[str] = DESI_BANDS,
    z_range: tuple[float, float] = Z_RANGE,
    validate: bool = True,
) -> Spectra:
    """Read a DESI coadd file into one :class:`Spectra` (arms concatenated, per-arm resolution).

    Parameters
    ----------
    path : str or Path
        ``coadd-*.fits`` (healpix or tile coadd; spectra-*.fits files have the same layout).
    redrock : str, Path or Table, optional
        ``redrock-*.fits`` (its REDSHIFTS HDU) or a table with TARGETID, Z and optionally
        ZWARN, SPECTYPE, matched to the coadd by TARGETID. Targets not in it get z = NaN and
        ``SpecFlag.NO_Z_MATCH``.
    z : optional
        Redshifts instead of ``redrock``: a scalar (all targets), an (N,) array aligned with
        the returned rows (after ``targetids``), a ``{targetid: z}`` mapping, or a catalog
        (Table or table file) with TARGETID and Z columns. Neither given: z = NaN (flagged
        ``BAD_Z``), fine for inspection, not for fitting.
    targetids : sequence of int, optional
        Read only these targets, in this order (KeyError-like ``SpectrumFileError`` if one
        is not in the file). Default: all targets in file order.
    zwarn_ok : bool
        True: keep targets with redrock ZWARN != 0 (flagged ``ZWARN``); False: drop them.
    galaxies_only : bool
        Drop targets whose redrock SPECTYPE is not GALAXY (else they are flagged ``NOT_GALAXY``).
    arms : sequence of str
        Arms to read, in the concatenation order.
    bands : sequence of str
        FIBERMAP photometry bands (``FLUX_<band>``, ``FLUX_IVAR_<band>``); absent bands are
        skipped; none present gives ``photometry=None``.
    z_range : (float, float)
        Supported redshifts (outside: ``BAD_Z``).
    validate : bool
        Run :meth:`Spectra.validate` (batch mode: mask and flag, never raise).

    Returns
    -------
    Spectra
        ``wave`` (M,) with M = sum of arm lengths, ``arm`` (M,), ``resolution`` per arm
        (N, 11, M_arm), ``photometry`` (N, nb) nanomaggies, ``ids`` TARGETID (int64),
        ``extra``: ZWARN, SPECTYPE, ZERR, DELTACHI2 (from redrock) and EBV, PHOTSYS,
        TARGET_RA/DEC, COADD_FIBERSTATUS, ... (from the FIBERMAP) when present.

    Raises
    ------
    SpectrumFileNotFoundError
        The coadd (or redrock) file does not exist.
    MissingHDUError
        A required HDU or column is missing (message names file and HDU).
    SpectrumFileError
        Shapes disagree between HDUs, or requested TARGETIDs are absent.
    """
    if redrock is not None and z is not None:
        raise ValueError("give either redrock= or z=, not both")
    path = Path(path)
    arms = tuple(a.upper() for a in arms)
    with open_fits(path) as hdul:
        fibermap = hdu_data(hdul, "FIBERMAP", path)
        file_tid = column(fibermap, "TARGETID", path, "FIBERMAP").astype(np.int64)
        n_file = len(file_tid)

        if targetids is None:
            rows = np.arange(n_file)
        else:
            want = np.atleast_1d(np.asarray(targetids, dtype=np.int64))
            lookup = {int(t): i for i, t in enumerate(file_tid)}
            missing = [int(t) for t in want if int(t) not in lookup]
            if missing:
                raise SpectrumFileError(
                    f"{path}: {len(missing)} TARGETID(s) not in HDU 'FIBERMAP': {missing[:10]}"
                )
            rows = np.asarray([lookup[int(t)] for t in want], dtype=np.int64)

        waves, fluxes, ivars, masks, resolutions = [], [], [], [], []
        for arm in arms:
            wave = hdu_data(hdul, f"{arm}_WAVELENGTH", path, ndim=1)
            m_arm = len(wave)
            arm_arrays = {}
            for kind, ndim in (("FLUX", 2), ("IVAR", 2), ("MASK", 2), ("RESOLUTION", 3)):
                name = f"{arm}_{kind}"
                data = hdu_data(hdul, name, path, ndim=ndim)
                if data.shape[0] != n_file or data.shape[-1] != m_arm:
                    raise SpectrumFileError(
                        f"{path}: HDU {name!r} has shape {data.shape}, expected "
                        f"({n_file}, {'ndiag, ' if kind == 'RESOLUTION' else ''}{m_arm}) from "
                        f"FIBERMAP ({n_file} targets) and {arm}_WAVELENGTH ({m_arm} pixels)"
                    )
                # the whole file: no fancy-indexed copy (native() below makes the one copy)
                arm_arrays[kind] = data if targetids is None else data[rows]
            waves.append(native(wave, np.float64))
            fluxes.append(native(arm_arrays["FLUX"], np.float32))
            ivars.append(native(arm_arrays["IVAR"], np.float32))
            masks.append(arm_arrays["MASK"] != 0)
            resolutions.append(native(arm_arrays["RESOLUTION"], np.float32))

        fm_rows = fibermap[rows]
        present = [b for b in bands if f"FLUX_{b.upper()}" in fibermap.columns.names]
        photometry = photometry_ivar = mw = None
        if present:
            photometry = np.stack(
                [column(fm_rows, f"FLUX_{b}", path, "FIBERMAP") for b in present], axis=1
            )
            photometry_ivar = np.stack(
                [column(fm_rows, f"FLUX_IVAR_{b}", path, "FIBERMAP") for b in present], axis=1
            )
            mw_cols = [
                column(fm_rows, f"MW_TRANSMISSION_{b}", path, "FIBERMAP", required=False)
                for b in present
            ]
            if all(c is not None for c in mw_cols):
                mw = np.stack(mw_cols, axis=1)
        extra: dict[str, np.ndarray] = {}
        for name in _FIBERMAP_EXTRA:
            col = column(fm_rows, name, path, "FIBERMAP", required=False)
            if col is not None:
                extra[name] = _native_column(col)
        primary = hdul[0].header
        meta = {
            "instrument": "DESI",
            "source": str(path),
            **{k.lower(): primary[k] for k in ("SPECPROD", "SURVEY", "PROGRAM") if k in primary},
        }

    n = len(rows)
    tid = file_tid[rows]
    flags = np.zeros(n, dtype=np.int64)
    if "COADD_FIBERSTATUS" in extra:
        flags[extra["COADD_FIBERSTATUS"] != 0] |= int(SpecFlag.BAD_FIBER)

    zs = np.full(n, np.nan)
    if redrock is not None or isinstance(z, Table | str | Path):
        label, cat = _redshift_catalog(
            redrock if redrock is not None else z, redrock=redrock is not None
        )
        meta["redshift_source"] = label
        lookup = {int(t): i for i, t in enumerate(np.asarray(cat["TARGETID"], dtype=np.int64))}
        idx = np.asarray([lookup.get(int(t), -1) for t in tid], dtype=np.int64)
        found = idx >= 0
        flags[~found] |= int(SpecFlag.NO_Z_MATCH)
        zs[found] = np.asarray(cat["Z"], dtype=np.float64)[idx[found]]
        # Unmatched targets get neutral fill values (the NO_Z_MATCH flag says why).
        for name, fill in (("ZERR", np.nan), ("DELTACHI2", np.nan), ("ZWARN", 0), ("SPECTYPE", "")):
            if name in cat.colnames:
                col = _native_column(np.asarray(cat[name]))
                extra[name] = np.where(found, col[np.maximum(idx, 0)], fill)
        if "ZWARN" in extra:
            extra["ZWARN"] = extra["ZWARN"].astype(np.int64)
            flags[extra["ZWARN"] != 0] |= int(SpecFlag.ZWARN)
        if "SPECTYPE" in extra:
            flags[found & (extra["SPECTYPE"] != "GALAXY")] |= int(SpecFlag.NOT_GALAXY)
    elif isinstance(z, Mapping):
        meta["redshift_source"] = "mapping"
        for i, t in enumerate(tid):
            if int(t) in z:
                zs[i] = float(z[int(t)])
            else:
                flags[i] |= int(SpecFlag.NO_Z_MATCH)
    elif z is not None:
        meta["redshift_source"] = "array"
        zarr = np.asarray(z, dtype=np.float64)
        if zarr.ndim == 0:
            zs[:] = float(zarr)
        elif zarr.shape == (n,):
            zs = zarr.copy()
        else:
            raise ValueError(
                f"z: expected a scalar or shape ({n},) (one per target read), got {zarr.shape}"
            )

    spectra = Spectra(
        wave=np.concatenate(waves),
        flux=np.concatenate(fluxes, axis=1),
        ivar=np.concatenate(ivars, axis=1),
        mask=np.concatenate(masks, axis=1),
        z=zs,
        ids=tid,
        arm=np.repeat(np.arange(len(arms)), [len(w) for w in waves]),
        arm_names=arms,
        resolution=resolutions,
        photometry=photometry,
        photometry_ivar=photometry_ivar,
        bands=tuple(present),
        mw_transmission=mw,
        flags=flags,
        extra=extra,
        meta=meta,
    )
    if validate:
        spectra.validate(z_range=z_range)

    keep = np.ones(n, dtype=bool)
    if not zwarn_ok:
        keep &= (spectra.flags & int(SpecFlag.ZWARN)) == 0
    if galaxies_only:
        keep &= (spectra.flags & int(SpecFlag.NOT_GALAXY)) == 0
    return spectra if keep.all() else spectra.select(np.flatnonzero(keep))
