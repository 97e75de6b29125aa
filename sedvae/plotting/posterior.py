"""Posterior figures: corner plot, SFH/ZH bands, TARP coverage, SBC rank histograms.

Each function returns ``(fig, axes)`` and never calls ``plt.show()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..sps.provabgs import PARAM_NAMES

LABELS = {
    "logmstar": r"$\log M_\star^{\rm form}$",
    "beta1": r"$\beta_1$",
    "beta2": r"$\beta_2$",
    "beta3": r"$\beta_3$",
    "beta4": r"$\beta_4$",
    "fburst": r"$f_{\rm burst}$",
    "tburst": r"$t_{\rm burst}$ [Gyr]",
    "gamma1": r"$\gamma_1$",
    "gamma2": r"$\gamma_2$",
    "tau_bc": r"$\tau_{\rm BC}$",
    "tau_ism": r"$\tau_{\rm ISM}$",
    "n_dust": r"$n_{\rm dust}$",
    "logmstar_surv": r"$\log M_\star^{\rm surv}$",
    "log_sfr_100myr": r"$\log {\rm SFR}_{100\,{\rm Myr}}$",
    "log_sfr_1gyr": r"$\log {\rm SFR}_{1\,{\rm Gyr}}$",
    "log_z_mw": r"$\log Z_{\rm MW}$",
    "t_mw_gyr": r"$t_{\rm MW}$ [Gyr]",
}


def _np(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def plot_corner(
    samples,
    truth=None,
    names: Sequence[str] = PARAM_NAMES,
    columns: Sequence[int] | None = None,
    log_columns: Sequence[str] = ("tburst", "gamma1", "gamma2"),
):
    """Corner plot of one galaxy's posterior samples.

    Parameters
    ----------
    samples : (n, D) array or tensor (e.g. ``Posterior.sample(batch, n)[:, i]``)
    truth : (D,) array, optional
        Drawn as lines (known for mocks).
    names : sequence of str
        Parameter names (keys of ``LABELS`` get pretty labels).
    columns : sequence of int, optional
        Subset of columns to show (default: all but beta4, which is 1 - the others).
    log_columns : sequence of str
        Parameters shown in log10 (log-uniform priors).

    Returns
    -------
    fig, axes : (k, k) array of axes
    """
    import corner

    x = _np(samples)
    if x.ndim != 2 or x.shape[1] != len(names):
        raise ValueError(f"samples must have shape (n, {len(names)}); got {x.shape}")
    if columns is None:
        columns = [i for i, n in enumerate(names) if n != "beta4"]
    x = x[:, columns].copy()
    t = None if truth is None else _np(truth)[list(columns)].copy()
    labels = []
    for j, c in enumerate(columns):
        name = names[c]
        if name in log_columns:
            x[:, j] = np.log10(x[:, j])
            if t is not None:
                t[j] = np.log10(t[j])
            labels.append(r"$\log_{10}$ " + LABELS.get(name, name))
        else:
            labels.append(LABELS.get(name, name))
    fig = corner.corner(
        x, labels=labels, truths=t, quantiles=(0.16, 0.5, 0.84), show_titles=False,
        truth_color="C3", plot_datapoints=False, fill_contours=True, levels=(0.68, 0.95),
    )  # fmt: skip
    axes = np.array(fig.axes).reshape(len(columns), len(columns))
    return fig, axes


def plot_sfh_bands(bands: dict, index: int = 0, truth: dict | None = None):
    """Star-formation and metallicity history bands of galaxy ``index``.

    Parameters
    ----------
    bands : dict from :meth:`sedvae.posterior.Posterior.sfh_bands` (3 quantiles: low, median,
        high)
    index : int
    truth : dict, optional
        ``{"sfr": (42,), "zmet": (42,)}`` of the true history (e.g. from
        ``Posterior.sfh_bands(theta_true[None], z)`` with one sample).

    Returns
    -------
    fig, axes : (2,) SFR(t) in M_sun/yr and Z(t), against lookback time (Gyr, log axis).
    """
    import matplotlib.pyplot as plt

    lo, hi = _np(bands["lookback_lo_gyr"]), _np(bands["lookback_hi_gyr"])
    t_u = float(_np(bands["t_univ_gyr"])[index])
    use = lo < t_u
    centre = np.sqrt(np.clip(lo, 1e-3, None) * np.minimum(hi, t_u))[use]
    quant = _np(bands["quantiles"])
    band_label = f"{100 * float(quant[-1] - quant[0]):.0f} % band"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    for ax, key, label in (
        (axes[0], "sfr", r"SFR [$M_\odot$/yr]"),
        (axes[1], "zmet", r"$Z$ (absolute)"),
    ):
        q = _np(bands[key])[:, index][:, use]
        ax.fill_between(centre, q[0], q[-1], step="mid", alpha=0.35, color="C0", label=band_label)
        ax.step(centre, q[len(q) // 2], where="mid", color="C0", label="median")
        if truth is not None and key in truth:
            ax.step(centre, _np(truth[key])[use], where="mid", color="C3", ls="--", label="truth")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("lookback time [Gyr]")
        ax.set_ylabel(label)
    axes[0].legend(loc="best", fontsize=8)
    return fig, axes


def plot_tarp(ecp, alpha, label: str | None = None, draws=None, band: float | None = None):
    """TARP expected coverage against credibility level, with the diagonal.

    Parameters
    ----------
    ecp, alpha : (K,) expected coverage (averaged over reference draws, if several) and levels
    label : legend entry of ``ecp`` (default: its max |ECP - alpha|)
    draws : (R, K), optional
        Each reference draw's own ECP, drawn as thin lines.
    band : float, optional
        Half-width of the band about the diagonal that a calibrated posterior's ECP stays
        within (:func:`sedvae.posterior.diagnostics.tarp_band`), shaded.

    Returns
    -------
    fig, ax
    """
    import matplotlib.pyplot as plt

    e, a = _np(ecp), _np(alpha)
    fig, ax = plt.subplots(figsize=(4.2, 4.2), layout="constrained")
    if band is not None:
        ax.fill_between(a, a - band, a + band, color="0.85", lw=0,
                        label=f"calibrated, 95 % (+-{band:.3f})")  # fmt: skip
    ax.plot([0, 1], [0, 1], color="k", ls="--", lw=1, label="calibrated")
    if draws is not None:
        d = _np(draws)
        for i, row in enumerate(d):
            ax.plot(a, row, color="C0", lw=0.5, alpha=0.35,
                    label=f"{len(d)} reference draws" if i == 0 else None)  # fmt: skip
    ax.plot(a, e, color="C0", label=label or f"max |ECP - alpha| = {np.abs(e - a).max():.3f}")
    ax.set_xlabel(r"credibility level $\alpha$")
    ax.set_ylabel("expected coverage")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    return fig, ax


def plot_sbc_ranks(ranks, n_samples: int, names: Sequence[str] = PARAM_NAMES, bins: int = 20,
                   pvalues: Sequence[float] | None = None):  # fmt: skip
    """SBC rank histograms, one panel per parameter, with the 99 % band of a uniform histogram.

    Parameters
    ----------
    ranks : (N, D) integer ranks in [0, n_samples] (``diagnostics.sbc_ranks``)
    n_samples : int
    names : sequence of str
    bins : int
    pvalues : sequence of float, optional
        KS p-values printed in each panel.

    Returns
    -------
    fig, axes : (rows, 4) array
    """
    import matplotlib.pyplot as plt
    from scipy.stats import binom

    r = _np(ranks)
    n, d = r.shape
    rows = int(np.ceil(d / 4))
    fig, axes = plt.subplots(rows, 4, figsize=(12, 2.4 * rows), layout="constrained",
                             squeeze=False)  # fmt: skip
    lo, hi = binom.ppf([0.005, 0.995], n, 1.0 / bins)
    for j, ax in enumerate(axes.flat):
        if j >= d:
            ax.set_visible(False)
            continue
        ax.axhspan(lo, hi, color="0.85")
        ax.hist(r[:, j], bins=bins, range=(0, n_samples + 1), histtype="step", color="C0")
        title = LABELS.get(names[j], names[j])
        if pvalues is not None:
            title += f"  (KS p = {pvalues[j]:.2g})"
        ax.set_title(title, fontsize=9)
        ax.set_yticks([])
    return fig, axes


def marginal_coverage(rank, levels) -> np.ndarray:
    """Empirical coverage of central credible intervals from posterior quantiles of the truth.

    ``rank`` (N,) is the fraction of posterior samples below the truth; the truth lies in the
    central interval of credibility ``alpha`` when |2 rank - 1| <= alpha. NaNs are dropped.
    """
    r = _np(rank).astype(float)
    r = r[np.isfinite(r)]
    dist = np.abs(2 * r - 1)
    return np.array([(dist <= a).mean() if len(r) else np.nan for a in _np(levels)])


def plot_coverage(ranks: dict, levels=None):
    """Coverage of central credible intervals per quantity (``{name: rank (N,)}``), with the
    diagonal and the 95 % binomial band of a calibrated posterior.

    Returns
    -------
    fig, ax
    """
    import matplotlib.pyplot as plt
    from scipy.stats import binom

    a = np.linspace(0, 1, 51) if levels is None else _np(levels)
    fig, ax = plt.subplots(figsize=(5.2, 4.6), layout="constrained")
    n = max(int(np.isfinite(_np(r)).sum()) for r in ranks.values())
    if n:
        lo, hi = binom.ppf(0.025, n, a) / n, binom.ppf(0.975, n, a) / n
        ax.fill_between(a, lo, hi, color="0.85", label=f"95 % band, N = {n}")
    ax.plot([0, 1], [0, 1], color="k", ls="--", lw=1)
    for i, (name, r) in enumerate(ranks.items()):
        ax.plot(a, marginal_coverage(r, a), color=f"C{i % 10}", lw=1.2,
                ls="-" if i < 10 else ":", label=LABELS.get(name, name))  # fmt: skip
    ax.set_xlabel("credibility level of the central interval")
    ax.set_ylabel("fraction of truths inside")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=6, ncol=2)
    return fig, ax


def recovery_columns(table, name: str) -> dict[str, np.ndarray]:
    """``truth``, ``p16``, ``p50``, ``p84`` of ``name`` from a mock catalog, for the galaxies
    where the comparison means something: finite values, and for log SFR a truth above -6
    (quenched galaxies have log SFR -> -30 by construction)."""
    t = np.asarray(table[f"{name}_true"], float)
    cols = {p: np.asarray(table[f"{name}_{p}"], float) for p in ("p16", "p50", "p84")}
    ok = np.isfinite(t) & np.isfinite(cols["p50"])
    if name.startswith("log_sfr"):
        ok &= t > -6
    return {"truth": t[ok], **{k: v[ok] for k, v in cols.items()}}


def plot_recovery(table, names: Sequence[str]):
    """Posterior medians (with 16-84 % bars) against the truth, one panel per quantity, from
    catalog columns ``<name>_p16/_p50/_p84/_true``; bias and scatter of the median in each.

    Returns
    -------
    fig, axes
    """
    import matplotlib.pyplot as plt

    cols = min(3, len(names))
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), layout="constrained",
                             squeeze=False)  # fmt: skip
    for ax, name in zip(axes.flat, names, strict=False):
        c = recovery_columns(table, name)
        t, med, lo, hi = c["truth"], c["p50"], c["p16"], c["p84"]
        if not len(t):
            ax.set_visible(False)
            continue
        ax.errorbar(t, med, yerr=[med - lo, hi - med], fmt=".", ms=3, lw=0.5, alpha=0.6)
        span = [min(t.min(), med.min()), max(t.max(), med.max())]
        ax.plot(span, span, color="k", ls="--", lw=1)
        d = med - t
        ax.set_title(f"{LABELS.get(name, name)}: bias {np.mean(d):+.3f}, scatter {np.std(d):.3f}",
                     fontsize=8)  # fmt: skip
        ax.set_xlabel("truth")
        ax.set_ylabel("posterior median")
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    return fig, axes


__all__ = [
    "marginal_coverage",
    "plot_corner",
    "plot_coverage",
    "plot_recovery",
    "plot_sbc_ranks",
    "plot_sfh_bands",
    "plot_tarp",
    "recovery_columns",
]
