"""Is the flow's excess error an information gap of its rest-frame binning or an amortisation
gap? Fisher information of held-out mocks on the native pixels and on binned spectra.

    python -m studies.posterior_information [--n-galaxies 1000] [--start 0]
                                            [--bins 256,512,1024,2048]
                                            [--checkpoint data/posterior/posterior.pt]
                                            [--out outputs/bench_posterior_information]

For each of the first ``--n-galaxies`` mocks of ``bench/posterior.py``'s held-out set, the
derivatives of the expected spectrum and photometry with respect to all 14 parameters of the
mock (theta's 11 free coordinates, logU, sigma_v, the fibre-aperture factor), in coordinates
where its prior is N(0, I), are taken by central differences of the simulator at the truth
(28 simulations; ``studies.information``). From them, the Laplace posterior sigma
(Cramer-Rao bound with the prior) of logM* (formed), surviving mass and Z_MW for what each
view of the data holds:

- ``native``: every pixel and the photometry, as the exact posterior
  (``studies/posterior_exact.py``);
- ``bins<N>``: the spectrum binned onto N ln-uniform rest-frame bins over 2200-9900 A the way
  the embedding bins it (ivar-weighted means; the shipped embedding uses 512), and the
  photometry;
- ``spectrum``, ``photometry``: each alone;
- ``summary``: what survives the learned summary the flow conditions on (the embedding's
  64-number context and its logM* anchor; ``--checkpoint``): its linear Fisher information from
  ``--summary-draws`` noise draws (``studies.information.summary_fisher``).

The flow's 16/50/84 % (``--checkpoint``, 1,000 samples) on the same galaxies and noise stand
beside them. Reported: the RMS sigma of each view (``crb_rms``; for native pixels, a local
estimate of the Bayes risk), each view's over the native one (``ratio_vs_native``, and the
median of the per-galaxy ratios, ``median_ratio_vs_native``, which the few broad posteriors
do not dominate), the flow's RMS error and RMS sigma and their ratio to the native bound, the
median per-galaxy ratio of the flow's sigma to the native and the summary bounds, by true sSFR
and by S/N tercile.
So the chain pixels -> bins -> summary -> flow posterior shows where information is lost.
The bound is local: it sees neither a second mode nor the curvature of a wide posterior, so it
understates the Bayes risk where the posterior is broad or multimodal (bursty galaxies); the
ratio between views does not depend on that.

Per-galaxy records are appended to ``<out>/galaxies.jsonl`` as they finish, so a rerun
resumes and shards (``--start``) can run side by side; the summary uses every record. The
bounds are deterministic; the flow's samples are seeded per chunk of 250 galaxies, so other
shard boundaries redraw them (sampling noise only).
~4 s per galaxy on one core (the summary view's 2,300 embeddings and the 2048-bin view cost
most; 1,000 galaxies in ~35 min as two shards on two cores). Last line: JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import test_batch
from sedvae.posterior import load_posterior
from sedvae.sps import THETA
from studies.common import QUANTITIES, SSFR_BINS, read_records, rms

REPO = Path(__file__).resolve().parents[1]


def summarise(records: list[dict], views: list[str]) -> dict:
    """RMS bounds per view and the flow beside them, overall, by sSFR and by S/N tercile."""
    out: dict = {"n_galaxies": len(records)}
    log_ssfr = np.array([r["log_ssfr"] for r in records])
    snr = np.array([r["snr"] for r in records])
    groups = {"all": np.ones(len(records), bool)}
    for name, lo, hi in SSFR_BINS:
        groups[f"ssfr_{name}"] = (log_ssfr >= lo) & (log_ssfr < hi)
    edges = np.quantile(snr, [1 / 3, 2 / 3])
    for k, (lo, hi) in enumerate(zip([-np.inf, *edges], [*edges, np.inf], strict=True)):
        groups[f"snr_t{k + 1}"] = (snr >= lo) & (snr < hi)
    for q in QUANTITIES:
        crb = {v: np.array([r["crb"][q][v] for r in records]) for v in views}
        flow = np.array([r["flow"][q] for r in records])
        truth = np.array([r["truth"][q] for r in records])
        err, sigma = flow[:, 1] - truth, 0.5 * (flow[:, 2] - flow[:, 0])
        res = {}
        for name, sel in groups.items():
            if not sel.any():
                continue
            g = {"n": int(sel.sum())}
            g["crb_rms"] = {v: round(float(rms(crb[v][sel])), 4) for v in views}
            g["ratio_vs_native"] = {
                v: round(float(rms(crb[v][sel]) / rms(crb["native"][sel])), 4) for v in views
            }
            g["flow_rms_error"] = round(float(rms(err[sel])), 4)
            g["flow_rms_sigma"] = round(float(rms(sigma[sel])), 4)
            g["flow_rms_error_over_native"] = round(
                float(rms(err[sel]) / rms(crb["native"][sel])), 3
            )
            # per galaxy, robust to the few broad posteriors that dominate the RMS
            g["median_ratio_vs_native"] = {
                v: round(float(np.median(crb[v][sel] / crb["native"][sel])), 4) for v in views
            }
            g["flow_median_sigma_over_native"] = round(
                float(np.median(sigma[sel] / crb["native"][sel])), 3
            )
            if "summary" in crb:
                g["flow_median_sigma_over_summary"] = round(
                    float(np.median(sigma[sel] / crb["summary"][sel])), 3
                )
                # the summary cannot hold more than the data: where its Monte Carlo estimate
                # says so by over 1 %, that is its estimation error
                g["summary_below_native_fraction"] = round(
                    float(np.mean(crb["summary"][sel] < 0.99 * crb["native"][sel])), 4
                )
            res[name] = g
        out[q] = res
    if len(records) > 2:
        ratio = np.array([r["flow"]["logmstar"][2] - r["flow"]["logmstar"][0] for r in records])
        ratio = 0.5 * ratio / np.array([r["crb"]["logmstar"]["native"] for r in records])
        out["logmstar_sigma_ratio_vs_log_snr_corr"] = round(
            float(np.corrcoef(np.log(ratio), np.log(snr))[0, 1]), 4
        )
    return out


def flow_summary(net, ivar: torch.Tensor, photometry_ivar: torch.Tensor, z: float, chunk=512):
    """t(flux, photometry) (n, 65) of one galaxy's noise: the context vector the flow
    conditions on and its logM* shift (the mass anchor), as ``Posterior.sample`` computes
    them, by ``net`` (the posterior's ``NeuralPosterior`` in float64: ``summary_fisher``
    differences it over tiny steps). The inputs are clean mocks (ivar 0 where masked)."""

    def summary(flux: torch.Tensor, phot: torch.Tensor) -> torch.Tensor:
        out = []
        for k in range(0, flux.shape[0], chunk):
            f, p = flux[k : k + chunk], phot[k : k + chunk]
            n = f.shape[0]
            batch = {"flux": f, "ivar": ivar.expand(n, -1), "z": torch.full((n,), z).double(),
                     "photometry": p, "photometry_ivar": photometry_ivar.expand(n, -1)}  # fmt: skip
            context, shift = net.embed(batch)
            out.append(torch.cat([context, shift[:, :1]], -1))
        return torch.cat(out)

    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(REPO / "data/posterior/posterior.pt"))
    parser.add_argument("--cache", default=str(REPO / "cache/mocks"))
    parser.add_argument(
        "--n-test", type=int, default=5000, help="held-out file (bench/posterior.py's)"
    )
    parser.add_argument("--seed", type=int, default=11, help="the data module's base seed")
    parser.add_argument("--n-galaxies", type=int, default=1000)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--bins", default="256,512,1024,2048")
    parser.add_argument("--n-samples", type=int, default=1000, help="flow samples per galaxy")
    parser.add_argument("--out", default=str(REPO / "outputs/bench_posterior_information"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--summary-draws", type=int, default=512,
        help="noise draws for the covariance of the flow's summary (0: skip the summary view)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sedvae.physics.restframe import RestFrameBinner
    from sedvae.simulation import MockGenerator
    from studies.exact import MockLikelihood
    from studies.information import (
        GaussianCoordinates,
        binned_fisher,
        marginal_sigma,
        overlap_matrix,
        stencil,
        summary_fisher,
        whitened_jacobian,
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "galaxies.jsonl"
    n_bins = [int(b) for b in args.bins.split(",") if b]
    views = ["native", *(f"bins{n}" for n in n_bins), "spectrum", "photometry"]
    if args.summary_draws:
        views.append("summary")

    post = load_posterior(args.checkpoint)
    net64 = copy.deepcopy(post.net).double()
    batch = test_batch(Path(args.cache), args.n_test, args.seed)
    gen = MockGenerator()
    likelihood = MockLikelihood(gen)
    coords = GaussianCoordinates(post.prior, gen.logu_range, gen.sigma_v_range, gen.aperture_range)
    inst = gen.instrument
    binners = {n: RestFrameBinner(inst.wave, getattr(inst, "arm", None), 2200.0, 9900.0, n)
               for n in n_bins}  # fmt: skip
    z_all = batch["z"]
    d_true = post.derived(batch["theta"].float()[None], z_all)

    done = {r["index"] for r in read_records(path)}
    stop = min(args.start + args.n_galaxies, z_all.shape[0])
    todo = [i for i in range(args.start, stop) if i not in done]
    t0 = time.time()
    for c in range(0, len(todo), 250):
        idx = todo[c : c + 250]
        sub = {k: batch[k][idx] for k in ("flux", "ivar", "mask", "z", "photometry",
                                          "photometry_ivar")}  # fmt: skip
        samples = post.sample(sub, args.n_samples, torch.Generator().manual_seed(idx[0]))
        d_flow = post.derived(samples, sub["z"])
        flow_q = {
            "logmstar": samples[..., THETA.LOGMSTAR].double(),
            "logmstar_surv": d_flow["logmstar_surv"].double(),
            "log_zmw": torch.log10(d_flow["z_mw"]).double(),
        }
        qs = torch.tensor([0.16, 0.5, 0.84], dtype=torch.float64)
        flow_q = {k: torch.quantile(v, qs, dim=0) for k, v in flow_q.items()}  # (3, b)
        for j, i in enumerate(idx):
            z = float(z_all[i])

            def quantities(theta, z=z):
                d = post.derived(theta.float()[:, None], torch.tensor([z]).float())
                return {"logmstar": theta[:, THETA.LOGMSTAR],
                        "logmstar_surv": d["logmstar_surv"][:, 0],
                        "log_zmw": torch.log10(d["z_mw"][:, 0])}  # fmt: skip

            w0 = coords.to_w(*(batch[k][i : i + 1] for k in ("theta", "logU", "sigma_v",
                                                               "aperture")))[0]  # fmt: skip
            ivar, piv = batch["ivar"][i].double(), batch["photometry_ivar"][i].double()
            st = stencil(likelihood, coords, w0, z)
            y_s, y_p, grads = whitened_jacobian(st, ivar, piv, quantities)
            f_s, f_p = y_s @ y_s.T, y_p @ y_p.T
            fishers = {"native": f_s + f_p, "spectrum": f_s, "photometry": f_p}
            for n, b in binners.items():
                fishers[f"bins{n}"] = binned_fisher(y_s, overlap_matrix(b, z), ivar) + f_p
            if args.summary_draws:
                fishers["summary"] = summary_fisher(
                    flow_summary(net64, ivar, piv, z),
                    st,
                    ivar,
                    piv,
                    n_cov=args.summary_draws,
                    generator=torch.Generator().manual_seed(i),
                )
            good = ivar > 0
            snr = float(torch.median(batch["flux_true"][i].double()[good].abs()
                                     * ivar[good].sqrt()))  # fmt: skip
            ssfr = float(torch.log10(d_true["sfr_100myr"][0, i].clamp_min(1e-30))
                         - d_true["logmstar_surv"][0, i])  # fmt: skip
            truth = {
                "logmstar": float(batch["theta"][i, 0]),
                "logmstar_surv": float(d_true["logmstar_surv"][0, i]),
                "log_zmw": float(torch.log10(d_true["z_mw"][0, i])),
            }
            record = {
                "index": i, "z": round(z, 5), "snr": round(snr, 4),
                "log_ssfr": round(ssfr, 4), "truth": truth,
                "crb": {q: {v: round(marginal_sigma(fishers[v], grads[q]), 6) for v in views}
                        for q in QUANTITIES},
                "flow": {q: [round(float(x), 5) for x in flow_q[q][:, j]] for q in QUANTITIES},
            }  # fmt: skip
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        done_now = c + len(idx)
        print(f"{done_now}/{len(todo)} galaxies, {(time.time() - t0) / done_now:.2f} s each",
              flush=True)  # fmt: skip

    records = sorted(read_records(path), key=lambda r: r["index"])
    result = summarise(records, views)
    result["s_per_galaxy"] = round((time.time() - t0) / max(len(todo), 1), 3) if todo else None
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
