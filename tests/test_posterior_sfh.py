"""The head trained on the broader SFH prior (data/posterior/posterior_sfh.pt,
``experiment=posterior_flow_sfh``) against the default head on galaxies sedvae's simulator did
not make (bagpipes' delayed-tau, exponential, lognormal and double-power-law histories):
``bench/off_model.py`` measures surviving-mass bias +0.048 dex and 68 % coverage 0.63 against
+0.084 and 0.40 on 1,000 such spectra, and log SFR(100 Myr) of star-forming galaxies -0.087 dex
(goal |bias| <= 0.1; -0.128 before the projection could move theta's burst into the last 100
Myr); on 160 here the ordering and the SFR goal must hold."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from sedvae.io.batch import FATAL

DATA = Path(__file__).resolve().parents[1] / "data" / "posterior"
N = 160


@pytest.fixture(scope="module")
def offmodel(tmp_path_factory):
    from sedvae.catalog.sources import MockSource
    from sedvae.offmodel import write_offmodel

    torch.set_num_threads(1)
    path = write_offmodel(tmp_path_factory.mktemp("off") / "off.h5", n=N, seed=41)
    batch = MockSource(path, n=N, seed=41, noise_seed=0)(0, N)
    with h5py.File(path, "r") as f:
        truth = {k: f["offmodel"][k][()] for k in ("logmstar_surv", "sfr_100myr")}
    return batch, truth


def _posterior(name: str, batch: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(3, B) 16/50/84 % of the surviving mass, (B,) the median log SFR(100 Myr) and the
    usable galaxies."""
    from sedvae.posterior import load_posterior

    post = load_posterior(DATA / name)
    samples, flags = post.sample(batch, 300, torch.Generator().manual_seed(0),
                                 return_flags=True)  # fmt: skip
    derived = post.derived(samples, batch["z"])
    logm = derived["logmstar_surv"].double()
    q = torch.quantile(logm, torch.tensor([0.16, 0.5, 0.84], dtype=torch.float64), dim=0)
    logsfr = torch.log10(derived["sfr_100myr"].double().clamp_min(1e-30)).median(0).values
    return q.numpy(), logsfr.numpy(), (flags.numpy() & int(FATAL)) == 0


def test_sfh_head_is_less_biased_and_better_covered_off_model(offmodel):
    batch, t = offmodel
    truth = t["logmstar_surv"]
    (lo0, med0, hi0), _, ok0 = _posterior("posterior.pt", batch)
    (lo1, med1, hi1), sfr1, ok1 = _posterior("posterior_sfh.pt", batch)
    ok = ok0 & ok1
    assert ok.sum() >= 0.95 * N
    bias0, bias1 = np.median((med0 - truth)[ok]), np.median((med1 - truth)[ok])
    cov0 = np.mean(((truth >= lo0) & (truth <= hi0))[ok])
    cov1 = np.mean(((truth >= lo1) & (truth <= hi1))[ok])
    assert bias1 < bias0 - 0.01, (bias0, bias1)
    assert abs(bias1) < 0.08, bias1
    assert cov1 > cov0 + 0.08, (cov0, cov1)
    assert 0.5 < cov1 < 0.85, cov1
    # star-forming galaxies (true sSFR over 100 Myr > 1e-11 / yr): SFR within the goal
    sf = ok1 & (t["sfr_100myr"] / 10**truth > 1e-11)
    assert sf.sum() > 100
    sfr_bias = np.median(sfr1[sf] - np.log10(t["sfr_100myr"][sf]))
    assert abs(sfr_bias) < 0.1, sfr_bias
