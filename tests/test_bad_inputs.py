"""Bad inputs and broken files: one bad galaxy never stops a run, resume never mixes runs,
errors name the file, mock sources respect their settings, tests never hang (issue 24).

Inputs are made from the bundled DESI coadd (its one galaxy copied into several targets, some
then broken) or from small mock files."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from sedvae.catalog import CatalogError
from sedvae.catalog.fitter import PosteriorFitter
from sedvae.catalog.run import run_catalog
from sedvae.catalog.sources import MockSource, SpectraSource
from sedvae.io import SpecFlag, SpectrumFileError, SpectrumFileNotFoundError
from sedvae.paths import data_dir

REPO = Path(__file__).resolve().parents[1]
COADD = data_dir() / "desi_example" / "coadd-4-80613-thru20210324.fits"
REDROCK = COADD.with_name(COADD.name.replace("coadd-", "redrock-"))
AUTOENCODER = data_dir() / "autoencoder" / "autoencoder_laptop.pt"


def desi_file(folder: Path, n: int, z=None, spectype=None, dead=(), name="coadd-test.fits"):
    """A coadd of ``n`` copies of the bundled galaxy (TARGETID 1000 + i) with a redrock file
    beside it; ``z`` and ``spectype`` override the redrock columns, targets in ``dead`` get a
    broken fibre (COADD_FIBERSTATUS set, every pixel ivar = 0, as DESI writes a dead fibre)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / name
    rows = np.zeros(n, dtype=int)
    dead = list(dead)
    with fits.open(COADD) as f:
        hdus = [f[0].copy()]
        for hdu in f[1:]:
            if hdu.name == "EXP_FIBERMAP":
                continue
            if isinstance(hdu, fits.BinTableHDU):
                table = Table(hdu.data)[rows]
                table["TARGETID"] = 1000 + np.arange(n)
                if hdu.name == "FIBERMAP":
                    table["COADD_FIBERSTATUS"][dead] = 8
                hdus.append(fits.BinTableHDU(table, name=hdu.name))
            elif hdu.data.ndim >= 2:
                data = np.repeat(hdu.data, n, axis=0)
                if hdu.name.endswith("_IVAR"):
                    data[dead] = 0
                hdus.append(fits.ImageHDU(data, name=hdu.name))
            else:
                hdus.append(hdu.copy())
        fits.HDUList(hdus).writeto(out)
    with fits.open(REDROCK) as f:
        redshifts = Table(f["REDSHIFTS"].data)[rows]
    redshifts["TARGETID"] = 1000 + np.arange(n)
    if z is not None:
        redshifts["Z"] = z
    if spectype is not None:
        redshifts["SPECTYPE"] = spectype
    redrock = fits.BinTableHDU(redshifts, name="REDSHIFTS")
    fits.HDUList([fits.PrimaryHDU(), redrock]).writeto(folder / name.replace("coadd-", "redrock-"))
    return out


# ---------------------------------------------------------------- 2. one bad galaxy, plots


def test_flagged_galaxies_are_not_plotted_and_good_ones_keep_their_values(tmp_path):
    """The first targets are a star, a z = 0.8 galaxy, one without a redshift and a dead fibre:
    the run finishes with metrics and plots of the unflagged galaxies only (it used to end in
    a ValueError from the plots after catalog.fits), and the good galaxies have exactly the
    values of a clean file at the same seed."""
    z = [0.36874, 0.8, np.nan, 0.36874, 0.36874, 0.36874]
    spectype = ["STAR", "GALAXY", "GALAXY", "GALAXY", "GALAXY", "GALAXY"]
    mixed = desi_file(tmp_path / "mixed", 6, z=z, spectype=spectype, dead=[3])
    clean = desi_file(tmp_path / "clean", 6, z=0.36874)

    def run(path, out, n_plots):
        source = SpectraSource("desi", path, redrock="auto")
        fitter = PosteriorFitter(n_samples=200, autoencoder=AUTOENCODER, seed=4)
        return run_catalog(source, fitter, out, shard_size=6, n_plots=n_plots, progress=False)

    metrics = run(mixed, tmp_path / "out_mixed", n_plots=2)
    run(clean, tmp_path / "out_clean", n_plots=0)
    table = Table.read(tmp_path / "out_mixed" / "catalog.fits")
    flags = np.asarray(table["flags"])
    assert flags[0] & SpecFlag.NOT_GALAXY and flags[1] & SpecFlag.BAD_Z
    assert flags[2] & SpecFlag.BAD_Z and flags[3] & SpecFlag.ALL_MASKED
    # the copies of the bundled galaxy: OOD for the shipped head (sedvae.posterior.ood)
    assert flags[3] & SpecFlag.BAD_FIBER and (flags[4:] == int(SpecFlag.OOD)).all()
    assert metrics["n_plotted"] == 2 and metrics["plot_failures"] == []
    saved = json.loads(json.dumps(metrics))  # what evaluate.py writes to metrics.json
    # n_flagged: galaxies a FATAL flag removed (BAD_Z twice, ALL_MASKED); the warnings of the
    # galaxies kept by name (BAD_FIBER is on a removed one)
    assert saved["n_galaxies"] == 6 and saved["n_flagged"] == 3
    assert saved["n_warnings"] == {"NOT_GALAXY": 1, "OOD": 3}  # the star and galaxies 4, 5
    plots = sorted(p.name for p in (tmp_path / "out_mixed" / "plots").glob("*.png"))
    assert plots == [f"{kind}_{tid}.png" for kind in ("corner", "reconstruction", "sfh")
                     for tid in (1004, 1005)]  # fmt: skip

    reference = Table.read(tmp_path / "out_clean" / "catalog.fits")
    assert (reference["flags"] == int(SpecFlag.OOD)).all()
    for name in table.colnames:
        if name.endswith(("_p16", "_p50", "_p84")) or name == "rchi2":
            values = np.asarray(table[name], dtype=float)
            # the posterior's draws are exactly those of the clean run; the autoencoder sees
            # 3 galaxies instead of 6, a batch of another shape (float32 round-off)
            rtol = 1e-5 if name == "rchi2" else 0
            np.testing.assert_allclose(values[4:], reference[name][4:], rtol, 0, err_msg=name)
            assert np.isnan(values[1:4]).all(), name  # no posterior for fatal flags


# ---------------------------------------------------------------- 4. resume never mixes runs


@pytest.fixture(scope="module")
def mock_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mocks")
    return {"a": MockSource(folder / "a.h5", n=4, seed=5).path,
            "b": MockSource(folder / "b.h5", n=4, seed=6).path}  # fmt: skip


def run_mocks(path, out, seed=1, shard_size=2, seed_of_file=5):
    source = MockSource(path, n=4, seed=seed_of_file)
    fitter = PosteriorFitter(n_samples=100, seed=seed)
    return run_catalog(source, fitter, out, shard_size=shard_size, n_plots=0, progress=False)


def shard_times(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("shard_*.fits")}


def test_resume_with_other_inputs_or_settings_is_refused_naming_the_difference(
    tmp_path, mock_files
):
    out = tmp_path / "run"
    run_mocks(mock_files["a"], out)
    before = shard_times(out)
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["shard_size"] == 2 and manifest["n_galaxies"] == 4
    assert manifest["source"]["file"]["path"] == str(mock_files["a"].resolve())
    assert manifest["fitter"]["seed"] == 1 and manifest["sedvae_version"]
    from sedvae.catalog.fitter import default_posterior_path
    from sedvae.catalog.manifest import sha256_file

    assert manifest["fitter"]["posterior"]["sha256"] == sha256_file(default_posterior_path())

    with pytest.raises(CatalogError, match=r"source\.file\.path: was .*a\.h5.*now .*b\.h5"):
        run_mocks(mock_files["b"], out, seed_of_file=6)
    with pytest.raises(CatalogError, match=r"shard_size: was 2, now 3"):
        run_mocks(mock_files["a"], out, shard_size=3)
    with pytest.raises(CatalogError, match=r"fitter\.seed: was 1, now 2"):
        run_mocks(mock_files["a"], out, seed=2)
    assert shard_times(out) == before  # refused at once: nothing recomputed or replaced


def test_truncated_and_empty_shards_are_named_and_recomputed(tmp_path, mock_files, caplog):
    out = tmp_path / "run"
    run_mocks(mock_files["a"], out)
    reference = Table.read(out / "catalog.fits")
    first, second = out / "shards" / "shard_000000.fits", out / "shards" / "shard_000001.fits"
    first.write_bytes(b"")
    second.write_bytes(second.read_bytes()[:4000])  # header whole, table cut
    with caplog.at_level(logging.WARNING):
        metrics = run_mocks(mock_files["a"], out)
    assert "shard_000000.fits is empty or truncated" in caplog.text
    assert "shard_000001.fits is empty or truncated" in caplog.text
    assert metrics["n_galaxies"] == 4
    table = Table.read(out / "catalog.fits")
    for name in reference.colnames:
        np.testing.assert_array_equal(table[name], reference[name], err_msg=name)
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary file left behind


def test_corrupt_shard_is_named(tmp_path):
    from sedvae.catalog import merge_shards, write_shard

    folder = tmp_path / "shards"
    for s in range(2):
        write_shard(folder, s, {"index": np.arange(2 * s, 2 * s + 2), "x": np.ones(2)})
    (folder / "shard_000001.fits").write_bytes(b"SIMPLE  = not a table" + b" " * 2859)
    with pytest.raises(CatalogError, match="shard_000001.fits: not a readable shard"):
        merge_shards(folder, 2)


def test_unwritable_shards_folder_is_named_before_any_inference(tmp_path, mock_files):
    out = tmp_path / "run"
    out.mkdir()
    (out / "shards").write_text("a file where the shards folder goes")
    with pytest.raises(CatalogError, match="shards.*cannot write"):
        run_mocks(mock_files["a"], out)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anyway")
def test_read_only_shards_folder_is_named(tmp_path, mock_files):
    out = tmp_path / "run"
    (out / "shards").mkdir(parents=True)
    (out / "shards").chmod(0o500)
    try:
        with pytest.raises(CatalogError, match="shards.*cannot write"):
            run_mocks(mock_files["a"], out)
    finally:
        (out / "shards").chmod(0o700)


# ---------------------------------------------------------------- 5. errors name the file


def test_truncated_coadd_names_the_file_and_hdu(tmp_path):
    path = tmp_path / COADD.name
    path.write_bytes(COADD.read_bytes()[:300_000])  # the FIBERMAP is whole, the arms are cut
    shutil.copy(REDROCK, tmp_path)
    source = SpectraSource("desi", path, redrock="auto")
    with pytest.raises(SpectrumFileError, match=rf"{path.name}: HDU '\w+' cannot be read.*trunc"):
        source(0, 1)


def test_non_fits_file_names_the_file(tmp_path):
    path = tmp_path / "coadd-notfits.fits"
    path.write_text("TARGETID,Z\n1,0.1\n")
    shutil.copy(REDROCK, tmp_path / "redrock-notfits.fits")
    with pytest.raises(SpectrumFileError, match="coadd-notfits.fits: not a readable FITS file"):
        SpectraSource("desi", path, redrock="auto")


def test_empty_directory_as_input_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpectrumFileNotFoundError, match="empty is an empty directory"):
        SpectraSource("desi", tmp_path / "empty", redrock="auto")


def test_coadd_without_redshifts_is_refused_not_flagged(tmp_path):
    shutil.copy(COADD, tmp_path)
    path = tmp_path / COADD.name
    with pytest.raises(SpectrumFileNotFoundError, match=rf"{COADD.name}: no redshifts.*redrock-"):
        SpectraSource("desi", path, redrock="auto")
    with pytest.raises(SpectrumFileNotFoundError, match="no redshifts given"):
        SpectraSource("desi", path)
    batch = SpectraSource("desi", path, redrock="auto", z=0.36874)(0, 1)  # a user redshift
    assert batch["flags"].item() == 0 and abs(batch["z"].item() - 0.36874) < 1e-6


# ---------------------------------------------------------------- 6. mocks respect settings


def test_mock_source_refuses_a_file_of_other_settings(mock_files):
    with pytest.raises(CatalogError, match=r"made with n=4, seed=5; asked for n=320, seed=5"):
        MockSource(mock_files["a"], n=320, seed=5)
    with pytest.raises(CatalogError, match=r"made with n=4, seed=5; asked for n=4, seed=7"):
        MockSource(mock_files["a"], n=4, seed=7)
    assert len(MockSource(mock_files["a"], n=4, seed=5)) == 4


def test_default_mock_file_name_holds_its_settings():
    """Every config that builds a MockSource names its default file by n and seed."""
    from omegaconf import OmegaConf

    configs = [p for p in (REPO / "conf").rglob("*.yaml")
               if "sedvae.catalog.sources.MockSource" in p.read_text()]  # fmt: skip
    assert configs
    for path in configs:
        names = set()
        for n, seed in ((256, 3), (1000, 3), (256, 4)):
            cfg = OmegaConf.create({"paths": {"cache_dir": "cache"}, "src": OmegaConf.load(path)})
            cfg.src.n, cfg.src.seed = n, seed
            names.add(cfg.src.path)
        assert len(names) == 3, (path, names)


# ---------------------------------------------------------------- 7. tests never hang


def test_distributed_test_is_skipped_without_loopback_instead_of_hanging(tmp_path):
    """In a network namespace without loopback the DDP test used to hang until killed."""
    if shutil.which("unshare") is None or subprocess.run(
        ["unshare", "-n", "true"], capture_output=True
    ).returncode:
        pytest.skip("no network namespace can be made here (unshare -n)")
    test = "tests/test_catalog_shards.py::test_ddp_on_two_cpu_processes_matches_one_process"
    cmd = ["unshare", "-n", sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
           test]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "1 skipped" in done.stdout and "127.0.0.1" in done.stdout
