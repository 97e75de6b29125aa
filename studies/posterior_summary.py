"""Is it the flow or the summary that limits logM*? Frozen-summary tests of the SBI head.

    python -m studies.posterior_summary [--checkpoint data/posterior/posterior.pt]
                                        [--train-seeds 11,21,31] [--draws 2] [--epochs 30]

1. Frozen summaries (``sedvae.posterior.summaries``): the checkpoint's embedding applied to
   every galaxy of the training files of ``experiment=posterior`` (``--train-seeds``, 50,000
   galaxies each, written on first use, ~10 min each on one core), ``--draws`` fresh noise
   draws each with the training augmentation; to its 2,000-galaxy validation file (fixed
   noise) and to ``bench/posterior.py``'s 5,000 held-out mocks.
2. Two flows trained on them for the same ``--epochs``, learning rate and warm-up: the
   checkpoint's flow continued (the control), and the checkpoint's flow deepened by four
   spline couplings (conditioners 128 x 128, 8 bins, three times the flow's parameters) that
   start as the identity (``deepen_flow``). Each gets its validation and held-out NLL
   (nats in u, the training logs' ``nll_u``) and its logM* posterior medians against the
   truth on the held-out mocks (200 samples per galaxy).
3. A least-squares MLP regressor of logM* on the same summaries (``fit_regressor``): an
   estimate of the posterior mean given the summary, the estimator of smallest RMS error.
   Its held-out RMS error is what any consumer of the summary can reach, up to the
   regressor's own training, so if it equals the flow's error, the summary is the limit.
4. Oracles: the same regressor given, besides the summary, one set of true quantities
   (fibre-aperture factor; mass-weighted age; mass-weighted metallicity; the three dust
   parameters; the SFH shape): its error over the plain regressor's says which degeneracy
   the summary leaves open (``oracles``). ``--skip-flows`` runs 1, 3, 4 and 5 only
   (~12 min).
5. Gappy PCA (``--pca K``, 0 to skip): the same regressor given, besides the summary, the
   ivar-weighted least-squares coefficients of each noisy spectrum on K eigenspectra of the
   training set, their errors and the fit's chi^2 (``sedvae.posterior.pca``, the
   ``embedding.pca`` inputs): how much logM* information a linear compression that weighs
   every bin by its noise adds to the learned summary (``gappy_pca.over_regressor``).

Ratios in the JSON: ``deep_over_control_logmstar_rms`` (a larger flow on the same summary),
``regressor_over_flow_logmstar_rms`` (the best estimate from the summary against the
checkpoint's flow), the latter also by true sSFR (bench/posterior.py's bins) and by spectral
S/N tercile (``..._by_group``), where ``studies/posterior_information.py`` found the flow's
width over the summary's local Fisher bound to grow with S/N. About 40 minutes on one core
once the mock files exist. Last line: JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from bench.common import test_batch
from sedvae.checkpoint import load_checkpoint
from sedvae.posterior import NeuralPosterior, Posterior
from sedvae.posterior.diagnostics import recovery, spectral_snr
from sedvae.posterior.pca import GappyPCA
from sedvae.posterior.summaries import summarise_batch, summarise_dataset, summary_nll
from sedvae.sps import THETA
from studies.common import OBS_KEYS, SSFR_BINS
from studies.summaries import deepen_flow, fit_flow, fit_regressor

REPO = Path(__file__).resolve().parents[1]


def by_group(err: torch.Tensor, groups: dict[str, torch.Tensor]) -> dict[str, float]:
    """RMS of ``err`` (N,) within each boolean mask of ``groups``."""
    return {name: round(float(err[m].pow(2).mean().sqrt()), 4) for name, m in groups.items()}


def galaxy_groups(batch: dict, derived: dict) -> dict[str, torch.Tensor]:
    """Masks of the held-out galaxies by true sSFR (``SSFR_BINS``, from their true derived
    properties) and by spectral S/N tercile (median flux x sqrt(ivar) over usable pixels)."""
    log_ssfr = (torch.log10(derived["sfr_100myr"][0].clamp_min(1e-30))
                - derived["logmstar_surv"][0])  # fmt: skip
    groups = {f"ssfr_{name}": (log_ssfr >= lo) & (log_ssfr < hi) for name, lo, hi in SSFR_BINS}
    snr = spectral_snr(batch)
    t1, t2 = torch.quantile(snr, torch.tensor([1 / 3, 2 / 3]))
    groups.update(snr_t1=snr < t1, snr_t2=(snr >= t1) & (snr < t2), snr_t3=snr >= t2)
    return groups


def flow_recovery(net, flow, batch: dict, n_samples: int, groups: dict, seed: int = 0) -> dict:
    """logM* bias, scatter, NMAD and RMS error of the posterior medians of ``net`` with
    ``flow`` in place of its own, on a held-out batch; the RMS error also by group."""
    post = Posterior(NeuralPosterior(net.embedding, flow, net.p_drop_photometry, net.mass_anchor,
                                     net.gaussianize_prior))  # fmt: skip
    theta = post.sample({k: batch[k] for k in OBS_KEYS}, n_samples,
                        torch.Generator().manual_seed(seed))  # fmt: skip
    med = theta[..., THETA.LOGMSTAR].double().median(0).values
    truth = batch["theta"][:, THETA.LOGMSTAR].double()
    rec = recovery(med, truth)
    rec["rms"] = float(((med - truth) ** 2).mean().sqrt())
    out = {f"logmstar_{k}": round(float(v), 4) for k, v in rec.items() if k != "n"}
    out["logmstar_rms_by_group"] = by_group(med - truth, groups)
    return out


def oracle_columns(summaries: dict, derived: dict) -> dict[str, torch.Tensor]:
    """True quantities to give an oracle regressor, each (N, k): the fibre-aperture factor,
    the mass-weighted age and metallicity (logs), the three dust parameters, the SFH shape
    (beta_1..4, f_burst, log t_burst)."""
    theta = summaries["theta"]
    return {
        "aperture": torch.log10(summaries["aperture"])[:, None],
        "t_mw": torch.log10(derived["t_mw_gyr"][0].clamp_min(1e-4))[:, None],
        "z_mw": torch.log10(derived["z_mw"][0])[:, None],
        "dust": theta[:, THETA.DUST],
        "sfh": torch.cat(
            [theta[:, THETA.BETA], theta[:, THETA.F_BURST, None],
             torch.log10(theta[:, THETA.T_BURST, None])], 1
        ),  # fmt: skip
    }


def pca_features(net, train_set, k: int, n_fit: int = 20000):
    """A callable batch -> (B, 2k + 1) gappy-PCA inputs, with a basis fitted to ``n_fit``
    noiseless spectra of the training set (a copy of the checkpoint's embedding bins and
    normalises them), and the basis fit's RMS residual per iteration."""
    emb = copy.deepcopy(net.embedding)
    emb.pca = GappyPCA(emb.n_bins, k)
    residuals = emb.fit_pca(*train_set.clean_spectra(n_fit))

    def features(batch: dict) -> torch.Tensor:  # what SpectrumEmbedding.inputs appends
        f_rest, w_rest = emb.binner(batch["flux"], batch["ivar"], batch["z"])
        norm = emb.spectrum_norm(f_rest, w_rest > 0)[:, None]
        return emb.pca(f_rest / norm, w_rest * norm**2)

    return features, residuals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(REPO / "data/posterior/posterior.pt"))
    parser.add_argument("--cache", default=str(REPO / "cache/mocks"))
    parser.add_argument("--train-seeds", default="11,21,31")
    parser.add_argument("--draws", type=int, default=2, help="noise draws per training galaxy")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2.5e-4)
    parser.add_argument("--n-samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-flows", action="store_true",
                        help="summaries and regressors only (~12 min)")  # fmt: skip
    parser.add_argument("--pca", type=int, default=32, help="gappy-PCA components (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from sedvae.posterior.data import PosteriorMockDataModule

    seeds = [int(s) for s in args.train_seeds.split(",")]
    dm = PosteriorMockDataModule(cache_dir=args.cache, n_train=50000, n_val=2000, n_test=5000,
                                 seed=11, train_seeds=seeds)  # fmt: skip
    dm.prepare_data()  # writes missing training / validation files
    dm.setup()
    net, _ = load_checkpoint(args.checkpoint, "posterior")
    t0 = time.perf_counter()
    features = None
    if args.pca:
        features, pca_residuals = pca_features(net, dm.datasets["train"], args.pca)
    train = summarise_dataset(net, dm.datasets["train"], n_draws=args.draws, seed=1,
                              features=features)  # fmt: skip
    val_items = [dm.datasets["val"][i] for i in range(len(dm.datasets["val"]))]
    val = summarise_batch(net, {k: torch.stack([it[k] for it in val_items]) for k in val_items[0]})
    batch = test_batch(Path(args.cache), 5000, 11)
    test = summarise_batch(net, batch)
    post = Posterior(net)
    d_test = post.derived(batch["theta"][None], batch["z"])  # true derived properties
    groups = galaxy_groups(batch, d_test)
    result: dict = {
        "n_train_pairs": int(train["y"].shape[0]),
        "train_seeds": seeds,
        "draws": args.draws,
        "summaries_s": round(time.perf_counter() - t0, 1),
    }
    print(f"summaries: {result['n_train_pairs']} training pairs in {result['summaries_s']} s",
          flush=True)  # fmt: skip

    shipped = {"val_nll": round(summary_nll(net.flow, val), 4),
               "test_nll": round(summary_nll(net.flow, test), 4),
               **flow_recovery(net, net.flow, batch, args.n_samples, groups)}  # fmt: skip
    result["shipped"] = shipped
    print("checkpoint's flow:", shipped, flush=True)

    runs = {"control": copy.deepcopy(net.flow), "deep": deepen_flow(copy.deepcopy(net.flow))}
    for name, flow in ({} if args.skip_flows else runs).items():
        t0 = time.perf_counter()
        history = fit_flow(flow, train, val, epochs=args.epochs, lr=args.lr)
        flow.eval()
        result[name] = {
            "params": sum(p.numel() for p in flow.parameters()),
            "val_nll": round(history[-1]["val_nll"], 4),
            "val_nll_curve": [round(h["val_nll"], 3) for h in history],
            "test_nll": round(summary_nll(flow, test), 4),
            **flow_recovery(net, flow, batch, args.n_samples, groups),
            "minutes": round((time.perf_counter() - t0) / 60, 1),
        }
        print(name, {k: v for k, v in result[name].items() if k != "val_nll_curve"}, flush=True)

    t0 = time.perf_counter()
    reg = fit_regressor(train, train["theta"][:, 0])
    with torch.no_grad():
        pred = reg(reg.features(test)).double()
    truth = batch["theta"][:, THETA.LOGMSTAR].double()
    rec = recovery(pred, truth)
    result["regressor"] = {
        "logmstar_rms": round(float(((pred - truth) ** 2).mean().sqrt()), 4),
        "logmstar_bias": round(float(rec["bias"]), 4),
        "logmstar_scatter": round(float(rec["scatter"]), 4),
        "logmstar_nmad": round(float(rec["nmad"]), 4),
        "logmstar_rms_by_group": by_group(pred - truth, groups),
        "minutes": round((time.perf_counter() - t0) / 60, 1),
    }
    print("regressor:", result["regressor"], flush=True)

    # oracles: the same regressor given one true quantity besides the summary; how much it
    # gains says which degeneracy the summary leaves open
    d_train = post.derived(train["theta"][None], train["z"])
    result["oracles"] = {}
    cols_train, cols_test = oracle_columns(train, d_train), oracle_columns(test, d_test)
    for name in cols_train:
        t0 = time.perf_counter()
        reg = fit_regressor(train, train["theta"][:, 0], extra=cols_train[name])
        with torch.no_grad():
            pred = reg(reg.features(test, cols_test[name])).double()
        rms = float(((pred - truth) ** 2).mean().sqrt())
        result["oracles"][name] = {
            "logmstar_rms": round(rms, 4),
            "over_regressor": round(rms / result["regressor"]["logmstar_rms"], 4),
            "logmstar_rms_by_group": by_group(pred - truth, groups),
            "minutes": round((time.perf_counter() - t0) / 60, 1),
        }
        print(f"oracle {name}:", result["oracles"][name], flush=True)
    if args.pca:  # the summary plus gappy-PCA inputs of the same noisy spectra
        t0 = time.perf_counter()
        reg = fit_regressor(train, train["theta"][:, 0], extra=train["features"])
        with torch.no_grad():
            pred = reg(reg.features(test, features(batch))).double()
        rms = float(((pred - truth) ** 2).mean().sqrt())
        result["gappy_pca"] = {
            "components": args.pca,
            "basis_rms_residual": round(float(pca_residuals[-1]), 4),
            "logmstar_rms": round(rms, 4),
            "over_regressor": round(rms / result["regressor"]["logmstar_rms"], 4),
            "logmstar_rms_by_group": by_group(pred - truth, groups),
            "minutes": round((time.perf_counter() - t0) / 60, 1),
        }
        print("gappy PCA:", result["gappy_pca"], flush=True)
    if not args.skip_flows:
        result["deep_over_control_logmstar_rms"] = round(
            result["deep"]["logmstar_rms"] / result["control"]["logmstar_rms"], 4
        )
    result["regressor_over_flow_logmstar_rms"] = round(
        result["regressor"]["logmstar_rms"] / shipped["logmstar_rms"], 4
    )
    result["regressor_over_flow_logmstar_rms_by_group"] = {
        name: round(v / shipped["logmstar_rms_by_group"][name], 4)
        for name, v in result["regressor"]["logmstar_rms_by_group"].items()
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
