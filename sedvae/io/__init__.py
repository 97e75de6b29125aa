"""Spectrum readers: DESI coadds, SDSS/BOSS spec files and generic tables -> :class:`Spectra`.

Every reader returns a validated :class:`Spectra` (bad pixels masked with ivar = 0, problem
galaxies flagged with :class:`Flag` bits, nothing raised for a batch) and raises
:class:`SpectrumFileError` (a ``ValueError``; :class:`MissingHDUError` is also a ``KeyError``,
:class:`SpectrumFileNotFoundError` also a ``FileNotFoundError``) naming the file and the HDU
when a file does not follow its data model. :class:`SpectrumBatch` (``Spectra.to_batch()``) is
the torch batch every network reads; its ``clean()`` is the one validator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sedvae.io.batch import FATAL, Z_RANGE, Flag, SpectrumBatch
from sedvae.io.desi import (
    DESI_ARMS,
    DESI_BANDS,
    desi_filter_names,
    desi_resolution_matrix,
    read_desi_coadd,
)
from sedvae.io.sdss import DLOGLAM, read_sdss_spec
from sedvae.io.spectrum import (
    MissingHDUError,
    SpecFlag,
    Spectra,
    SpectrumFileError,
    SpectrumFileNotFoundError,
)
from sedvae.io.synthetic import spectrum_photometry
from sedvae.io.table import read_table, write_table

_READERS = {"desi": read_desi_coadd, "sdss": read_sdss_spec, "table": read_table}


def read_spectra(kind: str, path: str | Path | Any, **kwargs: Any) -> Spectra:
    """Read spectra with the reader for ``kind``.

    Parameters
    ----------
    kind : {"desi", "sdss", "table"}
        :func:`read_desi_coadd`, :func:`read_sdss_spec` or :func:`read_table`.
    path : path (or list of paths for "sdss", Table for "table")
    **kwargs
        Passed to the reader (e.g. ``redrock=``, ``z=``, ``targetids=``).
    """
    try:
        reader = _READERS[kind.lower()]
    except KeyError:
        raise ValueError(
            f"unknown spectrum kind {kind!r}; expected one of {sorted(_READERS)}"
        ) from None
    return reader(path, **kwargs)


__all__ = [
    "DESI_ARMS",
    "DESI_BANDS",
    "DLOGLAM",
    "FATAL",
    "Z_RANGE",
    "Flag",
    "MissingHDUError",
    "SpecFlag",
    "Spectra",
    "SpectrumBatch",
    "SpectrumFileError",
    "SpectrumFileNotFoundError",
    "desi_filter_names",
    "desi_resolution_matrix",
    "read_desi_coadd",
    "read_sdss_spec",
    "read_spectra",
    "read_table",
    "spectrum_photometry",
    "write_table",
]
