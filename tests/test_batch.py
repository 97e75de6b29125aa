"""SpectrumBatch: one batch type from observed files and from mocks, one flag enum, one z range."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sedvae.io import FATAL, Z_RANGE, Flag, SpecFlag, SpectrumBatch, read_spectra
from sedvae.paths import data_dir
from sedvae.posterior import PosteriorFlag
from sedvae.sps import PARAM_NAMES, THETA

COADD = data_dir() / "desi_example" / "coadd-4-80613-thru20210324.fits"
REDROCK = data_dir() / "desi_example" / "redrock-4-80613-thru20210324.fits"


def test_one_flag_enum_with_the_bits_catalogs_already_hold():
    assert SpecFlag is Flag and PosteriorFlag is Flag
    old = {"NONFINITE": 1, "ALL_MASKED": 2, "BAD_Z": 4, "ZWARN": 8, "NOT_GALAXY": 16,
           "NO_Z_MATCH": 32, "BAD_FIBER": 64, "NO_PHOTOMETRY": 256,
           "PARTIAL_PHOTOMETRY": 512}  # fmt: skip
    assert {k: int(Flag[k]) for k in old} == old
    new = {"BAD_RESOLUTION": 128, "NO_SIGNAL": 1024, "OUTLIER_PIXELS": 2048, "PRIOR_EDGE": 4096}
    assert {k: int(Flag[k]) for k in new} == new
    assert FATAL == Flag.ALL_MASKED | Flag.BAD_Z | Flag.NO_SIGNAL
    assert not Flag.NO_PHOTOMETRY & FATAL and not Flag.PRIOR_EDGE & FATAL
    assert Flag.describe(Flag.BAD_Z | Flag.NO_SIGNAL) == "BAD_Z|NO_SIGNAL"


def test_theta_names_follow_param_names():
    assert PARAM_NAMES[THETA.LOGMSTAR] == "logmstar"
    assert PARAM_NAMES[THETA.BETA] == ("beta1", "beta2", "beta3", "beta4")
    assert PARAM_NAMES[THETA.GAMMA] == ("gamma1", "gamma2")
    assert PARAM_NAMES[THETA.DUST] == ("tau_bc", "tau_ism", "n_dust")
    singles = (THETA.F_BURST, THETA.T_BURST, THETA.TAU_BC, THETA.TAU_ISM, THETA.N_DUST)
    assert [PARAM_NAMES[i] for i in singles] == ["fburst", "tburst", "tau_bc", "tau_ism", "n_dust"]


def test_batch_from_the_bundled_coadd():
    spec = read_spectra("desi", COADD, redrock=REDROCK)
    batch = spec.to_batch()
    assert isinstance(batch, SpectrumBatch) and len(batch) == 1
    assert batch.flux.shape == (1, 7958) and batch.flux.dtype == torch.float32
    assert batch.wave.dtype == torch.float64 and batch.resolution.shape == (1, 11, 7958)
    assert batch.photometry.shape == (1, 5) and batch.ids[0] == 39633345008634465
    np.testing.assert_array_equal(batch.flux.numpy(), spec.flux)
    # the networks read it like the dicts they were given before
    assert batch["z"] is batch.z and "photometry" in batch and "theta" not in batch
    assert batch.get("theta") is None and set(dict(batch)) >= {"flux", "ivar", "mask", "z"}
    clean = batch.clean(clip=True)
    assert clean.flags.tolist() == [0] and clean.n_clipped.tolist() == [0]
    assert Z_RANGE[0] <= float(clean.z[0]) <= Z_RANGE[1]


def test_batch_from_mock_items_carries_the_truth(tmp_path):
    from sedvae.catalog.sources import MockSource

    source = MockSource(tmp_path / "m.h5", n=4, seed=2)
    batch = SpectrumBatch.from_items([source.dataset[i] for i in range(4)])
    assert batch.theta.shape == (4, 12) and batch.sigma_v.shape == (4,)
    assert torch.equal(batch.flux, source(0, 4)["flux"])
    clean = batch.clean(clip=True)
    assert clean.flags.tolist() == [0, 0, 0, 0]  # simulated galaxies are never flagged
    sub = clean.select(torch.tensor([False, True, False, True]))
    assert torch.equal(sub.theta, batch.theta[[1, 3]]) and torch.equal(sub.flux, clean.flux[[1, 3]])


def test_clean_flags_redshifts_outside_the_one_range():
    flux = np.ones((4, 10))
    z = np.array([Z_RANGE[0], Z_RANGE[1], 0.9, np.nan])
    batch = SpectrumBatch.coerce({"flux": flux, "ivar": 100 * flux, "z": z})
    assert [bool(f & Flag.BAD_Z) for f in batch.validate().tolist()] == [False, False, True, True]
    with pytest.raises(ValueError, match=r"flux must have shape \(B, 12\)"):
        batch.clean(npix=12)
    with pytest.raises(ValueError, match="missing 'z'"):
        SpectrumBatch.coerce({"flux": flux, "ivar": flux})
