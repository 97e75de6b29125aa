"""SBI head: flow accuracy on a toy with a known posterior, support, shapes, bad inputs,
checkpoints, diagnostics and plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from posterior_helpers import (
    N_BINS,
    arm_waves,
    assert_widened_start,
    fake_batch,
    fake_instrument,
    hydra_net,
    net_config,
    tiny_net,
)

from sedvae.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from sedvae.posterior import (
    MLPTrunk,
    NeuralPosterior,
    Posterior,
    PosteriorFlag,
    PosteriorFlow,
    SpectrumEmbedding,
    load_posterior,
)
from sedvae.posterior.diagnostics import (
    recovery,
    sbc_ks_pvalues,
    sbc_rank_moments,
    sbc_ranks,
    spectral_snr,
    tarp_band,
    tarp_coverage,
    tarp_coverage_averaged,
    tarp_max_deviation,
)
from sedvae.sps.provabgs import THETA, PROVABGSPrior, check_support

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def posterior() -> Posterior:
    return Posterior(tiny_net())


# ---- the flow recovers an analytically known posterior ---------------------------------------
def test_flow_recovers_truncated_gaussian_posterior():
    """theta ~ U(0, 1)^2, x = theta + N(0, 0.1^2): the posterior is a product of normals
    N(x, 0.1^2) truncated to [0, 1]. The flow models u = logit(theta), so every sample is in
    the support; its moments must match the truncated normal's, also near an edge."""
    from scipy.stats import truncnorm

    sigma = 0.1
    steps = 600
    flow = PosteriorFlow(context=2, transforms=4, hidden=(32, 32), bins=4, features=2)
    opt = torch.optim.Adam(flow.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        theta = torch.rand(256, 2).clamp(1e-6, 1 - 1e-6)
        x = theta + sigma * torch.randn(256, 2)
        u = torch.log(theta) - torch.log1p(-theta)
        loss = -flow.log_prob(u, x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    x_obs = torch.tensor([[0.5, 0.3], [0.04, 0.97]])
    with torch.no_grad():
        theta_s = torch.sigmoid(flow.sample(x_obs, 20000, torch.Generator().manual_seed(1)))
    assert ((theta_s > 0) & (theta_s < 1)).all()
    for i in range(2):
        for d in range(2):
            loc = float(x_obs[i, d])
            a, b = (0 - loc) / sigma, (1 - loc) / sigma
            mean, var = truncnorm.stats(a, b, loc=loc, scale=sigma, moments="mv")
            assert abs(float(theta_s[:, i, d].mean()) - mean) < 0.015
            assert abs(float(theta_s[:, i, d].std()) - math.sqrt(var)) < 0.015


def test_context_coupling_matches_zuko():
    """The per-galaxy context split gives zuko's own coupling transform, to round-off."""
    from zuko.flows.coupling import GeneralCouplingTransform

    flow = PosteriorFlow(context=5, transforms=2, hidden=(16,), bins=4)
    c, x = torch.randn(4, 5), torch.randn(3, 4, 11)
    for layer in flow.flow.transform.transforms:
        ours, ref = layer(c)(x), GeneralCouplingTransform.forward(layer, c)(x)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_fast_spline_matches_zuko():
    from zuko.transforms import MonotonicRQSTransform

    from sedvae.posterior.flow import FastRQSTransform

    w, h, d = 3 * torch.randn(10, 8), 3 * torch.randn(10, 8), torch.randn(10, 7)
    x = 4 * torch.randn(10)
    ours, ref = FastRQSTransform(w, h, d), MonotonicRQSTransform(w, h, d)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.inv(ref(x)), x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bins", [4, 8])
def test_lean_spline_inverse_matches_zuko(bins):
    """The sampler's spline inverse is zuko's own (float64 reference), inside the bound, on
    its edges and outside (identity), for steep and flat bins alike."""
    from zuko.transforms import MonotonicRQSTransform

    from sedvae.posterior.flow import rqs_inverse

    gen = torch.Generator().manual_seed(4)
    phi = 3 * torch.randn(4000, 3 * bins - 1, generator=gen)
    y = 4 * torch.randn(4000, generator=gen)
    y[:4] = torch.tensor([-5.0, 5.0, 6.5, -7.0])  # the bound itself, and beyond it
    w, h, d = phi[:, :bins], phi[:, bins : 2 * bins], phi[:, 2 * bins :]
    ref = MonotonicRQSTransform(w.double(), h.double(), d.double()).inv(y.double())
    ours = rqs_inverse(y, phi, bins)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(ours[2:4], y[2:4])  # identity outside [-5, 5]
    # and, in float64 (flat bins make float32 round trips ill-conditioned), it inverts the
    # forward spline: x -> y -> x
    x = 4.5 * torch.rand(4000, generator=gen, dtype=torch.float64)
    x = x * torch.sign(torch.randn(4000, generator=gen, dtype=torch.float64))
    y_fwd = MonotonicRQSTransform(w.double(), h.double(), d.double())(x)
    torch.testing.assert_close(rqs_inverse(y_fwd, phi.double(), bins), x, atol=1e-9, rtol=1e-9)


def test_lean_flow_inverse_matches_zuko():
    """PosteriorFlow.inverse (the lean sampler) gives zuko's inverse of the same flow."""
    flow = PosteriorFlow(context=5, transforms=4, hidden=(16, 16), bins=4).eval()
    gen = torch.Generator().manual_seed(2)
    c, eps = torch.randn(3, 5, generator=gen), torch.randn(200, 3, 11, generator=gen)
    with torch.no_grad():
        ours = flow.inverse(eps, c)
        ref = flow.flow(c).transform.inv(eps)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_sampling_transforms_without_jacobians_agree():
    """w_to_u and to_constrained skip the log-Jacobian when sampling: the same values."""
    from sedvae.posterior.model import w_to_u

    gen = torch.Generator().manual_seed(5)
    w = 2 * torch.randn(500, 11, generator=gen, dtype=torch.float64)
    u, ladj = w_to_u(w)
    u_fast, none = w_to_u(w, jacobian=False)
    assert none is None and ladj.shape == (500,)
    torch.testing.assert_close(u_fast, u, rtol=0, atol=0)
    prior = PROVABGSPrior()
    theta, _ = prior._constrain(u)
    torch.testing.assert_close(prior.to_constrained(u), theta, rtol=0, atol=0)


# ---- support and shapes ------------------------------------------------------------------------
def test_samples_in_prior_support_and_shapes(posterior):
    batch = fake_batch(5)
    theta = posterior.sample(batch, 200, torch.Generator().manual_seed(0))
    assert theta.shape == (200, 5, 12)
    assert torch.isfinite(theta).all()
    check_support(theta.reshape(-1, 12))  # raises if any sample leaves the support
    torch.testing.assert_close(theta[..., THETA.BETA].sum(-1), torch.ones(200, 5))
    logp = posterior.log_prob(theta[:3], batch)
    assert logp.shape == (3, 5) and torch.isfinite(logp).all()


def test_sampling_is_reproducible(posterior):
    batch = fake_batch(3)
    a = posterior.sample(batch, 10, torch.Generator().manual_seed(3))
    b = posterior.sample(batch, 10, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)


def test_derived_and_history_bands_shapes(posterior):
    batch = fake_batch(3)
    theta = posterior.sample(batch, 50, torch.Generator().manual_seed(0))
    props = posterior.derived(theta, batch["z"])
    assert set(props) == {"logmstar_surv", "sfr_100myr", "sfr_1gyr", "z_mw", "t_mw_gyr"}
    for v in props.values():
        assert v.shape == (50, 3) and torch.isfinite(v).all()
    # surviving mass is below the formed mass
    assert (props["logmstar_surv"] <= theta[..., THETA.LOGMSTAR] + 1e-5).all()
    bands = posterior.sfh_bands(theta, batch["z"])
    assert bands["sfr"].shape == (3, 3, 42) and bands["zmet"].shape == (3, 3, 42)
    assert (bands["sfr"][0] <= bands["sfr"][2] + 1e-12).all()


# ---- bad inputs --------------------------------------------------------------------------------
def test_bad_spectra_are_flagged_and_the_rest_is_valid(posterior):
    batch = fake_batch(6)
    batch["mask"][1] = True  # every pixel masked
    batch["flux"][2] = torch.nan  # NaN spectrum
    batch["z"][3] = 1.5  # outside the trained redshifts
    batch["flux"][4, :10] = torch.nan  # a few NaN pixels: usable
    batch["photometry_ivar"][5] = 0.0  # no photometry: usable, flagged
    res = posterior.sample(batch, 100, torch.Generator().manual_seed(0), return_flags=True)
    flags = res.flags.tolist()
    assert flags[0] == 0
    assert flags[1] & PosteriorFlag.ALL_MASKED
    assert flags[2] & PosteriorFlag.ALL_MASKED and flags[2] & PosteriorFlag.NONFINITE
    assert flags[3] == PosteriorFlag.BAD_Z
    assert flags[4] == PosteriorFlag.NONFINITE
    assert flags[5] == PosteriorFlag.NO_PHOTOMETRY
    fatal = torch.tensor([False, True, True, True, False, False])
    assert torch.isnan(res.samples[:, fatal]).all()
    good = res.samples[:, ~fatal]
    assert torch.isfinite(good).all()
    check_support(good.reshape(-1, 12))
    # the good galaxies' summaries do not depend on their bad neighbours
    clean_all, _ = posterior.check(batch)
    clean_good, _ = posterior.check({k: v[~fatal] for k, v in batch.items()})
    with torch.no_grad():
        ctx_all, shift_all = posterior.net.embed(clean_all)
        ctx_good, shift_good = posterior.net.embed(clean_good)
    torch.testing.assert_close(ctx_all[~fatal], ctx_good)
    torch.testing.assert_close(shift_all[~fatal], shift_good)
    props = posterior.derived(res.samples, batch["z"])
    assert torch.isnan(props["z_mw"][:, fatal]).all()
    assert torch.isfinite(props["z_mw"][:, ~fatal]).all()
    assert PosteriorFlag.describe(flags[2]) == "NONFINITE|ALL_MASKED"


def test_a_batch_of_only_bad_spectra_returns_nan(posterior):
    batch = fake_batch(2)
    batch["mask"][:] = True
    theta = posterior.sample(batch, 5)
    assert theta.shape == (5, 2, 12) and torch.isnan(theta).all()


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("flux", torch.zeros(2, 10), r"flux must have shape \(B, 450\)"),
        ("ivar", torch.zeros(2, 450), r"ivar must have shape \(3, 450\)"),
        ("z", torch.zeros(3, 1), r"z must have shape \(3,\)"),
        ("photometry", torch.zeros(3, 4), "photometry and photometry_ivar must have shape"),
    ],
)
def test_wrong_shapes_raise_with_expected_and_got(posterior, key, value, match):
    batch = fake_batch(3)
    batch[key] = value
    with pytest.raises(ValueError, match=match):
        posterior.sample(batch, 2)


def test_mismatched_embedding_and_flow_raise():
    emb = SpectrumEmbedding(fake_instrument(), MLPTrunk(N_BINS), n_bins=N_BINS, n_out=16)
    with pytest.raises(ValueError, match="must equal flow.context"):
        NeuralPosterior(emb, PosteriorFlow(8))
    with pytest.raises(ValueError, match="trunk expects"):
        SpectrumEmbedding(fake_instrument(), MLPTrunk(32), n_bins=N_BINS)


# ---- training loss, checkpoints ----------------------------------------------------------------
def test_loss_is_finite_and_decreases():
    from sedvae.sps import PROVABGSPrior

    net = tiny_net()
    batch = fake_batch(16)
    batch["theta"] = PROVABGSPrior().sample(16, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss, metrics = net.loss(net.augment(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert set(metrics) == {"nll_u", "nll_theta"}


def test_coverage_cut_augmentation_empties_the_cut_ends_only():
    """p_cut_coverage: a share of the galaxies lose the pixels outside an observed-frame window
    (ivar = 0, flux = 0, masked) whose edges lie in cut_blue / cut_red; the others, and every
    pixel inside a galaxy's window, are untouched. With p = 0 the augmentation draws exactly
    what it drew before the option existed (the photometry draw)."""
    batch = fake_batch(400)
    batch["mask"] = torch.zeros_like(batch["ivar"], dtype=torch.bool)
    net = tiny_net()
    wave = net.embedding.wave_obs
    lo, hi = float(wave.min()), float(wave.max())
    span = hi - lo
    net.p_drop_photometry = 0.0
    net.p_cut_coverage = 0.5
    net.cut_blue, net.cut_red = (lo, lo + 0.2 * span), (hi - 0.2 * span, hi)
    out = net.augment(batch, torch.Generator().manual_seed(3))
    gone = out["ivar"] == 0
    cut = gone.any(-1)
    assert 0.42 < cut.float().mean() < 0.58  # 400 draws of p = 0.5
    assert torch.equal(out["mask"], gone) and (out["flux"][gone] == 0).all()
    for i in torch.nonzero(cut).flatten().tolist():
        kept = wave[~gone[i]]
        blue, red = float(kept.min()), float(kept.max())
        # the edges lie in cut_blue / cut_red: every pixel between those ranges survives
        central = (wave > lo + 0.2 * span) & (wave < hi - 0.2 * span)
        assert not (gone[i] & central).any()
        inside = (wave >= blue) & (wave <= red)  # one contiguous window, nothing lost inside
        assert torch.equal(~gone[i], inside)
        assert torch.equal(out["flux"][i, inside], batch["flux"][i, inside])
    assert torch.equal(out["ivar"][~cut], batch["ivar"][~cut])
    # p = 0: the photometry draw alone, as before the cut existed
    net.p_drop_photometry, net.p_cut_coverage = 0.5, 0.0
    a = net.augment(batch, torch.Generator().manual_seed(4))
    drop = torch.rand(400, generator=torch.Generator().manual_seed(4)) < 0.5
    assert torch.equal(a["photometry_ivar"] == 0, drop[:, None].expand_as(a["photometry_ivar"])
                       | (batch["photometry_ivar"] == 0))  # fmt: skip
    assert torch.equal(a["ivar"], batch["ivar"])
    with pytest.raises(ValueError, match="p_cut_coverage"):
        tiny_net(p_cut_coverage=1.5)
    with pytest.raises(ValueError, match="must lie below"):
        tiny_net(p_cut_coverage=0.1, cut_blue=(3600.0, 9000.0), cut_red=(8500.0, 9800.0))


def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    import hydra
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(net_config())
    net = hydra.utils.instantiate(cfg)
    path = save_checkpoint(tmp_path / "post.pt", "posterior", net, cfg, {"note": "test"})
    post = load_posterior(path)
    assert post.meta["training"] == {"note": "test"}
    batch = fake_batch(2)
    a = Posterior(net).sample(batch, 4, torch.Generator().manual_seed(0))
    b = post.sample(batch, 4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)

    # a config that no longer matches the weights
    payload = torch.load(path, weights_only=True)
    payload["config"]["flow"]["hidden"] = [64]
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="config/version mismatch"):
        load_posterior(tmp_path / "edited.pt")
    # another pixel grid than the one trained on
    payload = torch.load(path, weights_only=True)
    payload["config"]["embedding"]["instrument"]["waves"] = arm_waves(100)
    torch.save(payload, tmp_path / "grid.pt")
    with pytest.raises(CheckpointError, match="wave_obs"):
        load_posterior(tmp_path / "grid.pt")
    payload = torch.load(path, weights_only=True)
    payload["meta"]["input_fingerprint"][0] += 1.0  # as if the rest-frame binning had changed
    torch.save(payload, tmp_path / "binning.pt")
    with pytest.raises(CheckpointError, match="prepares spectra"):
        load_posterior(tmp_path / "binning.pt")
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        load_posterior(tmp_path / "future.pt")
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2"}, tmp_path / "pl.ckpt")
    with pytest.raises(CheckpointError, match="export it first"):
        load_posterior(tmp_path / "pl.ckpt")
    with pytest.raises(FileNotFoundError):
        load_posterior(tmp_path / "missing.pt")


# ---- diagnostics -------------------------------------------------------------------------------
def _gaussian_problem(n_sims=1000, n_samples=500, width=1.0, seed=0):
    """Truth and posterior samples of a 3-d Gaussian problem; width 1 is calibrated."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n_sims, 3, generator=g)  # posterior means
    truth = mu + torch.randn(n_sims, 3, generator=g)  # truth ~ posterior
    samples = mu + width * torch.randn(n_samples, n_sims, 3, generator=g)
    refs = 3 * torch.randn(n_sims, 3, generator=g)
    return samples, truth, refs


def test_tarp_detects_calibration_and_agrees_with_sbi():
    samples, truth, refs = _gaussian_problem()
    ecp, alpha, f = tarp_coverage(samples, truth, refs)
    assert tarp_max_deviation(ecp, alpha) < 0.05
    assert f.shape == (1000,)
    narrow = _gaussian_problem(width=0.5)
    ecp_n, alpha_n, _ = tarp_coverage(*narrow)
    assert tarp_max_deviation(ecp_n, alpha_n) > 0.1
    from sbi.diagnostics.tarp import _run_tarp

    ecp_sbi, alpha_sbi = _run_tarp(samples, truth, refs, num_bins=100)
    ours = np.interp(alpha_sbi.numpy(), alpha.numpy(), ecp.numpy())
    assert np.abs(ours - ecp_sbi.numpy()).max() < 0.02


def test_tarp_averaged_over_reference_draws_is_steadier():
    """Averaging the ECP over reference draws keeps a calibrated posterior calibrated and a
    narrow one flagged, and removes most of what the references' placement adds to the figure
    (the truths and samples are the same in every trial; only the references change)."""
    samples, truth, _ = _gaussian_problem()
    g = torch.Generator().manual_seed(5)
    trials = 3 * torch.randn(12, 8, 1000, 3, generator=g)  # 12 sets of 8 reference draws
    single, averaged = [], []
    for refs in trials:
        ecp, alpha, draws = tarp_coverage_averaged(samples, truth, refs)
        assert draws.shape == (8, 101) and torch.allclose(ecp, draws.mean(0))
        assert torch.allclose(draws[0], tarp_coverage(samples, truth, refs[0])[0])
        single.append(tarp_max_deviation(draws[0], alpha))
        averaged.append(tarp_max_deviation(ecp, alpha))
    # the references' noise adds to the deviation of a calibrated posterior: averaged, the
    # figure is smaller and steadier (measured: mean 0.009 against 0.024, spread 0.004 / 0.006)
    assert max(averaged) < 0.05
    assert np.mean(averaged) < 0.6 * np.mean(single)
    assert np.std(averaged) < np.std(single)
    narrow_samples, narrow_truth, _ = _gaussian_problem(width=0.5)
    ecp_n, alpha_n, _ = tarp_coverage_averaged(narrow_samples, narrow_truth, trials[0])
    assert tarp_max_deviation(ecp_n, alpha_n) > 0.1
    with pytest.raises(ValueError, match="references"):
        tarp_coverage_averaged(samples, truth, trials[0, 0])


def test_tarp_band_is_the_ks_quantile_and_holds_for_calibrated_posteriors():
    """One draw's max |ECP - alpha| is a KS statistic under calibration: the 95 % band is
    ~1.36 / sqrt(N), calibrated toys stay inside it about 95 % of the time, and posteriors
    40 % too wide leave it."""
    assert abs(tarp_band(1000) - 1.358 / 1000**0.5) < 0.002
    assert tarp_band(5000) < tarp_band(1000) < tarp_band(1000, 0.99)
    g = torch.Generator().manual_seed(3)
    outside = {1.0: 0, 1.4: 0}
    for width in outside:
        for _ in range(40):
            mu = torch.randn(500, 2, generator=g)
            truth = mu + torch.randn(500, 2, generator=g)
            samples = mu + width * torch.randn(200, 500, 2, generator=g)
            ecp, alpha, _ = tarp_coverage(samples, truth, 3 * torch.randn(500, 2, generator=g))
            outside[width] += tarp_max_deviation(ecp, alpha) > tarp_band(500)
    assert outside[1.0] <= 6  # binomial(40, 0.05): P(> 6) < 0.01 (measured: 1)
    assert outside[1.4] >= 36  # posteriors 40 % too wide: flagged (measured: 40 of 40)


def test_sbc_ranks_and_ks():
    samples, truth, _ = _gaussian_problem()
    ranks = sbc_ranks(samples, truth)
    assert ranks.shape == (1000, 3) and ranks.min() >= 0 and ranks.max() <= 500
    assert sbc_ks_pvalues(ranks, 500).min() > 0.01
    narrow, truth_n, _ = _gaussian_problem(width=0.5)
    assert sbc_ks_pvalues(sbc_ranks(narrow, truth_n), 500).max() < 1e-6


def test_sbc_rank_moments_tell_which_way():
    """Calibrated: mean 0.5, std 1/sqrt(12); too wide: smaller std; too narrow: larger;
    posteriors shifted low: truths rank high (mean > 0.5)."""
    calibrated, truth, _ = _gaussian_problem()
    mean, std = sbc_rank_moments(sbc_ranks(calibrated, truth), 500)
    assert (mean - 0.5).abs().max() < 0.03 and (std - 12**-0.5).abs().max() < 0.015
    wide, truth_w, _ = _gaussian_problem(width=1.5)
    assert sbc_rank_moments(sbc_ranks(wide, truth_w), 500)[1].max() < 0.26
    narrow, truth_n, _ = _gaussian_problem(width=0.7)
    assert sbc_rank_moments(sbc_ranks(narrow, truth_n), 500)[1].min() > 0.31
    low = sbc_rank_moments(sbc_ranks(calibrated - 0.5, truth), 500)[0]
    assert low.min() > 0.6
    # exact for ranks spread evenly over 0..n: the discrete uniform's moments
    even = torch.arange(501).repeat(2)[:, None]
    m, s = sbc_rank_moments(even, 500)
    assert abs(float(m) - 0.5) < 1e-12
    assert abs(float(s) - 12**-0.5 * (1 - 501**-2) ** 0.5) < 1e-3


def test_spectral_snr_ignores_unusable_pixels():
    flux = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 4.0, 4.0, 4.0]])
    ivar = torch.tensor([[4.0, 4.0, 4.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert torch.allclose(spectral_snr({"flux": flux, "ivar": ivar}), torch.tensor([4.0, 4.0]))


def test_recovery_statistics():
    est = torch.tensor([1.0, 2.0, 3.0, float("nan")])
    r = recovery(est, torch.tensor([1.1, 2.1, 3.1, 0.0]))
    assert r["n"] == 3 and abs(r["bias"] + 0.1) < 1e-6 and r["scatter"] < 1e-6


# ---- plots -------------------------------------------------------------------------------------
def test_plots_return_figures(posterior):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sedvae.plotting.posterior import plot_corner, plot_sbc_ranks, plot_sfh_bands, plot_tarp

    batch = fake_batch(2)
    theta = posterior.sample(batch, 300, torch.Generator().manual_seed(0))
    fig, axes = plot_corner(theta[:, 0], theta[0, 0])  # galaxy 0's samples, one as the truth
    assert axes.shape == (11, 11)
    plt.close(fig)
    fig, axes = plot_sfh_bands(posterior.sfh_bands(theta, batch["z"]), 1)
    assert len(axes) == 2
    plt.close(fig)
    samples, truth, refs = _gaussian_problem(200, 100)
    fig, ax = plot_tarp(*tarp_coverage(samples, truth, refs)[:2])
    assert ax.get_xlabel().startswith("credibility")
    plt.close(fig)
    ecp, alpha, draws = tarp_coverage_averaged(samples, truth, torch.stack([refs, -refs]))
    fig, ax = plot_tarp(ecp, alpha, draws=draws, band=tarp_band(200))
    assert len(ax.lines) == 4 and len(ax.collections) == 1  # diagonal, 2 draws, mean; band
    plt.close(fig)
    fig, axes = plot_sbc_ranks(sbc_ranks(samples, truth), 100, ["a", "b", "c"], pvalues=[1, 1, 1])
    assert axes.shape == (1, 4)
    plt.close(fig)


# ---- the Hydra/Lightning path ------------------------------------------------------------------
@pytest.mark.parametrize("pca", [0, 8])
def test_train_posterior_fast_dev_run(tmp_path, pca):
    """python train.py experiment=posterior debug=fdr on tiny mock files, end to end; with
    gappy-PCA inputs, the basis is fitted to the training files' noiseless spectra first
    (``BatchNoiseMocks.clean_spectra``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sedvae.paths import config_dir
    from sedvae.train import train

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=posterior", "debug=fdr", f"paths.output_dir={tmp_path}",
            f"data.cache_dir={tmp_path}/mocks", "data.n_train=16", "data.train_seeds=[1]",
            "data.n_val=8", "data.n_test=8", "data.batch_size=8",
            f"model.net.embedding.pca={pca}",
        ])  # fmt: skip
        metrics = train(cfg)
    GlobalHydra.instance().clear()
    assert np.isfinite(metrics["train/loss"])  # with pca, an unfitted basis would raise


def test_exported_file_names_its_checkpoint_without_the_machine_path(tmp_path):
    """Shipped posterior files must not carry the directory they were trained in."""
    from omegaconf import OmegaConf

    from sedvae.checkpoint import export

    run = tmp_path / "outputs" / "run"
    (run / "checkpoints").mkdir(parents=True)
    OmegaConf.save({"model": {"_target_": "sedvae.posterior.lightning.PosteriorModule",
                              "net": net_config()}}, run / "config.yaml")  # fmt: skip
    ckpt = run / "checkpoints" / "epoch007.ckpt"
    state = {f"net.{k}": v for k, v in hydra_net(net_config()).state_dict().items()}
    torch.save({"state_dict": state, "epoch": 7, "global_step": 80,
                "pytorch-lightning_version": "2"}, ckpt)  # fmt: skip
    out = export(ckpt, tmp_path / "posterior.pt")
    meta = load_posterior(out).meta["training"]
    assert meta["lightning_checkpoint"] == "epoch007.ckpt"
    assert meta["epochs"] == 8
    assert str(tmp_path) not in repr(meta)


def test_init_from_copies_weights_and_refuses_another_network(tmp_path):
    """model.init_from starts a run from a posterior file's weights (same density); a file of
    another architecture is refused with the differing tensors named."""
    import hydra

    from sedvae.posterior.lightning import PosteriorModule

    torch.manual_seed(0)
    src = hydra.utils.instantiate(net_config()).eval()
    path = save_checkpoint(tmp_path / "p.pt", "posterior", src, net_config())
    torch.manual_seed(1)
    dst = hydra.utils.instantiate(net_config()).eval()
    batch = fake_batch(3)
    from sedvae.sps import PROVABGSPrior

    batch["theta"] = PROVABGSPrior().sample(3, torch.Generator().manual_seed(0))
    before = dst.loss(batch)[0].item()
    module = PosteriorModule(dst, optimizer=torch.optim.Adam, init_from=str(path))
    module.net.eval()
    with torch.no_grad():
        assert module.net.loss(batch)[0].item() == pytest.approx(src.loss(batch)[0].item())
        assert module.net.loss(batch)[0].item() != pytest.approx(before)
    other = hydra.utils.instantiate(net_config(hidden=(24,)))
    with pytest.raises(CheckpointError, match="differs from the configured one.*flow"):
        PosteriorModule(other, optimizer=torch.optim.Adam, init_from=str(path))


def test_init_widen_adds_index_inputs_without_changing_the_density(tmp_path):
    """model.init_widen: a net given spectral-index inputs starts from a file trained without
    them and, before training, has exactly its density; the new inputs do get gradients."""
    from sedvae.posterior.lightning import PosteriorModule
    from sedvae.sps import PROVABGSPrior

    torch.manual_seed(0)
    src = hydra_net(net_config()).eval()
    path = save_checkpoint(tmp_path / "p.pt", "posterior", src, net_config())
    cfg = net_config()
    cfg["embedding"]["indices"] = True
    wide = hydra_net(cfg)
    assert wide.embedding.n_extras == src.embedding.n_extras + wide.embedding.indices.n_features
    with pytest.raises(CheckpointError, match="differs"):
        PosteriorModule(hydra_net(cfg), optimizer=torch.optim.Adam, init_from=str(path))
    module = PosteriorModule(wide, optimizer=torch.optim.Adam, init_from=str(path), init_widen=True)
    batch = fake_batch(3)
    batch["theta"] = PROVABGSPrior().sample(3, torch.Generator().manual_seed(0))
    assert_widened_start(module.net, src, batch, wide.embedding.indices.n_features)


def test_affine_head_starts_as_the_identity_and_narrows_a_posterior(tmp_path):
    """flow.affine_head: added to a trained file (model.init_widen) the run starts at exactly
    its density and the head's last layer gets gradients; on a toy whose posterior is 0.01
    wide (x = theta + N(0, 0.01^2)), a small flow with the head comes within 2.5x of the
    posterior's width (0.023; 0.03 asserted) and places it within 0.01 in 600 steps; the same
    flow without the head stays 2.6x wider (0.060) and 3x further off."""
    from sedvae.posterior.lightning import PosteriorModule
    from sedvae.sps import PROVABGSPrior

    torch.manual_seed(0)
    src = hydra_net(net_config()).eval()
    path = save_checkpoint(tmp_path / "p.pt", "posterior", src, net_config())
    cfg = net_config()
    cfg["flow"]["affine_head"] = [16]
    with pytest.raises(CheckpointError, match="differs"):
        PosteriorModule(hydra_net(cfg), optimizer=torch.optim.Adam, init_from=str(path))
    module = PosteriorModule(hydra_net(cfg), optimizer=torch.optim.Adam, init_from=str(path),
                             init_widen=True)  # fmt: skip
    batch = fake_batch(3)
    batch["theta"] = PROVABGSPrior().sample(3, torch.Generator().manual_seed(0))
    module.net.eval()
    loss = module.net.loss(batch)[0]
    with torch.no_grad():
        assert loss.item() == pytest.approx(src.loss(batch)[0].item(), rel=1e-6)
    loss.backward()
    assert module.net.flow.affine[-1].weight.grad.abs().sum() > 0
    with torch.no_grad():  # a file with a trained head reloads with it
        torch.nn.init.normal_(module.net.flow.affine[-1].weight, std=0.1)
        saved = save_checkpoint(tmp_path / "affine.pt", "posterior", module.net, cfg)
        reloaded = load_checkpoint(saved, "posterior")[0].eval()
        assert reloaded.flow.affine is not None
        assert reloaded.loss(batch)[0].item() == pytest.approx(module.net.loss(batch)[0].item())
        assert reloaded.loss(batch)[0].item() != pytest.approx(loss.item())

    def fit(affine_head, steps=600):
        torch.manual_seed(3)
        flow = PosteriorFlow(context=2, transforms=2, hidden=(16,), bins=4, features=2,
                             affine_head=affine_head)  # fmt: skip
        opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for _ in range(steps):
            theta = torch.randn(256, 2)
            x = theta + 0.01 * torch.randn(256, 2)
            loss = -flow.log_prob(theta, x).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            x_obs = torch.tensor([[-1.0, 0.5], [0.3, -1.2], [1.5, 0.0]])
            s = flow.sample(x_obs, 4000, torch.Generator().manual_seed(1))
        return (s.mean(0) - x_obs).abs().max().item(), s.std(0).max().item()

    # the posterior is N(x, 0.01^2) per coordinate (the N(0, 1) prior narrows it by 5e-5)
    offset, width = fit((16,))
    offset_none, width_none = fit(None)
    assert offset < 0.01 and width < 0.03
    assert width_none > 1.5 * width and offset_none > offset


def test_warmup_ramps_each_step_and_leaves_the_schedule(tmp_path):
    """model.warmup_steps scales the first steps' lr by (step + 1) / warmup_steps on top of
    the per-epoch cosine schedule, which itself is left as it would be without warm-up."""
    from functools import partial

    import pytorch_lightning as pl

    from sedvae.posterior.lightning import PosteriorModule
    from sedvae.sps import PROVABGSPrior

    seen: list[float] = []

    class RecordingAdam(torch.optim.Adam):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    batches = []
    for i in range(3):
        batch = fake_batch(4, seed=i)
        batch["theta"] = PROVABGSPrior().sample(4, torch.Generator().manual_seed(i))
        batches.append(batch)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)

    def fit(warmup: int) -> list[float]:
        seen.clear()
        torch.manual_seed(0)
        module = PosteriorModule(
            tiny_net(),
            optimizer=partial(RecordingAdam, lr=1e-3),
            scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=2),
            warmup_steps=warmup,
        )
        trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=tmp_path, limit_val_batches=0)  # fmt: skip
        trainer.fit(module, loader)
        return list(seen)

    plain, warm = fit(0), fit(5)
    # cosine over 2 epochs: 1e-3 for the first 3 steps, 5e-4 for the next 3
    assert plain == pytest.approx([1e-3] * 3 + [5e-4] * 3)
    factors = [1 / 5, 2 / 5, 3 / 5, 4 / 5, 1.0, 1.0]
    assert warm == pytest.approx([f * lr for f, lr in zip(factors, plain, strict=True)])
    with pytest.raises(ValueError, match="warmup_steps"):
        PosteriorModule(tiny_net(), optimizer=torch.optim.Adam, warmup_steps=-1)


def test_autoencoder_encoder_as_embedding():
    """The adapter runs the autoencoder's encoder (frozen) under the flow."""
    from sedvae.autoencoder import LatentMap, SpectrumEncoder
    from sedvae.posterior import AutoencoderEmbedding

    enc = SpectrumEncoder(LatentMap(), n_bins=N_BINS, channels=(4, 8), kernels=(3, 5),
                          pools=(2,), mlp=(16,))  # fmt: skip
    emb = AutoencoderEmbedding(encoder=enc, instrument=fake_instrument(), head=(16,), n_out=16)
    net = NeuralPosterior(emb, PosteriorFlow(16, transforms=2, hidden=(16,), bins=4))
    batch = fake_batch(3)
    theta = Posterior(net).sample(batch, 7)
    assert theta.shape == (7, 3, 12) and torch.isfinite(theta).all()
    from sedvae.sps import PROVABGSPrior

    batch["theta"] = PROVABGSPrior().sample(3, torch.Generator().manual_seed(0))
    net.train()
    net.loss(batch)[0].backward()
    assert all(p.grad is None for p in enc.parameters())
    assert all(p.grad is not None for p in emb.head.parameters())


@pytest.mark.parametrize("experiment", ["posterior", "posterior_gpu"])
def test_posterior_experiments_build(experiment, tmp_path):
    """The model configs of both experiments instantiate (not only compose)."""
    import hydra
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sedvae.paths import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}",
                                          f"paths.output_dir={tmp_path}"])  # fmt: skip
    GlobalHydra.instance().clear()
    net = hydra.utils.instantiate(cfg.model.net)
    assert isinstance(net, NeuralPosterior)
    assert net.embedding.n_out == net.flow.context


@pytest.mark.parametrize("gaussianize, affine", [(False, False), (True, False), (True, True)])
def test_mass_anchor_and_coordinates_are_consistent(gaussianize, affine):
    """Samples and densities refer to the same u, with the mass anchor, in either of the
    flow's coordinate systems and with an affine head: log q(u) of samples = base log density
    - inverse log-Jacobian."""
    from sedvae.posterior.model import w_to_u

    inst = fake_instrument()
    emb = SpectrumEmbedding(inst, MLPTrunk(N_BINS, (32,), 32), n_bins=N_BINS, head=(32,), n_out=16)
    flow = PosteriorFlow(16, 4, (32,), bins=4, affine_head=(24,) if affine else None)
    if affine:  # away from its identity start: locations ~1, scales e^-3..e^3
        torch.nn.init.normal_(flow.affine[-1].weight, std=1.0)
        with torch.no_grad():
            loc, log_scale = flow.affine_params(torch.randn(64, 16))
        assert float(loc.std()) > 0.3 and float(log_scale.abs().max()) > 1.0
    net = NeuralPosterior(emb, flow, mass_anchor=True, gaussianize_prior=gaussianize).eval()
    batch = fake_batch(4)
    with torch.no_grad():
        context, shift = net.embed(batch)
        assert (shift[:, 1:] == 0).all() and (shift[:, 0] != 0).all()
        y, log_q = net.flow.sample_and_log_prob(context, 50, torch.Generator().manual_seed(0))
        y = y + shift
        u = w_to_u(y)[0].float() if gaussianize else y
        log_q_u = log_q - (w_to_u(y)[1].float() if gaussianize else 0.0)
        torch.testing.assert_close(net.log_prob_u(u, batch), log_q_u, atol=2e-3, rtol=1e-4)
        torch.testing.assert_close(
            net.sample_u(batch, 50, torch.Generator().manual_seed(0)), u, atol=1e-4, rtol=1e-4
        )


def test_gaussianised_prior_coordinates():
    """w = Phi^-1(F_prior(u)): exactly N(0, I) under the prior, invertible, exact Jacobian."""
    from scipy.stats import kstest

    from sedvae.posterior.model import u_to_w, w_to_u
    from sedvae.sps import PROVABGSPrior

    prior = PROVABGSPrior()
    u = prior.to_unconstrained(prior.sample(20000, torch.Generator().manual_seed(0), torch.float64))
    w = u_to_w(u)
    for d in range(11):
        assert kstest(w[:, d].numpy(), "norm").pvalue > 1e-3
    u_back, ladj = w_to_u(w)
    torch.testing.assert_close(u_back, u, atol=1e-6, rtol=1e-6)
    w0 = torch.randn(6, 11, dtype=torch.float64) * 2
    jac = torch.autograd.functional.jacobian(lambda x: w_to_u(x)[0], w0[0])
    torch.testing.assert_close(w_to_u(w0[:1])[1][0], torch.logdet(jac).double())
    extreme = torch.tensor([[-30.0] * 11, [30.0] * 11], dtype=torch.float64)
    assert torch.isfinite(u_to_w(extreme)).all()
