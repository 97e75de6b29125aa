"""Autoencoder reconstruction figures: observed frame (data, model, stellar continuum, residual
component, normalised residuals; with the posterior-predictive check, the 16-84 % band of the
posterior draws' models and their solved emission lines) and the rest-frame model at the
decoder's full resolution."""

from __future__ import annotations

import numpy as np
import torch

from ..sps import THETA


def _runs(mask: np.ndarray) -> np.ndarray:
    """Float copy with NaN where masked, so lines break across gaps."""
    return np.where(mask, np.nan, 1.0)


@torch.no_grad()
def plot_reconstruction(net, batch: dict, index: int = 0, output: dict | None = None,
                        smooth: int = 5, zooms=((4800.0, 5050.0), (6500.0, 6780.0)),
                        catalog: dict | None = None, ppc: dict | None = None):  # fmt: skip
    """Reconstruction of galaxy ``index`` of a batch.

    Parameters
    ----------
    net : sedvae.autoencoder.SpectrumAutoencoder
    batch : dict
        A batch as for ``net.loss`` (flux, ivar, mask, z, ...).
    index : int
    output : dict, optional
        ``net(batch, components=True)`` if already computed.
    smooth : int
        Boxcar (pixels) applied to the displayed data only (the model is shown as is).
    zooms : sequence of (float, float)
        Rest-frame windows (Angstrom) shown at full resolution (default H-beta/[O III], H-alpha).
    catalog : dict, optional
        The galaxy's catalog row (``rchi2``, ``logmstar_p50``, optional ``rchi2_ppc``): the
        title then quotes the catalog's numbers, so that figure and catalog describe one fit
        (``output`` should then be the fit the catalog's ``rchi2`` comes from). Without it the
        title quotes the drawn fit's own reduced chi^2 (``net.chi2``, the catalog's and
        ``metrics.json``'s formula) and the autoencoder's logM*.
    ppc : dict, optional
        The galaxy's posterior-predictive check (:class:`sedvae.catalog.ppc.PosteriorPredictive`
        ``fit`` arrays of this galaxy): ``model`` (K, M) each draw's continuum x solved
        calibration + solved lines, ``lines`` (K, M) the solved lines, optional ``rchi2_ppc``.
        Drawn as the 16-84 % band over the draws and the median solved lines.

    Returns
    -------
    fig, axes
        axes[0]: observed frame; axes[1]: (data - model) / sigma (orange: against the PPC
        draws' median model); axes[2]: rest frame;
        axes[3:]: rest-frame zooms. ``fig.shown`` records the numbers of the title (``z``,
        ``rchi2``, ``logmstar``, ``rchi2_ppc`` when shown) and those of the drawn fit
        (``rchi2_fit``: the autoencoder fit's chi^2 / N_pix; ``logmstar_fit``).
    """
    import matplotlib.pyplot as plt

    if output is None:
        output = net(batch, components=True)
    b, model, latents = output["batch"], output["model"], output["latents"]
    i = index
    # the batch's own pixels when it carries them (any grid), else the decoder's instrument's
    own = b.get("wave") is not None
    wave = (b["wave"] if own else net.decoder.instrument.wave).cpu().numpy()
    arm = b.get("arm") if own else getattr(net.decoder.instrument, "arm", None)
    arm = torch.zeros(len(wave), dtype=torch.long) if arm is None else arm
    arm = arm.cpu().numpy()
    flux = b["flux"][i].cpu().numpy()
    ivar = b["ivar"][i].cpu().numpy()
    bad = b["mask"][i].cpu().numpy() | ~model["coverage"][i].cpu().numpy()
    mflux = model["flux"][i].cpu().numpy()
    cont = model.get("flux_continuum", model["flux"])[i].cpu().numpy()
    z = float(b["z"][i])
    resid = (flux - mflux) * np.sqrt(ivar)
    c = net.chi2(b, model)  # the catalog's and metrics.json's chi^2 / N_pix
    chi2 = float(c["chi2"][i] / c["n_pix"][i].clamp_min(1))

    n_zoom = len(zooms)
    fig = plt.figure(figsize=(12, 9.5), layout="constrained")
    gs = fig.add_gridspec(4, max(1, n_zoom), height_ratios=[3, 1, 2.5, 2])
    axes = [fig.add_subplot(gs[0, :])]
    axes.append(fig.add_subplot(gs[1, :], sharex=axes[0]))
    axes.append(fig.add_subplot(gs[2, :]))
    axes += [fig.add_subplot(gs[3, k]) for k in range(n_zoom)]

    band = ppc_lines = ppc_resid = None
    if ppc is not None:
        draws = np.asarray(torch.as_tensor(ppc["model"]).double().cpu())  # (K, M)
        if draws.shape[-1] != len(wave):
            raise ValueError(f"ppc model has {draws.shape[-1]} pixels; the plot {len(wave)}")
        band = np.percentile(draws, [16, 84], axis=0)
        ppc_lines = np.median(np.asarray(torch.as_tensor(ppc["lines"]).double().cpu()), 0)
        ppc_resid = (flux - np.median(draws, 0)) * np.sqrt(ivar)  # the median draw's model

    kernel = np.ones(smooth) / smooth
    for a in np.unique(arm):
        sel = arm == a
        gap = _runs(bad[sel])
        dat = np.convolve(flux[sel], kernel, mode="same") if smooth > 1 else flux[sel]
        axes[0].plot(wave[sel], dat * gap, color="0.6", lw=0.6, zorder=1,
                     label="data" if a == 0 else None)  # fmt: skip
        axes[0].plot(wave[sel], mflux[sel], color="C3", lw=0.8, label="model" if a == 0 else None)
        axes[0].plot(wave[sel], cont[sel], color="C0", lw=0.8,
                     label="stellar continuum (SPS)" if a == 0 else None)  # fmt: skip
        axes[0].plot(wave[sel], mflux[sel] - cont[sel], color="C2", lw=0.8,
                     label="residual component" if a == 0 else None)  # fmt: skip
        axes[1].plot(wave[sel], resid[sel] * gap, color="k", lw=0.4)
        if band is not None:
            axes[0].fill_between(wave[sel], band[0][sel] * gap, band[1][sel] * gap, color="C1",
                                 alpha=0.6, lw=0, zorder=1.5, label="posterior predictive 16-84 %"
                                 if a == 0 else None)  # fmt: skip
            axes[0].plot(wave[sel], ppc_lines[sel], color="C4", lw=0.7,
                         label="solved lines (PPC)" if a == 0 else None)  # fmt: skip
            axes[1].plot(wave[sel], ppc_resid[sel] * gap, color="C1", lw=0.4, alpha=0.8)
    lo, hi = np.nanpercentile(np.where(bad, np.nan, flux), [0.5, 99.5])
    axes[0].set_ylim(min(lo, 0) - 0.1 * (hi - lo), hi + 0.25 * (hi - lo))
    axes[0].set_ylabel(r"$f_\lambda$ [$10^{-17}$ erg s$^{-1}$ cm$^{-2}$ $\AA^{-1}$]")
    logm = float(latents["theta"][i, THETA.LOGMSTAR])
    shown = {"z": z, "rchi2": chi2, "logmstar": logm, "rchi2_fit": chi2, "logmstar_fit": logm}
    title = f"z = {z:.4f}   reduced $\\chi^2$ = {chi2:.3f}   log M* = {logm:.2f}   "
    if catalog is not None:
        shown["rchi2"] = float(catalog["rchi2"])
        shown["logmstar"] = float(catalog["logmstar_p50"])
        title = (
            f"z = {z:.4f}   reduced $\\chi^2$ = {shown['rchi2']:.3f}   "
            f"log M* = {shown['logmstar']:.2f} (posterior median)   "
        )
    ppc_chi2 = None
    if catalog is not None and catalog.get("rchi2_ppc") is not None:
        ppc_chi2 = float(catalog["rchi2_ppc"])
    elif ppc is not None and ppc.get("rchi2_ppc") is not None:
        ppc_chi2 = float(ppc["rchi2_ppc"])
    if ppc_chi2 is not None:
        shown["rchi2_ppc"] = ppc_chi2
        title += f"PPC $\\chi^2_\\nu$ = {ppc_chi2:.3f}   "
    fig.shown = shown
    axes[0].set_title(title + f"$\\sigma_*$ = {float(latents['sigma_star'][i]):.0f} km/s")
    axes[0].legend(loc="upper right", fontsize=8, ncol=4)
    axes[1].axhline(0, color="C3", lw=0.8)
    axes[1].set_ylim(-5, 5)
    axes[1].set_ylabel(r"$\Delta/\sigma$")
    axes[1].set_xlabel(r"observed wavelength [$\AA$]")

    rest = model["rest"]
    grid = net.decoder.grid.wave.cpu().numpy()
    n = net.decoder.grid.n_fine
    seen = (grid[:n] * (1 + z) >= wave.min()) & (grid[:n] * (1 + z) <= wave.max())
    comps = {
        "total": ("C3", rest["total"][i]),
        "stellar continuum": ("C0", rest["continuum"][i]),
        "lines": ("C2", rest["lines"][i]),
        "smooth residual": ("C1", rest["smooth"][i] + rest["free"][i]),
    }
    for label, (color, y) in comps.items():
        axes[2].plot(grid[:n][seen], y[:n].cpu().numpy()[seen], color=color, lw=0.6, label=label)
    axes[2].set_ylabel(r"$L_\lambda$ [$L_\odot\,\AA^{-1}$]")
    axes[2].set_xlabel(r"rest-frame wavelength [$\AA$] (decoder grid)")
    axes[2].legend(loc="upper right", fontsize=8, ncol=4)
    for ax, (w0, w1) in zip(axes[3:], zooms, strict=True):
        sel = (grid[:n] >= w0) & (grid[:n] <= w1)
        for _label, (color, y) in comps.items():
            ax.plot(grid[:n][sel], y[:n].cpu().numpy()[sel], color=color, lw=0.8)
        ax.set_xlim(w0, w1)
        ax.set_xlabel(r"rest $\lambda$ [$\AA$]")
    return fig, axes
