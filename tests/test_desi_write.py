"""DESI coadd writer: mock targets through the DESI instrument, written in the bundled coadd's
layout, read back by ``read_spectra('desi', ...)`` unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from sedvae.io import SpecFlag, read_spectra
from sedvae.io.desi_write import mock_coadd_spectra, write_desi_coadd

DESI_DIR = Path(__file__).resolve().parents[1] / "data" / "desi_example"
COADD = DESI_DIR / "coadd-4-80613-thru20210324.fits"
REDROCK = DESI_DIR / "redrock-4-80613-thru20210324.fits"
N = 24


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    from sedvae.simulation import MockGenerator

    like = read_spectra("desi", COADD, redrock=REDROCK)
    spectra, truth = mock_coadd_spectra(
        MockGenerator(), N, 11, like, p_masked_arm=0.15, p_zwarn=0.15
    )
    folder = tmp_path_factory.mktemp("desi")
    coadd, redrock = write_desi_coadd(folder / "coadd-mock-0000.fits", spectra)
    return spectra, truth, coadd, redrock


def test_mocks_have_bad_targets_and_realistic_noise(written):
    spectra, truth, _, _ = written
    assert (truth["masked_arm"] >= 0).sum() >= 1 and (truth["zwarn"] != 0).sum() >= 1
    assert (truth["masked_arm"] < 0).sum() >= N // 2
    # BGS-like S/N per pixel in the r arm (the example's 7.0 with a log-normal galaxy scatter)
    r = spectra.arm == 1
    snr = np.abs(spectra.flux[:, r]) * np.sqrt(spectra.ivar[:, r])
    ok = truth["masked_arm"] != 1
    median = np.median(np.median(snr[ok], axis=1))
    assert 2.0 < median < 25.0
    assert (spectra.photometry > 0).mean() > 0.9  # nanomaggies of bright galaxies


def test_layout_equals_the_bundled_coadd(written):
    _, _, coadd, redrock = written
    for ours, theirs in ((coadd, COADD), (redrock, REDROCK)):
        with fits.open(ours) as a, fits.open(theirs) as b:
            assert [h.name for h in a] == [h.name for h in b]
            for ha, hb in zip(a, b, strict=True):
                if isinstance(hb, fits.BinTableHDU):
                    assert ha.columns.names == hb.columns.names, hb.name
                    assert ha.columns.formats == hb.columns.formats, hb.name
                elif hb.data is not None:
                    assert ha.data.dtype == hb.data.dtype, hb.name
                    assert ha.data.shape[1:] == hb.data.shape[1:], hb.name
                    assert ha.data.shape[0] == (N if ha.data.ndim > 1 else hb.data.shape[0])
    with fits.open(coadd) as hdul:
        assert hdul["B_FLUX"].header["BUNIT"] == "10**-17 erg/(s cm2 Angstrom)"
        assert len(hdul["FIBERMAP"].data) == N


def test_round_trip_through_read_spectra(written):
    spectra, truth, coadd, redrock = written
    raw = read_spectra("desi", coadd, redrock=redrock, validate=False)
    assert np.array_equal(raw.ids, spectra.ids)
    assert np.array_equal(raw.wave, spectra.wave) and np.array_equal(raw.arm, spectra.arm)
    for name in ("flux", "ivar", "mask", "photometry", "photometry_ivar"):
        assert np.array_equal(getattr(raw, name), getattr(spectra, name)), name
        assert getattr(raw, name).dtype == getattr(spectra, name).dtype, name
    assert raw.bands == ("G", "R", "Z", "W1", "W2")
    for a in range(3):
        assert np.array_equal(raw.resolution[a], spectra.resolution[a])
    assert np.array_equal(raw.z, truth["z"])
    assert np.array_equal(raw.extra["ZWARN"], truth["zwarn"])
    assert (raw.extra["SPECTYPE"] == "GALAXY").all()
    assert (raw.extra["PHOTSYS"] == "N").all()
    assert (raw.extra["EBV"] == 0).all()

    # validated (the catalog's path): ZWARN flagged, a masked arm masked, nothing else flagged
    spectra_v = read_spectra("desi", coadd, redrock=redrock)
    zwarn = (spectra_v.flags & int(SpecFlag.ZWARN)) != 0
    assert np.array_equal(zwarn, truth["zwarn"] != 0)
    clean = (truth["zwarn"] == 0) & (truth["masked_arm"] < 0)
    assert (spectra_v.flags[clean] == 0).all()
    for i in np.flatnonzero(truth["masked_arm"] >= 0):
        sel = spectra_v.arm == truth["masked_arm"][i]
        assert spectra_v.mask[i, sel].all() and (spectra_v.ivar[i, sel] == 0).all()
        assert not spectra_v.mask[i, ~sel].all()


def test_targets_subset_and_redrock_name(written, tmp_path):
    spectra, _, coadd, redrock = written
    assert redrock.name == "redrock-mock-0000.fits"
    want = spectra.ids[[5, 2]]
    sub = read_spectra("desi", coadd, redrock=redrock, targetids=want, validate=False)
    assert np.array_equal(sub.flux, spectra.flux[[5, 2]])
    with pytest.raises(ValueError, match="coadd-"):
        write_desi_coadd(tmp_path / "mock.fits", spectra)
    path, none = write_desi_coadd(tmp_path / "mock.fits", spectra, redrock=False)
    assert none is None and path.is_file()
