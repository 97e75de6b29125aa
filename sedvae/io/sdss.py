"""SDSS / BOSS ``spec-PLATE-MJD-FIBER.fits`` files (full and "lite"), one object per file.

Data model (data.sdss.org, BOSS_SPECTRO_REDUX/RUN2D/spectra/PLATE4/spec.html):
HDU 1 ``COADD``: table with ``flux`` (1e-17 erg/s/cm^2/A), ``loglam`` (log10 vacuum Angstrom,
1e-4 dex pixels), ``ivar``, ``and_mask``, ``or_mask``, ``wdisp`` (Gaussian LSF sigma in pixels,
i.e. in units of 1e-4 dex), ``sky``, ``model``. HDU 2 (``SPECOBJ`` in SDSS-III files, ``SPALL``
in later ones): one row with ``Z``, ``ZWARNING``, ``CLASS``, ``PLATE``, ``MJD``, ``FIBERID``,
``SPECOBJID``, ... HDU 3: emission-line fits (unused).

Several files go onto one grid without interpolation: every SDSS/BOSS spectrum samples the
same global lattice loglam = k * 1e-4 and differs only in where it starts and ends, so each
spectrum is placed at its integer offset on the union grid and the pixels it does not cover
are masked (ivar = 0). Interpolating would correlate the noise and smear narrow lines, so
spectra that are not on a common lattice raise instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sedvae.io.fits import column, hdu_data, open_fits, read_data
from sedvae.io.spectrum import Z_RANGE, MissingHDUError, SpecFlag, Spectra, SpectrumFileError

DLOGLAM = 1e-4  # SDSS/BOSS coadd pixel width in log10(wavelength / Angstrom)
_LATTICE_TOL = 0.05  # max |loglam/DLOGLAM - k| in pixels; float32 loglam errs by <0.005 pixel


def _read_one(path: Path, and_mask_bits: int | None) -> dict:
    with open_fits(path) as hdul:
        tab = hdu_data(hdul, "COADD", path)
        out = {
            "loglam": column(tab, "loglam", path, "COADD").astype(np.float64),
            "flux": column(tab, "flux", path, "COADD").astype(np.float32),
            "ivar": column(tab, "ivar", path, "COADD").astype(np.float32),
        }
        and_mask = column(tab, "and_mask", path, "COADD", required=False)
        wdisp = column(tab, "wdisp", path, "COADD", required=False)
        m = len(out["loglam"])
        if and_mask is None:
            out["mask"] = np.zeros(m, dtype=bool)
        else:
            # Default: any AND-mask bit is bad (each bit was set in every exposure); a caller
            # can restrict to e.g. FULLREJECT|NOSKY|... via and_mask_bits.
            bits = np.asarray(and_mask).astype(np.int64)
            out["mask"] = (bits & and_mask_bits) != 0 if and_mask_bits is not None else bits != 0
        out["wdisp"] = None if wdisp is None else wdisp.astype(np.float32)

        # HDU 2 is SPECOBJ in SDSS-III files and SPALL in later ones; else take HDU 2 as is.
        hdu2 = next((h for h in ("SPECOBJ", "SPALL") if h in hdul), None)
        if hdu2 is None and len(hdul) > 2 and hdul[2].is_image is False:
            hdu2 = hdul[2].name or "HDU 2"
            obj = read_data(hdul[2], path, hdu2)
        else:
            obj = None if hdu2 is None else read_data(hdul[hdu2], path, hdu2)
        if obj is not None and len(obj) != 1:
            raise SpectrumFileError(f"{path}: HDU {hdu2!r} has {len(obj)} rows, expected 1")
        out["hdu2"] = hdu2

        def get(col: str):
            if obj is None:
                return None
            val = column(obj, col, path, hdu2, required=False)
            return None if val is None else val[0]

        out["Z"], out["ZWARNING"], out["CLASS"] = get("Z"), get("ZWARNING"), get("CLASS")
        specobjid, plate, mjd, fiber = get("SPECOBJID"), get("PLATE"), get("MJD"), get("FIBERID")
        if specobjid is not None and str(specobjid).strip():
            out["id"] = str(specobjid).strip()
        elif plate is not None and mjd is not None and fiber is not None:
            out["id"] = f"{int(plate):04d}-{int(mjd):05d}-{int(fiber):04d}"
        else:
            out["id"] = path.stem
        out["PLUG_RA"], out["PLUG_DEC"] = get("PLUG_RA"), get("PLUG_DEC")
        for key in ("flux", "ivar", "mask"):
            if out[key].shape != (m,):
                raise SpectrumFileError(f"{path}: HDU 'COADD' column {key!r} is not (M,)")
        if m > 1 and not np.all(np.diff(out["loglam"]) > 0):
            raise SpectrumFileError(f"{path}: HDU 'COADD' loglam is not increasing")
    return out


def read_sdss_spec(
    path: str | Path | Sequence[str | Path],
    z: float | Sequence[float] | np.ndarray | None = None,
    *,
    and_mask_bits: int | None = None,
    z_range: tuple[float, float] = Z_RANGE,
    validate: bool = True,
) -> Spectra:
    """Read one or several SDSS/BOSS spec(-lite) files into one :class:`Spectra`.

    Parameters
    ----------
    path : path or sequence of paths
        ``spec-PLATE-MJD-FIBER.fits`` files (one object each).
    z : float or (N,) array, optional
        Redshifts overriding the pipeline's HDU 2 ``Z`` (then ``ZWARNING`` is not flagged).
        Default: HDU 2 ``Z``; ``ZWARNING != 0`` is flagged ``ZWARN``.
    and_mask_bits : int, optional
        Bits of ``and_mask`` that make a pixel bad; default any bit. ``ivar <= 0`` is always
        masked.
    z_range : (float, float)
        Supported redshifts (outside: ``BAD_Z``).
    validate : bool
        Run :meth:`Spectra.validate` (batch mode).

    Returns
    -------
    Spectra
        ``wave`` (M,) = 10**(k * 1e-4) Angstrom vacuum on the union of the files' pixel
        lattices (exact float64, not the file's float32 loglam), ``flux``/``ivar``/``mask``
        (N, M) with pixels outside a file's coverage masked, ``wdisp`` (N, M) in pixels,
        ``lsf_sigma`` (N, M) = wdisp * 1e-4 * ln(10) * wave Angstrom, ``ids`` (N,) str
        (SPECOBJID, else "PLATE-MJD-FIBER"), ``extra`` CLASS, ZWARNING, PLUG_RA/DEC when present.
        A single file whose loglam is not on the 1e-4 dex lattice keeps ``10**loglam``.

    Raises
    ------
    SpectrumFileNotFoundError, MissingHDUError, SpectrumFileError
        Missing file; missing COADD HDU / column, or HDU 2 when ``z`` is not given; files
        not on one common 1e-4 dex lattice.
    """
    paths = [Path(path)] if isinstance(path, str | Path) else [Path(p) for p in path]
    if not paths:
        raise ValueError("read_sdss_spec needs at least one file")
    rows = [_read_one(p, and_mask_bits) for p in paths]
    n = len(rows)

    if z is None:
        for p, r in zip(paths, rows, strict=True):
            if r["Z"] is None:
                raise MissingHDUError(
                    f"{p}: no redshift: HDU 2 ('SPECOBJ' or 'SPALL') or its 'Z' column is "
                    "missing; pass z="
                )
        zs = np.asarray([float(r["Z"]) for r in rows])
    else:
        zs = np.broadcast_to(np.asarray(z, dtype=np.float64), (n,)).copy()

    # Integer lattice positions k = loglam / 1e-4 of every pixel.
    ks, on_lattice = [], True
    for r in rows:
        k = r["loglam"] / DLOGLAM
        k_int = np.rint(k).astype(np.int64)
        on_lattice &= bool(np.all(np.abs(k - k_int) < _LATTICE_TOL)) and bool(
            np.all(np.diff(k_int) == 1)
        )
        ks.append(k_int)

    if on_lattice:
        k_lo = min(int(k[0]) for k in ks)
        k_hi = max(int(k[-1]) for k in ks)
        wave = 10.0 ** (np.arange(k_lo, k_hi + 1) * DLOGLAM)
        starts = [int(k[0]) - k_lo for k in ks]
    elif n == 1:
        wave = 10.0 ** rows[0]["loglam"]
        starts = [0]
    else:
        raise SpectrumFileError(
            f"{[str(p) for p in paths]}: not all on the SDSS 1e-4 dex log-lambda lattice; "
            "sedvae places SDSS spectra on the union grid without interpolating, so read them "
            "separately"
        )

    m = len(wave)
    flux = np.zeros((n, m), dtype=np.float32)
    ivar = np.zeros((n, m), dtype=np.float32)
    mask = np.ones((n, m), dtype=bool)  # uncovered pixels stay masked
    have_wdisp = all(r["wdisp"] is not None for r in rows)
    wdisp = np.zeros((n, m), dtype=np.float32) if have_wdisp else None
    for i, (r, s0) in enumerate(zip(rows, starts, strict=True)):
        sl = slice(s0, s0 + len(r["flux"]))
        flux[i, sl], ivar[i, sl], mask[i, sl] = r["flux"], r["ivar"], r["mask"]
        if have_wdisp:
            wdisp[i, sl] = r["wdisp"]
    lsf_sigma = None
    if have_wdisp:
        # sigma_lambda = sigma_loglam * ln(10) * lambda, sigma_loglam = wdisp * 1e-4 dex
        lsf_sigma = (wdisp * (DLOGLAM * np.log(10.0)) * wave[None, :]).astype(np.float32)

    flags = np.zeros(n, dtype=np.int64)
    extra: dict[str, np.ndarray] = {}
    if all(r["CLASS"] is not None for r in rows):
        cls = np.asarray([str(r["CLASS"]).strip() for r in rows])
        extra["CLASS"] = cls
        flags[cls != "GALAXY"] |= int(SpecFlag.NOT_GALAXY)
    if all(r["ZWARNING"] is not None for r in rows):
        zw = np.asarray([int(r["ZWARNING"]) for r in rows], dtype=np.int64)
        extra["ZWARNING"] = zw
        if z is None:  # a user-given z makes the pipeline's warning irrelevant
            flags[zw != 0] |= int(SpecFlag.ZWARN)
    for key in ("PLUG_RA", "PLUG_DEC"):
        if all(r[key] is not None for r in rows):
            extra[key] = np.asarray([float(r[key]) for r in rows])

    spectra = Spectra(
        wave=wave,
        flux=flux,
        ivar=ivar,
        mask=mask,
        z=zs,
        ids=np.asarray([r["id"] for r in rows], dtype=str),
        wdisp=wdisp,
        lsf_sigma=lsf_sigma,
        flags=flags,
        extra=extra,
        meta={
            "instrument": "SDSS",
            "source": str(paths[0]) if n == 1 else [str(p) for p in paths],
            "redshift_source": f"HDU {rows[0]['hdu2']}" if z is None else "argument",
        },
    )
    if validate:
        spectra.validate(z_range=z_range)
    return spectra
