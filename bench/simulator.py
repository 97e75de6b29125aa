"""Speed and accuracy of sedvae's SPS simulator against bagpipes' own model_galaxy, in one run.

    python bench/simulator.py [--n-galaxies 100] [--batch 1024] [--repeats 5]

Galaxies: prior draws made expressible by bagpipes (no burst, tau_BC = 0, n_dust = 0, one grid
metallicity each, cycling 0.4, 1 and 2.5 Z_sun); see ``sedvae.sps.reference`` for the exact
bagpipes configuration. Accuracy: |df/f| over 3000-9000 A rest frame, all pixels of all
galaxies. Speed: sedvae spectra per second at the given batch size (the galaxies tiled to fill
the batch, float32, ``torch.no_grad``, all cores; ``SEDModel(compile=True)``, and eager as
``sedvae_eager_per_s``) against ``model_galaxy.update`` one galaxy at a
time (how bagpipes is used inside its samplers). Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from sedvae.sps import THETA, PROVABGSPrior, SEDModel
from sedvae.sps.reference import (
    BagpipesReference,
    av_from_tau_ism,
    compare_with_bagpipes,
    constant_z_history,
    matched_redshift,
    sfh_steps,
)

GRID_Z = (0.008, 0.02, 0.05)


def galaxies(n: int, seed: int) -> torch.Tensor:
    theta = PROVABGSPrior().sample(n, torch.Generator().manual_seed(seed), dtype=torch.float64)
    theta[:, THETA.F_BURST] = 0.0  # no burst
    theta[:, THETA.TAU_BC] = 0.0  # no extra birth-cloud dust
    theta[:, THETA.N_DUST] = 0.0  # Kriek & Conroy at n = 0 = bagpipes' Salim(delta=0, B=0.85)
    return theta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-galaxies", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = SEDModel()
    theta = galaxies(args.n_galaxies, args.seed)
    zmets = [GRID_Z[i % len(GRID_Z)] for i in range(args.n_galaxies)]

    # ---- accuracy: every galaxy, its own grid metallicity ---------------------------------
    reference = BagpipesReference()
    diffs = []
    for zmet in GRID_Z:
        idx = [i for i in range(args.n_galaxies) if zmets[i] == zmet]
        diffs += compare_with_bagpipes(model, theta[idx], zmet, reference=reference)
    model.to(torch.float32)
    all_d = np.concatenate(diffs)
    per_gal_median = np.array([np.median(d) for d in diffs])

    # ---- bagpipes speed: model_galaxy.update, one galaxy at a time ---------------------------
    z_match = torch.full((args.n_galaxies,), matched_redshift(), dtype=torch.float64)
    model64 = SEDModel(dtype=torch.float64)
    hist = [
        constant_z_history(model64, theta[i : i + 1], z_match[i : i + 1], zmets[i])
        for i in range(args.n_galaxies)
    ]
    comps = [
        reference.components(
            sfh_steps(
                model64.bin_edges[:-1].numpy(), h.bin_hi_gyr[0].numpy(), h.bin_mass[0].numpy()
            ),
            float(theta[i, THETA.LOGMSTAR]),
            zmets[i] / 0.02,
            av_from_tau_ism(float(theta[i, THETA.TAU_ISM])),
        )
        for i, h in enumerate(hist)
    ]
    del model64
    reference.spectrum(
        comps[0]["custom"]["history"], comps[0]["custom"]["massformed"], zmets[0] / 0.02, 0.1
    )
    t0 = time.perf_counter()
    for c in comps:
        reference.model.update(c)
    bagpipes_per_s = len(comps) / (time.perf_counter() - t0)

    # ---- sedvae speed: the same galaxies tiled into one batch, eager and compiled -------------
    reps = -(-args.batch // args.n_galaxies)
    batch_theta = theta.repeat(reps, 1)[: args.batch].float()
    batch_z = torch.full((args.batch,), float(z_match[0]))

    def rate(m) -> float:
        with torch.no_grad():
            m(batch_theta, batch_z)  # warm-up (and compilation)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                m(batch_theta, batch_z)
                times.append(time.perf_counter() - t0)
        return args.batch / float(np.median(times))

    eager_per_s = rate(model)
    model.dust.compile = True
    sedvae_per_s = rate(model)

    result = {
        "sedvae_per_s": round(sedvae_per_s, 1),
        "sedvae_eager_per_s": round(eager_per_s, 1),
        "bagpipes_per_s": round(bagpipes_per_s, 2),
        "speedup": round(sedvae_per_s / bagpipes_per_s, 1),
        "median_abs_frac_diff": float(f"{np.median(all_d):.3e}"),
        "p99_abs_frac_diff": float(f"{np.percentile(all_d, 99):.3e}"),
        "max_abs_frac_diff": float(f"{all_d.max():.3e}"),
        "worst_galaxy_median": float(f"{per_gal_median.max():.3e}"),
        "n_galaxies": args.n_galaxies,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "n_wave_sedvae": model.n_wave,
        "n_wave_bagpipes": int(reference.model.wavelengths.shape[0]),
    }
    print(
        f"sedvae   : {sedvae_per_s:10.1f} spectra/s  (batch {args.batch}, {model.n_wave} pixels, "
        f"1000-60000 A, compiled dust; eager {eager_per_s:.1f}/s)"
    )
    n_bp = result["n_wave_bagpipes"]
    print(f"bagpipes : {bagpipes_per_s:10.2f} spectra/s  (model_galaxy.update, {n_bp} pixels)")
    print(f"speedup  : {result['speedup']}x")
    print(
        f"|df/f| 3000-9000 A, {args.n_galaxies} galaxies: median {result['median_abs_frac_diff']}, "
        f"p99 {result['p99_abs_frac_diff']}, max {result['max_abs_frac_diff']}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
