"""Calibration, recovery and speed of the SBI head on held-out mock DESI BGS spectra.

    python bench/posterior.py [--checkpoint data/posterior/posterior.pt] [--n-samples 1000]
                              [--figures outputs/bench_posterior]

Held-out set: 5,000 mocks of the test seed of ``experiment=posterior``'s data module
(``cache/mocks/mocks_test_n5000_seed13.h5``: prior draws never used in training, nebular
emission, the DESI instrument, BGS-like noise with the data module's fixed test-noise seed;
its first 1,792 galaxies are those of the data module's 2,000-galaxy test file). It is
written on first use (~1 min) when missing. ``--n-test 2000`` gives that file.

- Calibration: TARP expected coverage in the flow's standardised coordinates (references: prior
  draws; ``tarp_max_dev`` = max |ECP - alpha| over 101 levels of the ECP averaged over
  ``--tarp-references`` independent reference draws, default 8, seeds 1..8;
  ``tarp_max_dev_by_draw``, each draw's own figure: at 1,000 galaxies one draw's figure moves by
  ~0.04 with the draw alone; ``tarp_max_dev_sbi``, sbi's ``_run_tarp`` on the first draw, a
  cross-check of ``tarp_max_dev_by_draw[0]``, which is the single-draw figure of the older
  benches that drew one reference set; ``tarp_band_95``, the 95 % Kolmogorov-Smirnov bound on
  one draw's figure for a calibrated posterior, ~1.36 / sqrt(N), loose for the averaged one);
  SBC ranks of the 12 physical parameters with a KS test each. With 12 tests, min p < 0.01
  happens by chance 11 % of the time for a calibrated posterior, so ``sbc_min_ks_p_bonferroni``
  (12 x min p) is also given, and ``sbc_min_ks_p_flow_coords``, the smallest p of the same test
  in the flow's 11 coordinates. ``sbc_rank_mean`` and ``sbc_rank_std`` say which way a parameter
  leans (normalised ranks: 0.5 and 0.289 if calibrated; a smaller std means posteriors too wide,
  a mean above 0.5 posteriors too low), ``sbc_rank_std_by_snr`` the std by spectral S/N tercile
  (``snr_t1`` lowest). ``truth_vs_prior_ks_p`` tests the held-out truths themselves against the
  prior: ranks lean with an unusual draw of truths (2,000 galaxies of seed 13 hold a beta_3
  sample with KS p = 0.002 against its Beta(1, 3) marginal, and their beta_3 SBC p was
  0.0008-0.002 in every training cycle, while the validation set's was 0.6), hence 5,000
  held-out galaxies by default.
- Recovery: posterior medians against the truth, in dex: logM* (formed mass), surviving mass,
  SFR over 100 Myr (star-forming galaxies, true sSFR > 1e-11/yr) and Z_MW; logM* also in
  three bins of true sSFR (``logmstar_by_log_ssfr``), since outshining by recent bursts is what
  limits it; and the correlation of the logM* error with the true mass-weighted age
  (``logmstar_err_vs_t_mw_corr``: medians pulled towards the prior's age make it negative).
- Speed: wall time of ``Posterior.sample(batch, 1000)`` for a batch of 1000 galaxies (one
  thread, everything included: rest-frame binning, embedding, flow, mapping to physical
  units), per galaxy; derived properties timed separately; with ``--compile`` also the
  ``torch.compile``d sampler. The load average is recorded: on a shared machine the same
  code is several times slower.

Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from common import REPO, test_batch  # bench/common.py: the held-out set

from sedvae.io import FATAL
from sedvae.posterior import load_posterior
from sedvae.posterior.diagnostics import (
    recovery,
    sbc_ks_pvalues,
    sbc_rank_moments,
    sbc_ranks,
    spectral_snr,
    tarp_band,
    tarp_coverage_averaged,
    tarp_max_deviation,
)
from sedvae.sps import THETA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(REPO / "data/posterior/posterior.pt"))
    parser.add_argument("--cache", default=str(REPO / "cache/mocks"))
    parser.add_argument("--n-test", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=11, help="the data module's base seed")
    parser.add_argument("--n-samples", type=int, default=1000)
    parser.add_argument("--speed-galaxies", type=int, default=1000)
    parser.add_argument("--figures", default=str(REPO / "outputs/bench_posterior"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time the compiled sampler")
    parser.add_argument(
        "--tarp-references",
        type=int,
        default=8,
        help="independent draws of TARP's reference points; the ECP is averaged over them",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)

    post = load_posterior(args.checkpoint)
    batch = test_batch(Path(args.cache), args.n_test, args.seed)
    n_gal = batch["z"].shape[0]
    result: dict = {"n_test": n_gal, "n_samples": args.n_samples}

    # ---- speed ----------------------------------------------------------------------------
    m = min(args.speed_galaxies, n_gal)
    sub = {k: v[:m] for k, v in batch.items()}
    post.sample({k: v[:4] for k, v in batch.items()}, 10, gen)  # warm-up
    t0 = time.perf_counter()
    theta_speed = post.sample(sub, args.n_samples, gen)
    t_sample = time.perf_counter() - t0
    t0 = time.perf_counter()
    post.derived(theta_speed, sub["z"])
    t_derived = time.perf_counter() - t0
    result["ms_per_galaxy"] = 1e3 * t_sample / m
    if args.compile:
        from sedvae.posterior import Posterior

        fast = Posterior(post.net, compile=True)
        t0 = time.perf_counter()
        fast.sample({k: v[:4] for k, v in batch.items()}, args.n_samples, gen)  # compiles
        result["compile_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast.sample(sub, args.n_samples, gen)
        result["ms_per_galaxy_compiled"] = 1e3 * (time.perf_counter() - t0) / m
    result["ms_per_galaxy_derived"] = 1e3 * t_derived / m
    result["load_average"] = os.getloadavg()[0]
    result["speed_batch"] = m
    result["speedup_vs_0.2s"] = 200.0 / result["ms_per_galaxy"]
    print(
        f"sampling: {result['ms_per_galaxy']:.2f} ms/galaxy ({m} galaxies x {args.n_samples} "
        f"samples); derived: {result['ms_per_galaxy_derived']:.2f} ms/galaxy"
    )
    del theta_speed

    # ---- calibration ----------------------------------------------------------------------
    res = post.sample(batch, args.n_samples, gen, return_flags=True)
    theta, flags = res.samples, res.flags
    # warnings (PRIOR_EDGE of a mock near logM* = 7) keep their galaxy: dropping them would
    # select on the posterior and bias the calibration
    ok = (flags & int(FATAL)) == 0
    result["n_flagged"] = int((~ok).sum())
    truth = batch["theta"].double()
    prior = post.prior
    loc, scale = post.net.flow.u_loc.double(), post.net.flow.u_scale.double()

    def standard_u(th: torch.Tensor) -> torch.Tensor:
        """The flow's own (standardised) coordinates: references and distances in a space
        where the prior has unit scale in every direction."""
        shape = th.shape[:-1]
        u = prior.to_unconstrained(th.reshape(-1, th.shape[-1]).double())
        y = post.net.flow_coordinates(u)[0].double()
        return ((y - loc) / scale).reshape(*shape, -1)

    u_samples = standard_u(theta[:, ok])
    u_truth = standard_u(truth[ok])
    # reference draws 1..R (seed r): the first is the single draw of earlier benches
    refs = torch.stack([
        standard_u(prior.sample(int(ok.sum()), torch.Generator().manual_seed(r)))
        for r in range(1, args.tarp_references + 1)
    ])  # fmt: skip
    ecp, alpha, ecp_draws = tarp_coverage_averaged(u_samples, u_truth, refs)
    result["tarp_max_dev"] = tarp_max_deviation(ecp, alpha)
    result["tarp_references"] = args.tarp_references
    result["tarp_max_dev_by_draw"] = [round(tarp_max_deviation(e, alpha), 4) for e in ecp_draws]
    result["tarp_band_95"] = tarp_band(int(ok.sum()))
    try:  # cross-check against sbi's implementation (private in sbi 0.27)
        from sbi.diagnostics.tarp import _run_tarp

        ecp_sbi, alpha_sbi = _run_tarp(u_samples.float(), u_truth.float(), refs[0].float(),
                                       num_bins=100)  # fmt: skip
        result["tarp_max_dev_sbi"] = float((ecp_sbi - alpha_sbi).abs().max())
    except ImportError:
        pass

    def named(values) -> dict[str, float]:
        """One figure per physical parameter, by name."""
        return {n: round(float(v), 4) for n, v in zip(post.names, values, strict=True)}

    ranks = sbc_ranks(theta[:, ok].double(), truth[ok])
    pvals = sbc_ks_pvalues(ranks, args.n_samples)
    result["sbc_ks_p"] = named(pvals)
    result["sbc_min_ks_p"] = float(pvals.min())
    result["sbc_min_ks_p_bonferroni"] = float(min(1.0, len(pvals) * pvals.min()))
    # which way each parameter leans (normalised ranks: std 0.289 and mean 0.5 if calibrated;
    # a smaller std = posteriors too wide), overall and by spectral S/N tercile, where the dust
    # posteriors' excess width grows with S/N (docs/results.md, "Training the flow alone")
    r_mean, r_std = sbc_rank_moments(ranks, args.n_samples)
    result["sbc_rank_mean"], result["sbc_rank_std"] = named(r_mean), named(r_std)
    snr = spectral_snr(batch)[ok].double()
    tercile = torch.bucketize(snr, torch.quantile(snr, torch.tensor([1 / 3, 2 / 3]).double()))
    result["sbc_rank_std_by_snr"] = {
        f"snr_t{t + 1}": named(sbc_rank_moments(ranks[tercile == t], args.n_samples)[1])
        for t in range(3)
    }
    # the same in the flow's 11 coordinates: a failure in theta but not here comes from the
    # joint of several coordinates (the SFH fractions beta are products of stick-breaking ones)
    pvals_u = sbc_ks_pvalues(sbc_ranks(u_samples, u_truth), args.n_samples)
    result["sbc_min_ks_p_flow_coords"] = float(pvals_u.min())
    # are the held-out truths themselves a typical prior draw? SBC ranks lean with them: a
    # calibrated posterior shrinks towards the prior, so truths that happen to sit high in the
    # prior rank high. KS of each parameter's truths against 10^6 prior draws.
    from scipy.stats import ks_2samp

    ref = prior.sample(1_000_000, torch.Generator().manual_seed(2), dtype=torch.float64)
    p_truth = [ks_2samp(truth[ok, d].numpy(), ref[:, d].numpy()).pvalue for d in range(12)]
    result["truth_vs_prior_ks_p"] = named(p_truth)

    # ---- recovery -------------------------------------------------------------------------
    z = batch["z"]
    d_true = post.derived(truth.float()[None], z)
    d_post = post.derived(theta, z)
    med = {k: v.nanmedian(0).values for k, v in d_post.items()}
    theta_med = theta.nanmedian(0).values
    rec = {"logmstar": recovery(theta_med[ok, 0], truth[ok, 0].float())}
    rec["logmstar_surv"] = recovery(med["logmstar_surv"][ok], d_true["logmstar_surv"][0, ok])
    sf = ok & (d_true["sfr_100myr"][0] / 10 ** d_true["logmstar_surv"][0] > 1e-11)
    rec["log_sfr100_sf"] = recovery(
        torch.log10(d_post["sfr_100myr"].clamp_min(1e-6)).nanmedian(0).values[sf],
        torch.log10(d_true["sfr_100myr"][0, sf]),
    )
    rec["log_zmw"] = recovery(torch.log10(med["z_mw"][ok]), torch.log10(d_true["z_mw"][0, ok]))

    # posterior widths (half the 16-84 % range, median over galaxies): a calibrated posterior's
    # median-vs-truth scatter cannot be much below its own width
    def width(x: torch.Tensor) -> float:
        q = torch.nanquantile(x, torch.tensor([0.16, 0.84], dtype=x.dtype), dim=0)
        return float((0.5 * (q[1] - q[0])).nanmedian())

    widths = {
        "logmstar": width(theta[:, ok, THETA.LOGMSTAR].double()),
        "logmstar_surv": width(d_post["logmstar_surv"][:, ok].double()),
        "log_sfr100_sf": width(torch.log10(d_post["sfr_100myr"][:, sf].clamp_min(1e-6)).double()),
        "log_zmw": width(torch.log10(d_post["z_mw"][:, ok]).double()),
    }
    for key, r in rec.items():
        result[f"{key}_post_sigma"] = widths[key]
        result[f"{key}_bias"] = r["bias"]
        result[f"{key}_scatter"] = r["scatter"]
        result[f"{key}_nmad"] = r["nmad"]
    result["n_star_forming"] = int(sf.sum())
    # logM* (formed) by true sSFR(100 Myr): recent bursts outshine the old stars, whose mass
    # the spectrum then hardly constrains. The PROVABGS prior (f_burst ~ U(0, 1)) puts about a
    # third of its draws above 1e-9 /yr, more than BGS galaxies have
    log_ssfr = torch.log10(d_true["sfr_100myr"][0].clamp_min(1e-30)) - d_true["logmstar_surv"][0]
    by_ssfr = {}
    for label, lo, hi in (("lt-11", -99, -11), ("-11_-9", -11, -9), ("gt-9", -9, 99)):
        sel = ok & (log_ssfr >= lo) & (log_ssfr < hi)
        logm = theta[:, sel, THETA.LOGMSTAR].double()
        r = recovery(theta_med[sel, THETA.LOGMSTAR], truth[sel, THETA.LOGMSTAR].float())
        by_ssfr[label] = {"n": r["n"], "bias": round(r["bias"], 4),
                          "scatter": round(r["scatter"], 4), "nmad": round(r["nmad"], 4),
                          "post_sigma": round(width(logm), 4)}  # fmt: skip
    result["logmstar_by_log_ssfr"] = by_ssfr
    # age shrinkage: the logM* error follows the mass-to-light ratio, i.e. age; a posterior
    # that misses the age information pulls every galaxy's age (so its mass) towards the
    # prior's, and its error correlates with the true mass-weighted age
    err = (theta_med[ok, 0] - truth[ok, 0].float()).double()
    t_mw = d_true["t_mw_gyr"][0, ok].double()
    result["logmstar_err_vs_t_mw_corr"] = float(torch.corrcoef(torch.stack([err, t_mw]))[0, 1])

    # ---- figures --------------------------------------------------------------------------
    if args.figures:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from sedvae.plotting.posterior import (
            plot_corner,
            plot_sbc_ranks,
            plot_sfh_bands,
            plot_tarp,
        )

        out = Path(args.figures)
        out.mkdir(parents=True, exist_ok=True)
        fig, _ = plot_corner(theta[:, 0], truth[0])
        fig.savefig(out / "corner_galaxy0.png", dpi=80)
        bands = post.sfh_bands(theta[:, :1], z[:1])
        true_bands = post.sfh_bands(truth[:1].float()[None], z[:1], quantiles=(0.5,))
        fig2, _ = plot_sfh_bands(bands, 0, {"sfr": true_bands["sfr"][0, 0],
                                            "zmet": true_bands["zmet"][0, 0]})  # fmt: skip
        fig2.savefig(out / "sfh_galaxy0.png", dpi=80)
        fig3, _ = plot_tarp(ecp, alpha, draws=ecp_draws, band=result["tarp_band_95"])
        fig3.savefig(out / "tarp.png", dpi=80)
        fig4, _ = plot_sbc_ranks(ranks, args.n_samples, post.names, pvalues=pvals)
        fig4.savefig(out / "sbc_ranks.png", dpi=80)
        for f in (fig, fig2, fig3, fig4):
            plt.close(f)
        np.savez(out / "tarp.npz", ecp=ecp.numpy(), alpha=alpha.numpy(),
                 ecp_draws=ecp_draws.numpy())  # fmt: skip
        result["figures"] = str(out)

    for key, value in result.items():
        if isinstance(value, float):
            result[key] = round(value, 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
