"""PROVABGS parametrisation (Hahn et al. 2023): NMF star-formation and metallicity histories,
the 12-number theta, its prior and a bijection to an unconstrained R^11.

theta (12 numbers, this order)::

    0  logM*    log10 total formed stellar mass / M_sun          U(7, 12.5)
    1-4 beta_1..4  NMF SFH weights, on the simplex              flat Dirichlet
    5  f_burst  fraction of the mass formed in the burst         U(0, 1)
    6  t_burst  burst lookback time, Gyr                         LogU(0.01, 13.27)
    7  gamma_1  NMF metallicity-history weights                  LogU(2e-5, 2e-2)
    8  gamma_2                                                    LogU(2e-5, 2e-2)
    9  tau_BC   birth-cloud optical depth at 5500 A              U(0, 3)
    10 tau_ISM  diffuse-ISM optical depth at 5500 A              U(0, 3)
    11 n_dust   Kriek & Conroy slope offset                       U(-2, 1)

gamma range: PROVABGS draws gamma from LogU(4.5e-5, 4.5e-2), the metallicity range of its
FSPS/MIST isochrones. The NMF metallicity bases peak at 3-5.5, so Z(t) ~ 4 gamma; we keep the
3-dex width and shift it so that Z(t) spans the BC03 grid (Z = 1e-4 ... 0.1) instead. Z(t) is
clipped to the grid range, as PROVABGS clips to its isochrones.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..paths import data_dir

PARAM_NAMES = (
    "logmstar",
    "beta1",
    "beta2",
    "beta3",
    "beta4",
    "fburst",
    "tburst",
    "gamma1",
    "gamma2",
    "tau_bc",
    "tau_ism",
    "n_dust",
)
N_THETA = 12
N_FREE = 11  # the simplex removes one dimension


def _at(name: str) -> int:
    return PARAM_NAMES.index(name)


def _span(first: str, last: str) -> slice:
    return slice(_at(first), _at(last) + 1)


class THETA:
    """Named positions in theta (``PARAM_NAMES`` order): an int for one parameter, a slice for
    a group, so ``theta[..., THETA.DUST]`` replaces ``theta[..., 9:12]``."""

    LOGMSTAR = _at("logmstar")
    BETA = _span("beta1", "beta4")  # the 4 NMF SFH weights on the simplex
    F_BURST = _at("fburst")
    T_BURST = _at("tburst")
    GAMMA = _span("gamma1", "gamma2")  # the 2 NMF metallicity-history weights
    TAU_BC = _at("tau_bc")
    TAU_ISM = _at("tau_ism")
    N_DUST = _at("n_dust")
    DUST = _span("tau_bc", "n_dust")  # (tau_BC, tau_ISM, n_dust): the dust model's arguments


LOGM_RANGE = (7.0, 12.5)
TBURST_RANGE = (0.01, 13.27)  # Gyr
GAMMA_RANGE = (2e-5, 2e-2)
TAU_RANGE = (0.0, 3.0)
NDUST_RANGE = (-2.0, 1.0)
SIMPLEX_TOL = 1e-4  # |sum(beta) - 1| accepted on input (float32 round-off)

# Edges of the PROVABGS lookback bins (Gyr): 0, 10**(6.05 + 0.1k - 9) for k = 0..40, 13.8.
# These coincide with bagpipes' 0.1-dex age bins, which makes the bagpipes comparison exact.
BIN_EDGES_GYR = np.concatenate([[0.0], 10 ** (6.05 + 0.1 * np.arange(41) - 9.0), [13.8]])
T_BC_GYR = 0.01  # stars younger than this sit in birth clouds (Charlot & Fall 2000)


@dataclass(frozen=True)
class NMFBases:
    """PROVABGS NMF bases on their lookback-time nodes (Gyr, increasing from 0)."""

    t_gyr: np.ndarray  # (52,) the 50 tabulated nodes plus 0 and 13.8 Gyr
    sfh: np.ndarray  # (4, 52) SFR bases, 1/Gyr
    zh: np.ndarray  # (2, 52) metallicity bases (dimensionless, times gamma -> Z)


@functools.lru_cache(maxsize=1)
def load_nmf_bases() -> NMFBases:
    """Read the bases shipped in ``data/provabgs_nmf`` the way PROVABGS does: reverse the time
    axis so lookback time increases, and reorder the SFH rows as [2, 0, 1, 3].

    The tabulated nodes run from 0.067 to 13.63 Gyr. PROVABGS evaluates the bases with
    order-1 splines, which extrapolate linearly; we add nodes at 0 and at the last bin edge
    (13.8 Gyr) with the linearly extrapolated values (clipped at 0), so that the youngest bins
    (where birth clouds and nebular emission live) form stars.
    """
    folder = data_dir() / "provabgs_nmf"
    t = np.loadtxt(folder / "sfh_t_int.txt")[::-1].copy()
    sfh = np.loadtxt(folder / "NMF_2basis_SFH_components_nowgt_lin_Nc4.txt")[:, ::-1]
    zh = np.loadtxt(folder / "NMF_2basis_Z_components_nowgt_lin_Nc2.txt")[:, ::-1]
    if t.shape != (50,) or sfh.shape != (4, 50) or zh.shape != (2, 50):
        raise ValueError(f"unexpected NMF basis shapes in {folder}")

    def extend(values: np.ndarray) -> np.ndarray:
        first = values[:, 0] + (values[:, 1] - values[:, 0]) * (0.0 - t[0]) / (t[1] - t[0])
        last_t = BIN_EDGES_GYR[-1]
        last = values[:, -1] + (values[:, -1] - values[:, -2]) * (last_t - t[-1]) / (t[-1] - t[-2])
        return np.concatenate(
            [np.clip(first, 0, None)[:, None], values, np.clip(last, 0, None)[:, None]], 1
        )

    t_ext = np.concatenate([[0.0], t, [BIN_EDGES_GYR[-1]]])
    return NMFBases(t_gyr=t_ext, sfh=extend(sfh[[2, 0, 1, 3]]), zh=extend(zh))


# (index, lower, upper, log-scaled?) of the 8 box parameters of theta
BOXES = (
    (THETA.LOGMSTAR, *LOGM_RANGE, False),
    (THETA.F_BURST, 0.0, 1.0, False),
    (THETA.T_BURST, *TBURST_RANGE, True),
    (THETA.GAMMA.start, *GAMMA_RANGE, True),
    (THETA.GAMMA.start + 1, *GAMMA_RANGE, True),
    (THETA.TAU_BC, *TAU_RANGE, False),
    (THETA.TAU_ISM, *TAU_RANGE, False),
    (THETA.N_DUST, *NDUST_RANGE, False),
)


def _check_theta(theta: torch.Tensor) -> None:
    if not isinstance(theta, torch.Tensor):
        raise ValueError(f"theta must be a torch.Tensor, got {type(theta).__name__}")
    if theta.ndim != 2 or theta.shape[-1] != N_THETA:
        raise ValueError(f"theta must have shape (B, {N_THETA}); got {tuple(theta.shape)}")
    if not torch.isfinite(theta).all():
        bad = torch.nonzero(~torch.isfinite(theta).all(0)).flatten().tolist()
        raise ValueError(f"theta has NaN/inf in {[PARAM_NAMES[i] for i in bad]}")


def check_support(theta: torch.Tensor) -> None:
    """Raise ValueError naming the first parameter outside the prior support."""
    _check_theta(theta)
    for i, lo, hi, _ in BOXES:
        col = theta[:, i]
        # a relative tolerance for float32 round-off at the edges of the box
        eps = 1e-6 * max(abs(lo), abs(hi), 1.0)
        if (col < lo - eps).any() or (col > hi + eps).any():
            raise ValueError(
                f"{PARAM_NAMES[i]} must lie in [{lo}, {hi}]; got {col.min().item():.6g}.."
                f"{col.max().item():.6g}"
            )
    beta = theta[:, THETA.BETA]
    if (beta < -SIMPLEX_TOL).any() or ((beta.sum(-1) - 1).abs() > SIMPLEX_TOL).any():
        raise ValueError(
            "beta1..beta4 must lie on the simplex (each >= 0, sum = 1); got sums "
            f"{beta.sum(-1).min().item():.6g}..{beta.sum(-1).max().item():.6g}"
        )


def check_theta_z(
    theta: torch.Tensor, z, z_max: float, z_min: float = 0.0, range_note: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """The input check of every SED model (``SEDModel``, ``Emulator``): theta inside the prior
    support and z a finite (B,) tensor (a scalar is broadcast) in [z_min, z_max]. Returns
    (theta, z) on theta's device, uncast; ValueError names the problem (``range_note`` says
    where z_max comes from)."""
    check_support(theta)
    z = torch.as_tensor(z, device=theta.device)
    if z.ndim == 0:
        z = z.expand(theta.shape[0])
    if z.shape != theta.shape[:1]:
        raise ValueError(f"z must have shape ({theta.shape[0]},); got {tuple(z.shape)}")
    if not torch.isfinite(z).all():
        raise ValueError("z has NaN/inf values")
    if (z < z_min).any() or (z > z_max * (1 + 1e-6)).any():
        raise ValueError(
            f"z must lie in [{z_min:.4g}, {z_max:.4g}]{range_note}; got "
            f"{z.min().item():.4g}..{z.max().item():.4g}"
        )
    return theta, z


class PROVABGSPrior:
    """The PROVABGS prior over theta (12 numbers, 11 free), with sampling, log density and a
    bijection to R^11 (stick-breaking for the simplex, logits of the scaled boxes)."""

    names = PARAM_NAMES
    n_theta = N_THETA
    n_free = N_FREE

    _boxes = BOXES  # (index, lower, upper, log-scaled?) of the 8 box parameters
    boxes = BOXES  # public: the checkpoint fingerprint records these ranges

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Draw ``n`` prior samples, shape (n, 12)."""
        u = torch.rand(n, 8, generator=generator, dtype=torch.float64)
        theta = torch.empty(n, N_THETA, dtype=torch.float64)
        for col, (i, lo, hi, is_log) in enumerate(self._boxes):
            if is_log:
                theta[:, i] = torch.exp(math.log(lo) + u[:, col] * (math.log(hi) - math.log(lo)))
            else:
                theta[:, i] = lo + u[:, col] * (hi - lo)
        # flat Dirichlet(1,1,1,1) = normalised unit exponentials
        e = -torch.log(torch.rand(n, 4, generator=generator, dtype=torch.float64).clamp_min(1e-300))
        theta[:, THETA.BETA] = e / e.sum(-1, keepdim=True)
        return theta.to(dtype)

    def log_prob(self, theta: torch.Tensor) -> torch.Tensor:
        """Log prior density (B,), w.r.t. Lebesgue measure on (logM, beta_1..3, the rest);
        -inf outside the support."""
        _check_theta(theta)
        lp = torch.full(theta.shape[:1], math.log(6.0), dtype=theta.dtype, device=theta.device)
        inside = torch.ones(theta.shape[:1], dtype=torch.bool, device=theta.device)
        for i, lo, hi, is_log in self._boxes:
            x = theta[:, i]
            # the same float32 round-off tolerance at the box edges as check_support
            eps = 1e-6 * max(abs(lo), abs(hi), 1.0)
            inside &= (x >= lo - eps) & (x <= hi + eps)
            if is_log:
                lp = lp - torch.log(x.clamp_min(lo)) - math.log(math.log(hi / lo))
            else:
                lp = lp - math.log(hi - lo)
        beta = theta[:, THETA.BETA]
        inside &= (beta >= 0).all(-1) & ((beta.sum(-1) - 1).abs() <= SIMPLEX_TOL)
        return torch.where(inside, lp, torch.full_like(lp, -math.inf))

    # ---- bijection theta <-> u in R^11 ------------------------------------------------------
    def to_unconstrained(self, theta: torch.Tensor) -> torch.Tensor:
        """theta (B, 12) in the support -> u (B, 11)."""
        check_support(theta)
        tiny = torch.finfo(theta.dtype).eps
        out = []
        for i, lo, hi, is_log in self._boxes:
            x = theta[:, i]
            p = (torch.log(x / lo) / math.log(hi / lo)) if is_log else (x - lo) / (hi - lo)
            p = p.clamp(tiny, 1 - tiny)
            out.append(torch.log(p) - torch.log1p(-p))
        beta = theta[:, THETA.BETA].clamp_min(tiny)
        beta = beta / beta.sum(-1, keepdim=True)
        # stick-breaking: z_k = beta_k / (1 - sum_{j<k} beta_j), u_k = logit(z_k) + log(K - k)
        rest = 1 - torch.cumsum(beta, -1)[:, :-1]
        rest = torch.cat([torch.ones_like(rest[:, :1]), rest], -1)[:, :3]
        z = (beta[:, :3] / rest.clamp_min(tiny)).clamp(tiny, 1 - tiny)
        offset = torch.log(torch.tensor([3.0, 2.0, 1.0], dtype=theta.dtype, device=theta.device))
        u_simplex = torch.log(z) - torch.log1p(-z) + offset
        return torch.cat([out[0][:, None], u_simplex, torch.stack(out[1:], -1)], -1)

    def to_constrained(self, u: torch.Tensor) -> torch.Tensor:
        """u (B, 11) -> theta (B, 12), always inside the support (differentiable)."""
        if u.ndim != 2 or u.shape[-1] != N_FREE:
            raise ValueError(f"u must have shape (B, {N_FREE}); got {tuple(u.shape)}")
        return self._constrain(u, jacobian=False)[0]

    def log_abs_det_jacobian(self, u: torch.Tensor) -> torch.Tensor:
        """log |d theta_free / d u| (B,), theta_free = (logM, beta_1..3, the 7 other boxes)."""
        return self._constrain(u)[1]

    def _constrain(
        self, u: torch.Tensor, jacobian: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """theta (B, 12) and log|d theta_free / d u| (B,) (None with ``jacobian=False``:
        sampling needs theta alone, and the log-Jacobian costs as much again)."""
        logsigmoid = torch.nn.functional.logsigmoid
        ladj = torch.zeros(u.shape[:1], dtype=u.dtype, device=u.device) if jacobian else None
        box_u = torch.cat([u[:, :1], u[:, 4:]], -1)  # (B, 8)
        theta = torch.empty(u.shape[0], N_THETA, dtype=u.dtype, device=u.device)
        for col, (i, lo, hi, is_log) in enumerate(self._boxes):
            p = torch.sigmoid(box_u[:, col])
            x = lo * torch.exp(p * math.log(hi / lo)) if is_log else lo + p * (hi - lo)
            if jacobian:
                log_dp = logsigmoid(box_u[:, col]) + logsigmoid(-box_u[:, col])
                log_dx = math.log(math.log(hi / lo)) + torch.log(x) if is_log else math.log(hi - lo)
                ladj = ladj + log_dp + log_dx
            theta[:, i] = x
        offset = torch.log(torch.tensor([3.0, 2.0, 1.0], dtype=u.dtype, device=u.device))
        v = u[:, 1:4] - offset
        z = torch.sigmoid(v)
        remaining = torch.ones_like(z[:, 0])
        betas = []
        for k in range(3):
            b = z[:, k] * remaining
            if jacobian:  # d beta_k / d v_k = z(1-z) * remaining; triangular Jacobian
                ladj = (
                    ladj
                    + logsigmoid(v[:, k])
                    + logsigmoid(-v[:, k])
                    + torch.log(remaining.clamp_min(torch.finfo(u.dtype).tiny))
                )
            betas.append(b)
            remaining = remaining - b
        betas.append(remaining)
        theta[:, THETA.BETA] = torch.stack(betas, -1)
        return theta, ladj
