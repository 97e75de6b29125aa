"""Exact posteriors of mocks under the real simulator (studies.exact): the
aperture integral, the likelihood's peak, the Laplace fit, the MCMC's coverage of the truth,
and nested sampling's prior transform and its posterior and evidence on an analytic case."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate

from sedvae.sps.provabgs import LOGM_RANGE, THETA, PROVABGSPrior, check_support
from studies.exact import (
    JointCoordinates,
    MockLikelihood,
    exact_posterior,
    laplace_fit,
    nested_posterior,
)

CHECKPOINT = Path(__file__).resolve().parents[2] / "data/posterior/posterior.pt"
OBS_KEYS = ("flux", "ivar", "mask", "z", "photometry", "photometry_ivar")


class _Ranges:
    aperture_range = (0.3, 1.0)


@pytest.mark.parametrize(
    "a_coef, a_best",
    [(10.0, 0.5), (1e6, 0.55), (1e4, 1.3), (1e5, 0.3005), (4e3, 0.05)],
    ids=["broad", "narrow-inside", "beyond-upper", "at-lower-edge", "below-lower"],
)
def test_aperture_marginal_matches_adaptive_quadrature(a_coef, a_best):
    """int p(a) exp(-(A a^2 - 2 B a)/2) da over the LogU(0.3, 1) prior, against scipy.quad."""
    lik = MockLikelihood(_Ranges(), n_aperture=256)
    b_coef = a_coef * a_best
    got = float(lik.log_aperture_marginal(torch.tensor([a_coef]), torch.tensor([b_coef]))[0])
    # the same integral with the Gaussian's peak value taken out (no overflow)
    peak = 0.5 * a_coef * a_best**2
    lo, hi = 0.3, 1.0
    a_ref = min(max(a_best, lo), hi)
    shift = 0.5 * a_coef * (a_ref - a_best) ** 2

    def f(a):
        return math.exp(-0.5 * a_coef * (a - a_best) ** 2 + shift) / (a * math.log(hi / lo))

    val, _ = integrate.quad(f, lo, hi, points=[a_ref], limit=500, epsabs=0, epsrel=1e-10)
    want = peak - shift + math.log(val)
    assert got == pytest.approx(want, abs=2e-3)


@pytest.fixture(scope="module")
def generator():
    from sedvae.simulation import MockGenerator

    return MockGenerator()


@pytest.fixture(scope="module")
def mock(generator):
    """One noisy mock (fixed seed) with its truth."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(4)
    params = generator.draw(1, g)
    clean = generator.noiseless(params)
    obs = generator.noisy(clean["flux_true"], clean["photometry_true"], g)
    one = {k: v[0] for k, v in obs.items() if k != "snr"}
    one["z"] = params["z"][0].float()
    return one, {k: v[0] for k, v in params.items()}


def test_likelihood_peaks_at_the_truth(generator, mock):
    """Shifting logM* by 0.05 dex at fixed SFH and dust changes the photometry by 12 %: at
    g, r, z S/N ~ 75 the log likelihood must fall by far more than 1."""
    obs, truth = mock
    lik = MockLikelihood(generator)
    theta = truth["theta"].double()[None].repeat(3, 1)
    theta[1, THETA.LOGMSTAR] += 0.05
    theta[2, THETA.LOGMSTAR] -= 0.05
    n = theta.shape[0]
    log_l = lik(theta, obs, float(truth["z"]), truth["logU"].repeat(n), truth["sigma_v"].repeat(n))
    assert bool(torch.isfinite(log_l).all())
    assert float(log_l[0] - log_l[1:].max()) > 20.0


def test_laplace_fit_recovers_the_truth_at_the_noise_level(generator, mock):
    obs, truth = mock
    lik = MockLikelihood(generator)
    from sedvae.sps.provabgs import PROVABGSPrior

    coords = JointCoordinates(PROVABGSPrior(), generator.logu_range, generator.sigma_v_range)
    v_true = coords.to_v(truth["theta"][None], truth["logU"][None], truth["sigma_v"][None])[0]
    # the coordinates map back to the truth
    theta, logu, sig = coords.split(v_true[None])
    assert torch.allclose(theta[0], truth["theta"].double(), atol=1e-6)
    assert float(logu[0]) == pytest.approx(float(truth["logU"]), abs=1e-6)
    assert float(sig[0]) == pytest.approx(float(truth["sigma_v"]), rel=1e-6)

    start = v_true + 0.3 * torch.randn(
        13, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    fit = laplace_fit(lik, coords, obs, float(truth["z"]), start)
    n_pix = int((obs["ivar"] > 0).sum())
    # a fit at the noise level: chi^2 ~ N +- sqrt(2N)
    assert abs(fit.chi2 - n_pix) < 5 * math.sqrt(2 * n_pix)
    assert fit.aperture == pytest.approx(float(truth["aperture"]), rel=0.05)
    sigma = fit.cov.diagonal().sqrt()
    assert bool((sigma > 0).all())
    assert abs(float(fit.v[0] - v_true[0])) < 5 * float(sigma[0])


@pytest.mark.skipif(not CHECKPOINT.exists(), reason="needs the shipped posterior checkpoint")
def test_exact_posterior_is_in_the_support_and_covers_the_truth(generator, mock):
    from sedvae.posterior import load_posterior

    obs, truth = mock
    post = load_posterior(CHECKPOINT)
    lik = MockLikelihood(generator)
    res = exact_posterior(post, lik, {k: obs[k] for k in OBS_KEYS}, n_flow=64, n_walkers=28,
                          n_steps=60, burn=30, seed=0)  # fmt: skip
    assert res.theta.shape == (28 * 30, 12)
    check_support(res.theta)
    lo_u, hi_u = generator.logu_range
    assert bool(((res.logu >= lo_u) & (res.logu <= hi_u)).all())
    assert res.n_sims > 28 * 60
    q = np.quantile(res.theta[:, THETA.LOGMSTAR].numpy(), [0.001, 0.999])
    assert q[0] - 0.05 < float(truth["theta"][0]) < q[1] + 0.05


def test_unit_cube_transform_draws_the_prior():
    """Nested sampling's prior transform: uniform points of the unit cube map to the PROVABGS
    prior (KS of every theta against direct prior draws) and uniform logU, sigma_v boxes."""
    from scipy.stats import ks_2samp

    prior = PROVABGSPrior()
    coords = JointCoordinates(prior, (-4.0, -1.0), (30.0, 300.0))
    g = torch.Generator().manual_seed(0)
    n = 20000
    theta, logu, sig = coords.split(coords.from_unit(torch.rand(n, 13, generator=g,
                                                                dtype=torch.float64)))  # fmt: skip
    check_support(theta)
    ref = prior.sample(n, g, dtype=torch.float64)
    for d in range(12):
        assert ks_2samp(theta[:, d].numpy(), ref[:, d].numpy()).pvalue > 1e-3, prior.names[d]
    assert abs(float(logu.mean()) + 2.5) < 0.03 and abs(float(sig.mean()) - 165.0) < 2.0
    # and it is the inverse CDF: the cube's corners go to the prior's edges
    edge = coords.split(coords.from_unit(torch.tensor([[1e-12] * 13, [1 - 1e-12] * 13])))[0]
    assert float(edge[0, 0]) == pytest.approx(LOGM_RANGE[0], abs=1e-6)
    assert float(edge[1, 0]) == pytest.approx(LOGM_RANGE[1], abs=1e-6)


class _GaussianLikelihood:
    """A stand-in for MockLikelihood with a known posterior: logM* ~ N(10.3, 0.05) and
    logU ~ N(-2.5, 0.2) in the likelihood, the other parameters free."""

    class generator:  # noqa: N801 - the attributes nested_posterior reads off MockGenerator
        logu_range = (-4.0, -1.0)
        sigma_v_range = (30.0, 300.0)

    clean = staticmethod(MockLikelihood.clean)

    def __call__(self, theta, obs, z, logu, sigma_v):
        logm = theta[:, THETA.LOGMSTAR]
        return -0.5 * ((logm - 10.3) / 0.05) ** 2 - 0.5 * ((logu + 2.5) / 0.2) ** 2


def test_nested_posterior_recovers_an_analytic_posterior_and_evidence():
    """With flat priors on logM* and logU the posterior is the likelihood's Gaussians, the
    unconstrained parameters keep their prior (beta ~ flat Dirichlet, mean 1/4), and the
    evidence is the Gaussians' integrals over the prior boxes."""
    obs = {"flux": torch.ones(10), "ivar": torch.ones(10), "z": torch.tensor(0.1)}
    res = nested_posterior(PROVABGSPrior(), _GaussianLikelihood(), obs, n_live=400,
                           n_eff=2000, n_samples=4000, seed=1)  # fmt: skip
    check_support(res.theta)
    m = res.theta[:, THETA.LOGMSTAR].double()
    assert float(m.mean()) == pytest.approx(10.3, abs=0.01)
    assert float(m.std()) == pytest.approx(0.05, rel=0.1)
    assert float(res.logu.double().mean()) == pytest.approx(-2.5, abs=0.03)
    assert float(res.logu.double().std()) == pytest.approx(0.2, rel=0.1)
    assert float(res.theta[:, THETA.BETA].double().mean()) == pytest.approx(0.25, abs=0.02)
    log_z = (math.log(math.sqrt(2 * math.pi) * 0.05 / (LOGM_RANGE[1] - LOGM_RANGE[0]))
             + math.log(math.sqrt(2 * math.pi) * 0.2 / 3.0))  # fmt: skip
    assert res.log_z == pytest.approx(log_z, abs=0.15)
    assert res.n_sims > 2000


def test_nested_posterior_refuses_a_spectrum_without_usable_pixels():
    obs = {"flux": torch.full((10,), float("nan")), "ivar": torch.ones(10),
           "z": torch.tensor(0.1)}  # fmt: skip
    with pytest.raises(ValueError, match="no usable spectral pixel"):
        nested_posterior(PROVABGSPrior(), _GaussianLikelihood(), obs)
