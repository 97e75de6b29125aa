"""The range users have (issue 25, item 7): nearby galaxies and a declared aperture.

    python bench/range.py [--n 300] [--seed 7] [--n-samples 300]
                          [--checkpoint data/posterior/posterior.pt]

Mock DESI BGS galaxies from ``MockGenerator`` (the bundled coadd's resolution and ivar shape,
BGS-like S/N, Legacy Surveys north photometry of the whole galaxy), each set drawn from its own
seed; the shipped posterior head, ``--n-samples`` samples per galaxy. Per set, for logM*
(formed, the head's parameter): bias (mean of posterior median - truth), scatter (standard
deviation of that error) and the 68 % and 95 % coverage (truth inside the 16-84 % and 2.5-97.5
% intervals).

1. Nearby galaxies: the head was trained on 0.01 <= z <= 0.6. Sets at fixed z = 0.001, 0.003,
   0.005, 0.008 (below its training range, now accepted) beside z = 0.02 and 0.05 (inside it),
   with photometry as the catalog gives it; the fibre aperture log-uniform on (0.3, 1) as in
   training.
2. A declared aperture: galaxies whose spectrum holds > 85 % of the light (aperture
   log-uniform on (0.85, 1)) and no photometry: the posterior without a declared aperture (it
   marginalises over the training prior, 0.3-1) against the same galaxies with
   ``declared_aperture = 1`` (:func:`sedvae.posterior.api.aperture_shift`), the same galaxies
   with their photometry as the reference, and with the synthetic photometry of the spectrum
   itself (:func:`sedvae.io.synthetic.spectrum_photometry`: g and r, the bands DESI covers;
   z, W1, W2 missing), the alternative the head would need partial-photometry training for.
3. A known distance: mocks at z = 0.004 (cz = 1,200 km/s) whose true distance is 1.25 x the
   Hubble flow's (a peculiar velocity of -300 km/s), from z alone against the same galaxies
   with their ``luminosity_distance`` (:func:`sedvae.posterior.api.distance_shift`).
4. Partial photometry: mocks as in training (aperture 0.3-1) with some bands hidden, read by the
   head as they are (``Posterior(partial_photometry="use")``) against the default, which gives
   a galaxy with some bands missing no photometry at all.

Last line: JSON (``lowz_*``, ``aperture_*``; ``aperture_bias_ratio`` = |bias declared| / |bias
undeclared|).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LOW_Z = (0.001, 0.003, 0.005, 0.008, 0.02, 0.05)


def logm_metrics(theta: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """bias, scatter, cov68, cov95 of logM* samples (n, B) against the truth (B,)."""
    s = theta.double()
    t = truth.double()
    q = torch.tensor([0.025, 0.16, 0.5, 0.84, 0.975], dtype=torch.float64)
    lo95, lo68, med, hi68, hi95 = torch.quantile(s, q, dim=0)
    err = med - t
    return {
        "bias": float(err.mean()),
        "scatter": float(err.std()),
        "cov68": float(((t >= lo68) & (t <= hi68)).double().mean()),
        "cov95": float(((t >= lo95) & (t <= hi95)).double().mean()),
        "half_width68": float((0.5 * (hi68 - lo68)).median()),
    }


def observed(batch: dict, photometry: bool = True, aperture: float | None = None) -> dict:
    keys = ("flux", "ivar", "mask", "z", "photometry", "photometry_ivar")
    out = {k: batch[k] for k in keys}
    if not photometry:
        out["photometry_ivar"] = torch.zeros_like(batch["photometry_ivar"])
    if aperture is not None:
        out["declared_aperture"] = torch.full_like(batch["z"], aperture)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--n-samples", type=int, default=300)
    parser.add_argument("--checkpoint", default=str(REPO / "data/posterior/posterior.pt"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    from sedvae.io import Flag
    from sedvae.posterior import load_posterior
    from sedvae.simulation.mocks import MockGenerator

    t0 = time.perf_counter()
    post = load_posterior(args.checkpoint)
    gen = MockGenerator(z_dist="uniform")

    def sample(batch, seed):
        res = post.sample(batch, args.n_samples, torch.Generator().manual_seed(seed), True)
        return res.samples[..., 0], res.flags

    summary: dict[str, float] = {}
    print(f"1. nearby galaxies: logM* of {args.n} mocks per z, with photometry")
    print(f"{'z':>7} {'bias':>7} {'scatter':>7} {'cov68':>6} {'cov95':>6} {'hw68':>6} BAD_Z")
    for k, z in enumerate(LOW_Z):
        gen.z_range = (z, z)
        batch = gen.sample(args.n, torch.Generator().manual_seed(args.seed + k))
        logm, flags = sample(observed(batch), args.seed + 100 + k)
        m = logm_metrics(logm, batch["theta"][:, 0])
        n_bad = int(((flags & int(Flag.BAD_Z)) != 0).sum())
        print(f"{z:7.3f} {m['bias']:+7.3f} {m['scatter']:7.3f} {m['cov68']:6.2f} "
              f"{m['cov95']:6.2f} {m['half_width68']:6.3f} {n_bad}")  # fmt: skip
        for key in ("bias", "scatter", "cov68", "cov95"):
            summary[f"lowz_{key}_z{z:g}"] = m[key]

    print(f"\n2. declared aperture: {args.n} mocks with aperture in (0.85, 1)")
    gen.z_range, gen.z_dist = (0.01, 0.6), "bgs"
    gen.aperture_range = (0.85, 1.0)
    batch = gen.sample(args.n, torch.Generator().manual_seed(args.seed + 50))
    truth = batch["theta"][:, 0]
    from sedvae.io.synthetic import spectrum_photometry

    synth, synth_ivar, _ = spectrum_photometry(
        gen.instrument.wave.double(), batch["flux"], batch["ivar"], gen.noise.arm
    )
    rows = {
        "with photometry (reference)": observed(batch),
        "no photometry, aperture unknown": observed(batch, photometry=False),
        "no photometry, aperture=1 declared": observed(batch, photometry=False, aperture=1.0),
        "synthetic g, r of the spectrum, read as they are": {
            **observed(batch), "photometry": torch.as_tensor(synth, dtype=torch.float32),
            "photometry_ivar": torch.as_tensor(synth_ivar, dtype=torch.float32),
        },
    }
    from sedvae.posterior.api import Posterior

    print(f"{'':48} {'bias':>7} {'scatter':>7} {'cov68':>6} {'cov95':>6} {'hw68':>6}")
    use = Posterior(post.net, partial_photometry="use")  # reads partial photometry as it is
    res = {}
    for name, obs in rows.items():
        if name.startswith("synthetic"):  # the default would drop the partial photometry
            res_u = use.sample(obs, args.n_samples, torch.Generator().manual_seed(args.seed + 200))
            logm = res_u[..., 0]
        else:
            logm, _ = sample(obs, args.seed + 200)  # the same draws of the flow in each row
        res[name] = m = logm_metrics(logm, truth)
        print(f"{name:48} {m['bias']:+7.3f} {m['scatter']:7.3f} {m['cov68']:6.2f} "
              f"{m['cov95']:6.2f} {m['half_width68']:6.3f}")  # fmt: skip
    print(f"\n3. known distance: {args.n} mocks at z = 0.004 at 1.25 x the Hubble distance")
    print(f"{'':48} {'bias':>7} {'scatter':>7} {'cov68':>6} {'cov95':>6} {'hw68':>6}")
    from sedvae.physics.cosmology import luminosity_distance_mpc

    gen.z_range, gen.z_dist, gen.aperture_range = (0.004, 0.004), "uniform", (0.3, 1.0)
    near = gen.sample(args.n, torch.Generator().manual_seed(args.seed + 60))
    scale = 1.0 / 1.25**2  # the fluxes of the galaxy at 1.25 d_L
    obs = observed(near)
    obs.update(flux=near["flux"] * scale, ivar=near["ivar"] / scale**2,
               photometry=near["photometry"] * scale,
               photometry_ivar=near["photometry_ivar"] / scale**2)  # fmt: skip
    dist = {}
    for name, batch_d in (
        ("distance from z", obs),
        ("luminosity_distance given", {
            **obs, "luminosity_distance": 1.25 * luminosity_distance_mpc(near["z"].double())}),
    ):  # fmt: skip
        logm, _ = sample(batch_d, args.seed + 300)
        dist[name] = m = logm_metrics(logm, near["theta"][:, 0])
        print(f"{name:48} {m['bias']:+7.3f} {m['scatter']:7.3f} {m['cov68']:6.2f} "
              f"{m['cov95']:6.2f} {m['half_width68']:6.3f}")  # fmt: skip
    summary.update({
        "distance_bias_from_z": dist["distance from z"]["bias"],
        "distance_bias_given": dist["luminosity_distance given"]["bias"],
        "distance_cov68_given": dist["luminosity_distance given"]["cov68"],
    })  # fmt: skip
    print(f"\n4. partial photometry: {args.n} mocks, aperture 0.3-1")
    gen.z_range, gen.z_dist = (0.01, 0.6), "bgs"
    mocks = gen.sample(args.n, torch.Generator().manual_seed(args.seed + 70))
    patterns = {"all": (0, 1, 2, 3, 4), "none": (), "no W2": (0, 1, 2, 3),
                "no W1, W2": (0, 1, 2), "no z": (0, 1, 3, 4), "no g": (1, 2, 3, 4),
                "g, r": (0, 1)}  # fmt: skip
    print(f"{'bands':12} {'read as they are: bias, scatter, cov68':>40} {'default':>24}")
    for name, keep in patterns.items():
        obs = observed(mocks)
        hide = torch.ones(5)
        hide[list(keep)] = 0.0
        obs["photometry_ivar"] = obs["photometry_ivar"] * (1 - hide)
        line = []
        for head in (use, post):
            res_p = head.sample(obs, args.n_samples, torch.Generator().manual_seed(7), True)
            m = logm_metrics(res_p.samples[..., 0], mocks["theta"][:, 0])
            line.append(m)
        a, d = line
        print(f"{name:12} {a['bias']:+22.3f} {a['scatter']:7.3f} {a['cov68']:6.2f}"
              f"{d['bias']:+12.3f} {d['scatter']:7.3f} {d['cov68']:6.2f}")  # fmt: skip
        key = name.replace(", ", "").replace(" ", "_").lower()
        summary[f"partial_{key}_scatter_as_is"] = a["scatter"]
        summary[f"partial_{key}_cov68_as_is"] = a["cov68"]
        summary[f"partial_{key}_scatter_default"] = d["scatter"]
    und = res["no photometry, aperture unknown"]
    dec = res["no photometry, aperture=1 declared"]
    ref = res["with photometry (reference)"]
    syn = res["synthetic g, r of the spectrum, read as they are"]
    summary.update({
        "aperture_bias_undeclared": und["bias"], "aperture_bias_declared": dec["bias"],
        "aperture_bias_with_photometry": ref["bias"],
        "aperture_cov68_undeclared": und["cov68"], "aperture_cov68_declared": dec["cov68"],
        "aperture_cov95_declared": dec["cov95"], "aperture_scatter_declared": dec["scatter"],
        "aperture_bias_ratio": abs(dec["bias"]) / abs(und["bias"]),
        "aperture_bias_synthetic_gr": syn["bias"], "aperture_scatter_synthetic_gr": syn["scatter"],
        "aperture_cov68_synthetic_gr": syn["cov68"],
        "seconds": time.perf_counter() - t0,
    })  # fmt: skip
    print(json.dumps({k: round(v, 4) for k, v in summary.items()}))


if __name__ == "__main__":
    main()
