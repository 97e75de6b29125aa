"""Gappy-PCA coefficients of the rest-frame spectrum: a linear compression with the noise
and the gaps handled exactly, as extra inputs of the summary network.

The binned, median-normalised spectrum f (N bins) with inverse variance w is fitted by a
linear combination of K eigenspectra E (N, K) of noiseless training spectra, by weighted
least squares with a small ridge (Connolly & Szalay 1999, AJ 117, 2052; Yip et al. 2004, AJ
128, 585):

    c = (E^T W E + lambda I)^-1 E^T W f,    Cov(c) = (E^T W E + lambda I)^-1,

where W = diag(w). Masked or uncovered bins have w = 0 and simply drop out, so spectra of
any redshift and mask give comparable coefficients. Within the basis this is the linear
estimate of the spectrum that the noise allows, with its errors: the information a
neural summary must otherwise learn to weigh by S/N from raw channels. The features are
c (K), log sigma(c) (K) and the log reduced chi^2 of the fit (1): 2K + 1 numbers.

The basis is fitted to the training set once (:meth:`GappyPCA.fit`: expectation-maximisation
PCA with gaps, the gaps filled by the reconstruction and the SVD repeated) and saved with
the network's weights, so a trained file carries the basis it was trained with.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

MAX_WEIGHT = 1e12  # cap of the normalised ivar (S/N^2 per bin at the median flux)


class GappyPCA(nn.Module):
    """Weighted least-squares coefficients on an eigenspectrum basis (module docstring).

    Parameters
    ----------
    n_bins : int
        Rest-frame bins N of the spectra it reads.
    n_components : int
        Eigenspectra K (32: the fit residual of noiseless training spectra is ~2.5 % per bin,
        below BGS noise per bin).
    ridge : float
        lambda, in units of the normalised ivar (S/N^2 per bin at the median flux): a
        component that the covered bins do not constrain gets c = 0 and sigma = 1/sqrt(lambda)
        instead of a singular system.
    """

    def __init__(self, n_bins: int, n_components: int = 32, ridge: float = 1.0) -> None:
        super().__init__()
        if n_components < 1 or n_components > n_bins:
            raise ValueError(f"n_components must be in [1, {n_bins}], got {n_components}")
        if ridge <= 0:
            raise ValueError(f"ridge must be > 0, got {ridge}")
        self.n_bins = int(n_bins)
        self.n_components = int(n_components)
        self.ridge = float(ridge)
        # persistent: a trained file carries its basis; zeros until fit() or load_state_dict
        self.register_buffer("basis", torch.zeros(self.n_bins, self.n_components))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def n_features(self) -> int:
        return 2 * self.n_components + 1

    @torch.no_grad()
    def forward(self, flux: torch.Tensor, ivar: torch.Tensor) -> torch.Tensor:
        """Features (B, 2K + 1) of normalised rest-frame spectra ``flux``, ``ivar`` (B, N)
        (ivar = 0 where a bin has no data): c, log sigma(c), log reduced chi^2."""
        if flux.shape[-1] != self.n_bins or flux.shape != ivar.shape:
            raise ValueError(
                f"expected flux and ivar of shape (B, {self.n_bins}), got "
                f"{tuple(flux.shape)} and {tuple(ivar.shape)}"
            )
        if not bool(self.fitted):
            raise RuntimeError("GappyPCA basis not fitted: call fit() or load a trained file")
        # float64 throughout: S/N^2 per bin spans orders of magnitude, and a float32 Gram
        # matrix of well-measured spectra loses positive definiteness
        basis = self.basis.double()
        # normalised weights beyond S/N 1e6 per bin are not data but a unit error; capped, a
        # flux scaled by 1e19 keeps a Gram matrix that float64 can factorise
        f, w = flux.double(), ivar.double().clamp(0.0, MAX_WEIGHT)
        ew = basis.T[None] * w[:, None, :]  # (B, K, N): E^T W
        eye = torch.eye(self.n_components, dtype=f.dtype, device=f.device)
        gram = ew @ basis + self.ridge * eye
        chol, info = torch.linalg.cholesky_ex(gram)  # (B, K, K)
        bad = info != 0
        if bool(bad.any()):  # round-off broke positive definiteness: a trace-scaled jitter
            jitter = 1e-10 * gram[bad].diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
            chol[bad] = torch.linalg.cholesky_ex(gram[bad] + jitter * eye)[0]
        coef = torch.cholesky_solve(ew @ f[..., None], chol)[..., 0]
        var = torch.cholesky_inverse(chol).diagonal(dim1=-2, dim2=-1)
        n_good = (w > 0).sum(-1).clamp_min(1)
        chi2 = (w * (f - coef @ basis.T) ** 2).sum(-1) / n_good
        feats = [coef, 0.5 * torch.log(var), torch.log(chi2.clamp_min(1e-3))[:, None]]
        feats = torch.cat(feats, -1)
        return torch.nan_to_num(feats, nan=0.0, posinf=0.0, neginf=0.0).to(flux.dtype)

    @torch.no_grad()
    def fit(self, flux: torch.Tensor, good: torch.Tensor, iterations: int = 8) -> torch.Tensor:
        """Fit the basis to noiseless normalised spectra ``flux`` (S, N) with coverage
        ``good`` (S, N) bool: gaps start at the mean spectrum; then, ``iterations`` times,
        the top K right singular vectors of the filled matrix (uncentred, so the mean
        spectrum is a component) and a refit of each spectrum on its covered bins, whose
        reconstruction fills its gaps. Returns the RMS residual on covered bins per iteration.
        """
        if flux.shape != good.shape or flux.shape[-1] != self.n_bins:
            raise ValueError(f"expected flux and good of shape (S, {self.n_bins})")
        if flux.shape[0] < self.n_components:
            raise ValueError(f"need at least {self.n_components} spectra, got {flux.shape[0]}")
        f = flux.double()
        g = good.double()
        mean = (f * g).sum(0) / g.sum(0).clamp_min(1.0)
        filled = torch.where(good, f, mean.expand_as(f))
        eye = 1e-8 * torch.eye(self.n_components, dtype=f.dtype)
        residuals = []
        for _ in range(int(iterations)):
            basis = torch.linalg.svd(filled, full_matrices=False).Vh[: self.n_components].T
            recon = torch.empty_like(f)
            for i in range(0, f.shape[0], 1024):  # (chunk, K, N) at a time
                eg = basis.T[None] * g[i : i + 1024, None, :]
                coef = torch.linalg.solve(eg @ basis + eye, eg @ f[i : i + 1024, :, None])
                recon[i : i + 1024] = coef[..., 0] @ basis.T
            residuals.append(float((((recon - f) * g) ** 2).sum() / g.sum()) ** 0.5)
            filled = torch.where(good, f, recon)
        # sign convention: each component's largest-|.| entry positive (the SVD's sign is arbitrary)
        sign = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
        self.basis.copy_((basis * sign).to(self.basis.dtype))
        self.fitted.fill_(True)
        log.info("gappy PCA basis: K=%d, RMS residual %s", self.n_components, residuals)
        return torch.tensor(residuals)


__all__ = ["GappyPCA"]
