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


def test_nmf_projection_returns_provabgs_histories_up_to_its_mix(sed_model64):
    """A history theta can make projects onto a theta with the same derived properties, up to
    the 2 % of the uniform mixture the projection mixes in (exactly without it)."""
    from sedvae.sps import continuity
    from sedvae.sps.continuity import project_to_nmf

    sps = sed_model64
    _, theta, z, _ = _draws(sps, 200, 7)
    th, zz = sps.check_inputs(theta, z)
    want = sps.derived(th, zz)
    sf = want["sfr_100myr"] > 1e-3 * 10 ** want["logmstar_surv"] / 1e8  # >= 0.1 % in 100 Myr
    for mix, tol in ((0.0, 1e-6), (continuity.PROJECTION_MIX, 2e-3)):
        old = continuity.PROJECTION_MIX
        continuity.PROJECTION_MIX = mix
        try:
            proj = project_to_nmf(sps, th, zz, sps.history(th, zz))
        finally:
            continuity.PROJECTION_MIX = old
        got = sps.derived(proj, zz)
        assert torch.allclose(got["logmstar_surv"], want["logmstar_surv"], atol=tol)
        assert torch.allclose(got["t_mw_gyr"], want["t_mw_gyr"], atol=50 * tol)  # Gyr
        ratio = got["sfr_100myr"][sf] / want["sfr_100myr"][sf]
        assert ((ratio - 1).abs() < (1e-4 if mix == 0 else 0.1)).float().mean() > 0.95
    keep = [i for i in range(theta.shape[1]) if i not in range(THETA.BETA.start, THETA.BETA.stop)]
    assert torch.equal(proj[:, keep], th[:, keep])  # only the NMF weights move
    assert torch.allclose(proj[:, THETA.BETA].sum(-1), torch.ones(200, dtype=torch.float64))
    # no basis at 0: the head's unconstrained coordinates stay within the prior draws' range
    u = sps.prior.to_unconstrained(proj)[:, 1:4]
    assert u.abs().max() < 12


def test_nmf_projection_labels_continuity_histories_closer_than_theta(sed_model64):
    """The projected theta describes a continuity history's surviving mass to ~0.01 dex and
    its mass-weighted age far better than the theta it was drawn with."""
    from sedvae.sps.continuity import project_to_nmf

    sps = sed_model64
    sfh, theta, z, d = _draws(sps, 400, 11, frac=1.0, scale=0.6)
    th, zz = sps.check_inputs(theta, z)
    h = sfh.history(sps, th, zz, d)
    truth = sps.derived_from_history(h, 10 ** th[:, THETA.LOGMSTAR])
    theta_proj = project_to_nmf(sps, th, zz, h)
    assert sps.prior.to_unconstrained(theta_proj)[:, 1:4].abs().max() < 12
    proj, orig = sps.derived(theta_proj, zz), sps.derived(th, zz)

    def med_abs(d, key):
        return float((d[key] - truth[key]).abs().median())

    assert med_abs(proj, "logmstar_surv") < 0.015
    assert med_abs(proj, "logmstar_surv") < 0.7 * med_abs(orig, "logmstar_surv")
    assert med_abs(proj, "t_mw_gyr") < 0.5 * med_abs(orig, "t_mw_gyr")


def test_mock_generator_sfh_prior_changes_only_the_continuity_galaxies(tmp_path):
    """MockGenerator(sfh=...): galaxies left with PROVABGS histories are the sfh=None mocks bit
    for bit; the others differ in their NMF weights and spectra; the file says which prior it
    holds, and a data module with another prior refuses it."""
    import h5py

    from sedvae.posterior.data import PosteriorMockDataModule
    from sedvae.simulation import MockGenerator
    from sedvae.simulation.writer import write_mocks

    base = MockGenerator()
    broad = MockGenerator(sps=base.sps, instrument=base.instrument, noise=base.noise,
                          sfh={"frac": 0.5, "scale": 0.6})  # fmt: skip
    write_mocks(tmp_path / "a.h5", 64, 5, base)
    write_mocks(tmp_path / "b.h5", 64, 5, broad)
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        assert a.attrs["sfh"] == "provabgs" and b.attrs["sfh"] == broad.sfh_settings
        pick = b["sfh_continuity"][()].astype(bool)
        assert 0.25 < pick.mean() < 0.75
        for key in ("flux_true", "theta", "line_lum"):
            assert np.array_equal(a[key][()][~pick], b[key][()][~pick]), key
        ta, tb = a["theta"][()][pick], b["theta"][()][pick]
        beta = list(range(THETA.BETA.start, THETA.BETA.stop))
        assert np.array_equal(np.delete(ta, beta, 1), np.delete(tb, beta, 1))
        assert np.abs(ta[:, beta] - tb[:, beta]).max() > 0.1
        rel = np.abs(a["flux_true"][()][pick] - b["flux_true"][()][pick]).mean(1)
        assert np.median(rel / np.abs(a["flux_true"][()][pick]).mean(1)) > 0.01
    dm = PosteriorMockDataModule(cache_dir=str(tmp_path), generator=base)
    dm.check_sfh(tmp_path / "a.h5")
    with pytest.raises(ValueError, match="SFH prior"):
        dm.check_sfh(tmp_path / "b.h5")
    with pytest.raises(ValueError, match="frac, scale and burst"):
        MockGenerator(sps=base.sps, instrument=base.instrument, noise=base.noise,
                      sfh={"frac": 0.5, "width": 1.0})  # fmt: skip


def test_burst_projection_labels_recent_star_formation(sed_model64):
    """PROVABGS' 4 bases cannot make the recent SFR of many continuity histories; moving theta's
    burst into the last 100 Myr (``burst=True``) brings the labels' log SFR(100 Myr) of
    star-forming histories close (mean error -0.33 -> -0.10 dex on 2,000) without losing the
    surviving mass, and keeps every coordinate inside the prior's range."""
    from sedvae.sps.continuity import project_to_nmf

    sps = sed_model64
    sfh, theta, z, d = _draws(sps, 400, 13, frac=1.0, scale=0.6)
    th, zz = sps.check_inputs(theta, z)
    h = sfh.history(sps, th, zz, d)
    truth = sps.derived_from_history(h, 10 ** th[:, THETA.LOGMSTAR])
    sf = truth["sfr_100myr"] / 10 ** truth["logmstar_surv"] > 1e-11

    def errors(burst: bool):
        proj = project_to_nmf(sps, th, zz, h, burst=burst)
        assert sps.prior.to_unconstrained(proj).abs().max() < 12
        got = sps.derived(proj, zz)
        sfr = torch.log10(got["sfr_100myr"][sf] / truth["sfr_100myr"][sf])
        return proj, sfr, (got["logmstar_surv"] - truth["logmstar_surv"]).abs()

    plain, sfr0, m0 = errors(False)
    moved, sfr1, m1 = errors(True)
    assert float(sfr1.mean()) > float(sfr0.mean()) + 0.1
    assert abs(float(sfr1.median())) < 0.02 and float(sfr1.mean()) > -0.2
    assert float(m1.median()) <= float(m0.median()) + 1e-3
    changed = moved[:, THETA.F_BURST] != plain[:, THETA.F_BURST]
    assert 0.1 < float(changed.double().mean()) < 0.7
    assert (moved[changed, THETA.T_BURST] < 0.1).all()
