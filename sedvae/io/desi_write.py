"""Write spectra as DESI coadd files (``coadd-*.fits``) with a redrock file beside each.

The layout is the bundled example's (``data/desi_example``), HDU for HDU, so that every DESI
reader (sedvae's, desispec's) opens them as it opens a real coadd:

- coadd: PRIMARY, FIBERMAP (one row per target, the example's 81 columns and dtypes, Legacy
  Surveys photometry ``FLUX_<band>``/``FLUX_IVAR_<band>`` in nanomaggies), EXP_FIBERMAP (the
  example's exposures, repeated for every target), per arm ``<ARM>_WAVELENGTH`` (float64),
  ``<ARM>_FLUX``, ``<ARM>_IVAR`` (float32), ``<ARM>_MASK`` (int32, non-zero = bad),
  ``<ARM>_RESOLUTION`` (float32, (N, 11, M_arm)), and SCORES;
- redrock: PRIMARY, REDSHIFTS (TARGETID, Z, ZERR, ZWARN, CHI2, COEFF, NPIXELS, SPECTYPE,
  SUBTYPE, NCOEFF, DELTACHI2), FIBERMAP, EXP_FIBERMAP, TSNR2.

Columns the spectra do not carry (fibre positions, targeting bits, ...) take the example
target's values; ``TARGET_RA``/``TARGET_DEC``, ``EBV``, ``PHOTSYS``, ``COADD_FIBERSTATUS`` and
the redrock ZWARN/SPECTYPE/ZERR/DELTACHI2 come from ``Spectra.extra`` when present (``EBV``
defaults to 0: no Milky-Way reddening, as for mocks). Files are written atomically.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits

from sedvae.fileio import atomic_path
from sedvae.io.spectrum import Spectra

EXAMPLE_COADD = "desi_example/coadd-4-80613-thru20210324.fits"
EXAMPLE_REDROCK = "desi_example/redrock-4-80613-thru20210324.fits"

_UNITS = {"WAVELENGTH": "Angstrom", "FLUX": "10**-17 erg/(s cm2 Angstrom)",
          "IVAR": "10**+34 (s2 cm4 Angstrom2) / erg2"}  # fmt: skip
_PROVENANCE = ("INFIL", "DEPNAM", "DEPVER", "CHECKSUM", "DATASUM")


def _example(name: str) -> Path:
    from sedvae.paths import data_dir

    return data_dir() / name


def _template_rows(hdu: fits.BinTableHDU, n: int, per: int | None = None) -> np.ndarray:
    """The template table's rows as a structured array repeated to ``n`` rows (``per``: every
    row of the template once per target, i.e. ``n`` targets x ``len(template)`` rows)."""
    base = np.asarray(hdu.data).copy()
    if per is None:
        return np.repeat(base[:1], n)
    return np.tile(base, n)


def _set(rows: np.ndarray, name: str, values) -> None:
    if name in rows.dtype.names:
        rows[name] = values


def _primary(template: fits.Header) -> fits.PrimaryHDU:
    """The template's primary header without its provenance cards (input files, versions)."""
    hdu = fits.PrimaryHDU()
    for card in template.cards:
        key = card.keyword
        if key in hdu.header or key.startswith(_PROVENANCE):
            continue
        hdu.header.append(card)
    hdu.header["DEPNAM00"] = "sedvae"
    hdu.header["DEPVER00"] = "desi_write"
    return hdu


def _extra(spectra: Spectra, name: str, default):
    value = spectra.extra.get(name)
    if value is None:
        return np.broadcast_to(np.asarray(default), (len(spectra.z),))
    return np.asarray(value)


def write_desi_coadd(
    path: str | os.PathLike,
    spectra: Spectra,
    redrock: str | os.PathLike | bool = True,
    *,
    template: str | os.PathLike | None = None,
    template_redrock: str | os.PathLike | None = None,
) -> tuple[Path, Path | None]:
    """Write ``spectra`` as a DESI coadd (and its redrock file); returns both paths.

    Parameters
    ----------
    path : the coadd file (``coadd-*.fits`` by convention).
    spectra : :class:`Spectra` with DESI arms (``arm``, ``arm_names``), per-arm ``resolution``,
        integer ``ids`` (TARGETID), ``z`` and optionally ``photometry`` in :data:`DESI_BANDS`.
        ``mask`` True is written as MASK = 1 (and the reader masks ivar <= 0 by itself).
    redrock : True: ``redrock-*`` beside ``path`` (the name with ``coadd-`` replaced), a path,
        or False for none. Its REDSHIFTS get Z = ``spectra.z`` and ZWARN, SPECTYPE, ZERR,
        DELTACHI2 from ``spectra.extra`` (defaults 0, GALAXY, 1e-5, 100).
    template, template_redrock : files whose layout is copied (default: the bundled example).
    """
    path = Path(path)
    n = len(spectra.z)
    if spectra.arm is None or spectra.resolution is None:
        raise ValueError("DESI coadds need per-arm spectra (arm, arm_names) and resolution")
    ids = np.asarray(spectra.ids)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"DESI TARGETIDs are integers; got ids of dtype {ids.dtype}")
    template = Path(template) if template is not None else _example(EXAMPLE_COADD)
    with fits.open(template, memmap=False) as tpl:
        hdus = fits.HDUList([_primary(tpl[0].header)])
        fibermap = _fibermap(tpl["FIBERMAP"], spectra, ids)
        hdus.append(fits.BinTableHDU(fibermap, name="FIBERMAP"))
        exp = _template_rows(tpl["EXP_FIBERMAP"], n, per=len(tpl["EXP_FIBERMAP"].data))
        exp["TARGETID"] = np.repeat(ids, len(tpl["EXP_FIBERMAP"].data))
        hdus.append(fits.BinTableHDU(exp, name="EXP_FIBERMAP"))
        scores = np.zeros(n, dtype=np.asarray(tpl["SCORES"].data).dtype)
        scores["TARGETID"] = ids
        for a, arm in enumerate(spectra.arm_names):
            sel = spectra.arm == a
            wave = spectra.wave[sel]
            hdus.append(_image(wave.astype(">f8"), f"{arm}_WAVELENGTH", "WAVELENGTH"))
            flux, ivar = spectra.flux[:, sel], spectra.ivar[:, sel]
            hdus.append(_image(flux.astype(">f4"), f"{arm}_FLUX", "FLUX"))
            hdus.append(_image(ivar.astype(">f4"), f"{arm}_IVAR", "IVAR"))
            hdus.append(_image(spectra.mask[:, sel].astype(">i4"), f"{arm}_MASK", None))
            res = np.asarray(spectra.resolution[a], dtype=">f4")
            if res.shape[0] != n or res.shape[-1] != len(wave):
                raise ValueError(
                    f"resolution of arm {arm}: shape {res.shape}, expected ({n}, ndiag, "
                    f"{len(wave)})"
                )
            hdus.append(_image(res, f"{arm}_RESOLUTION", None))
            with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a wholly masked arm
                good = ~spectra.mask[:, sel] & (ivar > 0)
                snr = np.where(good, np.abs(flux) * np.sqrt(np.maximum(ivar, 0)), np.nan)
                fl = np.where(good, flux, np.nan)
                _set(scores, f"MEDIAN_COADD_SNR_{arm}", np.nan_to_num(np.nanmedian(snr, 1)))
                _set(scores, f"MEDIAN_COADD_FLUX_{arm}", np.nan_to_num(np.nanmedian(fl, 1)))
                _set(scores, f"INTEG_COADD_FLUX_{arm}",
                     np.nansum(fl * np.gradient(wave)[None], 1))  # fmt: skip
        hdus.append(fits.BinTableHDU(scores, name="SCORES"))
        with atomic_path(path) as tmp:
            hdus.writeto(tmp, overwrite=True)
    if redrock is False:
        return path, None
    rr_path = (
        path.with_name(path.name.replace("coadd-", "redrock-", 1))
        if redrock is True
        else Path(redrock)
    )
    if rr_path == path:
        raise ValueError(f"{path}: cannot derive a redrock name (no 'coadd-' in it); pass one")
    _write_redrock(rr_path, spectra, ids, fibermap, exp, template_redrock)
    return path, rr_path


def _image(data: np.ndarray, name: str, unit_key: str | None) -> fits.ImageHDU:
    hdu = fits.ImageHDU(np.ascontiguousarray(data), name=name)
    if unit_key is not None:
        hdu.header["BUNIT"] = _UNITS[unit_key]
    return hdu


def _fibermap(hdu: fits.BinTableHDU, spectra: Spectra, ids: np.ndarray) -> np.ndarray:
    n = len(ids)
    rows = _template_rows(hdu, n)
    rows["TARGETID"] = ids
    _set(rows, "FIBER", np.arange(n) % 5000)
    _set(rows, "LOCATION", np.arange(n) % 5000)
    _set(rows, "COADD_FIBERSTATUS", _extra(spectra, "COADD_FIBERSTATUS", 0))
    _set(rows, "EBV", _extra(spectra, "EBV", 0.0))
    for name in ("TARGET_RA", "TARGET_DEC", "PHOTSYS", "MORPHTYPE", "BGS_TARGET", "TILEID"):
        if name in spectra.extra:
            _set(rows, name, np.asarray(spectra.extra[name]))
    for name in ("FLUX", "FLUX_IVAR"):
        for b in ("G", "R", "Z", "W1", "W2"):
            _set(rows, f"{name}_{b}", 0.0)
    if spectra.photometry is not None:
        for j, band in enumerate(spectra.bands):
            band = band.upper()
            if f"FLUX_{band}" not in rows.dtype.names:
                raise ValueError(f"band {band!r} is not a DESI FIBERMAP band")
            rows[f"FLUX_{band}"] = spectra.photometry[:, j]
            rows[f"FLUX_IVAR_{band}"] = spectra.photometry_ivar[:, j]
            if spectra.mw_transmission is not None:
                _set(rows, f"MW_TRANSMISSION_{band}", spectra.mw_transmission[:, j])
    return rows


def _write_redrock(path, spectra, ids, fibermap, exp, template) -> None:
    n = len(ids)
    template = Path(template) if template is not None else _example(EXAMPLE_REDROCK)
    with fits.open(template, memmap=False) as tpl:
        hdus = fits.HDUList([_primary(tpl[0].header)])
        z = _template_rows(tpl["REDSHIFTS"], n)
        z["TARGETID"] = ids
        z["Z"] = np.asarray(spectra.z, dtype=np.float64)
        z["ZWARN"] = _extra(spectra, "ZWARN", 0).astype(np.int64)
        z["SPECTYPE"] = _extra(spectra, "SPECTYPE", "GALAXY")
        z["ZERR"] = _extra(spectra, "ZERR", 1e-5)
        z["DELTACHI2"] = _extra(spectra, "DELTACHI2", 100.0)
        _set(z, "NPIXELS", (~spectra.mask).sum(1))
        hdus.append(fits.BinTableHDU(z, name="REDSHIFTS"))
        hdus.append(fits.BinTableHDU(fibermap, name="FIBERMAP"))
        hdus.append(fits.BinTableHDU(exp, name="EXP_FIBERMAP"))
        tsnr = np.zeros(n, dtype=np.asarray(tpl["TSNR2"].data).dtype)
        tsnr["TARGETID"] = ids
        hdus.append(fits.BinTableHDU(tsnr, name="TSNR2"))
        with atomic_path(path) as tmp:
            hdus.writeto(tmp, overwrite=True)


def mock_coadd_spectra(
    generator,
    n: int,
    seed: int,
    like: Spectra,
    *,
    first_targetid: int = 39633345008634465,
    p_masked_arm: float = 0.01,
    p_zwarn: float = 0.02,
) -> tuple[Spectra, dict]:
    """``n`` mock targets as DESI coadd spectra, with a few bad ones; returns (spectra, truth).

    ``generator`` is a mock generator (``MockGenerator``: ``sample(n, torch.Generator)`` ->
    noisy ``flux``, ``ivar``, ``mask``, ``photometry``, ``photometry_ivar`` and the truth
    ``theta``, ``z``); ``like`` a real coadd target (its pixels and resolution matrices, which
    the generator's instrument uses too). Bad targets, drawn from ``seed``: a fraction
    ``p_masked_arm`` has one whole arm masked (MASK = 1, IVAR = 0, as for a dead amplifier),
    a fraction ``p_zwarn`` a redrock ZWARN = 4 (redrock's SMALL_DELTA_CHI2 bit) with a low
    DELTACHI2. The truth dict holds ``theta``, ``z``, ``masked_arm`` (-1: none) and ``zwarn``.
    """
    import torch

    batch = generator.sample(n, torch.Generator().manual_seed(int(seed)))
    rng = np.random.default_rng([int(seed), 28])
    flux = batch["flux"].numpy().astype(np.float32)
    ivar = batch["ivar"].numpy().astype(np.float32)
    mask = batch["mask"].numpy().astype(bool)
    if flux.shape[1] != len(like.wave):
        raise ValueError(f"mocks have {flux.shape[1]} pixels, the template {len(like.wave)}")
    masked_arm = np.where(
        rng.random(n) < p_masked_arm, rng.integers(0, len(like.arm_names), n), -1
    )
    for i in np.flatnonzero(masked_arm >= 0):
        sel = like.arm == masked_arm[i]
        mask[i, sel] = True
        ivar[i, sel] = 0.0
    zwarn = np.where(rng.random(n) < p_zwarn, 4, 0).astype(np.int64)
    z = batch["z"].numpy().astype(np.float64)
    spectra = Spectra(
        wave=like.wave.copy(),
        flux=flux,
        ivar=ivar,
        mask=mask,
        z=z,
        ids=np.int64(first_targetid) + np.arange(n, dtype=np.int64),
        arm=like.arm.copy(),
        arm_names=like.arm_names,
        resolution=[np.repeat(r[:1], n, axis=0) for r in like.resolution],
        photometry=batch["photometry"].numpy().astype(np.float32),
        photometry_ivar=batch["photometry_ivar"].numpy().astype(np.float32),
        bands=("G", "R", "Z", "W1", "W2"),
        extra={
            "ZWARN": zwarn,
            "DELTACHI2": np.where(zwarn != 0, 3.0, 500.0),
            "ZERR": np.full(n, 2e-5),
            "SPECTYPE": np.full(n, "GALAXY"),
            "PHOTSYS": np.full(n, "N"),
            "TARGET_RA": 150.0 + rng.random(n),
            "TARGET_DEC": 2.0 + rng.random(n),
        },
    )
    truth = {"theta": batch["theta"].numpy(), "z": z, "masked_arm": masked_arm, "zwarn": zwarn}
    return spectra, truth
