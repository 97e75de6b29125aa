"""Spectra from generic tables (FITS binary table, ECSV, CSV, anything ``astropy.table`` reads).

Two layouts, told apart by the ``flux`` column's shape:

- one galaxy per file: one row per pixel, scalar columns ``wave``, ``flux``, ``ivar`` and
  optionally ``mask`` (True/non-zero = bad), a resolution column, and ``z`` (a constant
  column) or ``z`` in the table metadata (``z``, ``Z`` or ``REDSHIFT``);
- several galaxies: one row per galaxy, array columns ``wave``, ``flux``, ... of length M
  (identical ``wave`` in every row: nothing is resampled), scalar ``z`` and ``id`` columns.
  CSV cannot hold array columns; use ECSV or FITS.

Arms: an optional integer ``arm`` column (per pixel, as ``wave``) says which spectrograph arm
each pixel belongs to, for multi-arm data whose arms overlap (DESI b, r, z: ``wave`` then
increases within each arm only); the arm names are the metadata key ``ARMS`` (e.g. "B,R,Z").

Resolution: a ``lsf_sigma`` column (Gaussian LSF sigma, Angstrom) or a ``resolving_power``
column (R = lambda / FWHM, converted to sigma = lambda / (R * 2 sqrt(2 ln 2))).

Photometry (optional): the fluxes of the whole galaxy in the Legacy Surveys bands the
networks read, g, r, z, W1, W2, in nanomaggies (AB magnitude 22.5 - 2.5 log10 f, not corrected
for Milky-Way extinction, as in DESI's FIBERMAP) with their inverse variances:
``flux_g``/``flux_ivar_g``, ..., ``flux_w2``/``flux_ivar_w2`` (names are case-insensitive, so
DESI's ``FLUX_G``/``FLUX_IVAR_G`` are read as they are). One galaxy per file: constant columns
or keys of the table metadata (``FLUX_G``, ...); several: scalar columns, one value per row.
Any subset of the bands may be given (the others get ivar 0); without any, the galaxy has no
photometry (``Flag.NO_PHOTOMETRY`` from the posterior). A unit on a photometry column must be
convertible to nanomaggies (``nmgy``, ``mgy``) or to Jy (AB: 1 nanomaggy = 3.631e-6 Jy).

Distance (optional): ``luminosity_distance`` in Mpc (a column, one value per galaxy, or the
metadata key ``LUMINOSITY_DISTANCE`` for one galaxy), for nearby galaxies whose distance is
known better than from z (Cepheids, TRGB, a group's or a flow model's distance): it sets the
mass scale instead of the Hubble flow's d_L(z) (``Spectra.extra["LUMINOSITY_DISTANCE"]``).

Units: columns with astropy units are converted (wavelength to Angstrom, flux densities to
1e-17 erg/s/cm^2/A, with ivar scaled to match). Unitless columns are taken to be in those
units already. Wavelengths must be vacuum.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.table import MaskedColumn, Table

from sedvae.io.spectrum import (
    Z_RANGE,
    MissingHDUError,
    Spectra,
    SpectrumFileError,
    SpectrumFileNotFoundError,
)

FLUX_UNIT = u.Unit("1e-17 erg / (s cm2 Angstrom)")
# the photometric bands of a table, in the order the networks read them (as DESI_BANDS)
TABLE_BANDS = ("G", "R", "Z", "W1", "W2")
NANOMAGGY_JY = 3.631e-6  # AB: 1 nanomaggy = 1e-9 x 3631 Jy
_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))  # 2.3548


def _values(table: Table, name: str, unit: u.UnitBase | None, label: str) -> np.ndarray:
    """Column as float64 in ``unit`` (when it has a unit); empty (masked) cells become NaN,
    which validate() then masks, instead of whatever fill value the reader chose."""
    col = table[name]
    if isinstance(col, MaskedColumn):  # float first: an int column cannot hold NaN
        data = np.ma.asarray(col).astype(np.float64).filled(np.nan)
    else:
        data = np.asarray(col, dtype=np.float64)
    if unit is not None and getattr(col, "unit", None) is not None:
        try:
            return data * u.Unit(col.unit).to(unit)
        except u.UnitConversionError as err:
            raise SpectrumFileError(
                f"{label}: column {name!r} has unit {col.unit}, not convertible to {unit}"
            ) from err
    return data


def _flux_scale(table: Table, name: str) -> float:
    """Factor that takes column ``name`` to 1e-17 erg/s/cm^2/A (1 if it has no unit)."""
    unit = getattr(table[name], "unit", None)
    if unit is None:
        return 1.0
    try:
        return float(u.Unit(unit).to(FLUX_UNIT))
    except u.UnitConversionError as err:
        raise SpectrumFileError(
            f"column {name!r} has unit {unit}; sedvae needs a flux density per unit wavelength "
            f"(f_lambda) convertible to {FLUX_UNIT}"
        ) from err


def _as_mask(col: np.ndarray, label: str, name: str) -> np.ndarray:
    """Bad-pixel mask from a bool, integer (non-zero = bad) or text column (CSV writes bools as
    "True"/"False", and ``astype(bool)`` would make every non-empty string True)."""
    if col.dtype.kind in "SU":
        text = np.char.lower(np.char.strip(col.astype(str)))
        good, bad = np.isin(text, ("false", "0", "f", "")), np.isin(text, ("true", "1", "t"))
        if not np.all(good | bad):
            raise SpectrumFileError(f"{label}: column {name!r} has values that are not booleans")
        return bad
    return col.astype(bool)


def _phot_scale(table: Table, name: str, label: str, power: int = 1) -> float:
    """Factor that takes photometry column ``name`` to nanomaggies (``power`` -2: an inverse
    variance to nanomaggies^-2); 1 if it has no unit."""
    unit = getattr(table[name], "unit", None)
    if unit is None:
        return 1.0
    unit = u.Unit(unit)
    for target, factor in ((u.nmgy, 1.0), (u.Jy, 1.0 / NANOMAGGY_JY)):
        try:
            return float(unit.to(target**power)) * factor**power
        except u.UnitConversionError:
            continue
    raise SpectrumFileError(
        f"{label}: column {name!r} has unit {unit}; photometry must be in nanomaggies (or Jy)"
        + (", its inverse variance in their inverse square" if power != 1 else "")
    )


def _read_photometry(
    table: Table, cols: dict[str, str], single: bool, n: int, label: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """(n, 5) photometry and ivar (nanomaggies) from ``flux_<band>``/``flux_ivar_<band>``
    columns (or, for a one-galaxy table, metadata keys); None when no band is given."""
    meta = {str(k).lower(): v for k, v in table.meta.items()}
    phot = np.zeros((n, len(TABLE_BANDS)))
    pivar = np.zeros((n, len(TABLE_BANDS)))
    found = False
    for b, band in enumerate(TABLE_BANDS):
        fkey, ikey = f"flux_{band.lower()}", f"flux_ivar_{band.lower()}"
        if (fkey in cols) != (ikey in cols) or (fkey in meta) != (ikey in meta):
            raise SpectrumFileError(
                f"{label}: photometry needs both {fkey!r} and {ikey!r} (nanomaggies and its "
                "inverse variance)"
            )
        if fkey in cols:
            scale = _phot_scale(table, cols[fkey], label)
            f = _values(table, cols[fkey], None, label) * scale
            if getattr(table[cols[ikey]], "unit", None) is not None:
                i = _values(table, cols[ikey], None, label) * _phot_scale(
                    table, cols[ikey], label, power=-2
                )
            else:  # a unitless ivar goes with the flux column's unit
                i = _values(table, cols[ikey], None, label) / scale**2
            if f.ndim != 1 or i.ndim != 1:
                raise SpectrumFileError(f"{label}: column {cols[fkey]!r} must be scalar per row")
            if single:
                same = all(np.array_equal(v, np.full_like(v, v[0]), equal_nan=True)
                           for v in (f, i)) if len(f) else True  # fmt: skip
                if not same:
                    raise SpectrumFileError(
                        f"{label}: column {cols[fkey]!r} is not constant in a 1-galaxy table"
                    )
                f, i = f[:1], i[:1]
        elif fkey in meta:
            f, i = np.atleast_1d(float(meta[fkey])), np.atleast_1d(float(meta[ikey]))
            if not single:
                raise SpectrumFileError(
                    f"{label}: photometry of several galaxies must be columns, not metadata"
                )
        else:
            continue
        found = True
        phot[:, b], pivar[:, b] = f, i
    return (phot, pivar) if found else None


def _read_distance(
    table: Table, cols: dict[str, str], single: bool, n: int, label: str
) -> np.ndarray | None:
    """(n,) luminosity distances in Mpc from a ``luminosity_distance`` column (or, for one
    galaxy, the metadata key); None when not given."""
    name = cols.get("luminosity_distance")
    meta = {str(k).lower(): v for k, v in table.meta.items()}
    if name is not None:
        d = _values(table, name, u.Mpc, label)
        if d.ndim != 1:
            raise SpectrumFileError(f"{label}: column {name!r} must be scalar per row")
        if single:
            if len(d) and not np.all(d == d[0]):
                raise SpectrumFileError(
                    f"{label}: column {name!r} is not constant in a 1-galaxy table"
                )
            d = d[:1]
    elif single and "luminosity_distance" in meta:
        d = np.atleast_1d(float(meta["luminosity_distance"]))
    else:
        return None
    if np.any(np.isfinite(d) & (d <= 0)):
        raise SpectrumFileError(f"{label}: luminosity_distance must be > 0 Mpc (NaN: from z)")
    return np.broadcast_to(d, (n,)).astype(np.float64)


def read_table(
    path: str | Path | Table,
    *,
    z: float | Sequence[float] | np.ndarray | None = None,
    format: str | None = None,
    wave_col: str = "wave",
    flux_col: str = "flux",
    ivar_col: str = "ivar",
    mask_col: str = "mask",
    z_col: str = "z",
    id_col: str = "id",
    lsf_sigma_col: str = "lsf_sigma",
    resolving_power_col: str = "resolving_power",
    instrument: str | None = None,
    z_range: tuple[float, float] = Z_RANGE,
    validate: bool = True,
) -> Spectra:
    """Read a table of one or several spectra into a :class:`Spectra`.

    Parameters
    ----------
    path : str, Path or astropy Table
        File read with ``Table.read(path, format=format)``, or a Table already in memory.
    z : float or (N,) array, optional
        Redshift(s); overrides the ``z_col`` column and the metadata. None found: NaN
        (flagged ``BAD_Z``).
    format : str, optional
        astropy format (``"fits"``, ``"ascii.ecsv"``, ``"ascii.csv"``); default guessed from
        the file name.
    wave_col, flux_col, ivar_col : str
        Required columns: wavelength (Angstrom, vacuum), flux (1e-17 erg/s/cm^2/A), inverse
        variance.
    mask_col, z_col, id_col, lsf_sigma_col, resolving_power_col : str
        Optional columns, used when present (case-insensitive match).
    instrument : str, optional
        ``meta["instrument"]``; default the table's ``INSTRUME`` keyword, else "table".
    z_range : (float, float)
        Supported redshifts.
    validate : bool
        Run :meth:`Spectra.validate` (batch mode).

    Returns
    -------
    Spectra
        ``flux``/``ivar``/``mask`` (N, M), ``lsf_sigma`` (N, M) Angstrom when a resolution
        column exists, ``ids`` from ``id_col`` (else 0..N-1, or the file stem for one galaxy),
        ``photometry``/``photometry_ivar`` (N, 5) nanomaggies (bands :data:`TABLE_BANDS`) when
        photometry columns exist (module docstring).
    """
    if isinstance(path, Table):
        table, label = path, "<table>"
    else:
        p = Path(path)
        if not p.is_file():
            raise SpectrumFileNotFoundError(f"spectrum table not found: {p}")
        try:
            table = Table.read(p, format=format)
        except Exception as err:  # astropy raises many types for an unreadable table
            raise SpectrumFileError(f"{p}: cannot be read as a table ({err})") from err
        label = str(p)

    cols = {c.lower(): c for c in table.colnames}

    def find(name: str, required: bool) -> str | None:
        if name.lower() in cols:
            return cols[name.lower()]
        if required:
            raise MissingHDUError(f"{label}: column {name!r} missing (columns: {table.colnames})")
        return None

    wname, fname, iname = (find(c, True) for c in (wave_col, flux_col, ivar_col))
    aname = find("arm", False)
    mname, zname, idname = (find(c, False) for c in (mask_col, z_col, id_col))
    sname, rname = find(lsf_sigma_col, False), find(resolving_power_col, False)
    if sname and rname:
        raise SpectrumFileError(f"{label}: both {sname!r} and {rname!r} given; keep one")

    wave = _values(table, wname, u.AA, label).astype(np.float64)
    scale = _flux_scale(table, fname)
    flux = _values(table, fname, None, label) * scale
    if getattr(table[iname], "unit", None) is not None:
        ivar = _values(table, iname, FLUX_UNIT**-2, label)
    else:  # a unitless ivar goes with the flux column's unit
        ivar = _values(table, iname, None, label) / scale**2
    mask = None if mname is None else _as_mask(np.asarray(table[mname]), label, mname)
    lsf_sigma = None
    if sname is not None:
        lsf_sigma = _values(table, sname, u.AA, label).astype(np.float64)

    flags = None
    single = flux.ndim == 1
    if single:  # rows are pixels: promote everything to (1, M)
        if wave.ndim != 1:
            raise SpectrumFileError(f"{label}: column {wname!r} must be scalar per pixel")
        flux, ivar = flux[None], ivar[None]
        mask = None if mask is None else mask[None]
        arm = None if aname is None else np.asarray(table[aname])
        if rname is not None:
            lsf_sigma = wave / (_values(table, rname, None, label) * _FWHM_PER_SIGMA)
        lsf_sigma = None if lsf_sigma is None else np.asarray(lsf_sigma)[None]
        if idname is not None:
            ids = np.asarray(table[idname])[:1]
        else:
            ids = np.asarray([label if isinstance(path, Table) else Path(path).stem])
        z_file = _single_z(table, zname, label)
    else:
        if flux.ndim != 2:
            raise SpectrumFileError(f"{label}: column {fname!r} has shape {flux.shape}")
        n, m = flux.shape
        arm = None if aname is None else np.asarray(table[aname])
        if arm is not None and arm.ndim == 2:
            if not np.all(arm == arm[:1]):
                raise SpectrumFileError(f"{label}: rows have different {aname!r} columns")
            arm = arm[0]
        if wave.ndim == 2:
            if wave.shape != (n, m):
                raise SpectrumFileError(
                    f"{label}: column {wname!r} shape {wave.shape} != {fname!r} shape {flux.shape}"
                )
            if not np.all(wave == wave[:1]):
                raise SpectrumFileError(
                    f"{label}: rows have different wavelength grids; sedvae does not resample "
                    "silently: put them on one grid, or read them as separate files"
                )
            wave = wave[0]
        if rname is not None:
            lsf_sigma = wave[None, :] / (_values(table, rname, None, label) * _FWHM_PER_SIGMA)
        ids = np.asarray(table[idname]) if idname is not None else np.arange(n)
        z_file = None if zname is None else np.asarray(table[zname], dtype=np.float64)
        if "flags" in cols:  # as written by write_table
            flags = np.asarray(table[cols["flags"]], dtype=np.int64)

    if z is not None:
        zs, z_src = z, "argument"
    elif z_file is not None:
        zs, z_src = z_file, f"column {zname!r}" if zname else "table meta"
    else:
        zs, z_src = np.nan, "none"
    n = flux.shape[0]
    zs = np.broadcast_to(np.asarray(zs, dtype=np.float64), (n,)).copy()
    phot = _read_photometry(table, cols, single, n, label)
    extra = {}
    distance = _read_distance(table, cols, single, n, label)
    if distance is not None:
        extra["LUMINOSITY_DISTANCE"] = distance
    arm_names: tuple[str, ...] = ()
    if arm is not None:
        arm = arm.astype(np.int64)
        named = str(table.meta.get("ARMS", "")).strip()
        n_arms = int(arm.max()) + 1 if arm.size else 0
        arm_names = tuple(named.split(",")) if named else tuple(str(a) for a in range(n_arms))

    spectra = Spectra(
        wave=wave,
        flux=flux,
        ivar=ivar,
        mask=mask,
        z=zs,
        ids=ids,
        arm=arm,
        arm_names=arm_names,
        lsf_sigma=lsf_sigma,
        photometry=None if phot is None else phot[0],
        photometry_ivar=None if phot is None else phot[1],
        bands=TABLE_BANDS if phot is not None else (),
        flags=flags,
        extra=extra,
        meta={
            **{k: v for k, v in table.meta.items() if isinstance(v, str | int | float)},
            "instrument": instrument or str(table.meta.get("INSTRUME", "table")),
            "source": label,
            "redshift_source": z_src,
        },
    )
    if validate:
        spectra.validate(z_range=z_range)
    return spectra


def _single_z(table: Table, zname: str | None, label: str) -> float | None:
    """z of a one-galaxy table: a constant column, else metadata z/Z/REDSHIFT, else None."""
    if zname is not None:
        zc = np.asarray(table[zname], dtype=np.float64)
        if len(zc) and not np.all(zc == zc[0]):
            raise SpectrumFileError(
                f"{label}: column {zname!r} is not constant in a 1-galaxy table"
            )
        return float(zc[0]) if len(zc) else None
    for key in ("z", "Z", "REDSHIFT", "redshift"):
        if key in table.meta:
            return float(table.meta[key])
    return None


def write_table(spectra: Spectra, path: str | Path, overwrite: bool = False) -> None:
    """Write spectra as a multi-row table (one row per galaxy) that :func:`read_table` reads.

    Columns ``id``, ``z``, ``flags``, ``wave``/``flux``/``ivar``/``mask`` (N, M), ``arm`` and
    ``lsf_sigma`` when present, with units, and the photometry of the bands
    :data:`TABLE_BANDS` that the spectra have (``flux_<band>``, ``flux_ivar_<band>``,
    nanomaggies, unitless columns) and ``luminosity_distance`` (Mpc) when ``spectra.extra`` has
    it. The format follows the file name (``.fits``, ``.ecsv``).
    DESI resolution matrices are not written (use the FITS files).
    """
    n, m = spectra.flux.shape
    # INSTRUME: the standard FITS keyword (8 characters, so no HIERARCH card)
    table = Table(meta={"INSTRUME": str(spectra.meta.get("instrument", "table"))})
    table["id"] = spectra.ids
    table["z"] = spectra.z
    table["flags"] = spectra.flags
    table["wave"] = np.broadcast_to(spectra.wave, (n, m)) * u.AA
    table["flux"] = spectra.flux * FLUX_UNIT
    table["ivar"] = spectra.ivar * FLUX_UNIT**-2
    table["mask"] = spectra.mask
    if spectra.lsf_sigma is not None:
        table["lsf_sigma"] = spectra.lsf_sigma * u.AA
    if spectra.arm is not None:
        table["arm"] = np.broadcast_to(spectra.arm, (n, m))
        table.meta["ARMS"] = ",".join(spectra.arm_names)
    if spectra.photometry is not None:
        names = [str(b).upper() for b in spectra.bands]
        if len(names) != spectra.photometry.shape[1]:
            raise ValueError(
                f"spectra.bands {spectra.bands} do not name the {spectra.photometry.shape[1]} "
                "photometry columns"
            )
        for band in TABLE_BANDS:
            if band in names:
                k = names.index(band)
                table[f"flux_{band.lower()}"] = spectra.photometry[:, k]
                table[f"flux_ivar_{band.lower()}"] = spectra.photometry_ivar[:, k]
    if "LUMINOSITY_DISTANCE" in spectra.extra:
        table["luminosity_distance"] = np.asarray(spectra.extra["LUMINOSITY_DISTANCE"]) * u.Mpc
    table.write(Path(path), overwrite=overwrite)
