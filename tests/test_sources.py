"""Survey files as shard sources for catalog inference."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from astropy.io import fits

from sedvae.catalog.sources import SpectraSource
from sedvae.io import SpecFlag
from sedvae.paths import data_dir

COADD = data_dir() / "desi_example" / "coadd-4-80613-thru20210324.fits"


def test_desi_source_matches_the_file():
    source = SpectraSource("desi", str(COADD.parent / "coadd-*.fits"), redrock="auto")
    assert len(source) == 1
    batch = source(0, 1)
    with fits.open(COADD) as f:
        n_b = len(f["B_WAVELENGTH"].data)
        np.testing.assert_allclose(batch["flux"][0, :n_b].numpy(), f["B_FLUX"].data[0], rtol=1e-6)
        np.testing.assert_allclose(
            batch["photometry"][0, 1].item(), f["FIBERMAP"].data["FLUX_R"][0], rtol=1e-6
        )
    assert batch["ids"][0] == 39633345008634465
    assert abs(batch["z"].item() - 0.36874) < 1e-4
    assert batch["flags"].item() == 0
    assert batch["resolution"].shape == (1, 11, batch["flux"].shape[1])


def test_bad_galaxy_is_flagged_not_fatal(tmp_path):
    bad = tmp_path / COADD.name
    shutil.copy(COADD, bad)
    shutil.copy(COADD.parent / COADD.name.replace("coadd-", "redrock-"), tmp_path)
    with fits.open(bad, mode="update") as f:
        for arm in "BRZ":
            f[f"{arm}_FLUX"].data[:] = np.nan
    source = SpectraSource("desi", [COADD, bad], redrock="auto")
    batch = source(0, 2)
    assert batch["flags"][0].item() == 0
    assert batch["flags"][1].item() & SpecFlag.ALL_MASKED
    assert np.isfinite(batch["flux"].numpy()).all()  # masked pixels carry finite values, ivar 0
    assert (batch["ivar"][1] == 0).all()


def test_missing_file_and_hdu_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file matches"):
        SpectraSource("desi", str(tmp_path / "coadd-*.fits"))
    broken = tmp_path / "coadd-broken.fits"
    with fits.open(COADD) as f:
        fits.HDUList([h for h in f if h.name != "FIBERMAP"]).writeto(broken)
    with pytest.raises(KeyError, match="FIBERMAP"):
        SpectraSource("desi", broken)
