"""Gappy-PCA inputs of the summary network: coefficients within their stated errors, a basis
recovered from gapped spectra, and the embedding option (fit, save, widen, fit in setup)."""

from __future__ import annotations

import pytest
import torch
from posterior_helpers import assert_widened_start, fake_batch, hydra_net, net_config

from sedvae.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from sedvae.posterior.pca import GappyPCA

pytestmark = pytest.mark.usefixtures("one_thread")

N = 64


def smooth_basis(k: int, n: int = N) -> torch.Tensor:
    """(n, k) orthonormal smooth columns (a constant, then low-order cosines)."""
    x = torch.linspace(0, 1, n, dtype=torch.float64)
    cols = [torch.cos(torch.pi * j * x) for j in range(k)]
    q, _ = torch.linalg.qr(torch.stack(cols, 1))
    return q


def gapped(s: int, n: int = N, frac: float = 0.3, seed: int = 0) -> torch.Tensor:
    """(s, n) coverage with one contiguous gap of ``frac`` of the bins per spectrum."""
    g = torch.Generator().manual_seed(seed)
    good = torch.ones(s, n, dtype=torch.bool)
    width = int(frac * n)
    starts = torch.randint(0, n - width + 1, (s,), generator=g)
    for i, a in enumerate(starts.tolist()):
        good[i, a : a + width] = False
    return good


def fitted(basis: torch.Tensor, ridge: float = 1.0) -> GappyPCA:
    pca = GappyPCA(basis.shape[0], basis.shape[1], ridge)
    pca.basis.copy_(basis.float())
    pca.fitted.fill_(True)
    return pca


def test_coefficients_are_recovered_within_their_stated_errors():
    """Spectra in the basis' span with Gaussian noise of known ivar and gaps of 30 %: the
    standardised errors (c - c_true) / sigma have unit variance and no bias, and the reduced
    chi^2 is (n_good - K) / n_good."""
    g = torch.Generator().manual_seed(1)
    basis = smooth_basis(5)
    s = 4000
    c_true = torch.randn(s, 5, generator=g, dtype=torch.float64) + torch.tensor([8.0, 0, 0, 0, 0])
    good = gapped(s)
    ivar = (50 + 450 * torch.rand(s, N, generator=g, dtype=torch.float64)) * good
    noise = torch.randn(s, N, generator=g, dtype=torch.float64) / ivar.clamp_min(1e-30).sqrt()
    flux = c_true @ basis.T + noise * good
    feats = fitted(basis, ridge=1e-3)(flux.float(), ivar.float()).double()
    coef, sigma = feats[:, :5], feats[:, 5:10].exp()
    z = (coef - c_true) / sigma
    assert z.pow(2).mean().item() == pytest.approx(1.0, abs=0.05)
    assert z.mean(0).abs().max().item() < 0.05
    n_good = good.sum(-1).double()
    chi2 = feats[:, 10].exp()
    assert chi2.mean().item() == pytest.approx(((n_good - 5) / n_good).mean().item(), abs=0.02)


def test_a_component_without_covered_bins_falls_back_to_the_ridge():
    """A component living only in masked bins gets c = 0 and sigma = 1 / sqrt(ridge) instead of
    a singular system."""
    basis = torch.zeros(N, 2, dtype=torch.float64)
    basis[: N // 2, 0] = (N // 2) ** -0.5
    basis[N // 2 :, 1] = (N // 2) ** -0.5
    ivar = torch.zeros(1, N)
    ivar[0, : N // 2] = 100.0
    flux = torch.ones(1, N)
    feats = fitted(basis, ridge=4.0)(flux, ivar)
    assert feats[0, 1].item() == 0.0
    assert feats[0, 3].exp().item() == pytest.approx(0.5)
    assert torch.isfinite(feats).all()


def test_very_high_snr_spectra_are_solved_exactly():
    """S/N^2 per bin of 1e4-1e9 (bright galaxies, normalised units): the Gram matrix stays
    positive definite (it did not in float32) and noiseless coefficients come back."""
    g = torch.Generator().manual_seed(4)
    basis = smooth_basis(8)
    c_true = torch.randn(200, 8, generator=g, dtype=torch.float64) + 5.0
    ivar = 10 ** (4 + 5 * torch.rand(200, N, generator=g, dtype=torch.float64)) * gapped(200)
    feats = fitted(basis, ridge=1e-6)((c_true @ basis.T).float(), ivar.float())
    assert torch.isfinite(feats).all()
    assert torch.allclose(feats[:, :8].double(), c_true, atol=1e-3)


def test_unfitted_basis_and_wrong_shapes_raise():
    pca = GappyPCA(N, 4)
    with pytest.raises(RuntimeError, match="not fitted"):
        pca(torch.ones(2, N), torch.ones(2, N))
    with pytest.raises(ValueError, match=r"expected flux and ivar of shape \(B, 64\)"):
        fitted(smooth_basis(4))(torch.ones(2, N + 1), torch.ones(2, N + 1))
    with pytest.raises(ValueError, match="n_components"):
        GappyPCA(N, N + 1)


def test_fit_recovers_a_subspace_from_gapped_spectra():
    """EM PCA with gaps: spectra spanning a 4-d subspace, each missing 30 % of its bins, give
    back that subspace (residual -> 0, principal angles ~ 0), the mean spectrum included."""
    g = torch.Generator().manual_seed(2)
    true = smooth_basis(4)
    coef = torch.randn(500, 4, generator=g, dtype=torch.float64) + torch.tensor([10.0, 2, 0, 0])
    flux = coef @ true.T
    pca = GappyPCA(N, 4)
    residuals = pca.fit(flux, gapped(500, seed=3), iterations=30)
    assert residuals[-1] < 1e-3 * residuals[0]
    assert (torch.diff(residuals) <= 1e-12).all()  # EM never increases the residual
    basis = pca.basis.double()
    assert torch.allclose(basis.T @ basis, torch.eye(4, dtype=basis.dtype), atol=1e-5)
    leak = true - basis @ (basis.T @ true)  # the part of the true span outside the fitted one
    assert leak.norm() < 1e-3
    assert bool(pca.fitted)


class _Data:
    """A data module that can give noiseless training spectra, as ``PosteriorMockDataModule``
    does."""

    def __init__(self, flux, ivar, z):
        self.spectra = (flux, ivar, z)

    def clean_spectra(self, n, seed=0):
        return tuple(t[:n] for t in self.spectra)


class _Trainer:
    def __init__(self, data):
        self.datamodule = data


def test_embedding_option_fits_saves_widens_and_fits_in_setup(tmp_path):
    """embedding.pca=K: the head reads 2K + 1 more inputs; without a basis the embedding
    refuses to run; PosteriorModule.setup fits it from the training set; the basis travels
    with the file; a file trained without PCA starts a widened run at exactly its density."""
    from sedvae.posterior.lightning import PosteriorModule
    from sedvae.sps import PROVABGSPrior

    torch.manual_seed(0)
    src = hydra_net(net_config()).eval()
    path = save_checkpoint(tmp_path / "p.pt", "posterior", src, net_config())
    cfg = net_config()
    cfg["embedding"]["pca"] = 4
    wide = hydra_net(cfg)
    assert wide.embedding.n_extras == src.embedding.n_extras + 9
    batch = fake_batch(6)
    batch["theta"] = PROVABGSPrior().sample(6, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="not fitted"):
        wide.loss(batch)
    with pytest.raises(CheckpointError, match="differs"):
        PosteriorModule(hydra_net(cfg), optimizer=torch.optim.Adam, init_from=str(path))
    module = PosteriorModule(wide, optimizer=torch.optim.Adam, init_from=str(path), init_widen=True)
    assert not bool(module.net.embedding.pca.fitted)  # the file has no basis
    clean = fake_batch(40, seed=1)
    trainer = _Trainer(_Data(clean["flux"], clean["ivar"], clean["z"]))
    module.trainer = trainer
    module.setup("fit")
    assert bool(module.net.embedding.pca.fitted)
    assert_widened_start(module.net, src, batch, 9)

    # the basis is part of the file, and the features come back identical
    out = save_checkpoint(tmp_path / "wide.pt", "posterior", module.net, cfg)
    back = load_checkpoint(out, "posterior")[0]
    assert torch.equal(back.embedding.pca.basis, module.net.embedding.pca.basis)
    keys = ("flux", "ivar", "z", "photometry", "photometry_ivar")
    a = module.net.embedding.inputs(*(batch[k] for k in keys))[1]
    b = back.embedding.inputs(*(batch[k] for k in keys))[1]
    assert torch.equal(a, b)
    # a run resumed from a fitted file does not refit
    before = module.net.embedding.pca.basis.clone()
    trainer.datamodule = _Data(2 * clean["flux"], clean["ivar"], clean["z"])
    module.setup("fit")
    assert torch.equal(module.net.embedding.pca.basis, before)
