"""Simulations drawn inside the training loop (sedvae.simulation.onthefly), at toy size on CPU."""

from __future__ import annotations

import pytest
import torch

from sedvae.posterior.data import OBS_KEYS, TRUTH_KEYS
from sedvae.simulation.onthefly import (
    EmulatorSimulatorDataModule,
    SimulatorDataModule,
    build_generator,
    noisy_batch,
)


@pytest.fixture(scope="module")
def generator():
    return build_generator()


def test_batches_have_the_posterior_training_form(generator):
    dm = SimulatorDataModule(generator, batch_size=16, n_val=0, seed=5)
    batch = dm.train_batch(0)
    n_pix = generator.instrument.npix
    assert set(OBS_KEYS + TRUTH_KEYS) <= set(batch)
    assert batch["flux"].shape == batch["ivar"].shape == batch["mask"].shape == (16, n_pix)
    assert batch["mask"].dtype == torch.bool and batch["flux"].dtype == torch.float32
    assert batch["photometry"].shape == batch["photometry_ivar"].shape == (16, 5)
    assert batch["theta"].shape == (16, 12)
    for key in ("z", "logU", "sigma_v", "aperture"):
        assert batch[key].shape == (16,)
    # masked pixels carry no flux and no weight; the prior support holds
    assert torch.all(batch["ivar"][batch["mask"]] == 0)
    assert torch.all(batch["flux"][batch["mask"]] == 0)
    assert torch.all((batch["ivar"] > 0) == ~batch["mask"])
    assert torch.all((batch["z"] >= 0.01) & (batch["z"] <= 0.6))
    generator.sps.prior.to_unconstrained(batch["theta"].double())  # raises outside the prior


def test_noise_is_consistent_with_ivar(generator):
    dm = SimulatorDataModule(generator, batch_size=48, n_val=0, seed=6)
    batch = dm.train_batch(3)
    good = ~batch["mask"]
    chi2 = ((batch["flux"] - batch["flux_true"]) ** 2 * batch["ivar"])[good]
    # 48 x ~7900 pixels: the mean of chi^2 (1 dof each) is 1 within ~0.005 (1 sigma)
    assert abs(float(chi2.mean()) - 1.0) < 0.03
    # median S/N per pixel over arms near the model's (3.9, 7.0, 6.9) times e^N(0, 0.5^2)
    snr = (batch["flux_true"].abs() * batch["ivar"].sqrt())[good].median()
    assert 2.0 < float(snr) < 15.0


def test_batched_noise_matches_the_noise_model():
    """Without random scatter or masked runs, the batched noise levels are the noise model's."""
    from sedvae.simulation.mocks import desi_noise_model

    noise = desi_noise_model(snr_scatter=0.0, arm_scatter=0.0, phot_scatter=0.0,
                             mask_segments=0.0)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    flux = 1.0 + torch.rand(8, noise.shape.shape[0], generator=gen)
    phot = 10.0 + torch.rand(8, 5, generator=gen)
    ref = noise(flux, phot, torch.Generator().manual_seed(1))
    ours = noisy_batch(noise, flux, phot, torch.Generator().manual_seed(2))
    assert torch.equal(ours["mask"], ref["mask"])
    assert torch.allclose(ours["ivar"], ref["ivar"], rtol=1e-6)
    assert torch.allclose(ours["photometry_ivar"], ref["photometry_ivar"], rtol=1e-6)
    # masked runs: on average mask_segments runs of (5 + 40) / 2 pixels per spectrum
    noise = desi_noise_model(mask_segments=2.0)
    out = noisy_batch(noise, flux[:1].expand(400, -1), None, torch.Generator().manual_seed(3))
    extra = (out["mask"] & ~(noise.shape <= 0)).sum(-1).float().mean()
    assert 2.0 * 22.5 * 0.85 < float(extra) < 2.0 * 22.5 * 1.05  # overlaps remove a few


def test_fresh_galaxies_each_step_and_reproducible(generator):
    dm = SimulatorDataModule(generator, batch_size=4, n_val=0, seed=7)
    a, b = dm.train_batch(0), dm.train_batch(1)
    assert not torch.equal(a["theta"], b["theta"])
    assert not torch.equal(a["flux"], b["flux"])
    again = SimulatorDataModule(generator, batch_size=4, n_val=0, seed=7).train_batch(1)
    for key in b:
        assert torch.equal(b[key], again[key]), key
    other = SimulatorDataModule(generator, batch_size=4, n_val=0, seed=8).train_batch(1)
    assert not torch.equal(b["theta"], other["theta"])


def test_train_py_posterior_simulator_lowers_the_loss(generator, tmp_path):
    """``train.py experiment=posterior_simulator`` end to end at toy size: the validation loss
    after 2 x 12 steps of fresh simulations is below the untrained network's."""
    import hydra
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sedvae.checkpoint import load_checkpoint
    from sedvae.paths import config_dir
    from sedvae.train import train

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=posterior_simulator", f"paths.output_dir={tmp_path}", "~logger",
            "data.batch_size=32", "data.steps_per_epoch=12", "data.n_val=64",
            "trainer.max_epochs=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
            "model.optimizer.lr=2e-3", "callbacks.lr_monitor=null",
        ])  # fmt: skip
    GlobalHydra.instance().clear()
    # the untrained network's loss on the same validation set
    torch.manual_seed(cfg.seed)
    net = hydra.utils.instantiate(cfg.model.net)
    dm = SimulatorDataModule(generator, batch_size=32, n_val=64, seed=cfg.data.seed)
    dm.setup("fit")
    with torch.no_grad():
        before = sum(float(net.loss(b)[0]) * len(b["z"]) for b in dm.datasets["val"]) / 64
    metrics = train(cfg)
    assert metrics["val/loss"] < before - 0.5, (metrics["val/loss"], before)
    net, _ = load_checkpoint(tmp_path / "posterior.pt", "posterior")
    with torch.no_grad():
        after = sum(float(net.loss(b)[0]) * len(b["z"]) for b in dm.datasets["val"]) / 64
    assert after == pytest.approx(metrics["val/loss"], rel=1e-4)


def test_emulator_trains_on_the_fly(tmp_path):
    from sedvae.checkpoint import save_checkpoint
    from sedvae.emulator import EmulatorModule, Speculator, load_emulator
    from sedvae.simulation.onthefly import WallClockSchedule

    dm = EmulatorSimulatorDataModule(batch_size=32, steps_per_epoch=10, n_val=64, seed=2)
    assert dm.wave[0] >= 2000.0 and dm.wave[-1] <= 60000.0
    batch = dm.train_batch(0)
    assert batch["lum"].shape == (32, len(dm.wave)) and torch.all(batch["lum"] > 0)
    assert not torch.equal(dm.train_batch(1)["theta"], batch["theta"])

    def net(wave, z_max):
        return Speculator(wave, n_components=(8, 8, 8, 6), hidden=32, n_layers=2, z_max=z_max)

    module = EmulatorModule(
        net, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3), pca_spectra=256
    )
    clock = WallClockSchedule(budget_s=600.0, warmup_steps=1)
    import pytorch_lightning as pl

    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[clock])  # fmt: skip
    trainer.fit(module, datamodule=dm)
    first = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    assert clock.stats["steps"] == 30 and clock.stats["steps_per_s"] > 0
    path = save_checkpoint(tmp_path / "emulator.pt", "emulator", module.net)
    loaded = load_emulator(path)
    val = dm.datasets["val"][0]
    with torch.no_grad():
        loss = float(loaded.loss(val["theta"], val["z"], val["lum"]))
        baseline = float(loaded.baseline_loss(val["theta"], val["lum"]))
    assert loss == pytest.approx(first, rel=0.2)
    assert loss < baseline  # better than the PCA mean spectrum


# ---- the generative model's data-driven parts (issue 26) ----------------------------------------
@pytest.fixture(scope="module")
def parts(generator):
    from sedvae.simulation.onthefly import GenerativeParts

    return GenerativeParts(generator.sps.line_names, generator.instrument)


def test_generative_batches_are_reproducible_and_carry_their_draws(generator):
    dm = SimulatorDataModule(generator, batch_size=8, n_val=0, seed=9, generative=True)
    a = dm.train_batch(2)
    again = SimulatorDataModule(generator, batch_size=8, n_val=0, seed=9, generative=True)
    b = again.train_batch(2)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    plain = SimulatorDataModule(generator, batch_size=8, n_val=0, seed=9).train_batch(2)
    # the same galaxies (prior draws come first from the step's stream), other spectra
    assert torch.equal(a["theta"], plain["theta"]) and torch.equal(a["z"], plain["z"])
    assert not torch.allclose(a["flux_true"], plain["flux_true"])
    assert {"log_line_factor", "calib", "sky_amp"} <= set(a)
    assert a["calib"].shape == (8, 9)  # 3 DESI arms x Legendre P_0..P_2


def test_calibration_warps_have_the_prior_amplitude(parts):
    """Warps drawn from sedvae.linear's calibration prior: c ~ N(0, 0.05^2) per arm and order,
    so the rms of warp - 1 over an arm is 0.05 sqrt(1 + 1/3 + 1/5) = 0.0619 (P_k has mean
    square 1 / (2k + 1)); the coefficients are recovered exactly by least squares."""
    draws = parts.draw(3000, torch.Generator().manual_seed(0))
    calib = draws["calib"]
    assert calib.std(0).sub(0.05).abs().max() < 0.05 * 0.08  # 3000 draws: 1.3 % per sigma
    warp = parts.warp(calib[:200]).double()
    basis = parts.calib_basis.double()
    coef = torch.linalg.lstsq(basis.T, (warp - 1).T).solution.T
    assert torch.allclose(coef, calib[:200], atol=1e-5)
    rms = (parts.warp(calib).double() - 1).pow(2).mean().sqrt()
    assert abs(float(rms) - 0.05 * (1 + 1 / 3 + 1 / 5) ** 0.5) < 0.003


def test_line_ratios_are_free_within_their_bounds(generator, parts):
    """Family factors are log-normal with the stated sigma, clipped at +-1 dex; lines of one
    ion keep Cloudy's ratio; a factor multiplies exactly that line's luminosity in the
    spectrum (flux conservation of the nebular deposit)."""
    draws = parts.draw(4000, torch.Generator().manual_seed(1))
    dex = draws["log_line_factor"]
    assert float(dex.abs().max()) <= 1.0
    o3 = parts.family_names.index("O  3")
    h1 = parts.family_names.index("H  1")
    assert abs(float(dex[:, o3].std()) - 0.3) < 0.02
    assert abs(float(dex[:, h1].std()) - 0.15) < 0.01
    factors = parts.line_factors(dex[:5])
    names = [str(n) for n in generator.sps.line_names]
    i5007, i4959 = names.index("O  3  5006.84A"), names.index("O  3  4958.91A")
    ia, ib = names.index("H  1  6562.80A"), names.index("H  1  4861.32A")
    assert torch.equal(factors[:, i5007], factors[:, i4959])
    assert torch.equal(factors[:, ia], factors[:, ib])
    # the spectrum: [O III] 5007 times 10 adds 9 x its luminosity, nothing else changes
    sps = generator.sps
    theta = sps.prior.sample(2, torch.Generator().manual_seed(2), dtype=torch.float64)
    z = torch.tensor([0.1, 0.2], dtype=torch.float64)
    logu = torch.tensor([-2.5, -3.0], dtype=torch.float64)
    f = torch.ones(2, len(names), dtype=torch.float64)
    f[:, i5007] = 10.0
    diff = sps.simulate(theta, z, logu, line_factors=f) - sps.simulate(theta, z, logu)
    wave = sps.wave
    dlam = torch.gradient(wave)[0]
    near = (wave > 4990) & (wave < 5020)
    added = (diff.double() * dlam)[:, near].sum(-1)
    expected = 9 * sps.line_luminosities(theta, z, logu)[:, i5007].double()
    assert torch.allclose(added, expected, rtol=0.02)
    assert float(diff[:, ~near].abs().max()) <= 1e-6 * float(diff.abs().max())


def test_sky_residuals_sit_on_bright_sky_lines(generator, parts):
    dm = SimulatorDataModule(generator, batch_size=16, n_val=0, seed=10,
                             generative={"sky_frac": 1.0, "sky_line_prob": 1.0})  # fmt: skip
    batch = dm.train_batch(0)
    good = ~batch["mask"]
    chi = ((batch["flux"] - batch["flux_true"]) * batch["ivar"].sqrt())[good]
    wave = generator.instrument.wave.double()
    near = (wave[None] - parts.sky_wave[:, None]).abs().min(0).values < 3.0  # (M,)
    near = near[None].expand_as(good)[good]
    # away from sky lines the noise is the ivar's (chi^2 ~ 1, outliers off by default);
    # on them the residuals (4 sigma rms spikes) raise it far above
    assert abs(float(chi[~near].pow(2).mean()) - 1.0) < 0.05
    assert float(chi[near].pow(2).mean()) > 3.0


def test_continuity_sfh_batches_change_only_the_histories(generator, parts):
    """An SFH prior (sedvae.sps.continuity) changes the histories and nothing else drawn; the
    batch carries each history's truths, which are derived(theta) where the history is
    theta's, and the continuity ones form as much mass as theta says."""
    from sedvae.simulation.onthefly import simulate_batch
    from sedvae.sps import THETA
    from sedvae.sps.continuity import ContinuitySFH

    sfh = ContinuitySFH(frac=0.5)
    a = simulate_batch(generator, 12, 4, 1, parts=parts, sfh=sfh)
    b = simulate_batch(generator, 12, 4, 1, parts=parts, sfh=sfh)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    plain = simulate_batch(generator, 12, 4, 1, parts=parts)
    assert "logmstar_surv" not in plain  # the default is unchanged: no history truths
    for key in ("theta", "z", "logU", "sigma_v", "aperture", "calib", "log_line_factor"):
        assert torch.equal(a[key], plain[key]), key
    pick = a["sfh_continuity"]
    assert 0 < int(pick.sum()) < 12
    sps = generator.sps
    ref = sps.derived(a["theta"].to(sps.dtype), a["z"].to(sps.dtype))
    for key in ("logmstar_surv", "sfr_100myr", "t_mw_gyr"):
        torch.testing.assert_close(a[key][~pick], ref[key][~pick].float(), rtol=1e-5, atol=0)
        assert (a[key][pick] - ref[key][pick].float()).abs().max() > 1e-2, key
    # theta's histories make theta's spectra; the continuity ones other spectra
    same = (a["flux_true"] - plain["flux_true"]).abs().amax(-1) <= 1e-5 * plain[
        "flux_true"].abs().amax(-1)  # fmt: skip
    assert torch.equal(same, ~pick)
    surv = 10 ** (a["logmstar_surv"] - a["theta"][:, THETA.LOGMSTAR])
    assert ((surv > 0.3) & (surv < 1)).all()
