"""The autoencoder's training data: mocks from :func:`sedvae.simulation.write_mocks` files
(noise drawn per item, so every epoch sees new noise and a test set is fixed by its seed) or
made on the fly, and the Lightning data module that writes the files it lacks; and real
spectra from survey files (:class:`SpectraDataModule`), paired with mocks, for fine-tuning on
data (``experiment=autoencoder_data``)."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from ..io.batch import Flag, SpectrumBatch
from ..physics.noise import SpectralNoiseModel, rng_for
from ..simulation.mocks import MockGenerator
from ..simulation.writer import write_mocks

log = logging.getLogger(__name__)


class MockDataset(Dataset):
    """Mocks from a :func:`write_mocks` file, held in memory, noise drawn per item.

    Parameters
    ----------
    path : str or PathLike
    noise : SpectralNoiseModel
    fixed_noise_seed : int, optional
        Noise of item i from (seed, i): a fixed validation/test set. None: fresh noise
        every time (training).
    truth : bool
        Also return ``flux_true``, ``photometry_true``, ``line_lum`` (benchmarks).
    """

    def __init__(self, path, noise: SpectralNoiseModel, fixed_noise_seed=None, truth=False):
        with h5py.File(path, "r") as f:
            if not f.attrs.get("complete", False):
                raise ValueError(f"{path} is incomplete; rerun write_mocks")
            # theta is absent from sets made by another model (sedvae.offmodel)
            self.data = {
                key: torch.as_tensor(f[key][:])
                for key in ("theta", "z", "logU", "sigma_v", "aperture", "flux_true",
                            "photometry_true", "line_lum")
                if key != "theta" or key in f
            }  # fmt: skip
            self.line_names = tuple(f.attrs["line_names"])
            self.bands = tuple(f.attrs["bands"])
        self.noise = noise
        self.fixed_noise_seed = fixed_noise_seed
        self.truth = truth

    def __len__(self) -> int:
        return self.data["z"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        gen = rng_for(self.fixed_noise_seed, i) if self.fixed_noise_seed is not None else None
        obs = self.noise(self.data["flux_true"][i : i + 1], self.data["photometry_true"][i : i + 1],
                         gen)  # fmt: skip
        item = {k: v[0] for k, v in obs.items() if k != "snr"}
        for key in ("theta", "z", "logU", "sigma_v", "aperture"):
            if key in self.data:
                item[key] = self.data[key][i]
        if self.truth:
            for key in ("flux_true", "photometry_true", "line_lum"):
                item[key] = self.data[key][i]
        return item


class OnTheFlyMocks(IterableDataset):
    """Fresh prior draws every epoch: ``n`` mocks made in chunks by a :class:`MockGenerator`."""

    def __init__(self, generator: MockGenerator, n: int, chunk_size: int = 256, seed=None):
        self.generator, self.n, self.chunk_size, self.seed = generator, n, chunk_size, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = None
        if self.seed is not None:
            rng = rng_for(self.seed, self.epoch)
        self.epoch += 1
        done = 0
        while done < self.n:
            count = min(self.chunk_size, self.n - done)
            batch = self.generator.sample(count, rng)
            keep = ("flux", "ivar", "mask", "z", "photometry", "photometry_ivar", "theta",
                    "logU", "sigma_v", "aperture")  # fmt: skip
            for j in range(count):
                yield {k: batch[k][j] for k in keep}
            done += count


class MockDataModule(pl.LightningDataModule):
    """Train/val/test mocks for the autoencoder.

    Parameters
    ----------
    cache_dir : str
        Where mock files live (``mocks_{split}_n{n}_seed{seed}.h5``); missing ones are written
        by :meth:`prepare_data`.
    n_train, n_val, n_test : int
    seed : int
        Base seed: train, val and test files use seed, seed + 1, seed + 2.
    on_the_fly : bool
        Train on fresh prior draws every epoch (``n_train`` per epoch) instead of a file.
    batch_size : int
    num_workers : int
    generator : MockGenerator, optional
        Built lazily with defaults when None.
    simulation : str, optional
        A :func:`~sedvae.simulation.simulate_to_hdf5` file (nebular) to observe for the training
        set.
    """

    def __init__(
        self,
        cache_dir: str = "cache/mocks",
        n_train: int = 8192,
        n_val: int = 512,
        n_test: int = 1024,
        seed: int = 1,
        on_the_fly: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        generator: MockGenerator | None = None,
        simulation: str | None = None,
    ) -> None:
        super().__init__()
        self.cache_dir = Path(cache_dir)
        self.n = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
        self.seed = int(seed)
        self.on_the_fly = bool(on_the_fly)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self._generator = generator
        self.simulation = simulation
        self.datasets: dict[str, Dataset] = {}

    @property
    def generator(self) -> MockGenerator:
        if self._generator is None:
            self._generator = MockGenerator()
        return self._generator

    def path(self, split: str) -> Path:
        seed = self.seed + ("train", "val", "test").index(split)
        return self.cache_dir / f"mocks_{split}_n{self.n[split]}_seed{seed}.h5"

    def prepare_data(self) -> None:
        splits = ("val", "test") if self.on_the_fly else ("train", "val", "test")
        for split in splits:
            path = self.path(split)
            if not path.exists():
                log.info("writing %s", path)
                sim = self.simulation if split == "train" else None
                seed = self.seed + ("train", "val", "test").index(split)
                write_mocks(path, self.n[split], seed, self.generator, simulation=sim)

    def train_dataset(self, noise: SpectralNoiseModel) -> Dataset:
        """The training set (subclasses change this, not :meth:`setup`)."""
        if self.on_the_fly:
            return OnTheFlyMocks(self.generator, self.n["train"], seed=None)
        return MockDataset(self.path("train"), noise)

    def setup(self, stage: str | None = None) -> None:
        noise = self.generator.noise
        if "train" not in self.datasets:
            self.datasets["train"] = self.train_dataset(noise)
        for split, offset in (("val", 1), ("test", 2)):
            if split not in self.datasets and self.path(split).exists():
                self.datasets[split] = MockDataset(
                    self.path(split), noise, fixed_noise_seed=self.seed + 100 + offset,
                    truth=split == "test",
                )  # fmt: skip

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle and not self.on_the_fly,
            num_workers=self.num_workers,
            drop_last=split == "train",
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


# ---- real spectra -------------------------------------------------------------------------
# Per-galaxy entries of a real batch the autoencoder reads (``ids`` stay in the dataset: they
# are for log lines, not for the model).
REAL_KEYS = ("flux", "ivar", "mask", "z", "photometry", "photometry_ivar", "resolution", "mw_ebv")


def _concat(parts: list[SpectrumBatch]) -> SpectrumBatch:
    """One batch of several on the same pixel grid; photometry absent from some parts is
    filled with zeros of ivar 0 (a band that is not measured)."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for key in (*REAL_KEYS, "flags"):
        values = [p.get(key) for p in parts]
        if all(v is None for v in values):
            continue
        if key in ("photometry", "photometry_ivar") and any(v is None for v in values):
            nb = next(v for v in values if v is not None).shape[-1]
            values = [v if v is not None else p.flux.new_zeros(len(p), nb)
                      for v, p in zip(values, parts, strict=True)]  # fmt: skip
        if any(v is None for v in values):
            raise ValueError(f"{key!r} is given for some files but not others on one grid")
        out[key] = torch.cat(values)
    out["ids"] = np.concatenate([p.ids for p in parts])
    out["wave"], out["arm"] = parts[0].wave, parts[0].arm
    return SpectrumBatch.coerce(out)


class RealSpectra(Dataset):
    """Observed spectra held in memory, one :class:`SpectrumBatch` per pixel grid.

    Items are whole batches: ``dataset[[i, j, ...]]`` with indices of one grid (as
    :class:`GridBatchSampler` yields them) returns the batch dict of those galaxies.

    Parameters
    ----------
    groups : list of SpectrumBatch
        Cleaned galaxies, one batch per distinct pixel grid.
    """

    def __init__(self, groups: list[SpectrumBatch]) -> None:
        self.groups = groups
        sizes = [len(g) for g in groups]
        self.group_of = np.repeat(np.arange(len(groups)), sizes)
        self.row_of = np.concatenate([np.arange(n) for n in sizes]) if sizes else np.zeros(0, int)

    def __len__(self) -> int:
        return len(self.group_of)

    def indices_by_group(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.group_of == g) for g in range(len(self.groups))]

    def __getitem__(self, indices) -> dict[str, torch.Tensor]:
        idx = np.atleast_1d(np.asarray(indices))
        group = np.unique(self.group_of[idx])
        if len(group) != 1:
            raise ValueError("a batch of real spectra must come from one pixel grid")
        batch = self.groups[int(group[0])].select(torch.as_tensor(self.row_of[idx]))
        return {k: batch[k] for k in REAL_KEYS if batch.get(k) is not None}


class GridBatchSampler(Sampler):
    """Batches of indices that share a pixel grid (spectra of different lengths cannot be
    stacked): shuffled within each grid, batches in shuffled order, a new order each epoch
    from ``(seed, epoch)``; the last batch of a grid may be smaller."""

    def __init__(self, groups: list[np.ndarray], batch_size: int, shuffle: bool, seed: int = 0):
        self.groups = [np.asarray(g) for g in groups if len(g)]
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return sum(-(-len(g) // self.batch_size) for g in self.groups)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        batches = []
        for g in self.groups:
            order = rng.permutation(g) if self.shuffle else g
            batches += [order[i : i + self.batch_size].tolist()
                        for i in range(0, len(order), self.batch_size)]  # fmt: skip
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        yield from batches


class SpectraDataModule(pl.LightningDataModule):
    """Real spectra from survey files (unsupervised: no truth) paired with mocks (supervised),
    for fine-tuning the autoencoder on data (``experiment=autoencoder_data``).

    The spectra are read once by a catalog source (:class:`sedvae.catalog.sources.SpectraSource`:
    DESI coadds, SDSS/BOSS spec files or tables through the ``sedvae.io`` readers) and cleaned
    by :meth:`SpectrumBatch.clean`; galaxies with a fatal flag (no usable pixel, redshift
    outside the source's range, no signal) are skipped with a log line each. DESI's Galactic
    E(B-V) (the FIBERMAP's ``EBV``) goes with each galaxy as ``mw_ebv``.

    Training batches are ``{"real": ..., "mock": ...}`` (a Lightning ``CombinedLoader`` in
    ``max_size_cycle`` mode: an epoch is the longer of the two loaders, the shorter one
    cycles), and so are validation batches (held-out real spectra and the mock validation file).

    Parameters
    ----------
    source : SpectraSource
        The files (``data=desi|sdss|table`` reuse ``conf/source/<kind>.yaml``).
    path : str or list
        The files, as given on the command line (``data.path``); the source reads them
        (its ``path`` is this one), recorded here for the run's provenance.
    mocks : MockDataModule, optional
        The supervised half (``conf/data/mocks.yaml``); None: real spectra only.
    batch_size : int
        Real spectra per batch (per pixel grid: a batch never mixes grids).
    val_fraction : float
        Real galaxies held out for validation (at least one when there are two or more;
        a single galaxy is validated on itself, which the log says).
    seed : int
        The validation split and the order of the batches.
    num_workers : int
        DataLoader workers for the real spectra (in memory already: 0 is enough).
    """

    def __init__(
        self,
        source,
        path=None,
        mocks: MockDataModule | None = None,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
        self.source = source
        self.path = path
        self.mocks = mocks
        self.batch_size = int(batch_size)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.datasets: dict[str, RealSpectra] = {}
        self.info: dict = {}

    def prepare_data(self) -> None:
        if self.mocks is not None:
            self.mocks.prepare_data()

    def read(self) -> list[SpectrumBatch]:
        """Every usable galaxy of the source, one cleaned batch per pixel grid."""
        by_grid: dict[tuple, list[SpectrumBatch]] = {}
        n_read = n_skipped = 0
        for spectra in self.source.spectra(0, len(self.source)):
            batch = SpectrumBatch.from_spectra(spectra)
            ebv = spectra.extra.get("EBV")
            if ebv is not None:
                batch.mw_ebv = torch.as_tensor(np.asarray(ebv, dtype=np.float32))
            batch = batch.clean(z_range=self.source.z_range)
            fatal = batch.fatal
            n_read += len(batch)
            for i in torch.nonzero(fatal).flatten().tolist():
                log.warning(
                    "skipping galaxy %s of %s: %s", batch.ids[i],
                    spectra.meta.get("source", self.source.kind),
                    Flag.describe(int(batch.flags[i])),
                )  # fmt: skip
            n_skipped += int(fatal.sum())
            batch = batch.select(~fatal)
            if len(batch):
                key = (batch.flux.shape[-1], spectra.wave.tobytes())
                by_grid.setdefault(key, []).append(batch)
        groups = [_concat(parts) for parts in by_grid.values()]
        self.info = {"real_files": [Path(p).name for p in self.source.files], "real_read": n_read,
                     "real_skipped": n_skipped, "real_grids": len(groups)}  # fmt: skip
        if not groups:
            raise ValueError(
                f"no usable galaxy in {self.path or self.source.files}: all {n_read} were "
                "flagged (see the log lines above)"
            )
        return groups

    def _split(self, groups: list[SpectrumBatch]) -> dict[str, RealSpectra]:
        n = sum(len(g) for g in groups)
        n_val = max(1, round(self.val_fraction * n)) if n >= 2 and self.val_fraction > 0 else 0
        if n_val == 0:
            log.warning("%d real galaxy(ies): validating on the training spectra", n)
            return {"train": RealSpectra(groups), "val": RealSpectra(groups)}
        rng = np.random.default_rng(self.seed)
        held = np.zeros(n, dtype=bool)
        held[rng.choice(n, n_val, replace=False)] = True
        out, start = {"train": [], "val": []}, 0
        for g in groups:
            sel = torch.as_tensor(held[start : start + len(g)])
            start += len(g)
            for split, keep in (("train", ~sel), ("val", sel)):
                if bool(keep.any()):
                    out[split].append(g.select(keep))
        return {k: RealSpectra(v) for k, v in out.items()}

    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            self.datasets = self._split(self.read())
            self.info.update(n_real_train=len(self.datasets["train"]),
                             n_real_val=len(self.datasets["val"]))  # fmt: skip
            log.info("real spectra: %s", self.info)
        if self.mocks is not None:
            self.mocks.setup(stage)

    def _real_loader(self, split: str, shuffle: bool) -> DataLoader:
        data = self.datasets[split]
        sampler = GridBatchSampler(data.indices_by_group(), self.batch_size, shuffle, self.seed)
        return DataLoader(data, sampler=sampler, batch_size=None, num_workers=self.num_workers)

    def _combined(self, split: str, mock_loader):
        from pytorch_lightning.utilities import CombinedLoader

        loaders = {"real": self._real_loader(split, shuffle=split == "train")}
        if self.mocks is not None:
            loaders["mock"] = mock_loader()
        return CombinedLoader(loaders, "max_size_cycle")

    def train_dataloader(self):
        return self._combined("train", lambda: self.mocks.train_dataloader())

    def val_dataloader(self):
        return self._combined("val", lambda: self.mocks.val_dataloader())
