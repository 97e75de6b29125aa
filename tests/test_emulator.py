"""Speculator emulator: the physics it relies on, training, checkpoints, shapes and devices."""

from __future__ import annotations

import math

import pytest
import torch

from sedvae.checkpoint import CheckpointError, save_checkpoint
from sedvae.emulator import Speculator, load_emulator
from sedvae.sps import THETA, PROVABGSPrior
from sedvae.sps.ssp import grid_wavelengths

# a small emulator for fast tests: two optical segments, few components, a narrow MLP
TINY = {
    "segments": (3600.0, 5500.0, 7410.0),
    "n_components": (8, 8),
    "hidden": 64,
    "n_layers": 2,
    "z_max": 0.6,
}


@pytest.fixture(scope="module")
def grid(sed_model):
    """The simulator's wavelengths (float64). Not ``sed_model.wave``: other tests cast the shared
    model to float32 and back, which rounds that buffer."""
    wave = torch.as_tensor(grid_wavelengths())
    first = int(torch.searchsorted(wave, 1000.0))  # below 2000 A, air = vacuum
    wave = wave[first : first + sed_model.n_wave]
    torch.testing.assert_close(wave.float(), sed_model.wave.float())
    return wave


@pytest.fixture(scope="module")
def sims(sed_model):
    """640 prior draws (512 train, 128 test): theta, z and L_lambda per unit formed mass on the
    simulator grid."""
    gen = torch.Generator().manual_seed(11)
    theta = PROVABGSPrior().sample(640, gen)
    z = 0.6 * torch.rand(640, generator=gen)
    with torch.no_grad():
        th, zz = sed_model.check_inputs(theta, z)
        lum = sed_model.spectrum_from_history(sed_model.history(th, zz), th[:, THETA.DUST])
    return theta, z, lum


def _on_emulator_grid(net: Speculator, wave: torch.Tensor, lum: torch.Tensor) -> torch.Tensor:
    keep = (wave >= net.wave[0]) & (wave <= net.wave[-1])
    return lum[:, keep]


@pytest.fixture(scope="module")
def trained(grid, sims):
    """A tiny emulator, PCA on the 512 training spectra, 40 Adam epochs (a few seconds)."""
    torch.manual_seed(0)
    theta, z, lum = sims
    net = Speculator(grid, **TINY)
    lum = _on_emulator_grid(net, grid, lum)
    net.fit_pca([(theta[:512], z[:512], lum[:512])])
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(40):
        for idx in torch.randperm(512).split(128):
            loss = net.loss(theta[idx], z[idx], lum[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval(), lum


# ---- the physics the emulator relies on -------------------------------------------------------
def test_ism_dust_is_an_exact_factor(sed_model, grid, sims):
    """The emulator learns ln L before ISM dust and applies T_ISM exactly: valid only if the
    simulator's ISM attenuation multiplies the whole spectrum."""
    theta, z, _ = sims
    net = Speculator(grid, **TINY)
    theta = theta[:16]
    clear = theta.clone()
    clear[:, 10] = 0.0
    with torch.no_grad():
        ratio = torch.log(sed_model(theta, z[:16]) / sed_model(clear, z[:16]))
    keep = (grid >= net.wave[0]) & (grid <= net.wave[-1])
    torch.testing.assert_close(
        ratio[:, keep], net.log_transmission_ism(theta), rtol=1e-5, atol=1e-4
    )


def test_burst_older_than_universe_is_switched_off(grid):
    net = Speculator(grid, **TINY)
    theta = PROVABGSPrior().sample(2, torch.Generator().manual_seed(0))
    theta[:, THETA.F_BURST] = 0.5
    theta[:, THETA.T_BURST] = torch.tensor([1.0, 13.0])  # t_U(z=0.5) = 8.6 Gyr
    x = net.features(theta, torch.full((2,), 0.5))
    assert x[0, 3] == 0.5 and x[1, 3] == 0.0


# ---- training ----------------------------------------------------------------------------------
def test_tiny_emulator_beats_mean_pca_baseline(trained, sims):
    net, lum = trained
    theta, z, _ = sims
    with torch.no_grad():
        loss = net.loss(theta[512:], z[512:], lum[512:])
        baseline = net.baseline_loss(theta[512:], lum[512:])
        err = net.log_lum_error(theta[512:], z[512:], lum[512:]).abs()
    assert loss < 0.05 * baseline, (float(loss), float(baseline))
    # and the spectra themselves: held-out median |d ln L| at the few-% level
    assert err.median() < 0.15, float(err.median())


def test_pca_is_orthonormal_and_fitted_on_given_spectra(trained):
    net, _ = trained
    for seg in net.segments:
        k = seg.basis.shape[0]
        torch.testing.assert_close(seg.basis @ seg.basis.T, torch.eye(k), atol=1e-5, rtol=0)
    assert bool(net.fitted) and float(net.z_max) == pytest.approx(0.6)


def test_unfitted_emulator_raises(grid):
    net = Speculator(grid, **TINY)
    theta = PROVABGSPrior().sample(2)
    with pytest.raises(RuntimeError, match="no PCA basis"):
        net(theta, torch.zeros(2))


# ---- call contract, shapes, devices ------------------------------------------------------------
def test_call_contract_matches_sedmodel(trained, grid, sims):
    net, _ = trained
    theta, z, _ = sims
    out = net(theta[:5], z[:5])
    assert out.shape == (5, net.n_wave) and out.dtype == torch.float32
    assert net.wave.dtype == torch.float64
    assert torch.isin(net.wave, grid).all()  # a subset of the simulator's pixels
    assert net.wave[0] - 3600.0 < 1.0 and 7410.0 - net.wave[-1] < 1.0
    # logM* is a pure scale
    log_unit = net.log_lum_unit(theta[:5], z[:5])
    torch.testing.assert_close(
        torch.log(out),
        log_unit + math.log(10) * theta[:5, THETA.LOGMSTAR, None],
        rtol=1e-5,
        atol=1e-4,
    )
    # a scalar z broadcasts, as for SEDModel
    assert net(theta[:3], 0.2).shape == (3, net.n_wave)


def test_gradients_flow_to_theta(trained, sims):
    net, _ = trained
    theta, z, _ = sims
    theta = theta[:4].clone().requires_grad_(True)
    net(theta, z[:4]).log().sum().backward()
    assert torch.isfinite(theta.grad).all() and (theta.grad[:, 9:12].abs() > 0).all()


@pytest.mark.parametrize(
    "theta_fix, z, match",
    [
        ({9: 3.5}, 0.1, "tau_bc"),
        ({}, 0.7, "training range"),
        ({}, float("nan"), "NaN"),
    ],
)
def test_invalid_inputs_raise(trained, theta_fix, z, match):
    net, _ = trained
    theta = PROVABGSPrior().sample(2)
    for i, v in theta_fix.items():
        theta[:, i] = v
    with pytest.raises(ValueError, match=match):
        net(theta, torch.full((2,), z))


def test_float64(trained, sims):
    net, _ = trained
    theta, z, _ = sims
    net64 = Speculator(net.wave, **net.config)
    net64.load_state_dict(net.state_dict())
    net64 = net64.double()
    out = net64(theta[:3].double(), z[:3].double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), net(theta[:3], z[:3]), rtol=1e-4, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runs_on_gpu(trained, sims, tmp_path):
    net, _ = trained
    theta, z, _ = sims
    path = save_checkpoint(tmp_path / "emu.ckpt", "emulator", net)
    gpu = load_emulator(path, map_location="cuda")
    out = gpu(theta[:8].cuda(), z[:8].cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), net(theta[:8], z[:8]), rtol=1e-4, atol=0)


# ---- checkpoints -------------------------------------------------------------------------------
def test_save_load_round_trip_is_identical(trained, sims, tmp_path):
    net, _ = trained
    theta, z, _ = sims
    path = save_checkpoint(tmp_path / "emu.ckpt", "emulator", net, training={"note": "test"})
    loaded = load_emulator(path)
    assert loaded.meta["training"] == {"note": "test"}
    assert not any(p.requires_grad for p in loaded.parameters())  # frozen for decoders
    assert torch.equal(loaded(theta[:16], z[:16]), net(theta[:16], z[:16]))
    assert torch.equal(loaded.wave, net.wave)
    assert float(loaded.z_max) == float(net.z_max)


def _tampered(path, tmp_path, edit):
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    out = tmp_path / "bad.ckpt"
    torch.save(ckpt, out)
    return out


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.update(format_version=99), "format version 99"),
        (lambda c: c["meta"]["fingerprint"]["param_names"].reverse(), "'param_names'"),
        (lambda c: c["meta"]["fingerprint"]["param_ranges"][7].__setitem__(2, 1e-1),
         "'param_ranges'"),
        (lambda c: c["meta"]["fingerprint"].update(physics_version=0), "'physics_version'"),
        (lambda c: c["meta"]["fingerprint"]["files"].update(
            {"NMF_2basis_SFH_components_nowgt_lin_Nc4.txt": "0" * 16}), "NMF_2basis_SFH"),
        (lambda c: c["meta"]["fingerprint"]["files"].update(
            {"bc03_miles_stellar_grids.fits": "0" * 16}), "bc03_miles_stellar_grids.fits"),
        (lambda c: c["meta"].update(inputs=["t_univ_gyr"]), "inputs"),
        (lambda c: c["state_dict"].__setitem__("wave", c["state_dict"]["wave"] + 0.1), "grid"),
        (lambda c: c.pop("format"), "not a sedvae checkpoint"),
        (lambda c: c.update(kind="posterior"), "kind 'posterior', expected kind 'emulator'"),
    ],
)
def test_mismatched_checkpoint_raises_clear_error(trained, tmp_path, edit, match):
    net, _ = trained
    path = save_checkpoint(tmp_path / "emu.ckpt", "emulator", net)
    with pytest.raises(CheckpointError, match=match):
        load_emulator(_tampered(path, tmp_path, edit))


def test_missing_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_emulator(tmp_path / "nope.ckpt")


# ---- data ------------------------------------------------------------------------------------
def _write_simulation(path, grid, sims, n=48):
    import h5py

    theta, z, lum = sims
    with h5py.File(path, "w") as f:
        f["theta"], f["z"], f["wave"] = theta[:n].numpy(), z[:n].numpy(), grid.numpy()
        f["lum"] = lum[:n].numpy()
        f.attrs.update(seed=11, n=n, z_min=0.0, z_max=0.6)
    return path


def test_datamodule_lazy_and_in_memory_agree(tmp_path, grid, sims):
    from sedvae.emulator import SimulationDataModule

    path = _write_simulation(tmp_path / "sim.h5", grid, sims)
    batches = []
    for in_memory, workers in ((True, 0), (False, 1)):
        dm = SimulationDataModule(
            str(path), val_fraction=0.25, wave_min=3600.0, wave_max=7410.0, batch_size=8,
            in_memory=in_memory, num_workers=workers,
        )  # fmt: skip
        dm.setup("fit")
        assert (len(dm.train_set), len(dm.val_set)) == (36, 12)
        assert dm.wave[0] >= 3600.0 and dm.wave[-1] <= 7410.0 and dm.attrs["seed"] == 11
        batches.append(next(iter(dm.val_dataloader())))  # unshuffled: the same rows
    for key in ("theta", "z", "lum"):
        assert torch.equal(batches[0][key], batches[1][key])
    _, _, lum = sims
    keep = (grid >= 3600.0) & (grid <= 7410.0)
    assert torch.equal(batches[0]["lum"], lum[36:44][:, keep])  # validation = the last rows


def test_datamodule_missing_file_without_n_raises(tmp_path):
    from sedvae.emulator import SimulationDataModule

    with pytest.raises(FileNotFoundError, match="sedvae.simulation"):
        SimulationDataModule(str(tmp_path / "none.h5")).prepare_data()


# ---- the training path through Hydra and Lightning --------------------------------------------
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _compose(overrides):
    from hydra import compose, initialize

    with initialize(config_path="../conf", version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.fixture
def clean_hydra():
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def test_smoke_experiment_fast_dev_run(tmp_path, cache_dir, clean_hydra):
    from sedvae.train import train

    cfg = _compose(
        ["experiment=smoke", "debug=fdr", f"paths.output_dir={tmp_path}",
         f"paths.cache_dir={cache_dir}"]
    )  # fmt: skip
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    assert (cache_dir / "emulator_smoke.h5").is_file()  # made by the data module on first use


def test_smoke_checkpoint_loads_as_emulator(tmp_path, cache_dir, clean_hydra):
    """The Lightning checkpoint of a training run is itself a loadable emulator, and
    ``sedvae.checkpoint.export`` turns it into the shipped format."""
    import h5py

    from sedvae.train import train

    cfg = _compose(
        ["experiment=smoke", f"paths.output_dir={tmp_path}",
         f"paths.cache_dir={cache_dir}"]
    )  # fmt: skip
    train(cfg)
    net = load_emulator(tmp_path / "checkpoints" / "last.ckpt")
    assert net.n_wave == len(net.wave) and float(net.z_max) == pytest.approx(0.6)
    with h5py.File(cache_dir / "emulator_smoke.h5") as f:
        theta = torch.from_numpy(f["theta"][-8:])
        z = torch.from_numpy(f["z"][-8:])
    assert torch.isfinite(net(theta, z)).all()
    # the export command turns it into the shipped format with the same predictions
    from sedvae.checkpoint import export, load_checkpoint

    out = export(tmp_path / "checkpoints" / "last.ckpt", tmp_path / "emulator.ckpt")
    exported, meta = load_checkpoint(out, "emulator")
    assert meta["training"]["lightning_checkpoint"] == "last.ckpt"
    assert meta["training"]["n_train"] > 0  # the data module's provenance travels along
    assert torch.equal(exported(theta, z), net(theta, z))


@pytest.mark.parametrize("experiment", ["emulator", "emulator_gpu"])
def test_emulator_experiments_compose(clean_hydra, tmp_path, experiment):
    cfg = _compose([f"experiment={experiment}", f"paths.output_dir={tmp_path}"])
    assert cfg.data.wave_min == cfg.model.net.segments[0]
    assert cfg.data.wave_max == cfg.model.net.segments[-1]
    assert cfg.model.scheduler.T_max == cfg.trainer.max_epochs
