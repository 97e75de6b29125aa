"""A broad non-parametric SFH prior: the "continuity" prior of Leja et al. 2019 (ApJ 876, 3),
mixed with PROVABGS' NMF histories, on :class:`~sedvae.sps.SEDModel`'s bins.

A continuity history has a constant SFR in each of ``K`` coarse lookback bins (default 7: 0-30
Myr, 30-100 Myr, 0.1-0.33, 0.33-1.1, 1.1-3.6 Gyr, then 2 bins log-spaced from 3.6 Gyr to the
age of the universe t_U(z)), and the log ratios of adjacent bins' SFRs,
log10(SFR_i / SFR_i+1), are independent Student-t draws (nu = 2, scale 0.3 dex): the prior
favours smooth histories but lets the SFR jump by orders of magnitude between bins (bursts,
quenching, rejuvenation). Its mass lands on the 42 PROVABGS bins in proportion to their overlap
with each coarse bin (the SPS assumes a constant SFR within a PROVABGS bin, so the simulated
history is the coarse one averaged over each PROVABGS bin; the cut bin at t_U(z) is filled
only up to t_U), then scaled to 1 - f_burst.

:class:`ContinuitySFH` draws, per galaxy, whether its history is PROVABGS' (probability
``1 - frac``, the history of theta as it is) or a continuity one; the metallicity history
(gamma) and the burst (f_burst, t_burst) stay theta's in both. A continuity history has no
theta: its truths come from the history (:meth:`SEDModel.derived_from_history`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from scipy.stats import t as student_t

from ..physics.cosmology import age_of_universe_gyr
from .model import History

FIXED_EDGES_GYR = (0.0, 0.03, 0.1, 0.33, 1.1, 3.6)  # Leja et al. 2019's 2 young bins, then x3.3


class ContinuitySFH:
    """The mixture of PROVABGS and continuity histories (module docstring).

    Parameters
    ----------
    frac : float
        Probability that a galaxy's history is a continuity one (0.5: half and half).
    scale : float
        Scale (dex) of the Student-t log SFR ratios (Leja et al. 2019: 0.3).
    nu : float
        Degrees of freedom of the Student-t (Leja et al. 2019: 2, heavy tails).
    fixed_edges_gyr : tuple of float
        Lookback edges (Gyr) of the young bins, from 0, increasing.
    n_old : int
        Bins log-spaced from the last fixed edge to t_U(z).
    """

    def __init__(self, frac: float = 0.5, scale: float = 0.3, nu: float = 2.0,
                 fixed_edges_gyr=FIXED_EDGES_GYR, n_old: int = 2) -> None:  # fmt: skip
        if not 0 <= frac <= 1:
            raise ValueError(f"frac must lie in [0, 1]; got {frac}")
        if not (scale > 0 and nu > 0):
            raise ValueError(f"scale and nu must be > 0; got {scale}, {nu}")
        edges = np.asarray(fixed_edges_gyr, dtype=np.float64)
        if edges[0] != 0 or not (np.diff(edges) > 0).all() or int(n_old) < 1:
            raise ValueError("fixed_edges_gyr must increase from 0 and n_old must be >= 1")
        self.frac, self.scale, self.nu = float(frac), float(scale), float(nu)
        self.fixed_edges = torch.as_tensor(edges)
        self.n_old = int(n_old)
        self.n_bins = len(edges) - 1 + self.n_old

    def edges(self, t_univ_gyr: torch.Tensor) -> torch.Tensor:
        """(B, K + 1) lookback edges (Gyr) of the coarse bins, the last at t_U(z)."""
        t_u = torch.as_tensor(t_univ_gyr, dtype=torch.float64).reshape(-1)
        last = self.fixed_edges[-1]
        if (t_u <= last).any():
            raise ValueError(f"t_U(z) must exceed {float(last)} Gyr (the last fixed edge); "
                             f"got min {float(t_u.min()):.3f} Gyr")  # fmt: skip
        frac = torch.arange(1, self.n_old + 1, dtype=torch.float64) / self.n_old
        old = last * (t_u[:, None] / last) ** frac  # (B, n_old) log-spaced to t_U
        return torch.cat([self.fixed_edges.expand(len(t_u), -1), old], -1)

    def draw(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-galaxy draws on the CPU (float64): ``sfh_continuity`` (n,) bool, and
        ``sfr_log_ratio`` (n, K - 1) = log10(SFR_i / SFR_i+1), youngest first (drawn for every
        galaxy, so the stream does not depend on the mixture)."""
        u = torch.rand(n, self.n_bins - 1, generator=generator, dtype=torch.float64)
        u = u.clamp(1e-15, 1 - 1e-15)
        ratio = torch.as_tensor(self.scale * student_t.ppf(u.numpy(), df=self.nu))
        pick = torch.rand(n, generator=generator, dtype=torch.float64) < self.frac
        return {"sfh_continuity": pick, "sfr_log_ratio": ratio}

    def bin_mass(self, sfr_log_ratio: torch.Tensor, t_univ_gyr: torch.Tensor,
                 bin_edges_gyr: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """(B, nbins) mass per PROVABGS bin (``bin_edges_gyr``, nbins + 1) of the continuity
        histories with log SFR ratios (B, K - 1), per unit formed mass (float64): each coarse
        bin's constant SFR times its overlap with each bin, nothing beyond t_U(z)."""
        ratio = torch.as_tensor(sfr_log_ratio, dtype=torch.float64)
        t_u = torch.as_tensor(t_univ_gyr, dtype=torch.float64).reshape(-1)
        if ratio.shape != (len(t_u), self.n_bins - 1):
            raise ValueError(f"sfr_log_ratio must be ({len(t_u)}, {self.n_bins - 1}); "
                             f"got {tuple(ratio.shape)}")  # fmt: skip
        c = self.edges(t_u)  # (B, K + 1)
        log_sfr = torch.cat([torch.zeros_like(ratio[:, :1]), -torch.cumsum(ratio, -1)], -1)
        sfr = torch.exp(np.log(10) * (log_sfr - log_sfr.max(-1, keepdim=True).values))
        e = torch.as_tensor(bin_edges_gyr, dtype=torch.float64)
        lo = e[:-1][None, :, None]  # (1, nbins, 1)
        hi = torch.minimum(e[1:][None, :], t_u[:, None])[..., None]  # cut at t_U
        overlap = (torch.minimum(hi, c[:, None, 1:]) - torch.maximum(lo, c[:, None, :-1]))
        mass = (overlap.clamp_min(0.0) * sfr[:, None, :]).sum(-1)  # (B, nbins)
        return mass / mass.sum(-1, keepdim=True)

    def history(self, sps, theta: torch.Tensor, z: torch.Tensor, draws: dict) -> History:
        """The History of each galaxy: theta's (``sps.history``) where ``sfh_continuity`` is
        False; otherwise the continuity bin masses times 1 - f_burst, with theta's metallicity
        history and burst. ``theta``, ``z`` as :meth:`SEDModel.check_inputs` returns them."""
        h = sps.history(theta, z)
        t_u = age_of_universe_gyr(z.detach().cpu().to(torch.float64))
        mass = self.bin_mass(draws["sfr_log_ratio"], t_u, sps.bin_edges.cpu())
        mass = mass.to(h.bin_mass) * (1 - h.burst_mass)[:, None]
        pick = draws["sfh_continuity"].to(h.bin_mass.device)[:, None]
        return dataclasses.replace(h, bin_mass=torch.where(pick, mass, h.bin_mass))


#: Derived properties the NMF projection matches, and the floor of each one's scale: rows are
#: relative errors, (value - target) / max(|target|, floor), so a quiescent galaxy's 100 Myr
#: fraction of 1e-6 does not ask for 1e-6 absolute precision.
PROJECTION_FLOORS = {"live": 0.0, "t_mw_gyr": 0.05, "f_100myr": 1e-3, "f_1gyr": 1e-2}
#: Share of every basis in a projected history: the least-squares optimum often lies on the
#: simplex's boundary (a basis at exactly 0), where the head's unconstrained coordinates are
#: +-36 (float64 eps); mixing 2 % of the uniform mixture in keeps them within the range of the
#: flat Dirichlet's own draws (|u| < ~6) for a change of the derived properties of ~1 %.
PROJECTION_MIX = 0.02
#: ``project_to_nmf(burst=True)`` takes the young burst where it leaves at most this share of
#: the 4-basis fit's relative residual.
PROJECTION_BURST_GAIN = 0.5


def _functionals(sps, h: History, nmf_only: bool = True) -> torch.Tensor:
    """(B, 4) surviving fraction, mass-weighted age (Gyr), fractions formed within 100 Myr and
    1 Gyr of ``h``: of its NMF part (its burst left out, its bin masses normalised to 1) or,
    ``nmf_only=False``, of the whole history, burst included. Each is linear in the bin masses
    for a fixed metallicity history."""
    if nmf_only:
        norm = h.bin_mass.sum(-1, keepdim=True).clamp_min(1e-30)
        h = dataclasses.replace(h, bin_mass=h.bin_mass / norm,
                                burst_mass=torch.zeros_like(h.burst_mass))  # fmt: skip
    d = sps.derived_from_history(h, torch.ones_like(h.burst_mass))
    return torch.stack([10 ** d["logmstar_surv"], d["t_mw_gyr"], d["sfr_100myr"] * 1e8,
                        d["sfr_1gyr"] * 1e9], -1)  # fmt: skip


def _young_burst(sps, theta: torch.Tensor, h: History) -> History:
    """A burst of unit mass at the mass-weighted age of ``h``'s stars younger than 100 Myr
    (50 Myr where it has none; within 11-99 Myr), at theta's metallicity for that age."""
    from .provabgs import THETA

    lo = sps.bin_edges[:-1]
    t_mid = 0.5 * (lo + h.bin_hi_gyr)
    young = (t_mid < 0.1).to(h.bin_mass.dtype) * h.bin_mass
    total = young.sum(-1)
    t_y = (young * t_mid).sum(-1) / total.clamp_min(1e-30)
    t_y = torch.where(total > 0, t_y, torch.full_like(t_y, 0.05)).clamp(0.011, 0.099)
    zmin, zmax = 10 ** sps.log_zgrid[0], 10 ** sps.log_zgrid[-1]
    z_y = (sps._nmf_zh(t_y) * theta[:, THETA.GAMMA]).sum(-1).clamp(zmin, zmax)
    return dataclasses.replace(h, bin_mass=torch.zeros_like(h.bin_mass),
                               burst_mass=torch.ones_like(h.burst_mass), burst_age_gyr=t_y,
                               burst_z=z_y)  # fmt: skip


def _simplex_fit(rows: np.ndarray, rhs: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative weights summing to 1 (a heavily weighted row) minimising
    ||rows @ w - rhs||; returns them and the residual norm."""
    from scipy.optimize import nnls

    lhs = np.vstack([rows, 1e3 * np.ones(rows.shape[1])])
    w, _ = nnls(lhs, np.append(rhs, 1e3))
    return w, float(np.linalg.norm(rows @ w - rhs))


def project_to_nmf(sps, theta: torch.Tensor, z: torch.Tensor, h: History,
                   burst: bool = False) -> torch.Tensor:  # fmt: skip
    """theta with its NMF weights (beta_1..4) replaced by those whose history best matches
    ``h`` in the derived properties a catalog reports.

    A history from another prior (a continuity one) has no theta; this gives it the PROVABGS
    theta that describes it best: beta on the simplex minimising the relative errors of the
    surviving mass fraction, the mass-weighted age and the mass fractions formed within 100
    Myr and 1 Gyr (:data:`PROJECTION_FLOORS`) of the NMF part of ``h``, with theta's metallicity
    history, burst, dust and formed mass kept. Every one of these is linear in the history's
    bin masses, and the normalised NMF history is a convex combination of the 4 normalised
    bases, so the fit is a 4-unknown non-negative least squares per galaxy (scipy's NNLS, the
    simplex as a heavily weighted row), then 2 % of the uniform mixture mixed in
    (:data:`PROJECTION_MIX`: no basis at exactly 0).

    The four bases cannot make the recent SFR of many continuity histories (a rising or
    bursty last 100 Myr). With ``burst=True`` the whole history (burst included) is also fitted
    by the 4 bases plus a burst at the mass-weighted age of its stars younger than 100 Myr, as
    a 5th column; that burst replaces theta's where its mass fraction is >= 1e-3 and the fit's
    relative residual is at most :data:`PROJECTION_BURST_GAIN` of the 4-basis one.

    ``theta``, ``z`` as :meth:`SEDModel.check_inputs` returns them; ``h`` a History with the
    same metallicity history (:meth:`ContinuitySFH.history`). Where the bases cannot reach a
    property, the nearest mixture is returned: the projection is a label, not an identity."""
    from .provabgs import THETA

    n_basis = THETA.BETA.stop - THETA.BETA.start
    cols = []
    unit = torch.eye(n_basis, dtype=theta.dtype, device=theta.device)
    for i in range(n_basis):
        th = theta.clone()
        th[:, THETA.BETA] = unit[i]
        th[:, THETA.F_BURST] = 0.0
        cols.append(_functionals(sps, sps.history(th, z)))
    a = torch.stack(cols, -1).cpu().double().numpy()  # (B, 4 properties, 4 bases)
    floors = np.array(list(PROJECTION_FLOORS.values()))
    target = _functionals(sps, h).cpu().double().numpy()  # (B, 4)
    scale = np.maximum(np.abs(target), floors)
    # unnormalised mass of each basis up to t_U: beta_i is c_i / m_i, renormalised
    t_u = age_of_universe_gyr(z.detach().cpu().double()).to(theta)
    m = (sps._nmf_cumulative(t_u) - sps._nmf_cumulative(torch.zeros_like(t_u)))
    m = m.cpu().double().numpy()

    def to_beta(c: np.ndarray, k: int, ok: np.ndarray) -> np.ndarray:
        c = c / c.sum() if c.sum() > 0 else np.full(len(c), 1.0 / len(c))  # all in the burst
        c = (1 - PROJECTION_MIX) * c + PROJECTION_MIX / ok.sum()
        b = np.zeros(n_basis)
        b[ok] = c / m[k, ok]
        return b / b.sum()

    out = theta.clone()
    beta = np.empty((len(target), n_basis))
    for k in range(len(target)):
        ok = m[k] > 1e-12
        c, _ = _simplex_fit(a[k][:, ok] / scale[k][:, None], target[k] / scale[k])
        beta[k] = to_beta(c, k, ok)
    out[:, THETA.BETA] = torch.as_tensor(beta, dtype=theta.dtype, device=theta.device)
    if not burst:
        return out
    # the whole history against the 4 bases with theta's burst, and with a young burst instead
    hy = _young_burst(sps, theta, h)
    young = _functionals(sps, hy, nmf_only=False).cpu().double().numpy()
    a5 = np.concatenate([a, young[..., None]], -1)
    full = _functionals(sps, h, nmf_only=False).cpu().double().numpy()
    full_scale = np.maximum(np.abs(full), floors)
    kept = _functionals(sps, sps.history(out, z), nmf_only=False).cpu().double().numpy()
    r4 = np.linalg.norm((kept - full) / full_scale, axis=-1)
    for k in range(len(target)):
        ok = np.append(m[k] > 1e-12, True)
        w, r5 = _simplex_fit(a5[k][:, ok] / full_scale[k][:, None], full[k] / full_scale[k])
        if w[-1] < 1e-3 or r5 > PROJECTION_BURST_GAIN * r4[k]:
            continue
        out[k, THETA.BETA] = torch.as_tensor(to_beta(w[:-1], k, ok[:-1])).to(out)
        out[k, THETA.F_BURST] = min(float(w[-1]), 0.99)
        out[k, THETA.T_BURST] = hy.burst_age_gyr[k].to(out)
    return out


__all__ = [
    "FIXED_EDGES_GYR",
    "PROJECTION_BURST_GAIN",
    "PROJECTION_FLOORS",
    "PROJECTION_MIX",
    "ContinuitySFH",
    "project_to_nmf",
]
