"""How the posterior head behaves on galaxies its simulator did not make (issue 26, item 5).

    python bench/off_model.py [--n 300] [--seed 1] [--n-in 300] [--n-samples 500]
                              [--checkpoint data/posterior/posterior.pt] [--new-checkpoint F]
                              [--ppc-draws 16] [--cache cache]

Two sets, both DESI-like (the bundled coadd's resolution and ivar shape, BGS-like S/N,
Legacy Surveys north photometry, a fibre aperture on the spectrum):

- off-model: ``python -m sedvae.offmodel`` (bagpipes' own model: delayed/exponential/lognormal/
  double-power-law SFHs with bursts on 30 %, Calzetti/Cardelli/SMC dust, bagpipes' nebular
  model, veldisp 50-300 km/s; calibration warps on a third, sky residuals on 10 %), read by
  ``MockSource`` with noise seed 0; written to ``<cache>/offmodel/offmodel_n<n>_seed<seed>.h5``
  when missing;
- in-model: held-out mocks of sedvae's own simulator (``bench/common.test_batch``: the test
  seed of the posterior's data module, prior draws never used in training).

The heads: the shipped one (``--checkpoint``, the baseline: trained on SPS mocks only; keys
prefixed ``baseline_``) and, with ``--new-checkpoint``, the head trained on the generative model
(``experiment=posterior_generative``; unprefixed keys), on the same galaxies and noise. Per head
and set, from
``--n-samples`` posterior samples per galaxy and ``Posterior.derived``:

- surviving mass (log10 M_sun), log SFR over 100 Myr for star-forming galaxies (true sSFR over
  100 Myr > 1e-11 / yr, by surviving mass) and the formed-mass-weighted age t_MW (Gyr): bias
  (median of posterior median - truth), scatter (standard deviation of that error), NMAD
  (1.4826 median |error - median error|) and the 68 % coverage (truth inside the 16-84 %
  interval); galaxies with a FATAL flag are left out;
- the flagged fraction (any flag bit, FATAL or warning, PRIOR_EDGE included, as the catalog's
  ``flags`` column) and the fraction per flag name; ``OOD`` where the head has an OOD model
  (``sedvae.posterior.ood``, the companion file beside the checkpoint), ``MISFIT`` from the
  catalog's posterior-predictive check (``--ppc-draws`` draws, lines and calibration solved),
  on the first ``--ppc-galaxies`` of each set (~1 s per galaxy; ``*_misfit_frac`` is over them);
- off-model, the metrics of the galaxies not flagged OOD (``not_ood``);
- in-model, the checks of ``bench/posterior.py`` at this size (``calibration``): TARP max
  |ECP - alpha| (8 reference draws), the smallest SBC rank KS p, logM* (formed) scatter;
- spurious young bursts: among galaxies whose true fraction of formed mass made in the last
  100 Myr is < 1 %, the fraction whose posterior median of that fraction is > 10 %;
- off-model only: the surviving-mass and t_MW metrics per SFH family, dust law, and with/without
  a burst, a warp or sky residuals.

The truths of the off-model set are bagpipes' (surviving mass is its ``sfh.stellar_mass``); its
ages are in bagpipes' cosmology, its distances are Planck18 (see ``sedvae/offmodel.py``).
Last line: JSON with the keys of issue 26 (``offmodel_logmsurv_bias`` ...), ``baseline_``-prefixed
for the shipped head, plus the OOD and MISFIT fractions (``offmodel_ood_frac`` ...).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from common import REPO, test_batch  # bench/common.py: the held-out set

from sedvae.io.batch import FATAL, Flag
from sedvae.posterior import load_posterior
from sedvae.posterior.diagnostics import (
    recovery,
    sbc_ks_pvalues,
    sbc_ranks,
    tarp_coverage_averaged,
    tarp_max_deviation,
)
from sedvae.sps import THETA

SSFR_SF = 1e-11  # /yr: star-forming above it (true sSFR over 100 Myr, surviving mass)


def stats(median: np.ndarray, p16: np.ndarray, p84: np.ndarray, truth: np.ndarray) -> dict:
    """Bias, scatter, NMAD and 68 % coverage of posterior medians against the truth."""
    ok = np.isfinite(median) & np.isfinite(truth)
    err = median[ok] - truth[ok]
    if not ok.any():
        return {"n": 0}
    return {
        "n": int(ok.sum()),
        "bias": float(np.median(err)),
        "scatter": float(np.std(err)),
        "nmad": float(1.4826 * np.median(np.abs(err - np.median(err)))),
        "cov68": float(np.mean((truth[ok] >= p16[ok]) & (truth[ok] <= p84[ok]))),
    }


def misfit(posterior, batch: dict, samples: torch.Tensor, flags: torch.Tensor, n_ppc: int,
           n_gal: int) -> torch.Tensor:  # fmt: skip
    """(B,) bool ``Flag.MISFIT`` of the catalog's posterior-predictive check (``n_ppc`` draws,
    lines and calibration solved; :mod:`sedvae.catalog.ppc`, as ``PosteriorFitter`` runs it) for
    the first ``n_gal`` galaxies (it costs ~1 s per galaxy); False for the others."""
    from sedvae.catalog.ppc import PosteriorPredictive

    n_gal = min(n_gal, len(flags))
    sub = {k: v[:n_gal] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == len(flags)
           else v for k, v in batch.items()}  # fmt: skip
    clean, _ = posterior.check(sub)
    ok = torch.as_tensor((flags[:n_gal] & int(FATAL)) == 0)
    out = torch.zeros(len(flags), dtype=torch.bool)
    out[:n_gal] = PosteriorPredictive(n_ppc)(samples[:, :n_gal], clean, ok)["misfit"].bool()
    return out


def calibration(posterior, samples: torch.Tensor, flags: np.ndarray, theta: torch.Tensor) -> dict:
    """In-model checks of ``bench/posterior.py`` at this bench's size: TARP max |ECP - alpha|
    (ECP averaged over 8 prior reference draws, the flow's standardised coordinates), SBC rank
    KS p of the 12 parameters (smallest), and logM* (formed) bias and scatter of the medians."""
    ok = torch.as_tensor((flags & int(FATAL)) == 0)
    prior, flow = posterior.prior, posterior.net.flow
    loc, scale = flow.u_loc.double(), flow.u_scale.double()

    def standard_u(th: torch.Tensor) -> torch.Tensor:
        shape = th.shape[:-1]
        u = prior.to_unconstrained(th.reshape(-1, th.shape[-1]).double())
        return ((posterior.net.flow_coordinates(u)[0].double() - loc) / scale).reshape(*shape, -1)

    truth = theta.double()[ok]
    refs = torch.stack([standard_u(prior.sample(int(ok.sum()), torch.Generator().manual_seed(r)))
                        for r in range(1, 9)])  # fmt: skip
    ecp, alpha, _ = tarp_coverage_averaged(standard_u(samples[:, ok]), standard_u(truth), refs)
    ranks = sbc_ranks(samples[:, ok].double(), truth)
    med = samples[:, ok, THETA.LOGMSTAR].double().median(0).values
    rec = recovery(med, truth[:, THETA.LOGMSTAR])
    return {
        "tarp_max_dev": tarp_max_deviation(ecp, alpha),
        "sbc_min_ks_p": float(np.min(sbc_ks_pvalues(ranks, samples.shape[0]))),
        "logmstar_bias": rec["bias"],
        "logmstar_scatter": rec["scatter"],
    }


def quantities(posterior, batch: dict, n_samples: int, n_ppc: int = 0, ppc_galaxies: int = 0,
               calibrate_on: dict | None = None):  # fmt: skip
    """Posterior 16/50/84 % of the benchmarked quantities (each (B,)) and the flags (B,)
    (OOD where the head has an OOD model; MISFIT with ``n_ppc`` > 0); with ``calibrate_on``
    (a dict), :func:`calibration` against ``batch["theta"]`` goes into it."""
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    samples, flags = posterior.sample(batch, n_samples, gen, return_flags=True)
    seconds = time.perf_counter() - t0
    derived = posterior.derived(samples, batch["z"])
    flags = flags.long() | posterior.prior_edge(samples, derived).long() * int(Flag.PRIOR_EDGE)
    flags = flags.numpy()
    if n_ppc and ppc_galaxies:
        bad = misfit(posterior, batch, samples, flags, n_ppc, ppc_galaxies)
        flags |= bad.long().numpy() * int(Flag.MISFIT)
    if calibrate_on is not None:
        calibrate_on.update(calibration(posterior, samples, flags, batch["theta"]))
    formed = 10 ** samples[..., THETA.LOGMSTAR].double()
    values = {
        "logmsurv": derived["logmstar_surv"].double(),
        "logsfr": torch.log10(derived["sfr_100myr"].double().clamp_min(1e-30)),
        "tmw": derived["t_mw_gyr"].double(),
        "frac100": derived["sfr_100myr"].double() * 1e8 / formed,
    }
    q = torch.tensor([0.16, 0.5, 0.84], dtype=torch.float64)
    out = {k: torch.nanquantile(v, q, dim=0).numpy() for k, v in values.items()}
    out["sample_seconds"] = seconds
    return out, flags


def evaluate(q: dict, flags: np.ndarray, truth: dict) -> dict:
    """Every metric of one set (module docstring)."""
    fatal = (flags & int(FATAL)) > 0
    use = ~fatal
    sf = truth["sfr_100myr"] / 10 ** truth["logmsurv"] > SSFR_SF
    res: dict = {"n": int(len(flags)), "n_fatal": int(fatal.sum()), "n_star_forming": int(sf.sum())}
    for key, sel in (("logmsurv", use), ("logsfr", use & sf), ("tmw", use)):
        p16, p50, p84 = (v[sel] for v in q[key])
        res[key] = stats(p50, p16, p84, truth[key][sel])
    res["flagged_frac"] = float(np.mean(flags != 0))
    res["flagged_by_name"] = {f.name: float(np.mean((flags & f.value) > 0)) for f in Flag
                              if np.any((flags & f.value) > 0)}  # fmt: skip
    quiet = use & (truth["frac100"] < 0.01)
    spurious = quiet & (q["frac100"][1] > 0.1)
    res["n_truth_no_recent_sf"] = int(quiet.sum())
    res["spurious_burst_frac"] = float(spurious.sum() / max(1, quiet.sum()))
    return res


def offmodel_set(path: Path, n: int, seed: int) -> tuple[dict, dict, dict]:
    """The off-model batch (noise seed 0), its truths and its labels."""
    from sedvae.catalog.sources import MockSource
    from sedvae.offmodel import DUST_LAWS, SFH_FAMILIES, write_offmodel

    if not path.is_file():
        t0 = time.perf_counter()
        write_offmodel(path, n=n, seed=seed, progress=True)
        print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")
    batch = MockSource(path, n=n, seed=seed, noise_seed=0)(0, n)
    with h5py.File(path, "r") as f:
        t = {k: f["offmodel"][k][()] for k in f["offmodel"]}
    truth = {
        "logmsurv": t["logmstar_surv"],
        "sfr_100myr": t["sfr_100myr"],
        "logsfr": np.log10(np.maximum(t["sfr_100myr"], 1e-30)),
        "tmw": t["t_mw_gyr"],
        "frac100": t["frac_100myr"],
    }
    labels = {
        "sfh": np.array(SFH_FAMILIES)[t["sfh_family"]],
        "dust": np.array(DUST_LAWS)[t["dust_law"]],
        "burst": t["burst"].astype(bool),
        "warp": t["warp"].astype(bool),
        "sky": t["sky"].astype(bool),
    }
    return batch, truth, labels


def inmodel_set(posterior, cache: Path, n: int, seed: int) -> tuple[dict, dict]:
    batch = test_batch(cache / "mocks", n, seed)
    theta = batch["theta"].double()
    d = posterior.derived(theta[None], batch["z"].double())
    truth = {
        "logmsurv": d["logmstar_surv"][0].numpy(),
        "sfr_100myr": d["sfr_100myr"][0].numpy(),
        "logsfr": torch.log10(d["sfr_100myr"][0].clamp_min(1e-30)).numpy(),
        "tmw": d["t_mw_gyr"][0].numpy(),
        "frac100": (d["sfr_100myr"][0] * 1e8 / 10 ** theta[:, THETA.LOGMSTAR]).numpy(),
    }
    return batch, truth


def by_label(q: dict, flags: np.ndarray, truth: dict, labels: dict) -> dict:
    """Surviving-mass and t_MW metrics per SFH family, dust law and systematic."""
    ok = (flags & int(FATAL)) == 0
    out = {}
    groups = {f"sfh={v}": labels["sfh"] == v for v in np.unique(labels["sfh"])}
    groups.update({f"dust={v}": labels["dust"] == v for v in np.unique(labels["dust"])})
    for key in ("burst", "warp", "sky"):
        groups[f"{key}=yes"], groups[f"{key}=no"] = labels[key], ~labels[key]
    for name, sel in groups.items():
        s = ok & sel
        out[name] = {}
        for key in ("logmsurv", "tmw"):
            p16, p50, p84 = (v[s] for v in q[key])
            r = stats(p50, p16, p84, truth[key][s])
            out[name][key] = {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
    return out


def run_head(posterior, sets: dict, n_samples: int, n_ppc: int, ppc_galaxies: int):
    """Every metric of one head on the off-model and in-model sets, and its summary keys."""
    (batch, truth, labels), (batch_in, truth_in) = sets["off"], sets["in"]
    q_off, flags_off = quantities(posterior, batch, n_samples, n_ppc, ppc_galaxies)
    t_off = q_off.pop("sample_seconds")
    off = evaluate(q_off, flags_off, truth)
    off["by_label"] = by_label(q_off, flags_off, truth, labels)
    cal: dict = {}
    q_in, flags_in = quantities(posterior, batch_in, n_samples, n_ppc, ppc_galaxies, cal)
    q_in.pop("sample_seconds")
    inm = evaluate(q_in, flags_in, truth_in)
    inm["calibration"] = cal
    frac = {f"{k}_ood_frac": v["flagged_by_name"].get("OOD", 0.0)
            for k, v in (("offmodel", off), ("inmodel", inm))}  # fmt: skip
    if n_ppc and ppc_galaxies:  # MISFIT: over the galaxies checked
        for k, f in (("offmodel", flags_off), ("inmodel", flags_in)):
            frac[f"{k}_misfit_frac"] = float(np.mean((f[:ppc_galaxies] & int(Flag.MISFIT)) > 0))
    summary = {
        "offmodel_sample_s_per_galaxy": round(t_off / len(flags_off), 4),
        "offmodel_logmsurv_bias": off["logmsurv"]["bias"],
        "offmodel_logmsurv_scatter": off["logmsurv"]["scatter"],
        "offmodel_logmsurv_nmad": off["logmsurv"]["nmad"],
        "offmodel_logmsurv_cov68": off["logmsurv"]["cov68"],
        "offmodel_logsfr_bias": off["logsfr"]["bias"],
        "offmodel_logsfr_nmad": off["logsfr"]["nmad"],
        "offmodel_logsfr_cov68": off["logsfr"]["cov68"],
        "offmodel_tmw_bias": off["tmw"]["bias"],
        "offmodel_tmw_cov68": off["tmw"]["cov68"],
        "offmodel_spurious_burst_frac": off["spurious_burst_frac"],
        "offmodel_flagged_frac": off["flagged_frac"],
        "inmodel_logmsurv_bias": inm["logmsurv"]["bias"],
        "inmodel_logmsurv_nmad": inm["logmsurv"]["nmad"],
        "inmodel_logmsurv_cov68": inm["logmsurv"]["cov68"],
        "inmodel_logsfr_bias": inm["logsfr"]["bias"],
        "inmodel_tmw_bias": inm["tmw"]["bias"],
        "inmodel_spurious_burst_frac": inm["spurious_burst_frac"],
        "inmodel_flagged_frac": inm["flagged_frac"],
        "inmodel_tarp_max_dev": cal["tarp_max_dev"],
        "inmodel_sbc_min_ks_p": cal["sbc_min_ks_p"],
        "inmodel_logmstar_scatter": cal["logmstar_scatter"],
        **frac,
    }
    # the off-model galaxies the OOD flag keeps: is the posterior better where it is quiet?
    ood = (flags_off & int(Flag.OOD)) > 0
    if ood.any() and (~ood).any():
        kept = evaluate({k: v[:, ~ood] for k, v in q_off.items()}, flags_off[~ood],
                        {k: v[~ood] for k, v in truth.items()})  # fmt: skip
        off["not_ood"] = {k: kept[k] for k in ("n", "logmsurv", "logsfr", "tmw")}
        summary["offmodel_not_ood_logmsurv_bias"] = kept["logmsurv"]["bias"]
        summary["offmodel_not_ood_logmsurv_cov68"] = kept["logmsurv"]["cov68"]
    return {"offmodel": off, "inmodel": inm}, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300, help="off-model galaxies")
    parser.add_argument("--seed", type=int, default=1, help="off-model set seed")
    parser.add_argument("--n-in", type=int, default=300, help="in-model held-out mocks")
    parser.add_argument("--in-seed", type=int, default=11, help="the data module's base seed")
    parser.add_argument("--n-samples", type=int, default=500)
    parser.add_argument("--ppc-draws", type=int, default=16,
                        help="posterior-predictive draws for MISFIT (0: skip the check)")
    parser.add_argument("--ppc-galaxies", type=int, default=100,
                        help="the first galaxies of each set checked for MISFIT (~1 s each)")
    parser.add_argument("--checkpoint", default=str(REPO / "data/posterior/posterior.pt"),
                        help="the baseline head (keys prefixed baseline_)")
    parser.add_argument("--new-checkpoint", default=None,
                        help="the head trained on the generative model (unprefixed keys)")
    parser.add_argument("--cache", default=str(REPO / "cache"))
    parser.add_argument("--offmodel-file", default=None, help="default: in --cache")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = Path(args.cache)
    off_path = Path(args.offmodel_file or cache / f"offmodel/offmodel_n{args.n}_seed{args.seed}.h5")
    heads = {"baseline_": load_posterior(args.checkpoint)}
    if args.new_checkpoint:
        heads[""] = load_posterior(args.new_checkpoint)
    base = heads["baseline_"]
    sets = {"off": offmodel_set(off_path, args.n, args.seed),
            "in": inmodel_set(base, cache, args.n_in, args.in_seed)}  # fmt: skip

    full, summary = {}, {"n_offmodel": args.n, "n_inmodel": args.n_in,
                         "n_samples": args.n_samples, "ppc_draws": args.ppc_draws,
                         "ppc_galaxies": args.ppc_galaxies}  # fmt: skip
    for prefix, posterior in heads.items():
        res, keys = run_head(posterior, sets, args.n_samples, args.ppc_draws, args.ppc_galaxies)
        res["has_ood_model"] = posterior.ood is not None
        full[prefix or "new"] = res
        summary.update({prefix + k: v for k, v in keys.items()})
    print(json.dumps(full, indent=1))
    summary = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
