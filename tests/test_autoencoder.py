"""Tests of the physics-embedded autoencoder (sedvae.autoencoder, its mocks, noise model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sedvae.autoencoder import (
    LatentMap,
    LogGrid,
    PhysicsDecoder,
    ResidualNet,
    SpectrumAutoencoder,
    SpectrumEncoder,
)
from sedvae.autoencoder.model import safe_log_prior
from sedvae.physics.restframe import RestFrameBinner
from sedvae.sps.provabgs import N_FREE, check_support

BANDS = ("BASS-g", "BASS-r", "MzLS-z", "wise2010-W1", "wise2010-W2")


@pytest.fixture(scope="module")
def generator():
    """Mock generator on the real SPS with nebular emission (built once: ~6 s)."""
    from sedvae.simulation import MockGenerator

    return MockGenerator()


def _tiny_net(generator, **kwargs) -> SpectrumAutoencoder:
    """A small autoencoder sharing the generator's SPS, instrument and photometry."""
    from sedvae.physics import Photometry

    decoder = PhysicsDecoder(
        generator.sps,
        generator.instrument,
        ResidualNet(n_s=4, hidden=(32,), n_knots=8),
        LogGrid(dlnlam=5e-4),
        Photometry(BANDS),
    )
    encoder = SpectrumEncoder(
        LatentMap(n_s=4), n_bins=256, channels=(4, 8, 8), kernels=(3, 5, 5), mlp=(32,)
    )
    return SpectrumAutoencoder(encoder, decoder, **kwargs)


@pytest.fixture(scope="module")
def batch(generator):
    g = torch.Generator().manual_seed(3)
    return generator.sample(4, g)


def test_few_training_steps_lower_loss_on_fixed_batch(generator, batch):
    torch.manual_seed(0)
    net = _tiny_net(generator, w_supervised=1.0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss, _ = net.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert min(losses[-3:]) < 0.93 * losses[0], losses  # 2.50 -> 2.23 with this seed
    assert all(b < a for a, b in zip(losses[:5], losses[1:6], strict=True)), losses


def test_gradients_reach_theta_through_decoder(generator, batch):
    net = _tiny_net(generator)
    b = net.check_batch(batch)
    with torch.no_grad():
        latents = net.encode(b)
    theta = latents["theta"].clone().requires_grad_(True)
    latents["theta"] = theta
    model = net.decoder(latents, b["z"])
    chi2 = net.chi2(b, model)
    (chi2["chi2"] + chi2["chi2_phot"]).sum().backward()
    grad = theta.grad
    assert torch.isfinite(grad).all()
    # mass, SFH weights, metallicity and dust all shape the spectrum
    for i in (0, 1, 2, 3, 4, 7, 8, 10):
        assert grad[:, i].abs().max() > 0, i
    # and the encoder is trained through the same path (its last layer starts at zero, which
    # would block the gradient to earlier layers on the very first step)
    with torch.no_grad():
        net.encoder.mlp[-1].weight.normal_(0, 1e-2)
    net.zero_grad()
    loss, _ = net.loss(batch)
    loss.backward()
    first = net.encoder.conv[0][0].weight.grad
    assert first is not None and torch.isfinite(first).all() and first.abs().max() > 0


def test_amplitude_profiling_recovers_exact_scales(generator, batch):
    net = _tiny_net(generator)
    b = net.check_batch(batch)
    with torch.no_grad():
        latents, model = net.decode(b, net.encode(b))
        # noiseless data = the model with 2x the mass and a 1.5x larger aperture
        fake = dict(b, flux=3.0 * model["flux"], photometry=2.0 * model["photometry"])
        fake["mask"] = torch.zeros_like(b["mask"])
        fake["ivar"] = torch.ones_like(b["ivar"])
        new, refit = net.decode(fake, latents)
    logm = latents["theta"][:, 0]
    inside = (logm + math.log10(2) < 12.5) & (logm + math.log10(2) > 7)
    assert torch.allclose(new["theta"][inside, 0], logm[inside] + math.log10(2), atol=1e-4)
    assert torch.allclose(new["aperture"][inside], 1.5 * latents["aperture"][inside], rtol=1e-3)
    cov = refit["coverage"][inside]
    assert torch.allclose(refit["flux"][inside][cov], fake["flux"][inside][cov], rtol=1e-3,
                          atol=1e-6 * fake["flux"].abs().max().item())  # fmt: skip


def test_latent_map_outputs_always_in_prior_support():
    lm = LatentMap(n_calib=2, n_s=3)
    raw = torch.cat([torch.randn(200, lm.n_raw) * 30, torch.full((2, lm.n_raw), 1e4)])
    raw[-1] *= -1
    log_lum = torch.cat([torch.randn(200) * 10, torch.tensor([1e3, -1e3])])
    out = lm(raw, log_lum)
    check_support(out["theta"])  # raises if outside
    assert torch.isfinite(safe_log_prior(lm.prior, out["theta"])).all()
    assert ((out["sigma_star"] >= 10 * (1 - 1e-5)) & (out["sigma_star"] <= 600 * (1 + 1e-5))).all()
    assert ((out["aperture"] > 0) & torch.isfinite(out["aperture"])).all()
    assert out["calib"].abs().max() <= 0.2 and out["s"].shape == (202, 3)
    assert out["u"].shape == (202, N_FREE)


def test_encoder_outputs_in_support_for_noise_spectra(generator, batch):
    torch.manual_seed(1)
    net = _tiny_net(generator)
    with torch.no_grad():  # random (not zero) last layer: outputs far from the prior centre
        net.encoder.mlp[-1].weight.normal_(0, 10.0)
    b = dict(batch)
    b["flux"] = torch.randn_like(b["flux"]) * 100
    check_support(net.encode(net.check_batch(b))["theta"])


def test_nan_flux_pixels_are_masked_not_propagated(generator, batch):
    net = _tiny_net(generator)
    b = dict(batch)
    b["flux"] = b["flux"].clone()
    b["flux"][:, 100:200] = float("nan")
    b["ivar"] = b["ivar"].clone()
    b["ivar"][0, 300:400] = float("inf")
    b["photometry"] = b["photometry"].clone()
    b["photometry"][1, 2] = float("nan")
    loss, metrics = net.loss(b)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    checked = net.check_batch(b)
    assert checked["mask"][:, 100:200].all() and (checked["ivar"][:, 100:200] == 0).all()


@pytest.mark.parametrize("case", ["all_masked", "ivar_nonpositive", "z_high", "z_nan"])
def test_unusable_inputs_raise_clear_errors(generator, batch, case):
    net = _tiny_net(generator)
    b = {k: v.clone() for k, v in batch.items()}
    if case == "all_masked":
        b["mask"][2] = True  # galaxy 2 of 4
        match = "no usable pixel"
    elif case == "ivar_nonpositive":
        b["ivar"][1] = -1.0
        match = "no usable pixel"
    elif case == "z_high":
        b["z"][0] = 0.9
        match = "z must lie in"
    else:
        b["z"][0] = float("nan")
        match = "z must lie in"
    with pytest.raises(ValueError, match=match):
        net.loss(b)


def test_augmentation_keeps_data_usable_and_identity_redshift(generator, batch):
    net = _tiny_net(generator, p_redshift=1.0, augment_z=0.0, extra_noise=0.0, mask_chunks=0.0)
    b = net.check_batch(batch)
    out = net.augment(b, torch.Generator().manual_seed(0))
    keep = ~out["mask"]
    assert torch.allclose(out["flux"][keep], b["flux"][keep], rtol=1e-4, atol=1e-6)
    net = _tiny_net(generator, p_redshift=0.5, mask_chunks=3.0, mask_length=8000)
    out = net.augment(b, torch.Generator().manual_seed(1))
    assert not out["mask"].all(-1).any()
    assert torch.isfinite(net.loss(out)[0])


def test_rest_frame_binner_conserves_weighted_flux(generator, batch):
    binner = RestFrameBinner(generator.instrument.wave, generator.instrument.arm, 1000.0, 12000.0)
    f, w = binner(batch["flux"], batch["ivar"], batch["z"])
    assert torch.allclose((f * w).sum(-1), (batch["flux"] * batch["ivar"]).sum(-1), rtol=1e-4)
    assert torch.allclose(w.sum(-1), batch["ivar"].sum(-1), rtol=1e-4)


def test_log_grid_broadening_conserves_flux_and_adds_width():
    grid = LogGrid(dlnlam=1e-4)
    lum = torch.zeros(2, grid.n_wave)
    x = torch.log(grid.wave_fine / 5000.0)
    lum[:, : grid.n_fine] = torch.exp(-0.5 * (x / 1e-4) ** 2).float()
    out = grid.broaden(lum, torch.tensor([0.0, 300.0]))
    width = grid.wave * grid.dlnlam
    assert torch.allclose((out * width).sum(-1), (lum * width).sum(-1), rtol=1e-5)
    w = out[1, : grid.n_fine].double()
    sigma = torch.sqrt((w * x**2).sum() / w.sum())
    assert sigma.item() == pytest.approx(math.hypot(1e-4, 300.0 / 299792.458), rel=0.02)


def test_noise_model_median_snr_and_reproducibility(generator):
    from sedvae.physics.noise import SpectralNoiseModel

    arm = generator.instrument.arm
    noise = SpectralNoiseModel(torch.ones(arm.shape[0]), arm, snr=(4.0, 7.0, 6.0),
                               snr_scatter=0.0, arm_scatter=0.0, mask_segments=0)  # fmt: skip
    flux = torch.ones(64, arm.shape[0]) * torch.linspace(1, 2, arm.shape[0])
    out = noise(flux, None, torch.Generator().manual_seed(0))
    for a, snr in enumerate((4.0, 7.0, 6.0)):
        got = (flux[:, arm == a] * out["ivar"][:, arm == a].sqrt()).median(-1).values
        assert torch.allclose(got, torch.full_like(got, snr), rtol=1e-3)
        pull = ((out["flux"] - flux) * out["ivar"].sqrt())[:, arm == a]
        assert pull.std().item() == pytest.approx(1.0, abs=0.02)
    again = noise(flux, None, torch.Generator().manual_seed(0))
    assert torch.equal(out["flux"], again["flux"])


def test_checkpoint_round_trip_excludes_sps_tables(generator, batch, tmp_path):
    from sedvae.checkpoint import load_checkpoint, save_checkpoint

    cfg = {
        "_target_": "sedvae.autoencoder.SpectrumAutoencoder",
        "encoder": {"_target_": "sedvae.autoencoder.SpectrumEncoder", "n_bins": 256,
                    "channels": [4, 8, 8], "kernels": [3, 5, 5], "mlp": [32],
                    "latent_map": {"_target_": "sedvae.autoencoder.LatentMap", "n_s": 4}},
        "decoder": {"_target_": "sedvae.autoencoder.PhysicsDecoder",
                    "sps": {"_target_": "sedvae.sps.SEDModel", "wave_min": 2000.0,
                            "wave_max": 60000.0, "z_max": 0.8},
                    "instrument": {"_target_": "sedvae.simulation.desi_instrument"},
                    "residual": {"_target_": "sedvae.autoencoder.ResidualNet", "n_s": 4,
                                 "hidden": [32], "n_knots": 8},
                    "grid": {"_target_": "sedvae.autoencoder.LogGrid", "dlnlam": 5e-4},
                    "photometry": {"_target_": "sedvae.physics.Photometry", "bands": list(BANDS)}},
    }  # fmt: skip
    net = _tiny_net(generator)
    state = net.state_dict()
    assert not any(k.startswith(("decoder.sps.", "decoder.instrument.")) for k in state)
    path = save_checkpoint(tmp_path / "ae.pt", "autoencoder", net, cfg)
    assert path.stat().st_size < 2e6
    loaded, _ = load_checkpoint(path, "autoencoder")
    net.eval()
    with torch.no_grad():
        a = net(batch)["model"]["flux"]
        b = loaded(batch)["model"]["flux"]
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_refinement_lowers_each_galaxys_loss(generator, batch):
    net = _tiny_net(generator)
    out = net.refine(batch, steps=5, lr=0.1)
    c = net.objective(out["batch"], out["latents"], out["model"])
    assert (c["nll"] <= out["nll_encoder"] + 1e-6).all()
    assert (c["nll"] < out["nll_encoder"]).any()
    check_support(out["latents"]["theta"])


def test_reconstruction_plot_returns_figure(generator, batch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sedvae.plotting import plot_reconstruction

    net = _tiny_net(generator)
    fig, axes = plot_reconstruction(net, batch, index=1)
    assert len(axes) == 5 and axes[0].get_legend() is not None
    assert len(axes[0].lines) >= 4
    plt.close(fig)


def test_milky_way_transmission_matches_av():
    from sedvae.physics.calibration import milky_way_transmission

    wave = torch.tensor([3600.0, 5500.0, 9000.0, 20000.0])
    t = milky_way_transmission(wave, torch.tensor([0.1]))
    a = -2.5 * torch.log10(t[0])
    assert a[1].item() == pytest.approx(0.31, abs=0.02)  # A_V = R_V E(B-V)
    assert (torch.diff(a) < 0).all()


def test_bgs_redshifts_follow_the_stated_distribution():
    from sedvae.simulation import sample_bgs_redshift

    z = sample_bgs_redshift(20000, torch.Generator().manual_seed(0)).numpy()
    assert z.min() >= 0.01 and z.max() <= 0.6
    assert 0.15 < np.median(z) < 0.25 and np.quantile(z, 0.9) < 0.4


def test_mocks_have_requested_snr_and_consistent_truth(generator):
    out = generator.sample(32, torch.Generator().manual_seed(5))
    arm = generator.instrument.arm
    for a, snr in enumerate((3.9, 7.0, 6.9)):
        got = (out["flux"][:, arm == a] * out["ivar"][:, arm == a].sqrt()).median(-1).values
        assert 0.6 * snr < got.median().item() < 1.6 * snr
    pull = (out["flux"] - out["flux_true"]) * out["ivar"].sqrt()
    assert pull[~out["mask"]].std().item() == pytest.approx(1.0, abs=0.03)
    assert (out["line_lum"] > 0).all() and torch.isfinite(out["photometry_ivar"]).all()


def test_configs_compose(tmp_path):
    from hydra import compose, initialize
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize(config_path="../conf", version_base="1.3"):
            for exp in ("autoencoder", "autoencoder_paper"):
                overrides = [f"experiment={exp}", f"paths.output_dir={tmp_path}"]
                cfg = compose("train", overrides=overrides)
                assert cfg.model.net.decoder.sps._target_ == "sedvae.sps.SEDModel"
                assert cfg.model.net.decoder.residual.n_s == cfg.model.net.encoder.latent_map.n_s
            cfg = compose("train", overrides=["experiment=autoencoder", "model/sps=emulator"])
            assert cfg.model.net.decoder.sps._target_ == "sedvae.emulator.load_emulator"
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.slow
def test_fast_dev_run_trains_end_to_end(tmp_path):
    from hydra import compose, initialize
    from hydra.core.global_hydra import GlobalHydra

    from sedvae.train import train

    GlobalHydra.instance().clear()
    try:
        with initialize(config_path="../conf", version_base="1.3"):
            cfg = compose("train", overrides=[
                "experiment=autoencoder", "debug=fdr", f"paths.output_dir={tmp_path}",
                f"paths.cache_dir={tmp_path}", "data.n_train=64", "data.n_val=16",
                "data.n_test=16", "data.batch_size=8", "model.net.encoder.channels=[4,8,8]",
            ])  # fmt: skip
            metrics = train(cfg)
    finally:
        GlobalHydra.instance().clear()
    assert math.isfinite(metrics["train/loss"])
