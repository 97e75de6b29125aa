"""Sharded Lightning predict: atomic shard files, resume without loss or duplicates, DDP."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from astropy.table import Table
from torch.utils.data import DataLoader

from sedvae.catalog import CatalogModule, ShardDataset, ShardWriter, finished_shards, merge_shards

N_GAL, N_PIX, SHARD = 23, 50, 5


def make_data(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    flux = torch.randn(N_GAL, N_PIX, generator=g) + torch.linspace(1, 5, N_GAL)[:, None]
    ivar = torch.rand(N_GAL, N_PIX, generator=g) + 0.5
    return {"flux": flux, "ivar": ivar, "targetid": torch.arange(1000, 1000 + N_GAL)}


class WeightedMean(torch.nn.Module):
    """A real per-galaxy measurement (ivar-weighted mean flux and its S/N) standing in for the
    posterior head, so the test exercises only the sharding, writing and resuming."""

    def __init__(self, fail_on_shard: int | None = None):
        super().__init__()
        self.fail_on_shard = fail_on_shard

    def forward(self, batch):
        if self.fail_on_shard is not None and batch["shard"] == self.fail_on_shard:
            raise RuntimeError("node lost")
        w = batch["ivar"]
        mean = (w * batch["flux"]).sum(-1) / w.sum(-1)
        return {"targetid": batch["targetid"], "mean_flux": mean, "snr": mean * w.sum(-1).sqrt()}


class Slices:
    """Picklable loader (DDP spawn pickles the dataloader)."""

    def __init__(self, data):
        self.data = data

    def __call__(self, start, stop):
        return {k: v[start:stop] for k, v in self.data.items()}


def loader_for(data, skip):
    ds = ShardDataset(N_GAL, Slices(data), SHARD, skip=skip)
    return ds, DataLoader(ds, batch_size=None, shuffle=False)


def run_predict(folder, fitter, data, **trainer_kw):
    ds, loader = loader_for(data, finished_shards(folder))
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        callbacks=[ShardWriter(folder)],
        **trainer_kw,
    )
    trainer.predict(CatalogModule(fitter), loader, return_predictions=False)
    return ds


def expected(data):
    w = data["ivar"]
    return ((w * data["flux"]).sum(-1) / w.sum(-1)).numpy()


def test_interrupted_run_resumes_without_loss_or_duplicates(tmp_path):
    data = make_data()
    folder = tmp_path / "shards"
    with pytest.raises(RuntimeError, match="node lost"):
        run_predict(folder, WeightedMean(fail_on_shard=3), data, devices=1)
    assert finished_shards(folder) == {0, 1, 2}
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no half-written files
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    ds = run_predict(folder, WeightedMean(), data, devices=1)
    assert ds.todo == [3, 4]  # finished shards were skipped
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name in mtimes} == mtimes
    table = merge_shards(folder, ds.n_shards, tmp_path / "catalog.fits")
    assert list(table["index"]) == list(range(N_GAL))
    np.testing.assert_array_equal(table["targetid"], data["targetid"].numpy())
    np.testing.assert_allclose(table["mean_flux"], expected(data), rtol=1e-6)
    assert len(Table.read(tmp_path / "catalog.fits")) == N_GAL


def test_merge_refuses_missing_shards(tmp_path):
    data = make_data()
    with pytest.raises(RuntimeError, match="node lost"):
        run_predict(tmp_path / "s", WeightedMean(fail_on_shard=1), data, devices=1)
    with pytest.raises(FileNotFoundError, match="missing"):
        merge_shards(tmp_path / "s", 5, tmp_path / "catalog.fits")
    assert not (tmp_path / "catalog.fits").exists()


@pytest.mark.distributed
def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path):
    data = make_data(1)
    run_predict(tmp_path / "one", WeightedMean(), data, devices=1)
    one = merge_shards(tmp_path / "one", 5, tmp_path / "one.fits")
    run_predict(tmp_path / "two", WeightedMean(), data, devices=2, strategy="ddp_spawn")
    two = merge_shards(tmp_path / "two", 5, tmp_path / "two.fits")
    assert len(two) == N_GAL
    for name in one.colnames:
        np.testing.assert_array_equal(one[name], two[name])
