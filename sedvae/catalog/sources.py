"""Survey files as a source of model-ready batches, loaded shard by shard.

``SpectraSource(kind, path)`` indexes every galaxy of the files (``kind`` in desi, sdss, table;
``path`` a file, a glob or a list) without loading their spectra, then ``source(start, stop)``
reads the galaxies of one shard and returns the batch dict the networks take::

    flux, ivar (n, M) float32 1e-17 erg/s/cm^2/A; mask (n, M) bool (True = bad); z (n,);
    photometry, photometry_ivar (n, nb) nanomaggies; flags (n,) int (sedvae.io.SpecFlag bits);
    ids (n,) TARGETID or name; ``wave`` (M,) Angstrom and ``arm`` (M,) (DESI) the pixel grid;
    plus ``resolution`` (n, 11, M) for DESI, ``lsf_sigma`` (n, M) Angstrom for SDSS and tables
    with a resolution column. Files on different grids: :func:`combine_batches`.

A bad galaxy (NaN flux, no valid pixel, redshift outside the supported range, ZWARN) is flagged
by ``Spectra.validate`` and passed on with its flag, so one bad spectrum never stops a batch.
"""

from __future__ import annotations

import glob
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import SpectrumFileNotFoundError, read_spectra
from ..io.batch import Z_RANGE
from ..timing import stage


def expand_paths(paths: str | os.PathLike | list) -> list[Path]:
    """A file, a glob pattern or a list of either -> sorted existing files (clear error if none)."""
    # a str or path is one item; any other sequence (list, tuple, Hydra's ListConfig) is many
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    out: list[Path] = []
    for item in items:
        matches = (
            sorted(glob.glob(str(item))) if any(c in str(item) for c in "*?[") else [str(item)]
        )
        if not matches:
            raise FileNotFoundError(f"no file matches {item}")
        for m in matches:
            if Path(m).is_dir():
                what = "an empty directory" if not any(Path(m).iterdir()) else "a directory"
                raise SpectrumFileNotFoundError(
                    f"{m} is {what}, not a spectrum file: give a file, a list or a glob "
                    f"such as {Path(m) / '*.fits'}"
                )
            if not Path(m).is_file():
                raise SpectrumFileNotFoundError(f"{m}: no such file")
            out.append(Path(m))
    return out


def _count_rows(kind: str, path: Path) -> int:
    """Galaxies in one file, from its headers (DESI: the FIBERMAP rows) without the spectra."""
    from ..io.fits import hdu_data, open_fits

    if kind == "sdss":
        return 1
    if kind == "desi":
        with open_fits(path) as hdul:
            return len(hdu_data(hdul, "FIBERMAP", path))
    return len(read_spectra("table", path, validate=False).z)


class SpectraSource:
    """Index of the galaxies in survey files; ``__call__(start, stop)`` loads a shard.

    Parameters
    ----------
    kind : ``desi``, ``sdss`` or ``table`` (see ``sedvae.io.read_spectra``).
    path : file, glob pattern or list of them.
    z_range : redshifts outside it are flagged (the model's supported range).
    prefetch : read the next file in a background thread while the current one is fitted
        (reading overlaps inference; at most two files are in memory). Batches are the same.
    aperture : the fraction of each galaxy's light its spectrum holds, when known: 1 for a
        spectrum of the whole galaxy (a summed IFU cube, a long slit across it, a stack);
        None (default) for a fibre of unknown coverage. Given to every galaxy as
        ``declared_aperture``; the posterior conditions logM* on it where there is no
        photometry (``sedvae.posterior.api.aperture_shift``).
    **reader_kwargs : passed to the reader (e.g. ``redrock=...`` or ``z=...`` for DESI).
    """

    def __init__(
        self,
        kind: str,
        path,
        z_range: tuple[float, float] = Z_RANGE,
        prefetch: bool = True,
        aperture: float | None = None,
        **reader_kwargs,
    ):
        if aperture is not None and not 0.0 < float(aperture) <= 1.0:
            raise ValueError(
                f"aperture is the fraction of the galaxy's light in the spectrum, in (0, 1]; "
                f"got {aperture}"
            )
        self.aperture = None if aperture is None else float(aperture)
        self.kind = kind
        self.prefetch = bool(prefetch)
        self._pending: tuple[int, Future] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.files = expand_paths(path)
        self.z_range = tuple(z_range)
        self.reader_kwargs = reader_kwargs
        counts = [_count_rows(kind, p) for p in self.files]
        if kind == "desi" and reader_kwargs.get("z") is None:
            self._check_redshifts()
        self.file_of = np.repeat(np.arange(len(self.files)), counts)
        self.row_of = np.concatenate([np.arange(c) for c in counts]) if counts else np.zeros(0, int)
        self._cache: tuple[int, Any] | None = None

    def __len__(self) -> int:
        return len(self.file_of)

    def manifest(self) -> dict[str, Any]:
        """The files and reader settings of this source (see ``sedvae.catalog.manifest``)."""
        from .manifest import describe_value, file_record

        files = []
        for k, p in enumerate(self.files):
            record = {**file_record(p), "rows": int((self.file_of == k).sum())}
            if self.kind == "desi" and self.reader_kwargs.get("redrock") == "auto":
                beside = _redrock_beside(p)
                record["redrock"] = None if beside is None else file_record(beside)
            files.append(record)
        reader = {k: describe_value(v) for k, v in sorted(self.reader_kwargs.items())}
        return {"kind": self.kind, "files": files, "z_range": list(self.z_range),
                "aperture": self.aperture, "reader": reader}  # fmt: skip

    def _check_redshifts(self) -> None:
        """A coadd without redshifts would flag every galaxy BAD_Z and end 'successfully'
        with an empty catalog: refuse it at once, naming the file and the ways to give them."""
        redrock = self.reader_kwargs.get("redrock")
        how = "give its redrock file (redrock=<path>) or redshifts (z=<value or TARGETID,Z table>)"
        if redrock is None:
            raise SpectrumFileNotFoundError(f"{self.files[0]}: no redshifts given; {how}")
        if redrock == "auto":
            for p in self.files:
                if _redrock_beside(p) is None:
                    raise SpectrumFileNotFoundError(
                        f"{p}: no redshifts: no redrock file beside it ({_redrock_name(p).name}); "
                        + how
                    )

    def _read(self, file_index: int):
        if self._cache is None or self._cache[0] != file_index:
            self._cache = None  # free the previous file before holding another
            self._cache = (file_index, self._take_or_load(file_index))
            if self.prefetch and file_index + 1 < len(self.files):
                self._start_prefetch(file_index + 1)
        return self._cache[1]

    def _load(self, file_index: int):
        """Read and validate one whole file (the reader's ``Spectra``)."""
        path = self.files[file_index]
        kwargs = dict(self.reader_kwargs)
        if self.kind == "desi" and kwargs.get("redrock") == "auto":
            # user redshifts win over the redrock file beside the coadd
            kwargs["redrock"] = None if kwargs.get("z") is not None else _redrock_beside(path)
        return read_spectra(self.kind, path, z_range=self.z_range, **kwargs)

    def _take_or_load(self, file_index: int):
        """The prefetched file if it is the one wanted (errors surface here), else a read."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == file_index:
            return pending[1].result()
        if pending is not None:
            pending[1].cancel()
        return self._load(file_index)

    def _start_prefetch(self, file_index: int) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="sedvae-read")
        self._pending = (file_index, self._pool.submit(self._load, file_index))

    def __getstate__(self) -> dict:
        # threads and futures stay in their process (DataLoader workers, spawned ranks)
        state = dict(self.__dict__)
        state.update(_pool=None, _pending=None, _cache=None)
        return state

    def spectra(self, start: int, stop: int):
        """The ``sedvae.io.Spectra`` of galaxies [start, stop) (one per file they span)."""
        parts = []
        for f in np.unique(self.file_of[start:stop]):
            rows = self.row_of[start:stop][self.file_of[start:stop] == f]
            parts.append(self._read(int(f)).select(rows))
        return parts

    def __call__(self, start: int, stop: int) -> dict[str, Any]:
        with stage("read"):
            batches = [to_batch(s) for s in self.spectra(start, stop)]
            if any("luminosity_distance" in b for b in batches):  # NaN: from z
                for b in batches:
                    if "luminosity_distance" not in b:
                        b["luminosity_distance"] = torch.full(
                            (len(b["z"]),), torch.nan, dtype=torch.float64
                        )
            out = combine_batches(batches)
            if self.aperture is not None:
                for part in out.get("parts", [out]):
                    part["declared_aperture"] = torch.full((len(part["z"]),), self.aperture)
            return out


def _redrock_name(path: Path) -> Path:
    return path.with_name(path.name.replace("coadd-", "redrock-", 1))


def _redrock_beside(path: Path) -> Path | None:
    candidate = _redrock_name(path)
    return candidate if candidate != path and candidate.is_file() else None


def _concat(values: list):
    if isinstance(values[0], torch.Tensor):
        return torch.cat(values)
    return np.concatenate(values)


# per-galaxy entries of a SpectrumBatch that the catalog's loader concatenates across files
GALAXY_KEYS = ("flux", "ivar", "mask", "z", "flags", "ids", "photometry", "photometry_ivar",
               "resolution", "lsf_sigma")  # fmt: skip
# the pixel grid of a batch: the networks bin any grid onto their rest-frame bins, and the
# autoencoder and the posterior-predictive check observe their models on it
GRID_KEYS = ("wave", "arm")
PIXEL_KEYS = ("flux", "ivar", "mask", "lsf_sigma")  # (n, M) entries on the grid
SDSS_DLOGLAM = 1e-4  # the SDSS/BOSS lattice: loglam = k * 1e-4 for every spec file
_LATTICE_TOL = 0.05  # pixels (float32 loglam errs by < 0.005 pixel)


def to_batch(spectra) -> dict[str, Any]:
    """A validated ``Spectra`` -> the entries of its :class:`sedvae.io.SpectrumBatch`
    (``Spectra.to_batch``) the catalog reads: the per-galaxy ones and the pixel grid."""
    batch = spectra.to_batch(dtype=torch.float32)
    out = {key: batch[key] for key in GALAXY_KEYS + GRID_KEYS if key in batch}
    if "LUMINOSITY_DISTANCE" in spectra.extra:  # a table's distance column (Mpc)
        out["luminosity_distance"] = torch.as_tensor(
            np.asarray(spectra.extra["LUMINOSITY_DISTANCE"], dtype=np.float64)
        )
    return out


def _lattice(wave: torch.Tensor) -> torch.Tensor | None:
    """Integer positions k of pixels on the SDSS 1e-4 dex lattice, or None when off it."""
    k = torch.log10(wave.double()) / SDSS_DLOGLAM
    k_int = torch.round(k).long()
    on = bool(((k - k_int).abs() < _LATTICE_TOL).all()) and bool((torch.diff(k_int) == 1).all())
    return k_int if on else None


def combine_batches(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """One shard's batch from the batches of the files it spans (in file order).

    Files on one grid (DESI coadds; tables written on one grid) are concatenated as they are.
    Files on different grids of the SDSS 1e-4 dex log-lambda lattice (every SDSS/BOSS spec
    file; they differ in where they start and end) are placed on the union of their lattice
    pixels, those a file lacks masked with ivar = 0: exact, as the readers do for several
    files (no pixel is interpolated, the chi^2 and the rest-frame bins see the same data),
    and the shard stays one batch. Any other mix of grids cannot be padded exactly: the
    shard then comes as ``{"parts": [batch per run of files on one grid, ...]}``, which the
    catalog's fitter runs part by part.
    """
    groups: list[list[dict[str, Any]]] = []
    for b in batches:
        last = groups[-1][0] if groups else None
        if last is not None and _same_grid(last, b):
            groups[-1].append(b)
        else:
            groups.append([b])
    merged = [_concat_batches(g) for g in groups]
    if len(merged) == 1:
        return merged[0]
    lattices = [_lattice(m["wave"]) if "arm" not in m else None for m in merged]
    if all(k is not None for k in lattices):
        return _pad_to_lattice(merged, lattices)
    return {"parts": merged}


def _same_grid(a: dict[str, Any], b: dict[str, Any]) -> bool:
    from ..physics.restframe import same_grid

    if ("wave" in a) != ("wave" in b):
        return False
    return "wave" not in a or same_grid(a["wave"], a.get("arm"), b["wave"], b.get("arm"))


def _concat_batches(batches: list[dict[str, Any]]) -> dict[str, Any]:
    out = {k: _concat([b[k] for b in batches]) for k in batches[0] if k not in GRID_KEYS}
    out.update({k: batches[0][k] for k in GRID_KEYS if k in batches[0]})
    return out


def _pad_to_lattice(batches: list[dict[str, Any]], lattices: list[torch.Tensor]) -> dict:
    """Batches on pieces of the SDSS lattice -> one batch on the union (see
    :func:`combine_batches`); LSF sigma is extended by the edge values (masked pixels)."""
    k_lo = min(int(k[0]) for k in lattices)
    k_hi = max(int(k[-1]) for k in lattices)
    m = k_hi - k_lo + 1
    out: dict[str, Any] = {}
    for key in batches[0]:
        if key in GRID_KEYS:
            continue
        if key not in PIXEL_KEYS:
            out[key] = _concat([b[key] for b in batches])
            continue
        if not all(key in b for b in batches):
            if key == "lsf_sigma":  # not every file has wdisp: the default LSF for all
                continue
            raise KeyError(key)
        rows = []
        for b, k in zip(batches, lattices, strict=True):
            v = b[key]
            s0 = int(k[0]) - k_lo
            pad = (s0, m - s0 - v.shape[-1])
            if key == "mask":
                v = torch.nn.functional.pad(v, pad, value=True)
            elif key == "lsf_sigma":
                v = torch.nn.functional.pad(v[:, None], pad, mode="replicate")[:, 0]
            else:
                v = torch.nn.functional.pad(v, pad, value=0.0)
            rows.append(v)
        out[key] = torch.cat(rows)
    out["wave"] = 10.0 ** (torch.arange(k_lo, k_hi + 1, dtype=torch.float64) * SDSS_DLOGLAM)
    return out


class MockSource:
    """Mock DESI BGS galaxies (``sedvae.simulation.write_mocks`` files) as a catalog source, with
    noise fixed by ``noise_seed`` and the truth (``theta``) in every batch, for coverage and
    recovery plots. A missing file is written first (``n`` galaxies from ``seed``); an existing
    file made with another ``n`` or ``seed`` is refused (CatalogError), never silently used."""

    kind = "mock"

    def __init__(self, path, n: int = 256, seed: int = 3, noise_seed: int = 0):
        import h5py

        from ..autoencoder.data import MockDataset
        from ..simulation import desi_noise_model, write_mocks
        from .shards import CatalogError

        path = Path(path)
        if not path.is_file():
            write_mocks(path, n=n, seed=seed)
        with h5py.File(path, "r") as f:
            made = {"n": f.attrs.get("n"), "seed": f.attrs.get("seed")}
        if made != {"n": n, "seed": seed}:
            raise CatalogError(
                f"{path} holds mocks made with n={made['n']}, seed={made['seed']}; asked for "
                f"n={n}, seed={seed}. Give a file name of its own for these settings (the "
                "default name has them in it), or delete the file to write it anew"
            )
        self.path, self.seed, self.noise_seed = path, int(seed), int(noise_seed)
        self.dataset = MockDataset(
            path, desi_noise_model(), fixed_noise_seed=noise_seed, truth=True
        )

    def manifest(self) -> dict[str, Any]:
        from .manifest import file_record

        return {"kind": self.kind, "file": file_record(self.path), "n": len(self),
                "seed": self.seed, "noise_seed": self.noise_seed}  # fmt: skip

    def __len__(self) -> int:
        return len(self.dataset)

    def __call__(self, start: int, stop: int) -> dict[str, Any]:
        items = [self.dataset[i] for i in range(start, stop)]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        batch["mask"] = batch["mask"].bool()
        batch["flags"] = torch.zeros(stop - start, dtype=torch.int64)
        batch["ids"] = np.arange(start, stop)
        return batch
