"""Training data for the posterior: an adapter around the autoencoder's ``MockDataModule``
(:mod:`sedvae.autoencoder.data`), reading the same ``write_mocks`` files.

What it adds, and why it lives here rather than in ``sedvae.autoencoder.data``:

- several pre-generated training files used as one set (``write_mocks`` files of the same
  generator with different seeds), so the training set can grow without regenerating it;
- noise drawn per *batch* (``MockDataset`` draws it per item: the noise model's per-arm medians
  and masks in Python cost ~1 ms per galaxy, as much as the network step). Statistically the
  same as ``MockDataset``: fresh noise every epoch from ``SpectralNoiseModel``;
- validation and test sets are ``MockDataset``s with fixed noise, exactly as in
  ``MockDataModule`` (so ``bench/posterior.py`` and the autoencoder bench share held-out data).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from pathlib import Path

import h5py
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..autoencoder.data import MockDataModule
from ..simulation.writer import mock_sfh_prior, write_mocks
from .model import NeuralPosterior

log = logging.getLogger(__name__)

OBS_KEYS = ("flux", "ivar", "mask", "photometry", "photometry_ivar")
TRUTH_KEYS = ("theta", "z", "logU", "sigma_v", "aperture")


class BatchNoiseMocks(Dataset):
    """Noiseless mocks from one or more files; indexed by *lists* of rows, returning whole
    batches with fresh noise (use with ``batch_size=None`` and a batch sampler).

    Parameters
    ----------
    paths : sequence of path
        ``write_mocks`` files (read once into memory, ~32 kB per galaxy, without an
        intermediate copy per file).
    noise : SpectralNoiseModel
    """

    def __init__(self, paths: Sequence[str | Path], noise) -> None:
        if not paths:
            raise ValueError("need at least one training file")
        files = [h5py.File(p, "r") for p in paths]
        try:
            for p, f in zip(paths, files, strict=True):
                if not f.attrs.get("complete", False):
                    raise ValueError(f"{p} is incomplete; rerun write_mocks")
            sizes = [len(f["z"]) for f in files]
            self.data = {}
            for key in ("flux_true", "photometry_true", *TRUTH_KEYS):
                shape = (sum(sizes), *files[0][key].shape[1:])
                out = torch.empty(shape, dtype=torch.float32)
                start = 0
                for f, n in zip(files, sizes, strict=True):
                    f[key].read_direct(out[start : start + n].numpy())
                    start += n
                self.data[key] = out
        finally:
            for f in files:
                f.close()
        self.noise = noise

    def __len__(self) -> int:
        return self.data["z"].shape[0]

    def __getitem__(self, rows) -> dict[str, torch.Tensor]:
        return self.batch(rows)

    def batch(self, rows, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The galaxies ``rows`` with noise drawn from ``generator`` (default: torch's global
        generator, as the training loader uses)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        obs = self.noise(self.data["flux_true"][rows], self.data["photometry_true"][rows],
                         generator)  # fmt: skip
        batch = {k: obs[k] for k in OBS_KEYS}
        for key in TRUTH_KEYS:
            batch[key] = self.data[key][rows]
        return batch

    def clean_spectra(self, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Noiseless spectra of ``n`` random galaxies (a fixed draw for a given ``seed``):
        flux (n, M), an ivar (n, M) from the noise model (its masks and arm coverage are what
        matter) and z (n,). For fitting data-derived bases such as the embedding's gappy PCA."""
        gen = torch.Generator().manual_seed(int(seed))
        rows = torch.randperm(len(self), generator=gen)[: int(n)]
        flux = self.data["flux_true"][rows]
        ivar = self.noise(flux, self.data["photometry_true"][rows], gen)["ivar"]
        return flux, ivar, self.data["z"][rows]


class _ShuffledBatches(Sampler):
    """Random batches of row indices (a new permutation each epoch), last partial one dropped."""

    def __init__(self, n: int, batch_size: int) -> None:
        self.n, self.batch_size = int(n), int(batch_size)

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self):
        perm = torch.randperm(self.n)
        for i in range(len(self)):
            yield perm[i * self.batch_size : (i + 1) * self.batch_size].tolist()


class PosteriorMockDataModule(MockDataModule):
    """``MockDataModule`` with several training files and per-batch noise (module docstring).

    Parameters
    ----------
    train_seeds : sequence of int, optional
        Seeds of the training files, each ``mocks_train_n{n_train}_seed{s}.h5`` in
        ``cache_dir`` (missing ones are written by :meth:`prepare_data`). Default: ``[seed]``,
        the parent's single file.
    **kwargs
        ``MockDataModule`` arguments (``cache_dir``, ``n_train``, ``n_val``, ``n_test``,
        ``seed``, ``batch_size``, ``generator``, ...). ``on_the_fly`` is not supported.
    """

    def __init__(self, train_seeds: Sequence[int] | None = None, **kwargs) -> None:
        if kwargs.get("on_the_fly"):
            raise ValueError("PosteriorMockDataModule trains on files: set on_the_fly=false")
        kwargs["on_the_fly"] = False
        super().__init__(**kwargs)
        self.train_seeds = [int(s) for s in (train_seeds or [self.seed])]

    def train_path(self, seed: int) -> Path:
        return self.cache_dir / f"mocks_train_n{self.n['train']}_seed{seed}.h5"

    def prepare_data(self) -> None:
        for split in ("val", "test"):
            path = self.path(split)
            if not path.exists():
                log.info("writing %s", path)
                seed = self.seed + ("train", "val", "test").index(split)
                write_mocks(path, self.n[split], seed, self.generator)
            self.check_sfh(path)
        for seed in self.train_seeds:
            path = self.train_path(seed)
            if not path.exists():
                log.info("writing %s", path)
                write_mocks(path, self.n["train"], seed, self.generator, simulation=self.simulation)
            self.check_sfh(path)

    def check_sfh(self, path: Path) -> None:
        """ValueError when the file at ``path`` was written with another SFH prior than the
        generator's (``MockGenerator(sfh=...)``; files written before the attribute existed
        hold PROVABGS histories): a cache directory serves one prior."""
        want = getattr(self.generator, "sfh_settings", "provabgs")
        got = mock_sfh_prior(path)
        if got != want:
            raise ValueError(f"{path} holds mocks of the SFH prior {got!r}, the generator draws "
                             f"{want!r}: point data.cache_dir at another directory")  # fmt: skip

    def train_dataset(self, noise) -> BatchNoiseMocks:
        return BatchNoiseMocks([self.train_path(s) for s in self.train_seeds], noise)

    def clean_spectra(self, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Noiseless spectra of ``n`` random training galaxies
        (:meth:`BatchNoiseMocks.clean_spectra`), for the embedding's gappy-PCA basis."""
        return self.datasets["train"].clean_spectra(n, seed)

    def train_dataloader(self) -> DataLoader:
        data = self.datasets["train"]
        return DataLoader(
            data,
            sampler=_ShuffledBatches(len(data), self.batch_size),
            batch_size=None,  # the dataset returns whole batches
            num_workers=self.num_workers,
        )


class SummaryBatches(Dataset):
    """Rows of frozen summaries (a dict of equal-length tensors), indexed by lists of rows."""

    def __init__(self, summaries: dict[str, torch.Tensor]) -> None:
        sizes = {v.shape[0] for v in summaries.values()}
        if len(sizes) != 1:
            raise ValueError(f"summaries of unequal lengths: {sizes}")
        self.summaries = summaries

    def __len__(self) -> int:
        return next(iter(self.summaries.values())).shape[0]

    def __getitem__(self, rows) -> dict[str, torch.Tensor]:
        rows = torch.as_tensor(rows, dtype=torch.long)
        return {k: v[rows] for k, v in self.summaries.items()}


class FrozenSummaryDataModule(PosteriorMockDataModule):
    """Training batches of frozen summaries, for training the flow alone
    (``model.freeze_embedding``, ``experiment=posterior_flow``).

    The summary network of a trained posterior file is applied once to every training galaxy,
    ``draws`` times with fresh noise and the training augmentation
    (:func:`~sedvae.posterior.summaries.summarise_dataset`, ~2 min per 150,000 galaxies on one
    core). An epoch of the flow on them then costs seconds where a joint epoch costs minutes,
    so the flow can take many more steps than joint training affords; each noise draw is
    reused every epoch. Validation and test batches are the parent's raw mocks, so the
    validation loss is the joint runs' own.

    Parameters
    ----------
    summary_from : str
        The posterior file whose embedding makes the summaries; it must be the file the
        model starts from (``model.init_from``; ``PosteriorModule.setup`` checks it, given it as
        ``model.summary_from``).
    draws : int
        Noise draws per training galaxy.
    noise_seed : int, optional
        Seed of those draws (default: ``seed``); a second run from the first one's file takes
        fresh noise with another.
    augment : dict, optional
        The training augmentation the summaries are made with: ``NeuralPosterior.set_augment``
        arguments (``p_drop_photometry``, ``p_cut_coverage``, ``cut_blue``, ``cut_red``) given
        to the file's network before it summarises. Default: the file's own.
        ``conf/data/posterior_summaries.yaml`` passes the trained model's (``model.net``), so a
        flow trained with coverage cuts sees
        summaries of cut spectra although the file's embedding was trained without.
    **kwargs
        :class:`PosteriorMockDataModule` arguments.
    """

    def __init__(
        self,
        summary_from: str | None = None,
        draws: int = 4,
        noise_seed: int | None = None,
        augment: dict | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not summary_from:
            raise ValueError("FrozenSummaryDataModule needs summary_from, a posterior file")
        if int(draws) < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        self.summary_from = str(summary_from)
        self.draws = int(draws)
        self.noise_seed = self.seed if noise_seed is None else int(noise_seed)
        self.augment = dict(augment or {})
        try:  # a key NeuralPosterior.set_augment does not take fails here, not after the mocks load
            inspect.signature(NeuralPosterior.set_augment).bind(None, **self.augment)
        except TypeError as err:
            raise ValueError(f"augment: {err}") from None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage not in (None, "fit") or "train_summaries" in self.datasets:
            return
        from ..checkpoint import load_checkpoint
        from .summaries import summarise_dataset

        net, _ = load_checkpoint(self.summary_from, "posterior")
        net.set_augment(**self.augment)
        log.info("summarising %d training galaxies x %d noise draws with %s",
                 len(self.datasets["train"]), self.draws, self.summary_from)  # fmt: skip
        s = summarise_dataset(net, self.datasets["train"], n_draws=self.draws,
                              seed=self.noise_seed)  # fmt: skip
        self.datasets["train_summaries"] = SummaryBatches(
            {k: s[k] for k in ("context", "y", "log_dy_du", "theta")}
        )

    def train_dataloader(self) -> DataLoader:
        data = self.datasets["train_summaries"]
        return DataLoader(
            data,
            sampler=_ShuffledBatches(len(data), self.batch_size),
            batch_size=None,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["val"], batch_size=256, num_workers=self.num_workers)


__all__ = [
    "BatchNoiseMocks",
    "FrozenSummaryDataModule",
    "PosteriorMockDataModule",
    "SummaryBatches",
]
