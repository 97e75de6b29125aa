"""Out-of-distribution score of the SBI head (sedvae.posterior.ood, Flag.OOD; issue 26)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from sedvae.checkpoint import CheckpointError
from sedvae.io.batch import FATAL, Flag
from sedvae.posterior import load_posterior
from sedvae.posterior.ood import OODScore, fit_gmm, fit_ood, ood_path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data/posterior/posterior.pt"


def test_gaussian_mixture_recovers_a_known_mixture():
    gen = torch.Generator().manual_seed(0)
    means = torch.tensor([[-3.0, 0.0, 1.0], [3.0, 1.0, -1.0]], dtype=torch.float64)
    sig = torch.tensor([0.5, 1.5], dtype=torch.float64)
    k = (torch.rand(4000, generator=gen) < 0.3).long()  # 30 % in component 1
    x = means[k] + sig[k, None] * torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    gmm = fit_gmm(x, 2, generator=torch.Generator().manual_seed(1))
    order = gmm["means"][:, 0].argsort()
    assert torch.allclose(gmm["means"][order], means, atol=0.1)
    assert torch.allclose(gmm["weights"][order], torch.tensor([0.7, 0.3], dtype=torch.float64),
                          atol=0.03)  # fmt: skip
    cov = gmm["chol"] @ gmm["chol"].transpose(-1, -2)
    sd = torch.diagonal(cov, dim1=-2, dim2=-1).sqrt()[order]
    assert torch.allclose(sd, sig[:, None].expand(2, 3), rtol=0.06)
    # the threshold at the 5 % quantile of a held-out set flags ~5 % of new points
    held = means[k[:2000]] + sig[k[:2000], None] * torch.randn(2000, 3, generator=gen,
                                                               dtype=torch.float64)  # fmt: skip
    model = fit_ood(x, held, components=2, quantile=0.05)
    assert model.meta["held_flagged_frac"] == pytest.approx(0.05, abs=0.002)
    new = means[k[2000:]] + sig[k[2000:], None] * torch.randn(2000, 3, generator=gen,
                                                              dtype=torch.float64)  # fmt: skip
    assert abs(float(model.flagged(new).double().mean()) - 0.05) < 0.015
    far = torch.tensor([[0.0, 10.0, 0.0], [20.0, 0.0, 0.0]], dtype=torch.float64)
    assert model.flagged(far).all()


@pytest.fixture(scope="module")
def shipped():
    post = load_posterior(SHIPPED)
    assert post.ood is not None, "the shipped head has its OOD companion file"
    return post


@pytest.fixture(scope="module")
def in_model():
    """384 mocks of the shipped head's training distribution, seeds neither the OOD fit (7)
    nor its threshold (8) used."""
    from sedvae.simulation.onthefly import SimulatorDataModule

    dm = SimulatorDataModule(batch_size=192, n_val=0, seed=4242)
    parts = [dm.make_batch(192, 4242, i) for i in range(2)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def test_ood_flags_at_most_2_percent_of_held_out_in_model_mocks(shipped, in_model):
    flags = shipped.flags(in_model)
    assert not ((flags & int(FATAL)) > 0).any()
    frac = float(((flags & int(Flag.OOD)) > 0).double().mean())
    assert frac <= 0.02, frac
    # how the threshold was set is stored with it
    meta = shipped.ood.meta
    assert meta["held_flagged_frac"] <= 0.02 and meta["n_held"] >= 1000
    assert meta["checkpoint"] == "posterior.pt"


def test_ood_score_separates_gross_inputs_from_in_model_mocks(shipped, in_model):
    """A flat spectrum and a power law f ~ lambda^-2, at the mocks' own noise level, redshift
    and photometry: not galaxies. Every one scores below the threshold; they are warnings,
    so their posteriors are still drawn."""
    gen = torch.Generator().manual_seed(0)
    n = 64
    batch = {k: v[:n] for k, v in in_model.items()}
    flux, ivar = batch["flux"], batch["ivar"]
    level = flux.abs().median(1, keepdim=True).values
    noise = torch.randn(flux.shape, generator=gen) * ivar.clamp_min(1e-12).rsqrt() * (ivar > 0)
    from sedvae.simulation.onthefly import desi_instrument

    wave = desi_instrument().wave.float()
    scores_in = shipped.ood_score(batch)
    for shape in (torch.ones_like(wave), (wave / 6000.0) ** -2):
        gross = dict(batch, flux=level * shape + noise)
        scores = shipped.ood_score(gross)
        assert bool((scores < shipped.ood.threshold).all())
        assert float(scores.max()) < float(scores_in.median())
        theta, flags = shipped.sample(gross, 20, torch.Generator().manual_seed(1),
                                      return_flags=True)  # fmt: skip
        assert bool(((flags & int(Flag.OOD)) > 0).all())
        assert bool(torch.isfinite(theta).all())


def test_stale_or_missing_companion_files(tmp_path, shipped):
    copy = tmp_path / "head.pt"
    shutil.copy(SHIPPED, copy)
    assert load_posterior(copy).ood is None  # no companion: no OOD model, no OOD flag
    with pytest.raises(FileNotFoundError, match="OOD"):
        load_posterior(copy, ood=True)
    # the shipped companion beside another file: refused, with the command that refits it
    shutil.copy(ood_path(SHIPPED), ood_path(copy))
    copy.write_bytes(copy.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match="ood fit"):
        load_posterior(copy)
    assert load_posterior(copy, ood=False).ood is None
    # a saved model reads back to the same scores
    x = torch.randn(5, shipped.ood.dim, dtype=torch.float64)
    path = shipped.ood.save(tmp_path / "m_ood.pt")
    again = OODScore.load(path)
    assert torch.equal(again.score(x), shipped.ood.score(x))
    assert again.threshold == shipped.ood.threshold and math.isfinite(again.threshold)


def test_ood_fit_summaries_carry_the_heads_coverage_cuts(shipped, in_model):
    """The OOD model is fitted on summaries made with the head's training augmentation: with
    coverage cuts on (``net.p_cut_coverage``) the summaries are those of cut spectra; without,
    only the photometry is hidden on a share, as before the cuts existed."""
    from sedvae.posterior.ood import summaries

    batch = {k: v[:32] for k, v in in_model.items()}
    net = shipped.net
    saved = net.p_cut_coverage, net.cut_red
    try:
        net.p_cut_coverage = 0.0
        plain = summaries(shipped, batch, drop_seed=5)
        again = summaries(shipped, batch, drop_seed=5)
        net.p_cut_coverage, net.cut_red = 1.0, (7000.0, 7500.0)  # every spectrum ends at 7,500 A
        cut = summaries(shipped, batch, drop_seed=5)
    finally:
        net.p_cut_coverage, net.cut_red = saved
    assert torch.equal(plain, again)
    assert not torch.allclose(plain, cut)
    # a red end cut at 7,500 A leaves its galaxies further from the training summaries
    assert float(shipped.ood.score(cut).median()) < float(shipped.ood.score(plain).median())
