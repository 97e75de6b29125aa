"""Figures for simulated training sets. Functions return ``(fig, axes)`` and never show."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

from sedvae.sps import THETA


def plot_training_examples(path: str | Path, n: int = 4, model=None):
    """Rest-frame spectra of the first ``n`` galaxies of a training set, with their binned
    SFHs and metallicity histories.

    Returns
    -------
    fig, axes : matplotlib figure and an (n, 2) array of axes (spectrum, history).
    """
    import matplotlib.pyplot as plt

    from ..sps import SEDModel

    with h5py.File(path, "r") as f:
        n = min(n, f["theta"].shape[0])
        theta = torch.as_tensor(f["theta"][:n], dtype=torch.float64)
        z = torch.as_tensor(f["z"][:n], dtype=torch.float64)
        wave = f["wave"][:]
        lum = f["lum"][:n] * 10 ** theta[:, THETA.LOGMSTAR, None].numpy()
        derived = {k: f["derived"][k][:n] for k in f["derived"]}
    model = model if model is not None else SEDModel(z_max=max(1e-3, float(z.max())))
    hist = model.sfh(theta.to(model.dtype), z.to(model.dtype))
    fig, axes = plt.subplots(n, 2, figsize=(11, 2.4 * n), squeeze=False, constrained_layout=True)
    sel = (wave > 1200) & (wave < 12000)
    for i in range(n):
        ax = axes[i, 0]
        ax.plot(wave[sel], lum[i, sel], lw=0.5, color="k")
        ax.set_yscale("log")
        ax.set_ylabel(r"$L_\lambda$ [$L_\odot/\AA$]")
        t = theta[i]
        ax.set_title(
            f"z={z[i]:.3f}  logM*={t[0]:.2f}  log M_surv={derived['logmstar_surv'][i]:.2f}  "
            f"tau_BC={t[9]:.2f} tau_ISM={t[10]:.2f} n={t[11]:.2f}",
            fontsize=8,
        )
        ax = axes[i, 1]
        lo = hist["bin_lo_gyr"][i].numpy()
        hi = hist["bin_hi_gyr"][i].numpy()
        sfr = hist["sfr"][i].numpy()
        keep = hi > lo
        edges = np.concatenate([lo[keep], hi[keep][-1:]])
        ax.stairs(sfr[keep], np.maximum(edges, 1e-3), color="C0", label="SFR")
        if hist["burst_mass"][i] > 0:
            ax.axvline(
                hist["burst_age_gyr"][i].item(),
                color="C3",
                ls="--",
                lw=1,
                label=f"burst {hist['burst_mass'][i].item():.2g} M$_\\odot$",
            )
        ax.set_xscale("log")
        ax.set_ylabel(r"SFR [M$_\odot$/yr]", color="C0")
        ax.legend(fontsize=7, loc="upper left")
        twin = ax.twinx()
        twin.stairs(hist["zmet"][i].numpy()[keep], np.maximum(edges, 1e-3), color="C2")
        twin.set_yscale("log")
        twin.set_ylabel("Z", color="C2")
    axes[-1, 0].set_xlabel(r"rest-frame wavelength [$\AA$, vacuum]")
    axes[-1, 1].set_xlabel("lookback time [Gyr]")
    return fig, axes
