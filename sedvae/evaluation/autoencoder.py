"""Autoencoder evaluation: per-galaxy metrics on mocks with truth, and reconstruction figures.

Used by ``bench/autoencoder.py`` (numbers) and ``python evaluate.py evaluation=autoencoder``
(figures: observed frame and rest frame for a few held-out mocks and the real DESI example).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..physics.cosmology import luminosity_distance_mpc
from ..physics.lines import BENCH_LINES, EMISSION_LINES
from ..physics.redshift import LSUN_PER_MPC2_IN_FLUX_UNIT
from ..sps import THETA

C_KMS = 299792.458
LSF_SIGMA = 0.75  # Angstrom, DESI's LSF (FWHM ~1.8 A), for line-flux noise windows


def desi_example_batch(spectra=None) -> dict[str, torch.Tensor]:
    """The bundled real DESI spectrum as an autoencoder batch: its own resolution matrices
    and the Galactic E(B-V) of its FIBERMAP (the model is reddened, the data left as is)."""
    from ..simulation.mocks import load_desi_example

    s = spectra if spectra is not None else load_desi_example()
    t = s.to_torch(dtype=torch.float32)
    batch = {k: t[k] for k in ("flux", "ivar", "mask", "z", "photometry", "photometry_ivar")}
    batch["resolution"] = t["resolution"]
    if "EBV" in s.extra:
        batch["mw_ebv"] = torch.as_tensor(np.asarray(s.extra["EBV"], dtype=np.float32))
    return batch


def line_flux_models(net, out: dict) -> torch.Tensor:
    """Model luminosities (B, n_bench) L_sun of :data:`BENCH_LINES` (doublets summed)."""
    names = net.decoder.residual.line_names
    lum = out["model"]["rest"]["line_lum"]
    cols = [sum(lum[:, names.index(m)] for m in members) for members in BENCH_LINES.values()]
    return torch.stack(cols, -1)


def line_snr(batch: dict, wave_obs: torch.Tensor, line_lum: torch.Tensor,
             sigma_v: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Expected S/N (B, n_bench) of the true line fluxes given the noise: the spectral flux
    ``L K / d_L^2 * aperture`` over sqrt(sum dlambda^2 / ivar) in +-2.5 sigma of the line."""
    z = batch["z"].double()
    d_l = luminosity_distance_mpc(z)[:, None]
    flux = line_lum.double() * LSUN_PER_MPC2_IN_FLUX_UNIT / d_l**2  # 1e-17 erg/s/cm^2
    flux = flux * batch.get("aperture", torch.ones_like(z)).double()[:, None]
    # variance of sum(flux * dlambda) per pixel, DESI pixels of 0.8 A
    var = torch.where(batch["ivar"] > 0, 0.64 / batch["ivar"].clamp_min(1e-30), torch.inf)
    out = torch.zeros_like(flux)
    wave = wave_obs.double()
    for k, members in enumerate(BENCH_LINES.values()):
        lam = torch.tensor([EMISSION_LINES[m] for m in members], dtype=torch.float64)
        lo, hi = lam.min() * (1 + z), lam.max() * (1 + z)  # (B,)
        sig = torch.sqrt((lo * sigma_v.double() / C_KMS) ** 2 + LSF_SIGMA**2)
        left, right = (lo - 2.5 * sig)[:, None], (hi + 2.5 * sig)[:, None]
        inside = (wave[None] >= left) & (wave[None] <= right)
        usable = inside & torch.isfinite(var)
        enough = usable.sum(-1) >= 0.5 * inside.sum(-1).clamp_min(1)
        sigma_f = torch.sqrt(torch.where(usable, var, 0.0).sum(-1))
        snr = flux[:, k] / sigma_f.clamp_min(1e-30)
        out[:, k] = torch.where(enough & (inside.sum(-1) > 0), snr, torch.zeros_like(snr))
    return out


@torch.no_grad()
def galaxy_metrics(net, out: dict) -> dict[str, np.ndarray]:
    """Per-galaxy numbers of one evaluated batch (``net(batch)`` or ``net.refine(batch)``).

    Returns reduced chi^2 of the spectrum, pixel counts (valid and |pull| > 3), the residual
    flux fractions, and with truth in the batch: logM* (fit and true), line luminosities
    (fit and true) and the lines' expected S/N.
    """
    b, model, latents = out["batch"], out["model"], out["latents"]
    w = b["ivar"] * model["coverage"]
    pull = (b["flux"] - model["flux"]) * w.sqrt()
    valid = w > 0
    res = {
        "chi2_red": ((pull**2).sum(-1) / valid.sum(-1).clamp_min(1)).numpy(),
        "n_valid": valid.sum(-1).numpy(),
        "n_gt3": ((pull.abs() > 3) & valid).sum(-1).numpy(),
    }
    frac = net.residual_fraction(b["z"], model["rest"])
    res.update({k: v.numpy() for k, v in frac.items()})
    res["logmstar_fit"] = latents["theta"][:, THETA.LOGMSTAR].numpy()
    if "theta" in b:
        res["logmstar_true"] = b["theta"][:, THETA.LOGMSTAR].numpy()
    if "line_lum" in b:
        res["line_fit"] = line_flux_models(net, out).numpy()
        res["line_true"] = b["line_lum"].numpy()
        wave = net.decoder.instrument.wave
        res["line_snr"] = line_snr(b, wave, b["line_lum"], b["sigma_v"]).numpy()
    if "flux_true" in b:
        truth = (b["flux"] - b["flux_true"]) * w.sqrt()
        res["chi2_red_truth"] = ((truth**2).sum(-1) / valid.sum(-1).clamp_min(1)).numpy()
    return res


def summarise(per: dict[str, np.ndarray], snr_min: float = 5.0) -> dict[str, float]:
    """Benchmark numbers from concatenated :func:`galaxy_metrics` (see bench/autoencoder.py)."""
    s = {
        "n_galaxies": int(len(per["chi2_red"])),
        "median_reduced_chi2": float(np.median(per["chi2_red"])),
        "mean_reduced_chi2": float(np.mean(per["chi2_red"])),
        "frac_pix_gt3sigma": float(per["n_gt3"].sum() / per["n_valid"].sum()),
        "residual_flux_fraction": float(np.mean(per["residual_fraction"])),
        "residual_continuum_fraction": float(np.mean(per["residual_continuum_fraction"])),
    }
    if "chi2_red_truth" in per:
        s["truth_median_reduced_chi2"] = float(np.median(per["chi2_red_truth"]))
    if "logmstar_true" in per:
        d = per["logmstar_fit"] - per["logmstar_true"]
        s["logmstar_point_scatter"] = float(1.4826 * np.median(np.abs(d - np.median(d))))
        s["logmstar_point_bias"] = float(np.median(d))
        s["logmstar_point_std"] = float(np.std(d))
    if "line_true" in per:
        rel = per["line_fit"] / np.maximum(per["line_true"], 1e-30) - 1
        det = per["line_snr"] >= snr_min
        s["line_flux_rel_err_median"] = float(np.median(np.abs(rel[det]))) if det.any() else None
        s["line_snr_min"] = snr_min
        for k, name in enumerate(BENCH_LINES):
            sel = det[:, k]
            s[f"line_{name}_n_detected"] = int(sel.sum())
            if sel.any():
                s[f"line_{name}_rel_err_median"] = float(np.median(np.abs(rel[sel, k])))
                s[f"line_{name}_bias"] = float(np.median(rel[sel, k]))
    return s


def evaluate_autoencoder(model: str, output_dir: str | Path, n_mocks: int = 4, seed: int = 7,
                         refine_steps: int = 0, ppc_draws: int = 16) -> dict:  # fmt: skip
    """Reconstruction figures (``reconstruction_mock{i}.png``, ``reconstruction_desi.png``)
    and their reduced chi^2, for ``n_mocks`` fresh mocks and the bundled DESI spectrum.

    With ``ppc_draws`` > 0 each figure also shows the posterior-predictive band of the shipped
    posterior (``ppc_draws`` draws, lines and calibration solved: the catalog's check) and
    the solved lines, and the metrics get ``rchi2_ppc_<label>``. The metrics are the numbers
    the figures' titles show (``fig.shown``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..checkpoint import load_checkpoint
    from ..plotting import plot_reconstruction
    from ..simulation.mocks import MockGenerator

    out_dir = Path(output_dir)
    net, _ = load_checkpoint(model, "autoencoder")
    batches = {
        "mock": MockGenerator().sample(n_mocks, torch.Generator().manual_seed(seed)),
        "desi": desi_example_batch(),
    }
    predictive = posterior = None
    if ppc_draws > 0:
        from ..catalog.fitter import default_posterior_path
        from ..catalog.ppc import PosteriorPredictive
        from ..posterior.api import load_posterior

        posterior = load_posterior(default_posterior_path())
        predictive = PosteriorPredictive(n_draws=ppc_draws)
    metrics = {}
    for name, batch in batches.items():
        if refine_steps > 0:
            out = net.refine(batch, steps=refine_steps, components=True)
        else:
            with torch.no_grad():
                out = net(batch, components=True)
        chi2 = galaxy_metrics(net, out)["chi2_red"]
        ppc = None
        if predictive is not None:
            from ..io.batch import FATAL

            samples, flags = posterior.sample(batch, ppc_draws, torch.Generator().manual_seed(0),
                                              return_flags=True)  # fmt: skip
            clean, _ = posterior.check(batch)
            ppc = predictive(samples, clean, (flags & int(FATAL)) == 0)
        for i in range(len(chi2)):
            label = name if name == "desi" else f"{name}{i}"
            band = None
            if ppc is not None and "fit" in ppc and bool((ppc["fit"]["index"] == i).any()):
                j = int(torch.nonzero(ppc["fit"]["index"] == i)[0])
                band = {"model": ppc["fit"]["model"][j], "lines": ppc["fit"]["lines_model"][j],
                        "rchi2_ppc": float(ppc["rchi2_ppc"][i])}  # fmt: skip
            fig, _ = plot_reconstruction(net, batch, index=i, output=out, ppc=band)
            fig.savefig(out_dir / f"reconstruction_{label}.png", dpi=110)
            plt.close(fig)
            metrics[f"reduced_chi2_{label}"] = fig.shown["rchi2"]
            if "rchi2_ppc" in fig.shown:
                metrics[f"rchi2_ppc_{label}"] = fig.shown["rchi2_ppc"]
            if not np.isclose(fig.shown["rchi2"], float(chi2[i]), rtol=1e-5):
                raise RuntimeError(f"{label}: the figure's chi^2 {fig.shown['rchi2']} is not the "
                                   f"evaluation's {float(chi2[i])}")  # fmt: skip
    return metrics
