"""The autoencoder's training data: mocks from :func:`sedvae.simulation.write_mocks` files
(noise drawn per item, so every epoch sees new noise and a test set is fixed by its seed) or
made on the fly, and the Lightning data module that writes the files it lacks."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

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
