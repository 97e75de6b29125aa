"""How far is the SBI head from the exact posterior? MCMC of the simulator itself on held-out
mocks, side by side with the flow, galaxy by galaxy.

    python -m studies.posterior_exact [--checkpoint data/posterior/posterior.pt] [--n-galaxies 64]
                                      [--start 0] [--out outputs/bench_posterior_exact]
                                      [--sampler mcmc|nested]

For each of the first ``--n-galaxies`` mocks of ``bench/posterior.py``'s held-out test set
(prior draws with nebular emission, the DESI instrument and BGS-like noise), the exact
posterior p(theta, logU, sigma_v | spectrum, photometry, z) under the model that made the mock
(the real BC03/MILES + Cloudy simulator, the DESI resolution, the Legacy Surveys filters, the
Gaussian noise with the given ivar, the fibre-aperture factor marginalised) is sampled with
``studies.exact.exact_posterior``: Levenberg-Marquardt MAPs started from the flow's
three best samples, then emcee (56 walkers x 300 steps from their Laplace approximations, the
first 150 discarded). The flow's posterior is 1000 samples of ``Posterior.sample`` of
``--checkpoint``, drawn when the summary is made (the exact posteriors do not depend on the
checkpoint beyond their starting points, so one results file serves every checkpoint).

A Levenberg-Marquardt fit started at the truth (true theta, logU, sigma_v) finds the mode the
truth lies in; when it fits as well as the MCMC's best fit (|chi^2 difference| < 9) but lies
more than 0.2 dex from the MCMC's logM* median, the galaxy counts in ``n_degenerate_modes``:
the data cannot tell the two masses apart. Those fits go to ``<out>/truth_fits.jsonl``.

Reported for both, against the truth: logM* (formed), surviving mass and Z_MW medians (bias,
scatter, NMAD), median posterior sigma, the fraction of truths inside the central 68 %
interval, logM* by true sSFR; the simulations and seconds per galaxy of each. The MCMC's
medians use nothing but the data and the true model, so their scatter bounds from above what
the data allow for the recovery goals of ``bench/posterior.py``; the flow's excess over it is
an amortisation gap. (The MCMC can stay in one of several modes, so its own intervals may be
too narrow: see its 68 % coverage and ``n_degenerate_modes``.)

``--sampler nested`` checks the MCMC with nested sampling from the prior alone
(``studies.exact.nested_posterior``, nautilus: no flow, no local fits, so separated
modes and long tails are found), into ``<out>/nested.jsonl``; the summary's ``nested`` entry
sets flow, MCMC and nested sampling side by side on the galaxies that have all three
(30,000-70,000 simulations, 5-15 min per galaxy on one core). Its RMS posterior sigma, sqrt(mean
sigma^2), is the Bayes risk of the posterior mean: the smallest RMS error any estimator of these
galaxies can reach in expectation (``logmstar_bayes_risk_rms``, with a bootstrap over galaxies,
beside the flow's RMS error on the same galaxies). sigma is half the 16-84 % width, which for a
multimodal posterior can be far below its standard deviation; records written since the mean and
standard deviation were added give the latter (``logmstar_nested_sd``). The exact posterior's
own medians against the truth (``nested_rms_error``) match the Bayes risk in expectation where
its intervals are right. Weighted by each sSFR bin's share of the held-out set, the bins give
whole-prior figures (``logmstar_prior_weighted``), so galaxies may be run bin by bin; its
``nested_rms_error_ratio_estimate`` scales each bin's exact-to-flow error ratio on the galaxies
run by the flow's error over the whole held-out set (the few galaxies run may be easier or
harder than their bin). ``--n-live N`` reruns nested sampling with N live points into
``<out>/nested_live<N>.jsonl``; the summary's ``nested_live<N>`` entry sets it beside the
default run (500 live points) on the galaxies that have both, with the log evidence gained, and
the ``nested`` entry uses each galaxy's run with the most live points (``n_more_live``).

Per-galaxy results are appended to ``<out>/galaxies.jsonl`` as they finish (one complete
line each), so an interrupted run resumes where it stopped and several ``--start`` shards
can run side by side; the summary uses every galaxy in the file. ~70 s per galaxy on one
core. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bench.common import test_batch
from sedvae.posterior import load_posterior
from sedvae.posterior.diagnostics import recovery
from sedvae.sps import THETA
from studies.common import OBS_KEYS, QUANTITIES, SSFR_BINS, read_records, rms

REPO = Path(__file__).resolve().parents[1]
N_LIVE = 500  # nested sampling's live points (nested.jsonl); other values: nested_live<N>.jsonl


def summaries(post, theta: torch.Tensor, z: torch.Tensor) -> dict[str, list[float]]:
    """16/50/84 % of logM*, log surviving mass and log Z_MW of samples theta (n, 12)."""
    d = post.derived(theta.float()[:, None], z)
    values = {
        "logmstar": theta[:, THETA.LOGMSTAR].double(),
        "logmstar_surv": d["logmstar_surv"][:, 0].double(),
        "log_zmw": torch.log10(d["z_mw"][:, 0]).double(),
    }
    q = torch.tensor([0.16, 0.5, 0.84], dtype=torch.float64)
    out = {k: [round(float(x), 5) for x in torch.quantile(v, q)] for k, v in values.items()}
    # mean and standard deviation too: for a multimodal posterior the 16-84 % half-width can be
    # far below the standard deviation, and the Bayes risk of the mean is the latter
    m = values["logmstar"]
    out["logmstar_mean_sd"] = [round(float(m.mean()), 5), round(float(m.std()), 5)]
    return out


def append_line(path: Path, record: dict) -> None:
    """One complete line per galaxy, flushed to disk before the next one starts."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def method_columns(records: list[dict], method: str, quantities=QUANTITIES) -> dict:
    """Recovery (median bias, scatter, NMAD) and calibration of one method's posteriors:
    median and RMS posterior sigma (half the 16-84 % width; the RMS is the Bayes risk of the
    posterior mean, so for exact posteriors sqrt(mean sigma^2) is the smallest RMS error any
    estimator can reach in expectation) and the fraction of truths inside the 68 % interval."""
    out = {}
    for q in quantities:
        lo, med, hi = (torch.tensor([r[method][q][j] for r in records]) for j in range(3))
        truth = torch.tensor([r["truth"][q] for r in records])
        rec = recovery(med, truth)
        key = f"{q}_{method}"
        sigma = 0.5 * (hi - lo)
        out[f"{key}_bias"] = rec["bias"]
        out[f"{key}_scatter"] = rec["scatter"]
        out[f"{key}_nmad"] = rec["nmad"]
        out[f"{key}_post_sigma"] = float(sigma.median())
        out[f"{key}_rms_sigma"] = float(sigma.double().pow(2).mean().sqrt())
        out[f"{key}_coverage68"] = float(((truth >= lo) & (truth <= hi)).double().mean())
    return out


def summarise_nested(
    records: list[dict],
    nested: list[dict],
    shares: dict[str, float] | None = None,
    flow_all: dict[str, float] | None = None,
) -> dict:
    """flow, MCMC and nested sampling side by side on the galaxies that have all three.

    ``shares``: each sSFR bin's fraction of the held-out set (a prior draw), to weight the
    bins' mean squares into whole-prior figures (the galaxies run may over-sample a bin).
    ``flow_all``: the flow's RMS logM* error in each bin over the whole held-out set, for a
    ratio estimate of the exact posterior's error there: the few galaxies run may be easier or
    harder than their bin, and the flow's error on them measures by how much."""
    by_index = {r["index"]: r for r in records}
    both = []
    for n in nested:
        if n["index"] in by_index:
            both.append({**by_index[n["index"]], "nested": n["nested"]})
    out: dict = {"n_galaxies": len(both)}
    if not both:
        return out
    for method in ("flow", "exact", "nested"):
        out.update(method_columns(both, method, ("logmstar", "logmstar_surv")))
    # the Bayes risk of logM*: nested sampling's RMS posterior sigma over these galaxies, with
    # a bootstrap over galaxies (16-84 %), beside the flow's RMS error on the same galaxies
    sigma = np.array([0.5 * (r["nested"]["logmstar"][2] - r["nested"]["logmstar"][0])
                      for r in both])  # fmt: skip
    err = np.array([r["flow"]["logmstar"][1] - r["truth"]["logmstar"] for r in both])
    err_nested = np.array([r["nested"]["logmstar"][1] - r["truth"]["logmstar"] for r in both])

    boot = np.random.default_rng(0).integers(0, len(both), (2000, len(both)))
    risk = rms(sigma[boot], 1)
    out["logmstar_bayes_risk_rms"] = out["logmstar_nested_rms_sigma"]  # the same figure
    out["logmstar_bayes_risk_rms_16_84"] = [round(float(q), 4) for q in
                                            np.quantile(risk, [0.16, 0.84])]  # fmt: skip
    out["logmstar_flow_rms_error"] = float(rms(err))
    out["logmstar_flow_rms_error_over_bayes_risk"] = out["logmstar_flow_rms_error"] / max(
        out["logmstar_bayes_risk_rms"], 1e-12
    )
    # the same by true sSFR: the bins' Bayes risks, weighted by their share of the prior, give
    # the whole prior's (the first galaxies hold few of the bursty ones that dominate it)
    by_bin = {}
    log_ssfr = np.array([r["truth"]["log_ssfr"] for r in both])
    for name, lo, hi in SSFR_BINS:
        sel = (log_ssfr >= lo) & (log_ssfr < hi)
        if sel.any():
            by_bin[name] = {
                "n": int(sel.sum()),
                "bayes_risk_rms": round(float(rms(sigma[sel])), 4),
                "flow_rms_error": round(float(rms(err[sel])), 4),
                # the exact posterior's own medians against the truth: equal to the Bayes risk
                # in expectation if its intervals are right, above it where they are too narrow
                "nested_rms_error": round(float(rms(err_nested[sel])), 4),
            }
    out["logmstar_by_log_ssfr"] = by_bin
    if shares and set(by_bin) == {name for name, _, _ in SSFR_BINS}:
        total = sum(shares[name] for name in by_bin)
        out["logmstar_prior_weighted"] = {
            key: round(math.sqrt(sum(shares[b] * by_bin[b][key] ** 2 for b in by_bin) / total), 4)
            for key in ("bayes_risk_rms", "nested_rms_error", "flow_rms_error")
        }
        out["log_ssfr_bin_shares"] = {b: round(shares[b], 4) for b in by_bin}
        if flow_all:
            ratio_sq = {b: (by_bin[b]["nested_rms_error"] / by_bin[b]["flow_rms_error"]) ** 2
                        for b in by_bin}  # fmt: skip
            out["logmstar_prior_weighted"]["flow_rms_error_all"] = round(
                math.sqrt(sum(shares[b] * flow_all[b] ** 2 for b in by_bin) / total), 4
            )
            out["logmstar_prior_weighted"]["nested_rms_error_ratio_estimate"] = round(
                math.sqrt(sum(shares[b] * ratio_sq[b] * flow_all[b] ** 2 for b in by_bin) / total),
                4,
            )
    # where the records have it (runs since the field was added): the RMS posterior standard
    # deviation, the Bayes risk itself, beside the RMS half-width on the same galaxies
    has_sd = np.array(["logmstar_mean_sd" in r["nested"] for r in both])
    if has_sd.any():
        sd = np.array([r["nested"].get("logmstar_mean_sd", [0.0, 0.0])[1] for r in both])
        out["logmstar_nested_sd"] = {
            "n": int(has_sd.sum()),
            "rms_sd": round(float(rms(sd[has_sd])), 4),
            "rms_half_width": round(float(rms(sigma[has_sd])), 4),
        }
    shift = [abs(r["exact"]["logmstar"][1] - r["nested"]["logmstar"][1]) for r in both]
    out["logmstar_mcmc_minus_nested_median_abs"] = float(np.median(shift))
    out["logmstar_mcmc_minus_nested_max_abs"] = float(np.max(shift))
    out["s_per_galaxy"] = float(np.mean([n["nested_s"] for n in nested]))
    out["sims_per_galaxy"] = float(np.mean([n["n_sims"] for n in nested]))
    for key, value in out.items():
        if isinstance(value, float):
            out[key] = round(value, 4)
    return out


def compare_live(nested: list[dict], other: list[dict], truth: dict[int, float]) -> dict:
    """Nested sampling with more live points against the default run, on the galaxies that
    have both (logM* 16/50/84 % of each, and the truth): if the default's intervals are right,
    more live points move nothing."""
    by_index = {n["index"]: n for n in nested}
    pairs = [(by_index[o["index"]], o) for o in other if o["index"] in by_index]
    out: dict = {"n_galaxies": len(pairs), "indices": [o["index"] for _, o in pairs]}
    if not pairs:
        return out
    out["logmstar_truth"] = [round(truth[o["index"]], 4) for _, o in pairs]
    t = np.array(out["logmstar_truth"])
    for label, run in (("default", 0), ("more_live", 1)):
        q = np.array([p[run]["nested"]["logmstar"] for p in pairs])
        out[f"logmstar_{label}"] = [[round(float(v), 4) for v in row] for row in q]
        out[f"logmstar_{label}_rms_sigma"] = round(float(rms(0.5 * (q[:, 2] - q[:, 0]))), 4)
        out[f"{label}_sims_per_galaxy"] = float(np.mean([p[run]["n_sims"] for p in pairs]))
        out[f"{label}_s_per_galaxy"] = round(float(np.mean([p[run]["nested_s"] for p in pairs])), 1)
        out[f"logmstar_{label}_coverage68"] = round(
            float(((t >= q[:, 0]) & (t <= q[:, 2])).mean()), 4
        )
    shift = [abs(a["nested"]["logmstar"][1] - b["nested"]["logmstar"][1]) for a, b in pairs]
    out["logmstar_median_shift_max_abs"] = round(float(np.max(shift)), 4)
    # log evidence gained with more live points: a few nats or more means the default run
    # missed posterior mass (a mode), not that it drew a different sample of the same one
    out["log_z_more_minus_default"] = [round(b["log_z"] - a["log_z"], 2) for a, b in pairs]
    return out


def summarise(records: list[dict]) -> dict:
    """Recovery and calibration of flow vs exact posterior over the galaxies in the file."""
    out: dict = {"n_galaxies": len(records)}
    for method in ("flow", "exact"):
        out.update(method_columns(records, method))
    for q in QUANTITIES:
        out[f"{q}_scatter_ratio_flow_over_exact"] = out[f"{q}_flow_scatter"] / max(
            out[f"{q}_exact_scatter"], 1e-12
        )
    log_ssfr = np.array([r["truth"]["log_ssfr"] for r in records])
    by_ssfr = {}
    for label, lo, hi in SSFR_BINS:
        sel = [r for r, s in zip(records, log_ssfr, strict=True) if lo <= s < hi]
        entry: dict = {"n": len(sel)}
        if sel:
            truth = torch.tensor([r["truth"]["logmstar"] for r in sel])
            for method in ("flow", "exact"):
                med = torch.tensor([r[method]["logmstar"][1] for r in sel])
                rec = recovery(med, truth)
                entry[f"{method}_bias"] = round(rec["bias"], 4)
                entry[f"{method}_scatter"] = round(rec["scatter"], 4)
        by_ssfr[label] = entry
    out["logmstar_by_log_ssfr"] = by_ssfr
    out["exact_s_per_galaxy"] = float(np.mean([r["exact_s"] for r in records]))
    out["exact_sims_per_galaxy"] = float(np.mean([r["n_sims"] for r in records]))
    out["flow_s_per_galaxy"] = float(np.mean([r["flow_s"] for r in records]))
    out["cost_ratio_exact_over_flow"] = out["exact_s_per_galaxy"] / out["flow_s_per_galaxy"]
    # degenerate modes: the truth's own mode fits within chi^2 9 of the MCMC's best fit but
    # lies > 0.2 dex from the MCMC's logM* median
    with_fit = [r for r in records if "truth_fit" in r]
    dchi2 = np.array([r["truth_fit"]["chi2"] - r["rchi2"] * r["npix"] for r in with_fit])
    dlogm = np.array([r["truth_fit"]["logmstar"] - r["exact"]["logmstar"][1] for r in with_fit])
    out["n_truth_fits"] = len(with_fit)
    out["n_degenerate_modes"] = int(((np.abs(dchi2) < 9) & (np.abs(dlogm) > 0.2)).sum())
    out["truth_fit_dchi2_median"] = float(np.median(dchi2)) if len(with_fit) else float("nan")
    n_eff = np.array([r["n_eff"] for r in records], dtype=float)
    out["exact_n_eff_median"] = float(np.nanmedian(n_eff))
    # NaN: some walker never moved in some parameter (emcee's autocorrelation is undefined)
    out["exact_n_stuck_walker_galaxies"] = int(np.isnan(n_eff).sum())
    out["exact_acceptance_median"] = float(np.median([r["acceptance"] for r in records]))
    out["laplace_rchi2_median"] = float(np.median([r["rchi2"] for r in records]))
    return out


def run_nested(
    path: Path, i: int, post, likelihood, obs: dict, nested_posterior, n_live: int = N_LIVE
) -> None:
    """Nested sampling of galaxy i, one line appended to ``path`` (an error line if it fails)."""
    t0 = time.perf_counter()
    try:
        res = nested_posterior(post.prior, likelihood, obs, n_live=n_live, seed=i)
    except (ValueError, RuntimeError) as err:
        append_line(path, {"index": i, "error": str(err)})
        print(f"galaxy {i}: skipped ({err})", flush=True)
        return
    record = {
        "index": i,
        "nested": summaries(post, res.theta, obs["z"].reshape(1)),
        "log_z": round(res.log_z, 3),
        "n_eff": round(res.n_eff, 1),
        "n_sims": res.n_sims,
        "n_live": int(n_live),
        "nested_s": round(time.perf_counter() - t0, 2),
    }
    append_line(path, record)
    print(f"galaxy {i}: nested {record['nested']['logmstar']} ({record['nested_s']:.0f} s)",
          flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(REPO / "data/posterior/posterior.pt"))
    parser.add_argument("--cache", default=str(REPO / "cache/mocks"))
    parser.add_argument(
        "--n-test", type=int, default=5000,
        help="held-out file, as bench/posterior.py's (the 2,000- and 5,000-galaxy files hold the "
        "same first 1,792 galaxies and noise: both are written in seeded chunks)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=11, help="the data module's base seed")
    parser.add_argument("--n-galaxies", type=int, default=64)
    parser.add_argument("--start", type=int, default=0, help="first galaxy of this shard")
    parser.add_argument(
        "--indices", default="",
        help="comma-separated galaxies to run instead of --start/--n-galaxies (e.g. more of one "
        "sSFR bin: the summaries' by-sSFR figures stay unbiased, the overall ones do not)",
    )  # fmt: skip
    parser.add_argument("--n-samples", type=int, default=1000, help="flow samples per galaxy")
    parser.add_argument("--out", default=str(REPO / "outputs/bench_posterior_exact"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--sampler", choices=("mcmc", "nested"), default="mcmc",
        help="nested: nested sampling from the prior (nautilus) into <out>/nested.jsonl, a "
        "check of the MCMC's intervals on the galaxies that have both (~5x its time)",
    )  # fmt: skip
    parser.add_argument(
        "--n-live", type=int, default=N_LIVE,
        help=f"nested sampling's live points; other than {N_LIVE} into <out>/nested_live<N>.jsonl, "
        "compared with the default run on the galaxies that have both (time ~ n_live)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.ERROR)  # emcee's autocorrelation-length warnings
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="emcee")

    from sedvae.simulation import MockGenerator
    from studies.exact import (
        JointCoordinates,
        MockLikelihood,
        exact_posterior,
        laplace_fit,
        nested_posterior,
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "galaxies.jsonl"
    truth_fits = out / "truth_fits.jsonl"
    nested_path = out / "nested.jsonl"
    run_path = nested_path if args.n_live == N_LIVE else out / f"nested_live{args.n_live}.jsonl"
    post = load_posterior(args.checkpoint)
    batch = test_batch(Path(args.cache), args.n_test, args.seed)
    likelihood = MockLikelihood(MockGenerator())
    truth_theta = batch["theta"].double()
    d_true = post.derived(truth_theta.float()[None], batch["z"])
    done = {r["index"] for r in read_records(results)}
    fits_done = {r["index"] for r in read_records(truth_fits)}
    nested_done = {r["index"] for r in read_records(run_path)}
    coords = JointCoordinates(post.prior, likelihood.generator.logu_range,
                              likelihood.generator.sigma_v_range)  # fmt: skip
    stop = min(args.start + args.n_galaxies, batch["z"].shape[0])
    todo = range(args.start, stop)
    if args.indices:
        todo = [int(i) for i in args.indices.split(",")]
        bad = [i for i in todo if not 0 <= i < batch["z"].shape[0]]
        if bad:
            raise SystemExit(f"--indices {bad} outside the {batch['z'].shape[0]} test galaxies")
    for i in todo:
        obs = {k: batch[k][i] for k in OBS_KEYS}
        if args.sampler == "nested":
            if i not in nested_done:
                run_nested(run_path, i, post, likelihood, obs, nested_posterior, args.n_live)
            continue
        if i not in fits_done:
            # the MAP of the mode the truth lies in (fit started at the true theta, logU,
            # sigma_v): if it fits as well as the MCMC's mode but sits far from it, the data
            # cannot tell the two apart (a degenerate second mode)
            v_true = coords.to_v(truth_theta[i : i + 1], batch["logU"][i : i + 1],
                                 batch["sigma_v"][i : i + 1])[0]  # fmt: skip
            fit = laplace_fit(likelihood, coords, obs, float(batch["z"][i]), v_true)
            theta_fit = coords.split(fit.v[None])[0][0]
            append_line(truth_fits, {"index": i, "logmstar": float(theta_fit[0]),
                                     "chi2": round(fit.chi2, 2)})  # fmt: skip
        if i in done:
            continue
        t0 = time.perf_counter()
        try:
            exact = exact_posterior(post, likelihood, obs, seed=i)
        except (ValueError, RuntimeError) as err:  # flagged input, failed fit: note, go on
            append_line(results, {"index": i, "error": str(err)})
            print(f"galaxy {i}: skipped ({err})", flush=True)
            continue
        exact_s = time.perf_counter() - t0
        surv = float(d_true["logmstar_surv"][0, i])
        record = {
            "index": i,
            "truth": {
                "logmstar": float(truth_theta[i, THETA.LOGMSTAR]),
                "logmstar_surv": surv,
                "log_zmw": float(torch.log10(d_true["z_mw"][0, i])),
                "log_ssfr": float(torch.log10(d_true["sfr_100myr"][0, i].clamp_min(1e-30))) - surv,
            },
            "exact": summaries(post, exact.theta, batch["z"][i : i + 1]),
            "n_eff": round(exact.n_eff, 1),
            "n_fits": exact.n_fits,
            "acceptance": round(exact.acceptance, 3),
            "rchi2": round(exact.laplace.chi2 / float((obs["ivar"] > 0).sum()), 4),
            "n_sims": exact.n_sims,
            "exact_s": round(exact_s, 2),
        }
        append_line(results, record)
        print(f"galaxy {i}: truth {record['truth']['logmstar']:.3f} "
              f"exact {record['exact']['logmstar']} "
              f"({exact_s:.0f} s)", flush=True)  # fmt: skip
    records = sorted({r["index"]: r for r in read_records(results)}.values(),
                     key=lambda r: r["index"])  # fmt: skip
    n_skipped = sum("error" in r for r in records)
    records = [r for r in records if "error" not in r]
    if not records:
        raise SystemExit(f"no galaxies in {results} yet")
    # the flow column is always this checkpoint's (the exact posteriors do not depend on it)
    rows = [r["index"] for r in records]
    sub = {k: batch[k][rows] for k in OBS_KEYS}
    t0 = time.perf_counter()
    flow = post.sample(sub, args.n_samples, torch.Generator().manual_seed(0))
    flow_s = (time.perf_counter() - t0) / len(rows)
    for j, r in enumerate(records):
        r["flow"] = summaries(post, flow[:, j], batch["z"][rows[j] : rows[j] + 1])
        r["flow_s"] = flow_s
    fits = {r["index"]: r for r in read_records(truth_fits)}
    for r in records:
        if r["index"] in fits:
            r["truth_fit"] = fits[r["index"]]
            r["npix"] = int((batch["ivar"][r["index"]] > 0).sum())
    result = summarise(records)
    result["n_skipped"] = n_skipped
    for key, value in result.items():
        if isinstance(value, float):
            result[key] = round(value, 4)
    nested = [r for r in read_records(nested_path) if "error" not in r]
    # per galaxy, the run with the most live points (reruns with more supersede the default)
    live = {path.stem: [r for r in read_records(path) if "error" not in r]
            for path in sorted(out.glob("nested_live*.jsonl"))}  # fmt: skip
    best = {r["index"]: r for r in nested}
    for r in (r for runs in live.values() for r in runs):
        if r["index"] in best and r["n_live"] > best[r["index"]].get("n_live", N_LIVE):
            best[r["index"]] = r
    if nested:
        # the sSFR bins' shares of the whole held-out set, a prior draw
        log_ssfr = (
            torch.log10(d_true["sfr_100myr"][0].clamp_min(1e-30)) - d_true["logmstar_surv"][0]
        )
        shares = {name: float(((log_ssfr >= lo) & (log_ssfr < hi)).double().mean())
                  for name, lo, hi in SSFR_BINS}  # fmt: skip
        # the flow's logM* error per bin over the whole held-out set (200 samples each)
        samples = post.sample({k: batch[k] for k in OBS_KEYS}, 200,
                              torch.Generator().manual_seed(0))  # fmt: skip
        med = samples[..., THETA.LOGMSTAR].double().nanmedian(0).values
        sq_err = (med - truth_theta[:, THETA.LOGMSTAR]) ** 2
        flow_all = {name: float(sq_err[(log_ssfr >= lo) & (log_ssfr < hi)].nanmean().sqrt())
                    for name, lo, hi in SSFR_BINS}  # fmt: skip
        result["nested"] = summarise_nested(records, list(best.values()), shares, flow_all)
        result["nested"]["n_more_live"] = sum(r.get("n_live", N_LIVE) > N_LIVE
                                              for r in best.values())  # fmt: skip
        truth = {i: float(truth_theta[i, THETA.LOGMSTAR]) for i in range(truth_theta.shape[0])}
        for name, other in live.items():
            result[name] = compare_live(nested, other, truth)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
