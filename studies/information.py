"""How much do the embedding's rest-frame binning and its learned summary lose? Fisher
information of mock observations under the simulator, on the native pixels, on the binned
spectrum and on any summary of the data.

The flow sees each spectrum through :class:`sedvae.physics.restframe.RestFrameBinner` (512
ln-uniform bins of 880 km/s by default); the exact posterior (:mod:`studies.exact`) sees every
pixel. Whether the flow's excess error over the exact posterior is an amortisation gap (the
network extracts less than its inputs hold) or an information gap (its inputs hold less than
the pixels) is a question about the binning, and the Fisher information answers it locally,
for thousands of galaxies at ~30 simulations each, where nested sampling costs 50,000.

Coordinates: ``w`` in R^14, in which the whole prior of a mock is exactly N(0, I)
(:class:`GaussianCoordinates`): theta's 11 free coordinates through the flow's own
Gaussianisation (``sedvae.posterior.model.w_to_u``), logU, sigma_v and the log of the
spectrum's aperture factor through the probit of their uniform priors. At the truth, with
whitened derivatives y = J / sigma of the expected data (pixels and photometry), the Laplace
posterior precision is F + I with F = y^T y, and the marginal variance of logM* (or any
function of theta) is g^T (F + I)^-1 g for g = d logM* / dw (the Cramer-Rao bound with the
prior, a local approximation: it cannot see a second mode).

Binning is linear: bin k gets sum_i O_ki ivar_i f_i / sum_i O_ki ivar_i, with O_ki the
fraction of pixel i inside bin k (:func:`overlap_matrix`). Its information is the part of y
in the row space of G = O diag(ivar)^(1/2): F_bin = y^T G^T (G G^T)^-1 G y
(:func:`binned_fisher`), never more than F. The ivar-weighted mean is what an optimal linear
compression does within a bin where the model's derivative is flat; what it loses is the
structure of the derivatives inside a bin (line profiles, narrow features).

The same question one step further: how much survives the learned summary the flow
conditions on? :func:`summary_fisher` measures the linear Fisher information of any summary
t(x) by Monte Carlo over the noise (its mean's derivatives and its covariance), so the chain
pixels -> bins -> summary -> flow posterior can be followed galaxy by galaxy
(``studies/posterior_information.py``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from sedvae.posterior.model import u_to_w, w_to_u
from sedvae.sps import N_FREE, THETA

N_W = N_FREE + 3  # theta's free coordinates, logU, sigma_v, log aperture


class GaussianCoordinates:
    """w (n, 14) <-> (theta (n, 12), logU, sigma_v, aperture (n,)); the prior of a mock is
    N(0, I) in w.

    Parameters
    ----------
    prior : sedvae.sps.PROVABGSPrior
    logu_range, sigma_v_range, aperture_range : (float, float)
        The mock generator's uniform boxes (the aperture's is log-uniform).
    """

    n = N_W

    def __init__(self, prior, logu_range, sigma_v_range, aperture_range) -> None:
        self.prior = prior
        self.boxes = tuple(tuple(map(float, b)) for b in (logu_range, sigma_v_range))
        lo, hi = map(float, aperture_range)
        self.log_aperture = (math.log(lo), math.log(hi))

    def split(self, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """theta (n, 12), logU, sigma_v, aperture (n,) of w (n, 14)."""
        w = w.double()
        theta = self.prior.to_constrained(w_to_u(w[:, :N_FREE])[0])
        c = torch.special.ndtr(w[:, N_FREE:])
        (lo_u, hi_u), (lo_s, hi_s) = self.boxes
        lo_a, hi_a = self.log_aperture
        logu = lo_u + (hi_u - lo_u) * c[:, 0]
        sigma_v = lo_s + (hi_s - lo_s) * c[:, 1]
        aperture = torch.exp(lo_a + (hi_a - lo_a) * c[:, 2])
        return theta, logu, sigma_v, aperture

    def to_w(self, theta, logu, sigma_v, aperture) -> torch.Tensor:
        """w (n, 14): the inverse of :meth:`split`."""
        w_theta = u_to_w(self.prior.to_unconstrained(theta.double()))
        (lo_u, hi_u), (lo_s, hi_s) = self.boxes
        lo_a, hi_a = self.log_aperture
        c = torch.stack(
            [
                (logu.double() - lo_u) / (hi_u - lo_u),
                (sigma_v.double() - lo_s) / (hi_s - lo_s),
                (torch.log(aperture.double()) - lo_a) / (hi_a - lo_a),
            ],
            -1,
        ).clamp(1e-12, 1 - 1e-12)
        return torch.cat([w_theta, torch.special.ndtri(c)], -1)


class Stencil(NamedTuple):
    """The expected data of one galaxy at w0 and at w0 +- step along each of the 14
    coordinates (rows: w0, then the 14 plus, then the 14 minus steps): ``theta`` (29, 12),
    ``flux`` (29, M) with the aperture applied, ``photometry`` (29, nb), ``step``."""

    theta: torch.Tensor
    flux: torch.Tensor
    photometry: torch.Tensor
    step: float

    def derivative(self, values: torch.Tensor) -> torch.Tensor:
        """Central differences (14, ...) of per-row ``values`` (29, ...)."""
        return (values[1 : N_W + 1] - values[N_W + 1 :]) / (2 * self.step)


@torch.no_grad()
def stencil(likelihood, coords: GaussianCoordinates, w0: torch.Tensor, z: float,
            step: float = 1e-2) -> Stencil:  # fmt: skip
    """29 simulations of one galaxy at redshift z around w0 (14,) (``likelihood.model``, a
    :class:`studies.exact.MockLikelihood`)."""
    eye = torch.eye(N_W, dtype=torch.float64)
    w0 = w0.double()
    pts = torch.cat([w0[None], w0 + step * eye, w0 - step * eye])
    theta, logu, sigma_v, aperture = coords.split(pts)
    flux, phot = likelihood.model(theta, z, logu, sigma_v)
    return Stencil(theta, flux * aperture[:, None], phot, float(step))


def whitened_jacobian(
    st: Stencil,
    ivar: torch.Tensor,
    photometry_ivar: torch.Tensor | None = None,
    quantities=None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """Derivatives of the expected data with respect to w, whitened by the noise: spectrum
    (14, M) = ivar^(1/2) d(aperture x flux)/dw, photometry (14, nb) or None; and the
    gradients g (14,) of ``quantities`` (a function of theta (n, 12) returning a dict of (n,)
    values; default logM* formed)."""
    if quantities is None:
        values = {"logmstar": st.theta[:, THETA.LOGMSTAR]}
    else:
        values = quantities(st.theta)
    g = {k: st.derivative(v.double()) for k, v in values.items()}
    y_spec = st.derivative(st.flux) * ivar.double().clamp_min(0).sqrt()
    y_phot = None
    if photometry_ivar is not None:
        y_phot = st.derivative(st.photometry) * photometry_ivar.double().clamp_min(0).sqrt()
    return y_spec, y_phot, g


@torch.no_grad()
def summary_fisher(
    summary,
    st: Stencil,
    ivar: torch.Tensor,
    photometry_ivar: torch.Tensor,
    n_cov: int = 512,
    n_jac: int = 64,
    step: float = 1e-4,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Linear Fisher information (14, 14) of a learned summary t = summary(flux, photometry)
    ((n, M), (n, nb) float64 -> (n, d)) under the Gaussian noise of ivar and photometry_ivar:
    dmu^T Cov(t)^-1 dmu, with Cov(t) from ``n_cov`` noise draws at w0 (Hartlap-corrected
    inverse). dmu/dw = E[dt/dx] dx/dw by the chain rule: the summary is differenced along the
    simulator's derivative dx/dw (the data moved by +- ``step`` x dx/dw) at ``n_jac`` noise
    draws shared by the plus and minus side (common random numbers).

    The marginal sigma of logM* rests on near-degenerate directions of F (for a typical mock
    ~50 times the sigma with the other parameters fixed), so the estimate must keep them
    exact: moving the data linearly does (a direction the data do not see moves no summary,
    whatever the Monte Carlo error of E[dt/dx]), which differencing re-simulated data or
    steps where the network is not linear would not. Hence a tiny ``step`` and a summary
    evaluated in float64. What a consumer of t that is Gaussian in t could learn; locally,
    the information that survives the summary (never more than the data's)."""
    iv, piv = ivar.double().clamp_min(0), photometry_ivar.double().clamp_min(0)
    sd = torch.where(iv > 0, iv.clamp_min(1e-300).rsqrt(), torch.zeros_like(iv))
    psd = torch.where(piv > 0, piv.clamp_min(1e-300).rsqrt(), torch.zeros_like(piv))

    def draws(n):
        e = torch.randn(n, iv.shape[0], generator=generator, dtype=torch.float64) * sd
        return e, torch.randn(n, piv.shape[0], generator=generator, dtype=torch.float64) * psd

    flux0, phot0 = st.flux[0], st.photometry[0]
    eps, peps = draws(n_cov)
    t0 = summary(flux0 + eps, phot0 + peps).double()
    d = t0.shape[1]
    if n_cov <= d + 2:
        raise ValueError(f"n_cov must exceed the summary size + 2 ({d + 2})")
    cov = torch.cov(t0.T)
    eps, peps = draws(n_jac)
    h = float(step)
    d_flux = st.derivative(st.flux)  # (14, M)
    d_phot = st.derivative(st.photometry)
    sign = torch.tensor([1.0, -1.0], dtype=torch.float64)[:, None, None, None]  # (2, 1, 1, 1)
    flux = flux0 + eps[None, None] + sign * h * d_flux[None, :, None]  # (2, 14, n_jac, M)
    phot = phot0 + peps[None, None] + sign * h * d_phot[None, :, None]
    t = summary(flux.reshape(-1, iv.shape[0]), phot.reshape(-1, piv.shape[0])).double()
    t = t.reshape(2, N_W, n_jac, d).mean(2)
    dmu = (t[0] - t[1]) / (2 * h)  # (14, d)
    hartlap = (n_cov - d - 2) / (n_cov - 1)
    return hartlap * dmu @ torch.linalg.solve(cov, dmu.T)


def overlap_matrix(binner, z: float) -> torch.Tensor:
    """O (N, M), float64: the fraction of each observed pixel of ``binner``'s arms inside
    each of its rest-frame bins at redshift z, so that ``binner(flux, ivar, z)`` is
    O (ivar f) / O ivar (tested against it)."""
    x = binner.edges.double() * (1.0 + float(z))  # observed bin edges (N + 1,)
    blocks = []
    for a, _ in enumerate(binner.arm_slices):
        e = getattr(binner, f"edges_{a}").double()  # (m_a + 1,)
        lo = torch.maximum(x[:-1, None], e[None, :-1])
        hi = torch.minimum(x[1:, None], e[None, 1:])
        blocks.append((hi - lo).clamp_min(0.0) / torch.diff(e)[None])
    return torch.cat(blocks, 1)


def binned_fisher(y: torch.Tensor, overlap: torch.Tensor, ivar: torch.Tensor) -> torch.Tensor:
    """Fisher information (d, d) of the ivar-weighted binned spectrum, for whitened pixel
    derivatives y (d, M), the overlap matrix O (N, M) and the pixels' ivar (M,):
    y^T G^T (G G^T)^-1 G y with G = O diag(ivar)^(1/2), over the bins that hold data."""
    gmat = overlap * ivar.double().clamp_min(0).sqrt()[None]
    keep = (gmat * gmat).sum(1) > 0
    gmat = gmat[keep]
    sparse = gmat.to_sparse()  # each pixel overlaps one or two bins
    gy = torch.sparse.mm(sparse, y.T.contiguous())  # (N', d)
    ggt = torch.sparse.mm(sparse, gmat.T.contiguous())
    chol = torch.linalg.cholesky(ggt + 1e-12 * torch.diag(torch.diagonal(ggt)))
    h = torch.cholesky_solve(gy, chol)
    return gy.T @ h


def marginal_sigma(fisher: torch.Tensor, g: torch.Tensor) -> float:
    """sqrt(g^T (F + I)^-1 g): the Laplace posterior sigma of a quantity with gradient g in
    w, in which the prior is N(0, I)."""
    prec = fisher + torch.eye(fisher.shape[0], dtype=fisher.dtype)
    return float(torch.sqrt(g @ torch.linalg.solve(prec, g)))


__all__ = [
    "GaussianCoordinates",
    "Stencil",
    "binned_fisher",
    "marginal_sigma",
    "overlap_matrix",
    "stencil",
    "summary_fisher",
    "whitened_jacobian",
]
