"""How the posterior head behaves on galaxies its simulator did not make (issue 26, item 5).

    python bench/off_model.py [--n 300] [--seed 1] [--n-in 300] [--n-samples 500]
                              [--checkpoint data/posterior/posterior.pt] [--cache cache]

Two sets, both DESI-like (the bundled coadd's resolution and ivar shape, BGS-like S/N,
Legacy Surveys north photometry, a fibre aperture on the spectrum):

- off-model: ``python -m sedvae.offmodel`` (bagpipes' own model: delayed/exponential/lognormal/
  double-power-law SFHs with bursts on 30 %, Calzetti/Cardelli/SMC dust, bagpipes' nebular
  model, veldisp 50-300 km/s; calibration warps on a third, sky residuals on 10 %), read by
  ``MockSource`` with noise seed 0; written to ``<cache>/offmodel/offmodel_n<n>_seed<seed>.h5``
  when missing;
- in-model: held-out mocks of sedvae's own simulator (``bench/common.test_batch``: the test
  seed of the posterior's data module, prior draws never used in training).

The head is the shipped one (the baseline: trained on SPS mocks only). Per set, from
``--n-samples`` posterior samples per galaxy and ``Posterior.derived``:

- surviving mass (log10 M_sun), log SFR over 100 Myr for star-forming galaxies (true sSFR over
  100 Myr > 1e-11 / yr, by surviving mass) and the formed-mass-weighted age t_MW (Gyr): bias
  (median of posterior median - truth), scatter (standard deviation of that error), NMAD
  (1.4826 median |error - median error|) and the 68 % coverage (truth inside the 16-84 %
  interval); galaxies with a FATAL flag are left out;
- the flagged fraction (any flag bit, FATAL or warning, PRIOR_EDGE included, as the catalog's
  ``flags`` column) and the fraction per flag name;
- spurious young bursts: among galaxies whose true fraction of formed mass made in the last
  100 Myr is < 1 %, the fraction whose posterior median of that fraction is > 10 %;
- off-model only: the surviving-mass and t_MW metrics per SFH family, dust law, and with/without
  a burst, a warp or sky residuals.

The truths of the off-model set are bagpipes' (surviving mass is its ``sfh.stellar_mass``); its
ages are in bagpipes' cosmology, its distances are Planck18 (see ``sedvae/offmodel.py``).
Last line: JSON with the ``baseline_`` keys of issue 26.
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


def quantities(posterior, batch: dict, n_samples: int) -> tuple[dict, np.ndarray]:
    """Posterior 16/50/84 % of the benchmarked quantities (each (B,)) and the flags (B,)."""
    gen = torch.Generator().manual_seed(0)
    samples, flags = posterior.sample(batch, n_samples, gen, return_flags=True)
    derived = posterior.derived(samples, batch["z"])
    flags = flags.long() | posterior.prior_edge(samples, derived).long() * int(Flag.PRIOR_EDGE)
    formed = 10 ** samples[..., THETA.LOGMSTAR].double()
    values = {
        "logmsurv": derived["logmstar_surv"].double(),
        "logsfr": torch.log10(derived["sfr_100myr"].double().clamp_min(1e-30)),
        "tmw": derived["t_mw_gyr"].double(),
        "frac100": derived["sfr_100myr"].double() * 1e8 / formed,
    }
    q = torch.tensor([0.16, 0.5, 0.84], dtype=torch.float64)
    out = {k: torch.nanquantile(v, q, dim=0).numpy() for k, v in values.items()}
    return out, flags.numpy()


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
    return {k: v for k, v in batch.items() if k != "theta"}, truth


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300, help="off-model galaxies")
    parser.add_argument("--seed", type=int, default=1, help="off-model set seed")
    parser.add_argument("--n-in", type=int, default=300, help="in-model held-out mocks")
    parser.add_argument("--in-seed", type=int, default=11, help="the data module's base seed")
    parser.add_argument("--n-samples", type=int, default=500)
    parser.add_argument("--checkpoint", default=str(REPO / "data/posterior/posterior.pt"))
    parser.add_argument("--cache", default=str(REPO / "cache"))
    parser.add_argument("--offmodel-file", default=None, help="default: in --cache")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = Path(args.cache)
    off_path = Path(args.offmodel_file or cache / f"offmodel/offmodel_n{args.n}_seed{args.seed}.h5")
    posterior = load_posterior(args.checkpoint)

    batch, truth, labels = offmodel_set(off_path, args.n, args.seed)
    t0 = time.perf_counter()
    q_off, flags_off = quantities(posterior, batch, args.n_samples)
    t_off = time.perf_counter() - t0
    off = evaluate(q_off, flags_off, truth)
    off["by_label"] = by_label(q_off, flags_off, truth, labels)

    batch_in, truth_in = inmodel_set(posterior, cache, args.n_in, args.in_seed)
    q_in, flags_in = quantities(posterior, batch_in, args.n_samples)
    inm = evaluate(q_in, flags_in, truth_in)

    print(json.dumps({"offmodel": off, "inmodel": inm}, indent=1))
    summary = {
        "n_offmodel": args.n, "n_inmodel": args.n_in, "n_samples": args.n_samples,
        "offmodel_sample_s_per_galaxy": round(t_off / args.n, 4),
        "baseline_offmodel_logmsurv_bias": off["logmsurv"]["bias"],
        "baseline_offmodel_logmsurv_scatter": off["logmsurv"]["scatter"],
        "baseline_offmodel_logmsurv_nmad": off["logmsurv"]["nmad"],
        "baseline_offmodel_logmsurv_cov68": off["logmsurv"]["cov68"],
        "baseline_offmodel_logsfr_bias": off["logsfr"]["bias"],
        "baseline_offmodel_logsfr_nmad": off["logsfr"]["nmad"],
        "baseline_offmodel_logsfr_cov68": off["logsfr"]["cov68"],
        "baseline_offmodel_tmw_bias": off["tmw"]["bias"],
        "baseline_offmodel_tmw_cov68": off["tmw"]["cov68"],
        "baseline_offmodel_spurious_burst_frac": off["spurious_burst_frac"],
        "baseline_offmodel_flagged_frac": off["flagged_frac"],
        "baseline_inmodel_logmsurv_bias": inm["logmsurv"]["bias"],
        "baseline_inmodel_logmsurv_nmad": inm["logmsurv"]["nmad"],
        "baseline_inmodel_logmsurv_cov68": inm["logmsurv"]["cov68"],
        "baseline_inmodel_logsfr_bias": inm["logsfr"]["bias"],
        "baseline_inmodel_tmw_bias": inm["tmw"]["bias"],
        "baseline_inmodel_spurious_burst_frac": inm["spurious_burst_frac"],
        "baseline_inmodel_flagged_frac": inm["flagged_frac"],
    }  # fmt: skip
    summary = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
