"""Fisher information of mocks (studies.information): the binning's overlap matrix
against RestFrameBinner, what binning keeps and loses, the coordinates in which the mock
prior is N(0, I), the simulator derivatives against their analytic form, and the Laplace
sigma against the Levenberg-Marquardt fit's Gauss-Newton covariance."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from sedvae.physics.restframe import RestFrameBinner
from sedvae.sps.provabgs import LOGM_RANGE, PROVABGSPrior, check_support
from studies.information import (
    GaussianCoordinates,
    binned_fisher,
    marginal_sigma,
    overlap_matrix,
    stencil,
    summary_fisher,
    whitened_jacobian,
)


@pytest.fixture(scope="module")
def generator():
    from sedvae.simulation import MockGenerator

    return MockGenerator()


@pytest.fixture(scope="module")
def coords(generator):
    return GaussianCoordinates(PROVABGSPrior(), generator.logu_range, generator.sigma_v_range,
                               generator.aperture_range)  # fmt: skip


def _mock(generator, seed: int):
    """Prior draw, noiseless observation and noisy observation of one mock (one thread)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    params = generator.draw(1, g)
    clean = generator.noiseless(params)
    return params, clean, generator.noisy(clean["flux_true"], clean["photometry_true"], g)


def _binner(generator, n_bins=512):
    inst = generator.instrument
    return RestFrameBinner(inst.wave, getattr(inst, "arm", None), 2200.0, 9900.0, n_bins)


@pytest.mark.parametrize("z", [0.02, 0.31])
def test_overlap_matrix_reproduces_the_binner(generator, z):
    """O (ivar f) / O ivar is RestFrameBinner's output on the DESI pixels, with masked pixels
    (to the float32 precision of its pixel widths)."""
    binner = _binner(generator)
    m = generator.instrument.wave.shape[0]
    g = torch.Generator().manual_seed(1)
    flux = torch.randn(1, m, generator=g, dtype=torch.float64) + 3.0
    ivar = torch.rand(1, m, generator=g, dtype=torch.float64) * (
        torch.rand(1, m, generator=g) > 0.1
    )
    f_ref, w_ref = binner(flux, ivar, torch.tensor([z]))
    o = overlap_matrix(binner, z)
    num, den = o @ (ivar[0] * flux[0]), o @ ivar[0]
    good = den > 0
    assert torch.equal(good, w_ref[0] > 0)
    torch.testing.assert_close(den, w_ref[0], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(num[good] / den[good], f_ref[0][good], rtol=1e-5, atol=1e-9)


def test_binning_keeps_in_bin_constant_derivatives_and_loses_in_bin_oscillations(generator):
    """A derivative constant within each rest bin keeps all its information after binning; one
    that alternates sign from pixel to pixel loses nearly all of it; and random derivatives
    never gain (F_bin <= F in the Loewner order)."""
    z = 0.15
    binner = _binner(generator, 256)
    o = overlap_matrix(binner, z)
    m = o.shape[1]
    g = torch.Generator().manual_seed(2)
    ivar = 0.5 + torch.rand(m, generator=g, dtype=torch.float64)
    sqrt_iv = ivar.sqrt()
    # derivative = a function of the bin only (pixels straddling two bins get the mean)
    per_bin = torch.randn(3, o.shape[0], generator=g, dtype=torch.float64)
    frac = o / o.sum(0).clamp_min(1e-300)
    smooth = (per_bin @ frac) * sqrt_iv  # whitened
    f_native = smooth @ smooth.T
    f_bin = binned_fisher(smooth, o, ivar)
    # straddling pixels are not constant in either bin: allow a small loss
    assert torch.allclose(f_bin, f_native, rtol=0.03)
    wiggle = (torch.where(torch.arange(m) % 2 == 0, 1.0, -1.0).double() * sqrt_iv)[None]
    assert float(binned_fisher(wiggle, o, ivar)) < 0.01 * float(wiggle @ wiggle.T)
    y = torch.randn(5, m, generator=g, dtype=torch.float64)
    gap = torch.linalg.eigvalsh(y @ y.T - binned_fisher(y, o, ivar))
    assert float(gap.min()) > -1e-8 * float(gap.max())


def test_mock_prior_is_standard_normal_in_w(generator, coords):
    """Prior draws of the mock generator map to independent N(0, 1) coordinates (KS per
    coordinate), and w -> (theta, nuisances) -> w is the identity inside the support."""
    draws = generator.draw(4000, torch.Generator().manual_seed(3))
    w = coords.to_w(draws["theta"], draws["logU"], draws["sigma_v"], draws["aperture"])
    assert w.shape == (4000, 14)
    for k in range(14):
        assert stats.kstest(w[:, k].numpy(), "norm").pvalue > 1e-3, k
    corr = torch.corrcoef(w.T) - torch.eye(14, dtype=w.dtype)
    assert float(corr.abs().max()) < 0.08  # 4000 draws: |r| of independent ones < ~0.06
    w_new = torch.randn(200, 14, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    theta, logu, sigma_v, aperture = coords.split(w_new)
    check_support(theta)
    assert bool(((aperture >= 0.3) & (aperture <= 1.0)).all())
    back = coords.to_w(theta, logu, sigma_v, aperture)
    torch.testing.assert_close(back, w_new, atol=1e-6, rtol=0)


def test_mass_and_aperture_derivatives_match_their_analytic_form(generator, coords):
    """The expected spectrum is a x 10^logM* x (shape): its derivative along a coordinate
    that moves only logM* (or only the aperture) is ln(10) dlogM*/dw (or d ln a/dw) times the
    spectrum itself."""
    from studies.exact import MockLikelihood

    torch.set_num_threads(1)
    lik = MockLikelihood(generator)
    params = generator.draw(1, torch.Generator().manual_seed(5))
    z = float(params["z"][0])
    w0 = coords.to_w(params["theta"], params["logU"], params["sigma_v"], params["aperture"])[0]
    ivar = torch.ones(generator.instrument.wave.shape[0], dtype=torch.float64)
    y_s, y_p, grads = whitened_jacobian(stencil(lik, coords, w0, z), ivar, torch.ones(5))
    theta, logu, sigma_v, aperture = coords.split(w0[None])
    flux, phot = lik.model(theta, z, logu, sigma_v)
    g_m = float(grads["logmstar"][0])
    assert float(grads["logmstar"][1:].abs().max()) == 0.0  # logM* is w_0's alone
    torch.testing.assert_close(y_s[0], math.log(10) * g_m * aperture[0] * flux[0], rtol=1e-3,
                               atol=1e-6 * float(flux.abs().max()))  # fmt: skip
    torch.testing.assert_close(y_p[0], math.log(10) * g_m * phot[0], rtol=1e-3, atol=0.0)
    lo, hi = math.log(0.3), math.log(1.0)
    dlna = (hi - lo) * math.exp(-0.5 * float(w0[13]) ** 2) / math.sqrt(2 * math.pi)
    torch.testing.assert_close(y_s[13], dlna * aperture[0] * flux[0], rtol=1e-3,
                               atol=1e-6 * float(flux.abs().max()))  # fmt: skip
    assert float(y_p[13].abs().max()) == 0.0  # the aperture scales the fibre spectrum only


def test_laplace_sigma_agrees_with_the_gauss_newton_fit(generator, coords):
    """For a noiseless mock, the Laplace sigma of logM* at the truth (this module: 14
    coordinates, prior N(0, I)) agrees with the Gauss-Newton covariance of a
    Levenberg-Marquardt fit started at the truth (studies.exact: other coordinates,
    the aperture fitted, the prior's exact Hessian), within 5 %."""
    from studies.exact import JointCoordinates, MockLikelihood, laplace_fit

    lik = MockLikelihood(generator)
    params, clean, noisy = _mock(generator, 6)
    obs = {"flux": clean["flux_true"][0], "ivar": noisy["ivar"][0],
           "photometry": clean["photometry_true"][0],
           "photometry_ivar": noisy["photometry_ivar"][0]}  # fmt: skip
    z = float(params["z"][0])
    w0 = coords.to_w(params["theta"], params["logU"], params["sigma_v"], params["aperture"])[0]
    st = stencil(lik, coords, w0, z)
    y_s, y_p, grads = whitened_jacobian(st, obs["ivar"], obs["photometry_ivar"])
    sigma = marginal_sigma(y_s @ y_s.T + y_p @ y_p.T, grads["logmstar"])
    jc = JointCoordinates(coords.prior, generator.logu_range, generator.sigma_v_range)
    v0 = jc.to_v(params["theta"], params["logU"], params["sigma_v"])[0]
    fit = laplace_fit(lik, jc, obs, z, v0, max_iter=8)
    # logM* = lo + (hi - lo) sigmoid(v_0)
    s = torch.sigmoid(fit.v[0])
    dlogm_dv = (LOGM_RANGE[1] - LOGM_RANGE[0]) * s * (1 - s)
    sigma_gn = float(dlogm_dv * fit.cov[0, 0].sqrt())
    assert sigma == pytest.approx(sigma_gn, rel=0.05)


def test_summary_fisher_of_a_linear_summary_matches_the_exact_one(generator, coords):
    """A summary that is the 64-bin rest-frame spectrum and the photometry is linear in the
    data, so its Fisher information is binned_fisher's exactly: the Monte Carlo estimate
    (noise draws for the covariance and the derivatives) must reproduce the logM* sigma."""
    from studies.exact import MockLikelihood

    lik = MockLikelihood(generator)
    params, _, obs = _mock(generator, 7)
    ivar, piv = obs["ivar"][0].double(), obs["photometry_ivar"][0].double()
    z = float(params["z"][0])
    binner = _binner(generator, 64)
    o = overlap_matrix(binner, z)
    keep = (o @ ivar) > 0

    def summary(flux, phot):
        return torch.cat([((o @ (ivar * flux).T) / (o @ ivar)[:, None])[keep].T, phot], 1)

    w0 = coords.to_w(params["theta"], params["logU"], params["sigma_v"], params["aperture"])[0]
    st = stencil(lik, coords, w0, z)
    y_s, y_p, grads = whitened_jacobian(st, ivar, piv)
    exact = marginal_sigma(binned_fisher(y_s, o, ivar) + y_p @ y_p.T, grads["logmstar"])
    native = marginal_sigma(y_s @ y_s.T + y_p @ y_p.T, grads["logmstar"])
    f_mc = summary_fisher(summary, st, ivar, piv, n_cov=1024, n_jac=16,
                          generator=torch.Generator().manual_seed(8))  # fmt: skip
    assert marginal_sigma(f_mc, grads["logmstar"]) == pytest.approx(exact, rel=0.04)
    assert exact > 1.02 * native  # 64 bins lose information: the test can tell them apart
    with pytest.raises(ValueError, match="n_cov"):
        summary_fisher(summary, st, ivar, piv, n_cov=40)
