"""Does a broader SFH prior in the simulator close the off-model gap? (issue 26)

    python -m studies.sfh_prior [--n-train 10000] [--priors provabgs,continuity,...]
                                [--seeds 3] [--cache cache]

The shipped head's surviving mass is +0.08 dex biased on the off-model set (bagpipes'
delayed-tau, exponential, lognormal, double-power-law and burst histories), for every input
the head could condition on (``studies.posterior_conditioning``); the suspected cause is the
training prior, PROVABGS' four NMF components. This study trains the same proxy estimator as
``studies.posterior_conditioning`` (input (a), today's summary and mass anchor; the same zuko
NSF, optimiser, early stopping, epochs and estimator seeds) on training sets of the generative
model that differ only in their star-formation histories:

- ``provabgs``: theta's NMF histories (the conditioning study's training set; its row (a));
- ``continuity``: a mixture, half theta's histories and half Leja et al. (2019)'s continuity
  prior (``sedvae.sps.continuity.ContinuitySFH``: constant SFR in 7 coarse lookback bins,
  Student-t (nu = 2, 0.3 dex) log SFR ratios between neighbours), with theta's metallicity
  history and burst;
- ``continuity_wide``: the same with a 0.6 dex scale, ``continuity_1dex`` with 1 dex;
- ``continuity_only``: continuity histories alone (0.6 dex), no PROVABGS ones;
- ``continuity_wide_nmf``: ``continuity_wide``'s spectra, labelled with the PROVABGS theta
  nearest each history (``sedvae.sps.continuity.project_to_nmf``), what a head over theta
  learns from; ``continuity_wide_nmf_burst`` the same with ``burst=True`` (the projection may
  move theta's burst into the last 100 Myr).

The training sets share their seed, so every galaxy has the same theta, redshift, lines,
calibration warp and sky as in the others; only its history (half of them) and its noise
draw differ. Truths come from each history (``SEDModel.derived_from_history``).

Test sets: the conditioning study's 500 held-out in-model simulations (theta's histories,
``in``), its 400 off-model galaxies (``python -m sedvae.offmodel n=400 seed=3``, noise seed 0;
``off``), and 500 held-out simulations of the training prior itself (``own``: the estimator's
calibration on its own prior; for ``provabgs`` the ``in`` set). Per prior and test set:
bias / NMAD / 68 % coverage of log surviving mass, log SFR(100 Myr) of star-forming galaxies
and t_MW (Gyr), the mean over ``--seeds`` estimator seeds (``_sd``: their standard deviation);
and the off-model bias of surviving mass and t_MW per SFH family and for galaxies with a
burst. Last line: JSON.

The continuity histories are not the off-model set's families (no delayed-tau, exponential,
lognormal or power-law shape is drawn): the test stays off the model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from sedvae.offmodel import SFH_FAMILIES
from sedvae.posterior import load_posterior
from sedvae.simulation.onthefly import OBS_KEYS
from sedvae.sps.continuity import ContinuitySFH, project_to_nmf
from studies.posterior_conditioning import (
    REPO,
    Features,
    evaluate,
    fit_estimator,
    mean_rows,
    offmodel,
    predict,
    quantiles_from_targets,
    sim_truth,
    simulate,
    stats,
    targets,
)

PRIORS = {  # name: the SFH prior of the training set (None: theta's histories)
    "provabgs": None,
    "continuity": {"frac": 0.5, "scale": 0.3},
    "continuity_wide": {"frac": 0.5, "scale": 0.6},
    "continuity_1dex": {"frac": 0.5, "scale": 1.0},
    "continuity_only": {"frac": 1.0, "scale": 0.6},  # no PROVABGS histories left
    # continuity_wide's spectra, labelled with the PROVABGS theta nearest each history
    # (sedvae.sps.continuity.project_to_nmf): what a head over theta can learn from them
    "continuity_wide_nmf": {"frac": 0.5, "scale": 0.6, "project": True},
    # the same, the projection free to move theta's burst into the last 100 Myr (burst=True)
    "continuity_wide_nmf_burst": {"frac": 0.5, "scale": 0.6, "project": True, "burst": True},
}
QUANTITIES = ("logmsurv", "logsfr", "tmw")


def training_set(cache: Path, name: str, n: int, seed: int) -> dict:
    """``n`` simulations of prior ``name`` from stream ``seed`` (cached; ``provabgs`` shares
    the conditioning study's files)."""
    d = cache / "conditioning"
    cfg = PRIORS[name]
    if cfg is None:
        return simulate(d / f"generative_n{n}_seed{seed}.pt", n, seed)
    tag = f"continuity_f{cfg['frac']}_s{cfg['scale']}"
    sfh = ContinuitySFH(frac=cfg["frac"], scale=cfg["scale"])
    return simulate(d / f"generative_{tag}_n{n}_seed{seed}.pt", n, seed, sfh=sfh)


def projected_truth(posterior, name: str, data: dict) -> dict:
    """Truths of the PROVABGS theta nearest each simulation's history
    (:func:`sedvae.sps.continuity.project_to_nmf`): the labels a head over theta trains on."""
    cfg = PRIORS[name]
    sps = posterior.sps
    theta, z = sps.check_inputs(data["theta"].double(), data["z"].double())
    draws = {"sfh_continuity": data["sfh_continuity"].bool(),
             "sfr_log_ratio": data["sfr_log_ratio"].double()}  # fmt: skip
    sfh = ContinuitySFH(frac=cfg["frac"], scale=cfg["scale"])
    proj = project_to_nmf(sps, theta, z, sfh.history(sps, theta, z, draws),
                          burst=cfg.get("burst", False))  # fmt: skip
    return sim_truth(posterior, {"theta": proj, "z": z})


def offmodel_subsets(path: Path) -> dict[str, np.ndarray]:
    """Masks of the off-model galaxies per SFH family and of those with a burst."""
    with h5py.File(path, "r") as f:
        grp = f["offmodel"]
        family = grp["sfh_family"][()]
        out = {name: family == i for i, name in enumerate(SFH_FAMILIES)}
        out["burst"] = grp["burst"][()] > 0
    return out


def observed(data: dict) -> dict:
    return {k: data[k] for k in (*OBS_KEYS, "z")}


def run(n_train: int, n_in: int, n_off: int, off_seed: int, cache: Path, priors: list[str],
        epochs: int = 150, n_samples: int = 500, train_seed: int = 201, test_seed: int = 202,
        n_seeds: int = 3) -> dict:  # fmt: skip
    """The whole study; returns the summary dict (the JSON line)."""
    torch.set_num_threads(1)
    c0 = time.process_time()
    posterior = load_posterior(str(REPO / "data/posterior/posterior.pt"))
    feat = Features(posterior, ["a"])
    test_in = simulate(cache / f"conditioning/generative_n{n_in}_seed{test_seed}.pt", n_in,
                       test_seed)  # fmt: skip
    off_batch, off_truth = offmodel(cache / f"offmodel/offmodel_n{n_off}_seed{off_seed}.h5",
                                    n_off, off_seed)  # fmt: skip
    sets = {"in": (*feat(observed(test_in)), sim_truth(posterior, test_in)),
            "off": (*feat(off_batch), off_truth)}  # fmt: skip
    subsets = offmodel_subsets(cache / f"offmodel/offmodel_n{n_off}_seed{off_seed}.h5")
    result: dict = {"n_train": n_train, "n_in": n_in, "n_off": n_off, "seeds": n_seeds}
    for name in priors:
        c1 = time.process_time()
        train = training_set(cache, name, n_train, train_seed)
        f_tr, a_tr, fatal_tr = feat(observed(train))
        truth = sim_truth(posterior, train)
        if PRIORS[name] is not None and PRIORS[name].get("project"):
            truth = projected_truth(posterior, name, train)  # labels from theta, not history
        y = targets(truth, a_tr)
        x = f_tr["a"]
        ok = ~fatal_tr & np.isfinite(y).all(1) & np.isfinite(x).all(1)
        if "sfh_continuity" in train:
            result[f"{name}_continuity_frac"] = round(float(train["sfh_continuity"].float()
                                                            .mean()), 3)  # fmt: skip
        if PRIORS[name] is None:
            own = sets["in"]
        else:  # held-out simulations of the training prior itself: its own calibration
            test_own = training_set(cache, name, n_in, test_seed)
            own = (*feat(observed(test_own)), sim_truth(posterior, test_own))
        per_seed = []
        for seed in range(n_seeds):
            flow, std, rec = fit_estimator(x[ok], y[ok], seed=seed, epochs=epochs)
            row = {"dim": int(x.shape[1]), **rec}
            for key, (f, anchor, fatal, t) in {**sets, "own": own}.items():
                samples = predict(flow, std, np.nan_to_num(f["a"]), n_samples, seed)
                q = quantiles_from_targets(samples, anchor)
                row[key] = evaluate(q, t, ~fatal)
                if key == "off":  # the bias per SFH family and with a burst
                    row["off_subsets"] = {
                        sub: {k: stats(q[k][:, ~fatal & m], t[k][~fatal & m])["bias"]
                              for k in ("logmsurv", "tmw")}
                        for sub, m in subsets.items()
                    }  # fmt: skip
            per_seed.append(row)
            print(name, seed, json.dumps(row), flush=True)
        row = mean_rows(per_seed, ("in", "off", "own"))
        result[f"{name}_n_train"] = int(ok.sum())
        result[f"{name}_val_nll"] = round(row["val_nll"], 3)
        for key in ("in", "off", "own"):
            for q in QUANTITIES:
                for s, v in row[key][q].items():
                    if s != "n":
                        result[f"{name}_{key}model_{q}_{s}"] = v
        for sub in subsets:
            for k in ("logmsurv", "tmw"):
                v = [r["off_subsets"][sub][k] for r in per_seed]
                result[f"{name}_offmodel_{sub}_{k}_bias"] = round(float(np.mean(v)), 4)
        result[f"{name}_cpu_s"] = round(time.process_time() - c1, 1)
    result["cpu_s"] = round(time.process_time() - c0, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=10000)
    parser.add_argument("--n-in", type=int, default=500)
    parser.add_argument("--n-off", type=int, default=400)
    parser.add_argument("--off-seed", type=int, default=3)
    parser.add_argument("--priors", default=",".join(PRIORS), help="comma-separated: "
                        + ", ".join(PRIORS))  # fmt: skip
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--n-samples", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=3, help="estimator seeds per prior")
    parser.add_argument("--cache", default=str(REPO / "cache"))
    args = parser.parse_args()
    priors = args.priors.split(",")
    unknown = [p for p in priors if p not in PRIORS]
    if unknown:
        parser.error(f"unknown priors {unknown}; choose from {list(PRIORS)}")
    result = run(args.n_train, args.n_in, args.n_off, args.off_seed, Path(args.cache), priors,
                 args.epochs, args.n_samples, n_seeds=args.seeds)  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
