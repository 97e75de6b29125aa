"""Simulated spectra for emulator training: the HDF5 files of ``python -m sedvae.simulation``.

Layout read (see ``sedvae.simulation``): ``theta`` (N, 12) float32, ``z`` (N,) float32, ``wave``
(L,) float64 rest-frame Angstrom, ``lum`` (N, L) float32 rest-frame L_lambda per unit formed
mass (L_sun/A/M_sun), attributes ``seed``, ``n``, ``z_min``, ``z_max``.

Split: the rows are independent prior draws, so the last ``val_fraction`` of them are the
validation set and the first rows the training set; contiguous blocks keep HDF5 reads fast.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

READ_ROWS = 1024  # rows per HDF5 read when loading into memory or fitting the PCA


class SimulationDataset(Dataset):
    """Rows ``[start, stop)`` of a simulation file as dicts of tensors.

    ``theta`` (12,), ``z`` (), ``lum`` (L,) on the columns ``cols`` (a slice of the file's
    wavelengths). Lazy by default: the file is opened on first access in each process, so the
    dataset pickles to DataLoader workers; ``in_memory`` reads the rows once (fast training on
    few cores; ~40 kB per spectrum).
    """

    def __init__(self, path: str | Path, start: int, stop: int, cols: slice, in_memory: bool):
        self.path = Path(path)
        self.start, self.stop, self.cols = int(start), int(stop), cols
        self._file: h5py.File | None = None
        self._memory: dict[str, torch.Tensor] | None = None
        if in_memory:
            parts = list(zip(*self.chunks(), strict=True))  # read while _memory is still None
            self._memory = {
                k: torch.cat(v) for k, v in zip(("theta", "z", "lum"), parts, strict=True)
            }

    def __len__(self) -> int:
        return self.stop - self.start

    def _h5(self) -> h5py.File:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return self._file

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None  # h5py handles do not cross process boundaries
        return state

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self._memory is not None:
            return {k: v[i] for k, v in self._memory.items()}
        f, row = self._h5(), self.start + i
        return {
            "theta": torch.from_numpy(f["theta"][row]),
            "z": torch.tensor(f["z"][row]),
            "lum": torch.from_numpy(f["lum"][row, self.cols]),
        }

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """A whole batch at once (the DataLoader calls this instead of per-row reads): one
        gather in memory, or one sorted HDF5 read."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices outside [0, {len(self)})")
        if self._memory is not None:
            return {k: v[idx] for k, v in self._memory.items()}
        rows, inverse = torch.unique(idx + self.start, return_inverse=True)  # h5py: increasing
        f, rows = self._h5(), rows.numpy()
        return {
            "theta": torch.from_numpy(f["theta"][rows])[inverse],
            "z": torch.from_numpy(f["z"][rows])[inverse],
            "lum": torch.from_numpy(f["lum"][rows, self.cols])[inverse],
        }

    def chunks(self, max_rows: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
        """Contiguous (theta, z, lum) blocks of up to ``READ_ROWS`` rows, from ``start``."""
        stop = self.stop if max_rows is None else min(self.stop, self.start + max_rows)
        if self._memory is not None:
            for a in range(0, stop - self.start, READ_ROWS):
                b = min(a + READ_ROWS, stop - self.start)
                yield self._memory["theta"][a:b], self._memory["z"][a:b], self._memory["lum"][a:b]
            return
        with h5py.File(self.path, "r") as f:
            for a in range(self.start, stop, READ_ROWS):
                b = min(a + READ_ROWS, stop)
                yield (
                    torch.from_numpy(f["theta"][a:b]),
                    torch.from_numpy(f["z"][a:b]),
                    torch.from_numpy(f["lum"][a:b, self.cols]),
                )


def _already_batched(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


class SimulationDataModule(pl.LightningDataModule):
    """Train/validation split of one simulation file, created by ``simulate_to_hdf5`` if missing.

    Parameters
    ----------
    path : HDF5 file written by ``python -m sedvae.simulation``
    n, seed, z_max : used only to create a missing file (``simulate_to_hdf5(path, n, seed,
        z_max=z_max)``); an existing file is used as it is.
    val_fraction : fraction of the rows held out for validation (the last rows).
    wave_min, wave_max : rest-frame range (Angstrom) of the ``lum`` columns served; must cover
        the emulator's segments.
    batch_size, num_workers : DataLoader settings.
    in_memory : read the split into memory once (recommended on CPUs: per-row HDF5 reads cost
        as much as a training step); otherwise rows are read lazily, also from workers.
    """

    def __init__(
        self,
        path: str,
        n: int | None = None,
        seed: int = 0,
        z_max: float = 0.6,
        val_fraction: float = 0.1,
        wave_min: float = 2000.0,
        wave_max: float = 60000.0,
        batch_size: int = 256,
        num_workers: int = 0,
        in_memory: bool = True,
    ):
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1); got {val_fraction}")
        self.path = Path(path)
        self.n, self.seed, self.z_max_create = n, seed, z_max
        self.val_fraction = val_fraction
        self.wave_min, self.wave_max = float(wave_min), float(wave_max)
        self.batch_size, self.num_workers, self.in_memory = batch_size, num_workers, in_memory
        self.train_set: SimulationDataset | None = None
        self.val_set: SimulationDataset | None = None

    def prepare_data(self) -> None:
        if self.path.exists():
            return
        if self.n is None:
            raise FileNotFoundError(
                f"{self.path} does not exist; make it with `python -m sedvae.simulation n=... "
                f"out={self.path}` or give data.n to create it"
            )
        from ..simulation.writer import simulate_to_hdf5

        log.info("simulating %d spectra into %s", self.n, self.path)
        simulate_to_hdf5(self.path, self.n, self.seed, z_max=self.z_max_create, progress=False)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        with h5py.File(self.path, "r") as f:
            missing = [k for k in ("theta", "z", "wave", "lum") if k not in f]
            if missing:
                raise KeyError(f"{self.path}: datasets {missing} missing (not a simulation file)")
            wave = np.asarray(f["wave"][:], dtype=np.float64)
            n = f["lum"].shape[0]
            self.attrs = {k: f.attrs[k].item() for k in ("seed", "n") if k in f.attrs}
            self.z_range = (
                float(f.attrs.get("z_min", np.min(f["z"][:]))),
                float(f.attrs.get("z_max", np.max(f["z"][:]))),
            )
        keep = np.flatnonzero((wave >= self.wave_min) & (wave <= self.wave_max))
        if len(keep) == 0:
            raise ValueError(
                f"{self.path} has no wavelengths in [{self.wave_min}, {self.wave_max}]"
            )
        cols = slice(int(keep[0]), int(keep[-1]) + 1)
        self.wave = torch.as_tensor(wave[cols])
        n_val = max(1, int(round(self.val_fraction * n)))
        if n - n_val < 2:
            raise ValueError(f"{self.path} has {n} rows: too few for a train/validation split")
        self.train_set = SimulationDataset(self.path, 0, n - n_val, cols, self.in_memory)
        self.val_set = SimulationDataset(self.path, n - n_val, n, cols, self.in_memory)
        log.info("%s: %d training, %d validation spectra", self.path, n - n_val, n_val)

    def train_chunks(self, max_rows: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
        """(theta, z, lum) blocks of the training split only (for fitting the PCA)."""
        return self.train_set.chunks(max_rows)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=_already_batched,  # __getitems__ returns the batch
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


__all__ = ["SimulationDataModule", "SimulationDataset"]
