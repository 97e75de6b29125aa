"""Physics of the SPS simulator: agreement with bagpipes, mass bookkeeping, dust, priors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sedvae.sps import PARAM_NAMES, THETA, PROVABGSPrior
from sedvae.sps.ssp import load_ssp_grid


def _theta(beta, fb=0.0, tb=1.0, gamma=(1e-3, 1e-3), tau_bc=0.0, tau_ism=0.0, n=0.0, logm=10.0):
    return [logm, *beta, fb, tb, *gamma, tau_bc, tau_ism, n]


GALAXIES = {
    # NMF basis 0 is the recent star-forming one, basis 3 the oldest (PROVABGS row order)
    "young_star_forming": _theta([0.85, 0.05, 0.05, 0.05]),
    "old_quiescent": _theta([0.0, 0.1, 0.2, 0.7], logm=11.0),
    "dusty": _theta([0.3, 0.3, 0.2, 0.2], tau_ism=1.5),
}


@pytest.mark.parametrize("zmet", [0.008, 0.02, 0.05])
def test_agrees_with_bagpipes_model_galaxy(sed_model, zmet):
    """sedvae vs bagpipes' model_galaxy (configuration: sedvae.sps.reference docstring).

    Compared: the rest-frame stellar continuum, 3000-9000 A, of three galaxies (young
    star-forming, old quiescent, dusty with tau_ISM = 1.5) built from the same binned SFH
    (bagpipes' custom SFH), at one grid metallicity, with the Kriek & Conroy ISM curve at
    n_dust = 0 (bagpipes' Salim curve with delta = 0, B = 0.85).
    Not compared: bursts (bagpipes bins them into 0.1-dex age bins), birth-cloud dust (bagpipes
    applies the ISM curve there), off-grid metallicities (bagpipes interpolates linearly in Z,
    sedvae in log Z), nebular emission and dust emission.
    """
    from sedvae.sps.reference import compare_with_bagpipes

    theta = torch.tensor(list(GALAXIES.values()), dtype=torch.float64)
    diffs = compare_with_bagpipes(sed_model, theta, zmet)
    sed_model.to(torch.float32)
    for name, d in zip(GALAXIES, diffs, strict=True):
        assert np.median(d) <= 5e-3, (name, np.median(d))
        assert np.percentile(d, 99) <= 2e-2, (name, np.percentile(d, 99))


def test_wavelengths_stay_float64_under_dtype_casts(sed_model):
    wave = sed_model.wave.clone()
    sed_model.to(torch.float64).to(torch.float32)
    assert sed_model.wave.dtype == torch.float64 and torch.equal(sed_model.wave, wave)
    assert sed_model.seg_lum_old.dtype == torch.float32


def test_binned_sfh_integrates_to_formed_mass(sed_model64):
    prior = PROVABGSPrior()
    theta = prior.sample(64, torch.Generator().manual_seed(1), dtype=torch.float64)
    z = torch.linspace(0.0, 1.0, 64, dtype=torch.float64)
    out = sed_model64.sfh(theta, z)
    width_yr = (out["bin_hi_gyr"] - out["bin_lo_gyr"]) * 1e9
    formed = (out["sfr"] * width_yr).sum(-1) + out["burst_mass"]
    torch.testing.assert_close(torch.log10(formed), theta[:, THETA.LOGMSTAR], rtol=0, atol=1e-10)
    # nothing forms before the Big Bang
    t_u = sed_model64.history(theta, z).t_univ_gyr
    beyond = out["bin_lo_gyr"] >= t_u[:, None]
    assert (out["sfr"][beyond] == 0).all() and beyond.any()
    assert (out["bin_hi_gyr"][~beyond] <= t_u[:, None].expand_as(beyond)[~beyond] + 1e-12).all()
    assert ((out["burst_age_gyr"] < t_u) | (out["burst_mass"] == 0)).all()


def test_tabulated_history_equals_direct_integration(sed_model64):
    """history() takes whole bins from tables and integrates only the bin t_U(z) cuts;
    derived() sums the dense segments' surviving mass per bin. Both equal the direct
    definitions: every bin integrated up to min(edge, t_U), Z at the middle of [lo, hi]
    (the lower edge for bins beyond t_U), and the (B, S, Z) segment weights."""
    from sedvae.physics.cosmology import age_of_universe_gyr

    m = sed_model64
    theta = PROVABGSPrior().sample(2000, torch.Generator().manual_seed(7), dtype=torch.float64)
    z = torch.linspace(0.0, m.z_max, 2000, dtype=torch.float64)
    h = m.history(theta, z)
    t_u = age_of_universe_gyr(z)
    lo = m.bin_edges[:-1]
    hi = torch.maximum(torch.minimum(m.bin_edges[1:][None], t_u[:, None]), lo[None])
    beta = theta[:, None, THETA.BETA]
    mass = ((m._nmf_cumulative(hi) - m._nmf_cumulative(lo)[None]) * beta).sum(-1)
    mass = mass.clamp_min(0.0) / mass.clamp_min(0.0).sum(-1, keepdim=True)
    f_burst = theta[:, THETA.F_BURST] * (theta[:, THETA.T_BURST] < t_u)
    torch.testing.assert_close(h.bin_mass, mass * (1 - f_burst)[:, None], rtol=1e-12, atol=1e-14)
    zmin, zmax = 10 ** m.log_zgrid[0], 10 ** m.log_zgrid[-1]
    gamma = theta[:, None, THETA.GAMMA]
    bin_z = (m._nmf_zh(0.5 * (lo[None] + hi)) * gamma).sum(-1).clamp(zmin, zmax)
    torch.testing.assert_close(h.bin_z, bin_z, rtol=1e-12, atol=0)
    torch.testing.assert_close(h.bin_hi_gyr, hi)
    dense = (m._dense_weights(h) * m.seg_live).sum((-1, -2))
    torch.testing.assert_close(m._dense_live(h), dense, rtol=1e-12, atol=1e-15)


def test_burst_older_than_universe_is_dropped(sed_model64):
    theta = torch.tensor([_theta([0.25] * 4, fb=0.5, tb=13.0)], dtype=torch.float64)
    out = sed_model64.sfh(theta, torch.tensor([0.5], dtype=torch.float64))
    assert out["burst_mass"].item() == 0.0
    width_yr = (out["bin_hi_gyr"] - out["bin_lo_gyr"]) * 1e9
    assert math.isclose((out["sfr"] * width_yr).sum().item(), 1e10, rel_tol=1e-10)


def _pure_burst(model, age_index: int, z_index: int) -> tuple[torch.Tensor, float, float]:
    """theta of a pure burst at a raw grid age with metallicity exactly a grid value."""
    grid = load_ssp_grid()
    age_gyr = grid.ages_yr[age_index] / 1e9
    zmet = grid.zmet[z_index]
    zh = model._nmf_zh(torch.tensor(age_gyr, dtype=torch.float64)).sum().item()
    gamma = zmet / zh  # gamma_1 = gamma_2 so that Z(t_burst) is exactly the grid value
    theta = torch.tensor([_theta([0.25] * 4, fb=1.0, tb=age_gyr, gamma=(gamma, gamma))])
    return theta.to(torch.float64), age_gyr, zmet


@pytest.mark.parametrize(("age_index", "z_index"), [(130, 4), (180, 2), (165, 5)])
def test_pure_burst_is_the_single_ssp(sed_model64, age_index, z_index):
    theta, _, _ = _pure_burst(sed_model64, age_index, z_index)
    lum = sed_model64(theta, torch.zeros(1, dtype=torch.float64))[0]
    ssp = torch.as_tensor(load_ssp_grid().lum[z_index, age_index]) * 1e10
    torch.testing.assert_close(lum, ssp, rtol=1e-9, atol=0)


def test_surviving_mass_matches_grid_live_fraction(sed_model64):
    theta, _, _ = _pure_burst(sed_model64, 170, 4)
    d = sed_model64.derived(theta, torch.zeros(1, dtype=torch.float64))
    expected = 10.0 + math.log10(load_ssp_grid().live_frac[4, 170])
    assert abs(d["logmstar_surv"].item() - expected) < 1e-10


def test_surviving_mass_below_formed_and_sensible(sed_model):
    prior = PROVABGSPrior()
    theta = prior.sample(256, torch.Generator().manual_seed(2))
    z = torch.rand(256) * 0.6
    d = sed_model.derived(theta, z)
    surv_frac = 10 ** (d["logmstar_surv"] - theta[:, THETA.LOGMSTAR])
    # never above 1, never below the grid's smallest live fraction younger than the universe
    grid = load_ssp_grid()
    assert (surv_frac < 1).all()
    assert surv_frac.min() >= grid.live_frac[:, grid.ages_yr <= 13.8e9].min() - 1e-4
    assert (d["t_mw_gyr"] > 0).all() and (d["t_mw_gyr"] < 13.8).all()
    assert (d["z_mw"] >= 1e-4 * (1 - 1e-5)).all() and (d["z_mw"] <= 0.1 * (1 + 1e-5)).all()
    # SFR over 1 Gyr times 1 Gyr never exceeds the formed mass
    assert (d["sfr_1gyr"] * 1e9 <= 10 ** theta[:, THETA.LOGMSTAR] * (1 + 1e-5)).all()


def test_dust_only_dims(sed_model):
    prior = PROVABGSPrior()
    theta = prior.sample(32, torch.Generator().manual_seed(3))
    z = torch.rand(32) * 0.6
    dusty = sed_model(theta, z)
    clean = theta.clone()
    clean[:, 9:11] = 0.0
    free = sed_model(clean, z)
    assert (dusty <= free * (1 + 1e-6)).all()
    assert (dusty >= 0).all()  # old BC03 SSPs are exactly 0 in parts of the far UV
    # more dust, less light, at every wavelength
    more = theta.clone()
    more[:, 10] = (more[:, 10] + 0.5).clamp(max=3.0)
    assert (sed_model(more, z) <= dusty * (1 + 1e-6)).all()


def test_birth_cloud_dims_only_young_stars(sed_model64):
    theta = torch.tensor([_theta([0.85, 0.05, 0.05, 0.05])], dtype=torch.float64)
    z = torch.zeros(1, dtype=torch.float64)
    h = sed_model64.history(*sed_model64.check_inputs(theta, z))
    young, old = sed_model64.components(h, mass=torch.tensor([1e10], dtype=torch.float64))
    with_bc = theta.clone()
    with_bc[:, THETA.TAU_BC] = 1.0
    wave = sed_model64.wave
    expected = old + young * torch.exp(-5500.0 / wave)
    torch.testing.assert_close(sed_model64(with_bc, z), expected, rtol=1e-10, atol=0)


def test_ism_curve_is_unity_at_5500():
    from sedvae.sps.dust import CharlotFallKriekConroy

    dust = CharlotFallKriekConroy(np.array([1500.0, 5500.0]), dtype=torch.float64)
    n = torch.tensor([-2.0, -0.5, 0.0, 1.0], dtype=torch.float64)
    curve = dust.ism_curve(n)
    torch.testing.assert_close(curve[:, 1], torch.ones(4, dtype=torch.float64))
    # steeper (more negative n) curves attenuate the UV more
    assert curve[0, 0] > curve[1, 0] > curve[2, 0] > curve[3, 0]


def test_float32_matches_float64(sed_model, sed_model64):
    theta = PROVABGSPrior().sample(16, torch.Generator().manual_seed(4), dtype=torch.float64)
    z = torch.rand(16, dtype=torch.float64) * 0.6
    f64 = sed_model64(theta, z)
    f32 = sed_model(theta.float(), z.float()).double()
    # pixels above 1e-6 of each spectrum's peak (far-UV values underflow in float32)
    sel = f64 > 1e-6 * f64.amax(-1, keepdim=True)
    assert ((f32[sel] / f64[sel] - 1).abs().max()) < 1e-4


def test_compiled_dust_matches_eager():
    from sedvae.sps.dust import CharlotFallKriekConroy

    wave = np.geomspace(1000.0, 60000.0, 3000)
    eager = CharlotFallKriekConroy(wave)
    fused = CharlotFallKriekConroy(wave, compile=True)
    old, young = torch.rand(2, 5, 3000).unbind(0)
    dust = torch.rand(3, 5) * torch.tensor([[3.0], [3.0], [3.0]]) - torch.tensor(
        [[0.0], [0.0], [2.0]]
    )
    torch.testing.assert_close(
        fused(old, young, *dust), eager(old, young, *dust), rtol=1e-5, atol=0
    )


def test_differentiable_in_theta(sed_model64):
    theta = torch.tensor(
        [
            _theta(
                [0.4, 0.3, 0.2, 0.1],
                fb=0.2,
                tb=2.37,  # off the raw BC03 age nodes
                gamma=(3e-3, 2e-3),
                tau_bc=0.5,
                tau_ism=0.7,
                n=-0.3,
            )
        ],
        dtype=torch.float64,
        requires_grad=True,
    )
    z = torch.tensor([0.2], dtype=torch.float64)
    weights = torch.rand(sed_model64.n_wave, dtype=torch.float64)

    def f(t):
        return (sed_model64(t, z) * weights).sum() / 1e10

    f(theta).backward()
    grad = theta.grad.clone()
    assert torch.isfinite(grad).all()
    boxes = [THETA.LOGMSTAR, THETA.F_BURST, THETA.T_BURST, THETA.GAMMA.start, THETA.TAU_BC,
             THETA.TAU_ISM, THETA.N_DUST]  # fmt: skip
    for i in boxes:  # finite differences on the box parameters
        step = 1e-6 * max(abs(theta[0, i].item()), 1e-3)
        up, dn = theta.detach().clone(), theta.detach().clone()
        up[0, i] += step
        dn[0, i] -= step
        fd = (f(up) - f(dn)) / (2 * step)
        assert math.isclose(grad[0, i].item(), fd.item(), rel_tol=1e-4, abs_tol=1e-8), PARAM_NAMES[
            i
        ]


def test_prior_samples_lie_in_support():
    prior = PROVABGSPrior()
    theta = prior.sample(20000, torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.isfinite(prior.log_prob(theta)).all()
    beta = theta[:, THETA.BETA]
    torch.testing.assert_close(beta.sum(-1), torch.ones(20000, dtype=torch.float64))
    # flat Dirichlet(1,1,1,1): mean 1/4, variance 3/80
    assert (beta.mean(0) - 0.25).abs().max() < 0.01
    assert (beta.var(0) - 3 / 80).abs().max() < 0.003
    # log-uniform t_burst: log t uniform on [log 0.01, log 13.27]
    logt = torch.log(theta[:, THETA.T_BURST])
    assert abs(logt.mean().item() - 0.5 * (math.log(0.01) + math.log(13.27))) < 0.05


def test_log_prob_finite_at_float32_box_edges():
    theta = torch.tensor([_theta([0.25] * 4, tb=0.01, gamma=(2e-5, 2e-2), tau_ism=3.0, n=1.0)])
    assert torch.isfinite(PROVABGSPrior().log_prob(theta)).all()


def test_bijection_round_trips_and_lands_in_support():
    prior = PROVABGSPrior()
    theta = prior.sample(1000, torch.Generator().manual_seed(6), dtype=torch.float64)
    u = prior.to_unconstrained(theta)
    assert u.shape == (1000, 11)
    torch.testing.assert_close(prior.to_constrained(u), theta, rtol=1e-9, atol=1e-9)
    wild = torch.randn(1000, 11, dtype=torch.float64) * 5
    assert torch.isfinite(prior.log_prob(prior.to_constrained(wild))).all()


def test_bijection_log_det_matches_autograd():
    prior = PROVABGSPrior()
    u = torch.randn(3, 11, dtype=torch.float64)
    free = [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11]  # beta4 is determined by beta1..3
    for k in range(3):
        jac = torch.autograd.functional.jacobian(
            lambda x: prior.to_constrained(x[None])[0, free], u[k]
        )
        expected = torch.linalg.slogdet(jac)[1]
        assert math.isclose(
            prior.log_abs_det_jacobian(u[k : k + 1]).item(), expected.item(), rel_tol=1e-9
        )


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        (THETA.LOGMSTAR, 13.0, "logmstar"),
        (THETA.T_BURST, 0.001, "tburst"),
        (THETA.TAU_ISM, -0.1, "tau_ism"),
        (THETA.N_DUST, 2.0, "n_dust"),
    ],
)
def test_out_of_support_raises_naming_parameter(sed_model, column, value, message):
    theta = torch.tensor([_theta([0.25] * 4)])
    theta[0, column] = value
    with pytest.raises(ValueError, match=message):
        sed_model(theta, torch.tensor([0.1]))


def test_bad_inputs_raise(sed_model):
    good = torch.tensor([_theta([0.25] * 4)])
    with pytest.raises(ValueError, match="NaN"):
        sed_model(torch.full_like(good, float("nan")), torch.tensor([0.1]))
    with pytest.raises(ValueError, match="shape"):
        sed_model(good[:, :11], torch.tensor([0.1]))
    with pytest.raises(ValueError, match="simplex"):
        bad = good.clone()
        bad[0, 1] = 0.9
        sed_model(bad, torch.tensor([0.1]))
    with pytest.raises(ValueError, match=r"z must lie in \[0"):
        sed_model(good, torch.tensor([1.5]))
    with pytest.raises(ValueError, match="z must lie"):
        sed_model(good, torch.tensor([-0.1]))
    with pytest.raises(ValueError, match="z has NaN"):
        sed_model(good, torch.tensor([float("nan")]))
