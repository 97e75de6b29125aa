"""Catalog-scale inference with Lightning ``predict``: shards, an atomic prediction writer, resume.

The galaxies of a run are cut into fixed shards (shard ``s`` = galaxies ``[s K, (s+1) K)`` of
the input list). A dataset item is a whole shard, so that:

- a finished shard is one file (``shards/shard_<s>.fits``), written to a temporary name, fsynced
  and renamed (``sedvae.fileio.atomic_path``), so that an interrupted run leaves only whole
  shards behind;
- a rerun skips the shards already on disk (resume) and never writes a galaxy twice; a shard
  file that is empty or truncated (a copy cut short, a full disk) is named and recomputed;
- under DDP (``trainer.strategy=ddp``, any number of devices or nodes) Lightning's distributed
  sampler deals the shards to the ranks; the padding it adds for uneven splits only recomputes a
  shard, whose file is then atomically replaced by an identical one.

``merge_shards`` concatenates the shard files, in galaxy order, into ``catalog.fits``.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from astropy.table import Table, vstack
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import Dataset

from ..fileio import atomic_path
from ..timing import stage

log = logging.getLogger(__name__)
SHARD_PATTERN = re.compile(r"^shard_(\d{6})\.fits$")


class CatalogError(ValueError):
    """A catalog run's files (shards, manifest, outputs) are unusable or do not belong to this
    run; the message names the file and what to do."""


def shard_path(folder: Path, shard: int) -> Path:
    return Path(folder) / f"shard_{shard:06d}.fits"


def shard_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a whole shard file: a FITS table whose data the file holds in full
    (read from the headers; the table itself is not loaded)."""
    from astropy.io import fits

    path = Path(path)
    try:
        size = path.stat().st_size
        with warnings.catch_warnings(), fits.open(path, memmap=False, lazy_load_hdus=True) as h:
            warnings.simplefilter("ignore")
            if len(h) < 2 or not isinstance(h[1], fits.BinTableHDU):
                return False
            info = h[1].fileinfo()
            return info["datLoc"] + info["datSpan"] <= size
    except Exception:  # astropy raises many types for a cut or foreign file
        return False


def finished_shards(folder: str | os.PathLike) -> set[int]:
    """Shard ids already written whole in ``folder``; temporary files are ignored, and a shard
    file that is empty or truncated is logged by name and left out (so it is recomputed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return set()
    done = set()
    for p in sorted(folder.iterdir()):
        if m := SHARD_PATTERN.match(p.name):
            if shard_complete(p):
                done.add(int(m.group(1)))
            else:
                log.warning("%s is empty or truncated: recomputing that shard", p)
    return done


class ShardDataset(Dataset):
    """Items are shards of ``n_items`` galaxies: ``load(start, stop)`` returns the batch dict of
    galaxies ``[start, stop)`` (tensors with a leading galaxy axis), to which the dataset adds
    ``shard`` (int) and ``index`` (galaxy positions in the run).

    Parameters
    ----------
    n_items : number of galaxies in the run.
    load : callable(start, stop) -> dict of tensors/arrays for those galaxies.
    shard_size : galaxies per shard (the resume unit; also the inference batch).
    skip : shard ids to leave out (already finished).
    """

    def __init__(
        self,
        n_items: int,
        load: Callable[[int, int], dict[str, Any]],
        shard_size: int = 256,
        skip: set[int] | None = None,
    ):
        if n_items <= 0 or shard_size <= 0:
            raise ValueError(
                f"n_items and shard_size must be positive; got {n_items}, {shard_size}"
            )
        self.n_items, self.load, self.shard_size = int(n_items), load, int(shard_size)
        n_shards = -(-self.n_items // self.shard_size)
        self.todo = [s for s in range(n_shards) if s not in (skip or set())]
        self.n_shards = n_shards

    def __len__(self) -> int:
        return len(self.todo)

    @property
    def n_galaxies_todo(self) -> int:
        """Galaxies in the shards still to run (the last shard may be short)."""
        return sum(min(self.shard_size, self.n_items - s * self.shard_size) for s in self.todo)

    def __getitem__(self, i: int) -> dict[str, Any]:
        shard = self.todo[i]
        start = shard * self.shard_size
        stop = min(start + self.shard_size, self.n_items)
        batch = dict(self.load(start, stop))
        batch["shard"] = shard
        batch["index"] = torch.arange(start, stop)
        return batch


def _to_column(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


class ShardWriter(BasePredictionWriter):
    """Write each predicted shard to ``<folder>/shard_<s>.fits`` atomically.

    ``predict_step`` returns a dict of per-galaxy columns (leading axis = galaxies of the shard)
    and the key ``shard``; every other key becomes a column of the shard table.
    """

    def __init__(self, folder: str | os.PathLike):
        super().__init__(write_interval="batch")
        self.folder = Path(folder)

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        with stage("write"):
            write_shard(self.folder, int(prediction["shard"]), prediction)


def write_shard(folder: str | os.PathLike, shard: int, columns: dict[str, Any]) -> Path:
    """Write one shard table atomically (temporary file in the same folder, fsync, rename)."""
    table = Table({k: _to_column(v) for k, v in columns.items() if k != "shard"})
    final = shard_path(Path(folder), shard)
    try:
        with atomic_path(final) as tmp:
            table.write(tmp, format="fits", overwrite=True)
    except OSError as err:
        raise CatalogError(f"{final}: cannot write the shard ({err})") from err
    return final


def read_shard(path: str | os.PathLike) -> Table:
    """A shard table, or CatalogError naming the file when it is not one."""
    try:
        return Table.read(path, format="fits")
    except Exception as err:  # astropy raises ValueError, OSError, TypeError, ... here
        raise CatalogError(
            f"{path}: not a readable shard ({type(err).__name__}: {err}); delete it and rerun "
            "to recompute that shard"
        ) from err


def merge_shards(
    folder: str | os.PathLike, n_shards: int, out: str | os.PathLike | None = None
) -> Table:
    """Concatenate shards 0..n_shards-1 into one table sorted by galaxy ``index`` and write it
    atomically to ``out`` (when given); raises if a shard is missing or unreadable
    (CatalogError naming it) or a galaxy appears twice."""
    folder = Path(folder)
    missing = [s for s in range(n_shards) if not shard_path(folder, s).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: shards {missing[:10]} are missing; rerun to finish them"
        )
    table = vstack([read_shard(shard_path(folder, s)) for s in range(n_shards)], join_type="exact")
    order = np.argsort(table["index"], kind="stable")
    table = table[order]
    if len(np.unique(table["index"])) != len(table):
        raise ValueError(f"{folder}: a galaxy appears in two shards")
    if out is not None:
        with atomic_path(out) as tmp:
            table.write(tmp, format="fits", overwrite=True)
    return table
