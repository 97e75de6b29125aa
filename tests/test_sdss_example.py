"""The shipped SDSS spectrum (NGC 3073, data/sdss_example) reads with sedvae.io alone."""

from __future__ import annotations

import numpy as np
import pytest

from sedvae.io import FATAL, Flag, read_spectra
from sedvae.linear import NARROW_LINES
from sedvae.paths import data_dir

PATH = data_dir() / "sdss_example" / "NGC3073_SDSS_DR18.fits"


@pytest.fixture(scope="module")
def spectra():
    return read_spectra("sdss", PATH)


def test_sdss_example_loads(spectra):
    s = spectra
    assert s.flux.shape == (1, 3848) and s.wave.shape == (3848,)
    # SDSS coadd pixels: 1e-4 dex from 3796 to 9204 A (vacuum), strictly increasing
    assert s.wave[0] == pytest.approx(3795.77, abs=0.05)
    assert s.wave[-1] == pytest.approx(9204.50, abs=0.05)
    assert np.allclose(np.diff(np.log10(s.wave)), 1e-4, rtol=1e-6)
    assert np.isfinite(s.flux).all() and np.isfinite(s.ivar).all()
    good = (s.ivar > 0) & ~s.mask
    assert good.mean() > 0.99
    # median S/N per pixel ~ 50 (the pipeline's SN_MEDIAN_ALL is 52.6)
    snr = np.median((s.flux * np.sqrt(s.ivar))[good])
    assert 40.0 < snr < 65.0
    # redshift from HDU SPECOBJ: NGC 3073 at cz ~ 1130 km/s
    assert s.meta["redshift_source"] == "HDU SPECOBJ"
    assert s.z[0] == pytest.approx(0.003763, abs=2e-6)
    assert s.ids[0] == "1064104649075746816"
    # the LSF from wdisp: ~0.84 pixels, i.e. FWHM 2.1-2.5 A around 5000 A
    fwhm = 2.3548 * s.lsf_sigma[0]
    near = (s.wave > 4900) & (s.wave < 5100)
    assert 2.0 < np.median(fwhm[near]) < 2.6


def test_sdss_example_flags(spectra):
    # The pipeline calls it an A0 star (young stars): a warning, never fatal.
    assert spectra.extra["CLASS"][0] == "STAR"
    assert spectra.flags[0] & Flag.NOT_GALAXY
    # z = 0.0038 lies inside the supported range (0.001-0.6; below the networks' training
    # range, 0.01-0.6, see docs/results.md "Nearby galaxies"): a usable galaxy, not BAD_Z.
    assert not spectra.flags[0] & FATAL
    # a reader given a narrower range (the training range) flags it
    narrow = read_spectra("sdss", PATH, z_range=(0.01, 0.6))
    assert narrow.flags[0] & Flag.BAD_Z


def test_sdss_example_has_its_emission_lines(spectra):
    # H alpha, [N II] 6584 and [O III] 5007 at the SPECOBJ redshift peak > 10 sigma (the
    # file's own ivar) above the median of the +-15-40 A sides.
    s = spectra
    for name in ("Halpha", "[NII]6584", "[OIII]5007"):
        lam = NARROW_LINES[name] * (1 + s.z[0])
        core = np.abs(s.wave - lam) < 3
        peak = s.flux[0, core].max()
        side = (np.abs(s.wave - lam) > 15) & (np.abs(s.wave - lam) < 40)
        sigma = np.median(1 / np.sqrt(s.ivar[0, core]))
        assert peak - np.median(s.flux[0, side]) > 10 * sigma, name
