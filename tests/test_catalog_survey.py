"""Catalogs of multi-target DESI files: the fast read path (prefetch, one copy per file) gives
the same catalog as shard-by-shard fitting of the reader's batches, and the stage timer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.table import Table

from sedvae.catalog.fitter import PosteriorFitter
from sedvae.catalog.run import run_catalog
from sedvae.catalog.sources import SpectraSource, to_batch
from sedvae.io import read_spectra
from sedvae.io.desi_write import write_desi_coadd
from sedvae.paths import data_dir
from sedvae.timing import STAGES, TIMER, stage

DESI_DIR = Path(__file__).resolve().parents[1] / "data" / "desi_example"
COADD = DESI_DIR / "coadd-4-80613-thru20210324.fits"
REDROCK = DESI_DIR / "redrock-4-80613-thru20210324.fits"
PER_FILE = (7, 6, 8)
SHARD = 5  # shards straddle the files


def _targets(like, n: int, rng: np.random.Generator, first_id: int):
    """n noisy copies of the real target at other redshifts and brightnesses; target 1 has its
    b arm masked and target 2 a redrock ZWARN."""
    scale = rng.uniform(0.5, 2.0, n).astype(np.float32)[:, None]
    sigma = 1 / np.sqrt(np.maximum(like.ivar, 1e-12))
    flux = like.flux * scale + rng.normal(size=(n, like.flux.shape[1])).astype(np.float32) * sigma
    ivar = np.repeat(like.ivar, n, 0)  # the same noise level at every brightness
    mask = np.repeat(like.mask, n, 0)
    mask[1, like.arm == 0] = True
    ivar[1, like.arm == 0] = 0
    zwarn = np.zeros(n, np.int64)
    zwarn[2] = 4
    spectra = type(like)(
        wave=like.wave, flux=flux, ivar=ivar.astype(np.float32), mask=mask,
        z=rng.uniform(0.05, 0.4, n), ids=first_id + np.arange(n), arm=like.arm,
        arm_names=like.arm_names, resolution=[np.repeat(r, n, 0) for r in like.resolution],
        photometry=like.photometry * scale, photometry_ivar=np.repeat(like.photometry_ivar, n, 0),
        bands=like.bands, extra={"ZWARN": zwarn, "PHOTSYS": np.full(n, "N")},
    )  # fmt: skip
    return spectra


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("survey")
    like = read_spectra("desi", COADD, redrock=REDROCK)
    rng = np.random.default_rng(28)
    paths = []
    for k, n in enumerate(PER_FILE):
        path, _ = write_desi_coadd(folder / f"coadd-t{k}.fits", _targets(like, n, rng, 1000 * k))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def fitter():
    return PosteriorFitter(
        n_samples=200, seed=3, autoencoder=data_dir() / "autoencoder" / "autoencoder_laptop.pt"
    )


def _catalog(files, fitter, out, prefetch):
    source = SpectraSource("desi", [str(p) for p in files], redrock="auto", prefetch=prefetch)
    run_catalog(source, fitter, out, shard_size=SHARD, n_plots=0, progress=False)
    return Table.read(out / "catalog.fits")


def _assert_same(a: Table, b: Table) -> None:
    assert a.colnames == b.colnames
    for name in a.colnames:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        if x.dtype.kind == "f":
            assert np.array_equal(x, y, equal_nan=True), name
        else:
            assert np.array_equal(x, y), name


def test_fast_read_path_gives_the_catalog_of_plain_shard_fitting(files, fitter, tmp_path):
    fast = _catalog(files, fitter, tmp_path / "fast", prefetch=True)
    plain = _catalog(files, fitter, tmp_path / "plain", prefetch=False)
    _assert_same(fast, plain)
    n = sum(PER_FILE)
    assert len(fast) == n and list(fast["index"]) == list(range(n))

    # the same columns from the fitter called on each shard of the reader's concatenated batch
    parts = [read_spectra("desi", p, redrock=str(p).replace("coadd-", "redrock-")) for p in files]
    batches = [to_batch(s) for s in parts]
    whole = {k: torch.cat([b[k] for b in batches]) for k in ("flux", "ivar", "mask", "z",
             "flags", "photometry", "photometry_ivar", "resolution")}  # fmt: skip
    for s, start in enumerate(range(0, n, SHARD)):
        batch = {k: v[start : start + SHARD] for k, v in whole.items()}
        batch["shard"] = s
        with torch.no_grad():
            cols = fitter(batch)
        for name in ("logmstar_p50", "log_sfr_100myr_p16", "t_mw_gyr_p84", "rchi2", "flags"):
            got = np.asarray(fast[name][start : start + SHARD])
            assert np.array_equal(got, np.asarray(cols[name]), equal_nan=True), name

    # the bad targets are flagged, not dropped; the masked arm still has a posterior
    ids = np.asarray(fast["TARGETID"])
    assert list(ids[: PER_FILE[0]]) == list(range(PER_FILE[0]))
    assert fast["flags"][2] != 0 and np.isfinite(fast["logmstar_p50"][1])


def test_stage_timer_is_off_by_default_and_counts_catalog_stages(files, fitter, tmp_path):
    assert not TIMER.enabled
    with stage("read"):
        pass
    assert "read" not in TIMER.seconds
    TIMER.enable()
    TIMER.reset()
    try:
        _catalog(files[:1], fitter, tmp_path / "timed", prefetch=True)
        seconds = dict(TIMER.seconds)
    finally:
        TIMER.enable(False)
        TIMER.reset()
    assert set(seconds) == set(STAGES)
    assert all(v > 0 for v in seconds.values())
    assert TIMER.seconds == {}
