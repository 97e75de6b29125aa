"""FITS access shared by the readers: every failure names the file and the HDU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from sedvae.io.spectrum import MissingHDUError, SpectrumFileError, SpectrumFileNotFoundError


def open_fits(path: str | Path) -> fits.HDUList:
    """Open a FITS file (memory-mapped), with sedvae's errors for a missing or broken file."""
    path = Path(path)
    if not path.is_file():
        raise SpectrumFileNotFoundError(f"spectrum file not found: {path}")
    try:
        return fits.open(path, memmap=True)
    except OSError as err:  # astropy raises OSError for a non-FITS or truncated file
        raise SpectrumFileError(f"{path}: not a readable FITS file ({err})") from err


def get_hdu(hdul: fits.HDUList, name: str, path: str | Path):
    """The HDU called ``name``, or MissingHDUError naming the file and the HDUs present."""
    if name in hdul:
        return hdul[name]
    present = [h.name for h in hdul]
    raise MissingHDUError(f"{path}: HDU {name!r} is missing (HDUs present: {present})")


def read_data(hdu, path: str | Path, name: str):
    """``hdu.data``, or SpectrumFileError naming the file and HDU when the file is cut short
    (numpy's bare "buffer is too small for requested array" TypeError) or corrupt."""
    try:
        return hdu.data
    except (TypeError, ValueError, OSError) as err:
        raise SpectrumFileError(
            f"{path}: HDU {name!r} cannot be read, the file is truncated or corrupt ({err})"
        ) from err


def hdu_data(hdul: fits.HDUList, name: str, path: str | Path, ndim: int | None = None):
    """Data of HDU ``name``, checked for presence and dimensionality."""
    data = read_data(get_hdu(hdul, name, path), path, name)
    if data is None:
        raise SpectrumFileError(f"{path}: HDU {name!r} has no data")
    if ndim is not None and np.ndim(data) != ndim:
        raise SpectrumFileError(
            f"{path}: HDU {name!r} has {np.ndim(data)} dimensions {np.shape(data)}, expected {ndim}"
        )
    return data


def column(table, name: str, path: str | Path, hdu: str, required: bool = True):
    """Column ``name`` (case-insensitive) of a FITS table, or None if optional and absent."""
    names = {n.upper(): n for n in table.columns.names}
    if name.upper() in names:
        return np.asarray(table[names[name.upper()]])
    if required:
        raise MissingHDUError(
            f"{path}: column {name!r} missing from HDU {hdu!r} (columns: {table.columns.names})"
        )
    return None


def native(a: np.ndarray, dtype) -> np.ndarray:
    """A native-endian copy (FITS is big-endian; torch and numba reject that)."""
    return np.array(a, dtype=dtype, copy=True)
