"""The continuity SFH prior (sedvae.sps.continuity) on SEDModel's bins, and the truths of
histories that have no theta (SEDModel.derived_from_history)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sedvae.physics.cosmology import age_of_universe_gyr
from sedvae.sps import THETA
from sedvae.sps.continuity import ContinuitySFH


def _draws(sps, n: int, seed: int, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    theta = sps.prior.sample(n, gen, dtype=torch.float64)
    z = 0.01 + 0.79 * torch.rand(n, generator=gen, dtype=torch.float64)
    sfh = ContinuitySFH(**kwargs)
    return sfh, theta, z, sfh.draw(n, torch.Generator().manual_seed(seed + 1))


def test_continuity_masses_sum_and_nothing_beyond_the_universe(sed_model64):
    sps = sed_model64
    sfh, theta, z, d = _draws(sps, 300, 0, frac=1.0)
    h = sfh.history(sps, theta, z, d)
    # formed mass: the bins plus the burst make one unit
    assert torch.allclose(h.bin_mass.sum(-1) + h.burst_mass, torch.ones(300, dtype=torch.float64),
                          rtol=0, atol=1e-12)  # fmt: skip
    assert (h.bin_mass >= 0).all()
    # no mass in bins that start at or after t_U(z); the cut bin holds only its part before t_U
    t_u = age_of_universe_gyr(z)
    assert (h.bin_mass[sps.bin_edges[:-1][None] >= t_u[:, None]] == 0).all()
    started = sps.bin_edges[:-1][None] < t_u[:, None]
    assert (h.bin_hi_gyr[started] <= t_u[:, None].expand_as(started)[started] + 1e-9).all()
    # the 7 coarse bins run from 0 to t_U
    edges = sfh.edges(t_u)
    assert edges.shape == (300, 8)
    assert torch.allclose(edges[:, -1], t_u) and (edges.diff(dim=-1) > 0).all()


def test_draws_are_reproducible_from_the_seed_and_student_t():
    sfh = ContinuitySFH()
    a = sfh.draw(20000, torch.Generator().manual_seed(7))
    b = sfh.draw(20000, torch.Generator().manual_seed(7))
    c = sfh.draw(20000, torch.Generator().manual_seed(8))
    assert torch.equal(a["sfr_log_ratio"], b["sfr_log_ratio"])
    assert torch.equal(a["sfh_continuity"], b["sfh_continuity"])
    assert not torch.equal(a["sfr_log_ratio"], c["sfr_log_ratio"])
    r = a["sfr_log_ratio"].flatten().numpy()
    # Student-t(nu = 2, scale 0.3): quartiles +-0.3 * 0.8165, P(|r| > 0.3 * 2.920) = 0.1
    q25, q75 = np.percentile(r, [25, 75])
    assert q75 == pytest.approx(0.3 * 0.8165, abs=0.01) and q25 == pytest.approx(-q75, abs=0.015)
    assert np.mean(np.abs(r) > 0.3 * 2.920) == pytest.approx(0.1, abs=0.006)
    assert float(a["sfh_continuity"].double().mean()) == pytest.approx(0.5, abs=0.01)


def test_history_truths_equal_derived_for_provabgs_histories(sed_model64):
    """Half the batch keeps theta's histories: their History-based truths are derived(theta)."""
    sps = sed_model64
    sfh, theta, z, d = _draws(sps, 400, 2)
    h = sfh.history(sps, theta, z, d)
    mine = sps.derived_from_history(h, 10 ** theta[:, THETA.LOGMSTAR])
    ref = sps.derived(theta, z)
    keep = ~d["sfh_continuity"]
    assert 150 < int(keep.sum()) < 250
    for key in ("logmstar_surv", "sfr_100myr", "sfr_1gyr", "t_mw_gyr", "z_mw"):
        torch.testing.assert_close(mine[key][keep], ref[key][keep], rtol=1e-5, atol=0)
    # the continuity half differs (otherwise the prior would not have changed anything)
    assert (mine["t_mw_gyr"][~keep] - ref["t_mw_gyr"][~keep]).abs().median() > 0.3


def test_constant_sfr_truths_are_analytic(sed_model64):
    """All log ratios 0 and no burst: SFR = M / t_U over any window, t_MW = t_U / 2, and the
    surviving mass is the segment-by-segment sum of the SSPs' live fractions."""
    sps = sed_model64
    n = 5
    z = torch.tensor([0.0, 0.05, 0.2, 0.45, 0.8], dtype=torch.float64)
    theta = sps.prior.sample(n, torch.Generator().manual_seed(3), dtype=torch.float64)
    theta[:, THETA.F_BURST] = 0.0
    sfh = ContinuitySFH(frac=1.0)
    d = {"sfh_continuity": torch.ones(n, dtype=torch.bool),
         "sfr_log_ratio": torch.zeros(n, sfh.n_bins - 1, dtype=torch.float64)}  # fmt: skip
    h = sfh.history(sps, theta, z, d)
    mass = torch.full((n,), 1e10, dtype=torch.float64)
    out = sps.derived_from_history(h, mass)
    t_u = age_of_universe_gyr(z)
    torch.testing.assert_close(out["sfr_100myr"], mass / (t_u * 1e9), rtol=1e-9, atol=0)
    torch.testing.assert_close(out["sfr_1gyr"], mass / (t_u * 1e9), rtol=1e-9, atol=0)
    torch.testing.assert_close(out["t_mw_gyr"], t_u / 2, rtol=1e-9, atol=0)
    # surviving mass: the dense segments' live fractions one by one, plus the cut bin's rows
    dense = (sps._dense_weights(h) * sps.seg_live[None]).sum((-1, -2))
    rows, w = sps._sparse_rows(h)
    live = dense + (sps.sparse_live[rows] * w).sum(-1)
    torch.testing.assert_close(out["logmstar_surv"], torch.log10(mass * live), rtol=1e-12, atol=0)
    # more than the oldest SSP of the grid keeps, less than all of it
    assert ((live > sps.seg_live.min()) & (live < 1)).all()


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="frac"):
        ContinuitySFH(frac=1.5)
    with pytest.raises(ValueError, match="scale"):
        ContinuitySFH(scale=0.0)
    with pytest.raises(ValueError, match="t_U"):
        ContinuitySFH().edges(torch.tensor([3.0]))
    with pytest.raises(ValueError, match="sfr_log_ratio"):
        ContinuitySFH().bin_mass(torch.zeros(2, 3), torch.tensor([10.0, 11.0]),
                                 torch.linspace(0, 13.8, 43))  # fmt: skip
