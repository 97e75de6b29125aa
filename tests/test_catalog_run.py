"""End to end: mocks and the real DESI file through the posterior into catalog.fits."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.table import Table

from sedvae.catalog.fitter import PosteriorFitter
from sedvae.catalog.run import run_catalog
from sedvae.catalog.sources import MockSource
from sedvae.sps import PARAM_NAMES, THETA
from sedvae.sps.provabgs import LOGM_RANGE


@pytest.fixture(scope="module")
def mocks(tmp_path_factory):
    return MockSource(tmp_path_factory.mktemp("mocks") / "m.h5", n=6, seed=5)


class OneBad:
    """Wraps a source and ruins galaxy ``bad`` (NaN flux everywhere)."""

    def __init__(self, source, bad):
        self.source, self.bad = source, bad

    def __len__(self):
        return len(self.source)

    def __call__(self, start, stop):
        batch = self.source(start, stop)
        if start <= self.bad < stop:
            batch["flux"][self.bad - start] = float("nan")
        return batch


def test_catalog_of_mocks_fills_every_column(tmp_path, mocks):
    fitter = PosteriorFitter(n_samples=300, seed=1)
    metrics = run_catalog(
        OneBad(mocks, 4), fitter, tmp_path, shard_size=4, n_plots=1, progress=False,
        write_samples=True,
    )  # fmt: skip
    table = Table.read(tmp_path / "catalog.fits")
    assert len(table) == 6 and list(table["index"]) == list(range(6))
    good = np.arange(6) != 4
    assert table["flags"][4] != 0 and (table["flags"][good] == 0).all()
    for name in table.colnames:
        values = np.asarray(table[name], dtype=float)
        if name.endswith(("_p16", "_p50", "_p84")):
            assert np.isfinite(values[good]).all(), name
            assert np.isnan(values[4]), name  # the ruined galaxy has no posterior
    for name in PARAM_NAMES + ("logmstar_surv", "log_sfr_100myr", "log_z_mw", "t_mw_gyr"):
        p16, p50, p84 = (np.asarray(table[f"{name}_p{p}"])[good] for p in (16, 50, 84))
        assert (p16 <= p50).all() and (p50 <= p84).all(), name
    lo, hi = LOGM_RANGE
    assert ((table["logmstar_p50"][good] > lo) & (table["logmstar_p50"][good] < hi)).all()
    assert (table["logmstar_surv_p50"][good] < table["logmstar_p50"][good]).all()
    # accuracy and calibration against the truth are measured by bench/posterior.py
    assert (tmp_path / "plots").is_dir()

    # mocks carry the truth: _true columns equal it, _rank is the truth's posterior quantile
    truth = mocks(0, 6)["theta"].numpy()
    for j, name in enumerate(PARAM_NAMES):
        assert np.allclose(table[f"{name}_true"], truth[:, j], rtol=1e-6), name
    import h5py

    with h5py.File(tmp_path / "samples.h5") as f:
        samples = f["samples"][:]  # (galaxy, draw, 12)
    for j, name in enumerate(PARAM_NAMES):
        expected = (samples[good, :, j] < truth[good, j, None]).mean(1)
        assert np.allclose(np.asarray(table[f"{name}_rank"])[good], expected, atol=1e-6), name
    assert np.isnan(np.asarray(table["logmstar_rank"], float)[4])
    rank = np.asarray(table["logmstar_surv_rank"])[good]
    assert ((rank >= 0) & (rank <= 1)).all()
    # surviving mass of the truth: below the formed mass by the returned fraction (~0.1-0.3 dex)
    loss = np.asarray(table["logmstar_true"] - table["logmstar_surv_true"])
    assert ((loss > 0.02) & (loss < 0.5)).all()
    assert set(metrics["coverage_68"]) >= set(PARAM_NAMES)
    headline = {"logmstar_bias", "logmstar_scatter", "logmstar_nmad", "coverage_max_dev_all"}
    assert headline <= set(metrics)
    assert (tmp_path / "plots" / "coverage.png").is_file()
    assert (tmp_path / "plots" / "recovery.png").is_file()


def test_marginal_coverage_of_calibrated_and_wrong_posteriors():
    from sedvae.plotting.posterior import marginal_coverage

    rng = np.random.default_rng(0)
    levels = np.linspace(0, 1, 11)
    calibrated = marginal_coverage(rng.uniform(size=20000), levels)
    assert np.abs(calibrated - levels).max() < 0.015
    # too wide: the truth always sits at the posterior median, inside every interval
    assert (marginal_coverage(np.full(100, 0.5), levels[1:]) == 1).all()
    # too narrow: the truth always in the far tail
    assert (marginal_coverage(np.full(100, 0.999), levels[:-1]) == 0).all()


def test_catalog_of_the_bundled_desi_spectrum(tmp_path):
    from sedvae.catalog.sources import SpectraSource
    from sedvae.paths import data_dir

    source = SpectraSource(
        "desi", str(data_dir() / "desi_example" / "coadd-*.fits"), redrock="auto"
    )
    fitter = PosteriorFitter(
        n_samples=300, autoencoder=data_dir() / "autoencoder" / "autoencoder_laptop.pt"
    )
    metrics = run_catalog(source, fitter, tmp_path, n_plots=0, progress=False, write_samples=True)
    table = Table.read(tmp_path / "catalog.fits")
    assert table["TARGETID"][0] == 39633345008634465
    assert math.isclose(float(table["z"][0]), 0.36874, abs_tol=1e-4)
    assert 8.5 < table["logmstar_p50"][0] < 12.0  # an r ~ 19.6 BGS galaxy at z = 0.37
    assert np.isfinite(table["rchi2"][0]) and table["rchi2"][0] > 0
    assert metrics["n_galaxies"] == 1
    # the rate counts galaxies, not shard slots (one galaxy in a shard of 64)
    rate = metrics["galaxies_per_s_this_run"]
    assert rate == pytest.approx(1 / metrics["inference_seconds"], rel=0.02)
    import h5py

    with h5py.File(tmp_path / "samples.h5") as f:
        assert f["samples"].shape == (1, 300, 12)


def test_shipped_posterior_recovers_and_covers_the_truth(tmp_path_factory):
    """The shipped SBI head on 96 fresh mocks (not its training draws): logM* medians close to
    the truth, and truths inside the 68 % intervals about 68 % of the time (binomial sd 0.05
    per parameter here). An overconfident or far too wide head fails."""
    import torch

    from sedvae.catalog.fitter import default_posterior_path
    from sedvae.posterior import load_posterior
    from sedvae.posterior.diagnostics import sbc_ranks

    source = MockSource(tmp_path_factory.mktemp("fresh") / "m.h5", n=96, seed=7, noise_seed=1)
    post = load_posterior(default_posterior_path())
    batch = source(0, 96)
    samples = post.sample(batch, 500, torch.Generator().manual_seed(3))  # (500, 96, 12)
    truth = batch["theta"]
    err = samples[..., THETA.LOGMSTAR].median(0).values - truth[:, THETA.LOGMSTAR]
    # the median error: the mean is pulled up by galaxies near the prior's lower edge (7), whose
    # posterior medians shrink inward (+0.11 dex below logM* = 9 on 256 mocks), as they should
    assert abs(float(err.median())) < 0.1, "logM* biased"
    assert float(err.abs().median()) < 0.2, "logM* medians too far from the truth"  # 0.095
    rank = sbc_ranks(samples, truth).numpy() / 500  # (96, 12) posterior quantiles of the truth
    inside = (np.abs(2 * rank - 1) <= 0.68).mean(0)
    assert 0.52 <= inside.mean() <= 0.84, inside
    assert 0.5 <= inside[0] <= 0.86, f"logM* coverage {inside[0]}"
