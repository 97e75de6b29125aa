"""Bad input inside good files: flagged, never a crash, never something that looks like an answer.

The inputs are the bundled DESI coadd repeated into one file of several targets, some of them
ruined on disk (NaN in a resolution matrix, fluxes scaled by 1e19, one pixel of 3e38, zero or
negative flux, one spike pixel), read back by the DESI reader and run through the catalog with
the shipped posterior and autoencoder, next to the same file left clean.
"""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import Table

from sedvae.catalog.fitter import PosteriorFitter
from sedvae.catalog.run import run_catalog
from sedvae.catalog.sources import SpectraSource
from sedvae.io import FATAL, Flag, SpectrumBatch, read_spectra
from sedvae.io.batch import CLIP_SIGMA, NO_SIGNAL_SNR, outlier_pixels
from sedvae.paths import data_dir
from sedvae.sps import THETA

COADD = data_dir() / "desi_example" / "coadd-4-80613-thru20210324.fits"
REDROCK = data_dir() / "desi_example" / "redrock-4-80613-thru20210324.fits"
ARMS = "BRZ"

# one row per case; rows 0 and 7 stay clean in every file
CLEAN, BAD_RES, X1E19, HUGE_PIXEL, ZERO, NEGATIVE, SPIKE, CLEAN2, UNIT = range(9)
N_ROWS = 9
SPIKE_PIXEL = 1500  # in the b arm, away from lines (rest ~3300 A at z = 0.37)


def _ruin(f: fits.HDUList, row: int, case: int) -> None:
    if case == BAD_RES:
        f["B_RESOLUTION"].data[row, 3, 100] = np.nan
    elif case == X1E19:  # flux in the wrong unit, ivar left alone: S/N 1e19
        for arm in ARMS:
            f[f"{arm}_FLUX"].data[row] *= 1e19
    elif case == HUGE_PIXEL:
        f["B_FLUX"].data[row, SPIKE_PIXEL] = 3e38
    elif case == ZERO:
        for arm in ARMS:
            f[f"{arm}_FLUX"].data[row] = 0.0
    elif case == NEGATIVE:
        for arm in ARMS:
            f[f"{arm}_FLUX"].data[row] = -np.abs(f[f"{arm}_FLUX"].data[row]) - 1.0
    elif case == SPIKE:  # the spectrum's median is ~1
        f["B_FLUX"].data[row, SPIKE_PIXEL] = 1e4
    elif case == UNIT:  # a galaxy 1e19 times brighter, flux and ivar consistent
        for arm in ARMS:
            f[f"{arm}_FLUX"].data[row] *= 1e19
            f[f"{arm}_IVAR"].data[row] /= 1e38


def write_coadd(path, ruined: bool) -> np.ndarray:
    """The bundled coadd repeated N_ROWS times (TARGETIDs made unique), each row ruined by
    its case when ``ruined``; returns the redshifts to read it with."""
    with fits.open(COADD) as src, fits.open(REDROCK) as rr:
        z = float(rr["REDSHIFTS"].data["Z"][0])
        hdus = [fits.PrimaryHDU(header=src[0].header)]
        for hdu in src[1:]:
            if hdu.name in ("FIBERMAP", "SCORES"):
                data = np.repeat(hdu.data, N_ROWS)
                if "TARGETID" in data.dtype.names:
                    data["TARGETID"] = data["TARGETID"][0] + np.arange(N_ROWS)
                hdus.append(fits.BinTableHDU(data, header=hdu.header, name=hdu.name))
            elif hdu.name.endswith(("_FLUX", "_IVAR", "_MASK", "_RESOLUTION")):
                data = np.repeat(hdu.data, N_ROWS, axis=0)
                hdus.append(fits.ImageHDU(data, header=hdu.header, name=hdu.name))
            else:
                hdus.append(hdu.copy())
        out = fits.HDUList(hdus)
        if ruined:
            for row in range(N_ROWS):
                _ruin(out, row, row)
        out.writeto(path)
    return np.full(N_ROWS, z)


@pytest.fixture(scope="module")
def fitter():
    return PosteriorFitter(
        n_samples=300, seed=4, autoencoder=data_dir() / "autoencoder" / "autoencoder_laptop.pt"
    )


def _run(folder, ruined, fitter):
    folder.mkdir(exist_ok=True)
    z = write_coadd(folder / "coadd-mixed.fits", ruined)
    source = SpectraSource("desi", folder / "coadd-mixed.fits", z=z)
    run_catalog(source, fitter, folder / "run", shard_size=4, n_plots=0, progress=False,
                write_samples=True)  # fmt: skip
    with h5py.File(folder / "run" / "samples.h5") as f:
        samples = f["samples"][:]
    return Table.read(folder / "run" / "catalog.fits"), samples


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, fitter):
    return _run(tmp_path_factory.mktemp("clean"), False, fitter)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, fitter):
    """Every ruined galaxy in one file: the run itself must finish (today's crashes)."""
    return _run(tmp_path_factory.mktemp("mixed"), True, fitter)


def _logm(table, row):
    return float(table["logmstar_p50"][row])


def test_clean_file_is_unflagged_and_fits(clean_run):
    table, _ = clean_run
    # no data problem; the one bit is OOD: the bundled DESI galaxy (a strong line emitter) lies
    # outside the shipped head's training summaries (sedvae.posterior.ood)
    assert (table["flags"] == int(Flag.OOD)).all()
    assert 8.5 < _logm(table, CLEAN) < 12.0 and np.isfinite(table["rchi2"]).all()


def test_nan_resolution_is_flagged_and_falls_back_to_a_gaussian_lsf(tmp_path, mixed_run, clean_run):
    table, _ = mixed_run
    # a warning: the fit goes on (OOD as for the clean copies of the bundled galaxy)
    assert table["flags"][BAD_RES] == Flag.BAD_RESOLUTION | Flag.OOD
    assert _logm(table, BAD_RES) == _logm(clean_run[0], BAD_RES)  # the posterior ignores the LSF
    # the autoencoder's chi^2 uses the Gaussian LSF: finite and close to the file's own matrix
    rchi2, rchi2_clean = float(table["rchi2"][BAD_RES]), float(clean_run[0]["rchi2"][BAD_RES])
    assert np.isfinite(rchi2) and abs(rchi2 / rchi2_clean - 1) < 0.1
    # the reader puts a unit-sum Gaussian in the broken pixel's column, for that target only
    z = write_coadd(tmp_path / "c.fits", True)
    spec = read_spectra("desi", tmp_path / "c.fits", z=z)
    assert spec.flags[BAD_RES] & Flag.BAD_RESOLUTION and not spec.flags[CLEAN] & Flag.BAD_RESOLUTION
    res = spec.resolution[0][BAD_RES]
    assert np.isfinite(res).all() and res[:, 100].sum() == pytest.approx(1.0, abs=1e-6)
    with fits.open(COADD) as f:
        file_b = f["B_RESOLUTION"].data[0]
        np.testing.assert_array_equal(np.delete(res, 100, -1), np.delete(file_b, 100, -1))
        np.testing.assert_array_equal(spec.resolution[1][BAD_RES], f["R_RESOLUTION"].data[0])


def test_extreme_flux_scales_are_flagged_not_raised(mixed_run, clean_run):
    table, _ = mixed_run
    # x1e19 with the file's ivar: the gappy-PCA solve used to fail; the mass is at the prior top
    assert table["flags"][X1E19] & Flag.PRIOR_EDGE
    assert _logm(table, X1E19) > 12.4
    # one pixel of 3e38 (float32's limit) is clipped: the galaxy keeps its clean mass
    assert not table["flags"][HUGE_PIXEL] & int(FATAL)
    assert abs(_logm(table, HUGE_PIXEL) - _logm(clean_run[0], HUGE_PIXEL)) < 0.02


def test_zero_and_negative_flux_are_no_signal_not_an_answer(mixed_run):
    table, _ = mixed_run
    for row in (ZERO, NEGATIVE):
        assert table["flags"][row] & Flag.NO_SIGNAL, Flag.describe(table["flags"][row])
        assert Flag.NO_SIGNAL & FATAL
        assert np.isnan(_logm(table, row)) and np.isnan(float(table["rchi2"][row]))


def test_no_signal_threshold_is_the_weighted_mean_snr():
    rng = np.random.default_rng(1)
    flux = rng.normal(0.0, 1.0, (200, 500))  # blank fibres: pure noise of unit ivar
    batch = SpectrumBatch.coerce({"flux": flux, "ivar": np.ones_like(flux), "z": np.full(200, 0.1)})
    no_signal = (batch.validate() & int(Flag.NO_SIGNAL)) != 0
    assert no_signal.float().mean() > 0.99  # S/N ~ N(0, 1) < 5
    faint = flux + 0.5  # mean S/N 0.5 sqrt(500) = 11 > NO_SIGNAL_SNR
    assert 0.5 * math.sqrt(500) > NO_SIGNAL_SNR
    batch = SpectrumBatch.coerce({"flux": faint, "ivar": np.ones_like(faint), "z": batch.z})
    assert ((batch.validate() & int(Flag.NO_SIGNAL)) == 0).all()


def test_spike_pixel_is_clipped_and_the_mass_kept(mixed_run, clean_run):
    table, _ = mixed_run
    assert table["flags"][SPIKE] == int(Flag.OOD)  # one clipped pixel is not "many"
    assert abs(_logm(table, SPIKE) - _logm(clean_run[0], SPIKE)) < 0.02  # was 10.25 -> 9.06
    assert abs(float(table["rchi2"][SPIKE]) / float(clean_run[0]["rchi2"][SPIKE]) - 1) < 0.01


def test_clipping_spares_emission_lines_and_flags_many_outliers():
    """A resolved emission line at peak S/N 200 (DESI FWHM 2.2 pixels) survives; single spikes
    of 20 sigma are clipped; a spectrum with 1 % spikes is flagged OUTLIER_PIXELS."""
    rng = np.random.default_rng(2)
    m = 4000
    pix = np.arange(m)
    sigma_pix = 2.2 / 2.355
    line = 200.0 * np.exp(-0.5 * ((pix - 1000.3) / sigma_pix) ** 2)
    flux = 10.0 + line + rng.normal(0, 1, (3, m))
    flux[1, [300, 2500]] += 2 * CLIP_SIGMA  # spikes of 20 sigma
    spikes = rng.choice(np.arange(50, m - 50, 7), 40, replace=False)
    flux[2, spikes] += 50.0
    ivar = np.ones_like(flux)
    clipped = outlier_pixels(torch.as_tensor(flux), torch.as_tensor(ivar))
    assert not clipped[:, 995:1006].any(), "an emission line was clipped"
    assert clipped[0].sum() == 0
    assert set(torch.nonzero(clipped[1]).flatten().tolist()) == {300, 2500}
    assert 2 * CLIP_SIGMA == 20.0
    assert set(torch.nonzero(clipped[2]).flatten().tolist()) == set(spikes.tolist())
    batch = SpectrumBatch.coerce({"flux": flux, "ivar": ivar, "z": np.full(3, 0.1)})
    batch = batch.clean(clip=True)
    assert batch.n_clipped.tolist() == [0, 2, 40]
    assert [Flag.describe(f) for f in batch.flags.tolist()] == ["OK", "OK", "OUTLIER_PIXELS"]
    assert batch.mask[1, 300] and batch.ivar[1, 300] == 0


def test_prior_edge_flag(mixed_run, fitter):
    table, _ = mixed_run
    # 1e19 times brighter in consistent units: more massive than the prior allows
    assert table["flags"][UNIT] & Flag.PRIOR_EDGE and _logm(table, UNIT) > 12.4
    assert not table["flags"][CLEAN] & Flag.PRIOR_EDGE
    post = fitter.posterior
    gen = torch.Generator().manual_seed(0)
    samples = torch.full((500, 4, 12), float("nan"))
    samples[..., THETA.LOGMSTAR] = 10.0 + 0.1 * torch.randn(500, 4, generator=gen)
    samples[..., THETA.N_DUST] = -0.5 + 0.2 * torch.randn(500, 4, generator=gen)
    samples[:, 1, THETA.LOGMSTAR] = 7.0 + 0.02 * torch.rand(500, generator=gen)  # at 7
    samples[:, 2, THETA.N_DUST] = 1.0 - 0.01 * torch.rand(500, generator=gen)  # at +1
    samples[:, 3, THETA.LOGMSTAR] = 11.0  # zero width
    assert post.prior_edge(samples).tolist() == [False, True, True, True]


def test_good_galaxies_of_a_mixed_file_keep_their_values(mixed_run, clean_run):
    """Same seed, same shards: the untouched galaxies' posterior samples are identical."""
    (table, samples), (table0, samples0) = mixed_run, clean_run
    for row in (CLEAN, CLEAN2, BAD_RES):
        np.testing.assert_array_equal(samples[row], samples0[row])
        assert table["logmstar_p50"][row] == table0["logmstar_p50"][row]
    for row in (CLEAN, CLEAN2):
        # the autoencoder sees only a shard's fit-able galaxies, a smaller batch: round-off
        assert table["flags"][row] == int(Flag.OOD)  # the bundled galaxy's, as the clean file's
        assert float(table["rchi2"][row]) == pytest.approx(float(table0["rchi2"][row]), rel=1e-5)
    assert len(table) == N_ROWS and list(table["index"]) == list(range(N_ROWS))
