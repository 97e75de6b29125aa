"""Calibration and recovery diagnostics for amortised posteriors (pure functions on tensors).

- TARP expected coverage (Lemos, Coogan et al. 2023, Algorithm 2): for each held-out
  simulation j, draw a reference point r_j, and let f_j be the fraction of posterior samples
  closer to r_j than the truth. ECP(alpha) = mean_j 1[f_j < alpha]; a calibrated posterior has
  ECP(alpha) = alpha for every alpha (necessary and sufficient when the references' law is
  suitably broad). With N simulations the estimate moves with the random references as well
  as with the truths; :func:`tarp_coverage_averaged` averages the ECP over several independent
  reference draws, which removes most of the first part.
- SBC ranks (Talts et al. 2018): rank of each true parameter among its posterior samples;
  uniform for a calibrated posterior, tested per parameter with a Kolmogorov-Smirnov test.
- Rank moments: which way a miscalibration goes (too wide or narrow, too high or low).
- Recovery: bias and scatter of posterior medians against the truth.
"""

from __future__ import annotations

import numpy as np
import torch


def tarp_coverage(
    samples: torch.Tensor,
    truth: torch.Tensor,
    references: torch.Tensor,
    alpha: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TARP expected coverage probability.

    Parameters
    ----------
    samples : (n, N, D) posterior samples for N simulations
    truth : (N, D) true parameters
    references : (N, D) one reference point per simulation
    alpha : (K,) credibility levels (default 101 levels from 0 to 1)

    Returns
    -------
    ecp : (K,) expected coverage at each alpha
    alpha : (K,)
    f : (N,) per-simulation coverage fractions (uniform if calibrated)
    """
    if samples.ndim != 3 or truth.shape != samples.shape[1:] or references.shape != truth.shape:
        raise ValueError(
            "need samples (n, N, D), truth (N, D) and references (N, D); got "
            f"{tuple(samples.shape)}, {tuple(truth.shape)}, {tuple(references.shape)}"
        )
    if alpha is None:
        alpha = torch.linspace(0, 1, 101, dtype=torch.float64)
    d_samples = (samples - references).double().norm(dim=-1)  # (n, N)
    d_truth = (truth - references).double().norm(dim=-1)  # (N,)
    f = (d_samples < d_truth).double().mean(0)  # (N,)
    ecp = (f[None, :] < alpha[:, None]).double().mean(-1)
    return ecp, alpha, f


def tarp_coverage_averaged(
    samples: torch.Tensor,
    truth: torch.Tensor,
    references: torch.Tensor,
    alpha: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TARP expected coverage averaged over R independent draws of the reference points.

    For a calibrated posterior every draw's ECP(alpha) has expectation alpha, so their mean
    does too; averaging removes most of the variance that comes from where the references
    happen to fall (at N = 1,000 simulations one draw's max |ECP - alpha| moves by ~0.04 with
    the draw alone), leaving the truths' own sampling noise (of order 1 / sqrt(N)).

    Parameters
    ----------
    samples : (n, N, D) posterior samples for N simulations
    truth : (N, D) true parameters
    references : (R, N, D) R independent reference draws, one point per simulation each
    alpha : (K,) credibility levels (default 101 levels from 0 to 1)

    Returns
    -------
    ecp : (K,) mean over the R draws of the expected coverage at each alpha
    alpha : (K,)
    ecp_draws : (R, K) each draw's expected coverage
    """
    if references.ndim != 3:
        raise ValueError(f"need references (R, N, D); got {tuple(references.shape)}")
    draws = []
    for ref in references:
        ecp, alpha, _ = tarp_coverage(samples, truth, ref, alpha)
        draws.append(ecp)
    ecp_draws = torch.stack(draws)
    return ecp_draws.mean(0), alpha, ecp_draws


def tarp_max_deviation(ecp: torch.Tensor, alpha: torch.Tensor) -> float:
    """max_alpha |ECP(alpha) - alpha|."""
    return float((ecp - alpha).abs().max())


def tarp_band(n_sims: int, level: float = 0.95) -> float:
    """Half-width of the band about ECP(alpha) = alpha that a calibrated posterior's ECP over
    ``n_sims`` simulations stays within with probability ``level``.

    For one reference draw the coverage fractions f_j are independent U(0, 1) under
    calibration, so ECP is their empirical CDF and max |ECP - alpha| is the Kolmogorov-Smirnov
    statistic: the band is its exact finite-N quantile (``scipy.stats.kstwo``; ~1.36 /
    sqrt(N) at 95 %). The ECP averaged over several draws deviates at most as much as the mean
    of the draws' own deviations; for it the band is a loose bound (a calibrated Gaussian toy,
    N = 1,000, 8 draws: 0 of 200 trials beyond it, 95 % quantile 0.019 against the band's 0.043).
    """
    from scipy.stats import kstwo

    return float(kstwo.ppf(level, int(n_sims)))


def sbc_ranks(samples: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Rank of each true value among its posterior samples, (N, D) integers in [0, n]."""
    if samples.ndim != 3 or truth.shape != samples.shape[1:]:
        raise ValueError(
            f"need samples (n, N, D) and truth (N, D); got {tuple(samples.shape)}, "
            f"{tuple(truth.shape)}"
        )
    return (samples < truth[None]).sum(0)


def sbc_ks_pvalues(ranks: torch.Tensor, n_samples: int) -> np.ndarray:
    """Kolmogorov-Smirnov p-value of each parameter's ranks against the uniform law, (D,).

    Ranks in [0, n] are mapped to (rank + U(0,1)) / (n + 1), which is exactly U(0, 1) under
    calibration (the jitter removes the discreteness that would bias the continuous KS test).
    """
    from scipy.stats import kstest

    rng = np.random.default_rng(0)
    r = ranks.double().numpy()
    u = (r + rng.random(r.shape)) / (n_samples + 1)
    return np.array([kstest(u[:, d], "uniform").pvalue for d in range(r.shape[1])])


def sbc_rank_moments(ranks: torch.Tensor, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (D,) of the normalised ranks (rank + 0.5) / (n + 1).

    They say which way a parameter is miscalibrated, which a KS p-value does not: for a
    calibrated posterior the mean is 0.5 and the standard deviation 1 / sqrt(12) = 0.289
    (0.289 * sqrt(1 - 1 / (n + 1)^2) for n samples); a standard deviation below that means
    posteriors too wide (truths rank near the middle), above it too narrow; a mean above 0.5,
    posteriors that sit too low.
    """
    u = (ranks.double() + 0.5) / (n_samples + 1)
    return u.mean(0), u.std(0)


def spectral_snr(batch: dict) -> torch.Tensor:
    """Median flux x sqrt(ivar) over each spectrum's usable pixels (ivar > 0), (B,)."""
    good = batch["ivar"] > 0
    return torch.where(good, batch["flux"] * batch["ivar"].sqrt(), torch.nan).nanmedian(1).values


def recovery(estimate: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Bias (median of estimate - truth), scatter (standard deviation) and NMAD
    (1.4826 median |residual - median|) of the residuals, over finite entries."""
    res = (estimate - truth).double()
    res = res[torch.isfinite(res)]
    if res.numel() == 0:
        return {"bias": float("nan"), "scatter": float("nan"), "nmad": float("nan"), "n": 0}
    med = res.median()
    return {
        "bias": float(med),
        "scatter": float(res.std()),
        "nmad": float(1.4826 * (res - med).abs().median()),
        "n": int(res.numel()),
    }


__all__ = [
    "recovery",
    "sbc_ks_pvalues",
    "sbc_rank_moments",
    "sbc_ranks",
    "spectral_snr",
    "tarp_coverage",
    "tarp_band",
    "tarp_coverage_averaged",
    "tarp_max_deviation",
]
