"""Every checkpoint shipped in data/ loads on a fresh install and still does its job: the
emulator agrees with the direct simulator, the posterior recovers logM* of mocks, the
autoencoder fits mocks to the noise level."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sedvae.checkpoint import load_checkpoint, read_torch_file

DATA = Path(__file__).resolve().parents[1] / "data"
SHIPPED = {
    "emulator": DATA / "emulator" / "speculator_bc03_provabgs.ckpt",
    "posterior": DATA / "posterior" / "posterior.pt",
    "posterior_cuts": DATA / "posterior" / "posterior_cuts.pt",  # trained with coverage cuts
    "posterior_sfh": DATA / "posterior" / "posterior_sfh.pt",  # the broader SFH prior
    "autoencoder": DATA / "autoencoder" / "autoencoder_laptop.pt",
}


def kind_of(name: str) -> str:
    return "posterior" if name.startswith("posterior") else name


@pytest.fixture(scope="module")
def mocks():
    """16 noisy DESI-like mocks with their truth (fixed seed), as the training sets are made."""
    from sedvae.simulation import MockGenerator

    torch.set_num_threads(1)
    return MockGenerator().sample(16, torch.Generator().manual_seed(2024))


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_file_is_small_and_of_its_kind(name):
    path = SHIPPED[name]
    assert path.stat().st_size < 16 * 2**20
    header = read_torch_file(path)
    assert header["kind"] == kind_of(name) and header["format_version"] == 2
    assert header["meta"]["fingerprint"]["param_names"][0] == "logmstar"


def test_every_shipped_file_loads_in_a_fresh_process(tmp_path):
    """A new interpreter, no network (proxies to a closed port), empty home and caches: only the
    installed packages and the repository's data/ folder."""
    code = (
        "import sys\n"
        "from sedvae.checkpoint import load_checkpoint\n"
        "for kind, path in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        "    net, meta = load_checkpoint(path, kind)\n"
        "    print(kind, sum(p.numel() for p in net.parameters()), meta['training'])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    closed = "http://127.0.0.1:9"
    env.update(HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               HTTP_PROXY=closed, HTTPS_PROXY=closed, WANDB_MODE="offline",
               HF_HUB_OFFLINE="1")  # fmt: skip
    env.pop("SEDVAE_DATA", None)
    args = [str(a) for name, path in sorted(SHIPPED.items()) for a in (kind_of(name), path)]
    run = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == [kind_of(n) for n in sorted(SHIPPED)]
    assert all(int(line.split()[1]) > 100_000 for line in lines)  # trained nets, not stubs


def test_shipped_emulator_agrees_with_the_direct_simulator():
    """bench/emulator.py measures |df/f| p50 0.74 %, p95 2.8 % over 3000-9000 A on 10^4 draws;
    on 48 new prior draws the median must stay below 2 % and p95 below 6 %."""
    from sedvae.sps import PROVABGSPrior, SEDModel

    emu, meta = load_checkpoint(SHIPPED["emulator"], "emulator")
    z_max = float(emu.z_max)
    direct = SEDModel(float(emu.wave[0]) - 5.0, float(emu.wave[-1]) + 50.0, z_max=z_max)
    cols = torch.searchsorted(direct.wave, emu.wave)
    assert torch.equal(direct.wave[cols], emu.wave)  # the emulator's pixels are the simulator's
    gen = torch.Generator().manual_seed(31)
    assert meta["training"]["training_seed"] != 31
    theta = PROVABGSPrior().sample(48, gen)
    z = z_max * torch.rand(48, generator=gen)
    with torch.no_grad():
        t, zz = direct.check_inputs(theta, z)
        lum = direct.spectrum_from_history(direct.history(t, zz), t[:, 9:12])
        log_direct = torch.log(lum[:, cols].clamp_min(1e-37))
        err = torch.expm1(emu.log_lum_unit(theta, z) - log_direct).abs()
    optical = (emu.wave >= 3000) & (emu.wave <= 9000)
    e = err[:, optical].flatten().numpy()
    assert np.median(e) < 0.02
    assert np.percentile(e, 95) < 0.06


@pytest.mark.parametrize("name", ["posterior", "posterior_cuts", "posterior_sfh"])
def test_shipped_posterior_recovers_stellar_mass(mocks, name):
    """The shipped heads' logM* scatter is 0.15-0.16 dex (bench/posterior.py, 5,000 mocks); the
    prior spans 5.5 dex. On 16 mocks: the posterior median is within 0.3 dex for most and
    within 1 dex for all, and the central 95 % interval holds the truth for at least 12."""
    from sedvae.posterior import load_posterior

    post = load_posterior(SHIPPED[name])
    samples = post.sample(mocks, 256, torch.Generator().manual_seed(0))  # (256, 16, 12)
    logm = samples[..., 0].double()
    truth = mocks["theta"][:, 0].double()
    err = (logm.median(0).values - truth).abs()
    assert float(err.median()) < 0.3, err
    assert float(err.max()) < 1.0, err
    lo, hi = torch.quantile(logm, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0)
    assert int(((truth >= lo) & (truth <= hi)).sum()) >= 12


def test_shipped_autoencoder_fits_mocks_to_the_noise(mocks):
    """bench/autoencoder.py: median reduced chi^2 1.08 for the encoder alone on 1,024 held-out
    mocks (the truth scores 1.00); on 16 mocks the median lies in [0.8, 1.4]."""
    from sedvae.evaluation.autoencoder import galaxy_metrics

    net, _ = load_checkpoint(SHIPPED["autoencoder"], "autoencoder")
    with torch.no_grad():
        out = net(mocks)
    chi2 = galaxy_metrics(net, out)["chi2_red"]
    assert np.isfinite(chi2).all()
    assert 0.8 < float(np.median(chi2)) < 1.4, chi2
