"""Cost of the catalog's posterior-predictive check (PPC) per galaxy, and of its kinematics.

    python bench/ppc.py [--n-mocks 64] [--draws 16] [--threads 1] [--own-resolution]
                        [--profile]

On ``--n-mocks`` in-model mocks (``MockGenerator``, seed 11: BC03 + Cloudy nebular emission,
the DESI instrument and noise; ``--own-resolution``: each with its own resolution matrix, as
DESI files carry) with the shipped posterior's samples (32 per galaxy, seed 5),
the check :class:`sedvae.catalog.ppc.PosteriorPredictive` (K = ``--draws``) runs as
``evaluation=catalog`` runs it, timed in CPU seconds of this process (``time.process_time``:
steadier than wall time on a shared machine), with the seconds of its two stages
(``sedvae.timing``: ``posterior_predictive``, the continua through SPS, broadening and
instrument; ``line_calibration_solve``, the narrow-line kinematics, lines and calibration).

Alternative in the same run: the narrow-line kinematics scan
(``LinearModel.fit_kinematics``, 13-point grids in width and velocity, 4 parabola steps
each; the check's first call) on the median draw's continuum, with the points of each grid
or parabola step solved together (``batch_points=True``, the default) against one batch per
point (``batch_points=False``, the former path): the ratio of CPU times, and the largest
difference of the (v, sigma) they return. ``--profile`` prints the check's 25 costliest
functions (cProfile, own time). Last line: JSON.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import pstats
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-mocks", type=int, default=64)
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--own-resolution", action="store_true",
                        help="each galaxy its own resolution matrix (as DESI files carry): the "
                             "instrument's, its columns scaled by 1 +- 5 %% and renormalised")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sedvae.catalog.fitter import default_posterior_path
    from sedvae.catalog.ppc import PosteriorPredictive, median_draw
    from sedvae.io.batch import FATAL
    from sedvae.posterior.api import load_posterior
    from sedvae.simulation.mocks import MockGenerator
    from sedvae.timing import TIMER

    m = MockGenerator().sample(args.n_mocks, torch.Generator().manual_seed(11))
    post = load_posterior(default_posterior_path())
    batch = {k: m[k] for k in ("flux", "ivar", "mask", "z", "photometry", "photometry_ivar")}
    samples, flags = post.sample(batch, 32, torch.Generator().manual_seed(5), return_flags=True)
    clean, _ = post.check(batch)
    if args.own_resolution:
        inst = MockGenerator().instrument
        g = torch.Generator().manual_seed(1)
        scale = 1 + 0.05 * torch.rand(args.n_mocks, 1, inst.npix, generator=g)
        res = inst.resolution.unsqueeze(0) * scale
        clean = dataclasses.replace(clean, resolution=res / res.sum(1, keepdim=True))
    ok = (flags.long() & int(FATAL)) == 0
    ppc = PosteriorPredictive(n_draws=args.draws)
    _ = ppc.mocks.sps, ppc.linear  # built once per run, untimed (a catalog amortises them)

    TIMER.enable()
    TIMER.reset()
    prof = cProfile.Profile() if args.profile else None
    t0 = time.process_time()
    if prof is not None:
        prof.enable()
    out = ppc(samples, clean, ok)
    if prof is not None:
        prof.disable()
    cpu = time.process_time() - t0
    stages = {k: round(v, 3) for k, v in TIMER.seconds.items()}
    TIMER.enable(False)
    n = int(ok.sum())
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)

    # the kinematics scan alone, both ways, on the median draw's continuum (as the check)
    b = int(ok.sum())
    theta = samples[: args.draws, ok].permute(1, 0, 2).double()
    z = clean.z[ok].double()
    res = None if clean.resolution is None else clean.resolution[ok]
    cont = ppc.continuum(median_draw(theta), z, resolution=res).float()
    flux, ivar = clean.flux[ok].float(), clean.ivar[ok].float()
    bad = ppc._bad(z, clean.mask[ok].bool())
    cont = cont * ppc._scale(cont, flux, torch.where(bad, 0.0, ivar))[:, None]
    lm = ppc.linear
    timing, result = {}, {}
    for batched in (True, False):
        t0 = time.process_time()
        result[batched] = lm.fit_kinematics(cont, flux, ivar, z.float(), mask=bad,
                                            resolution=res, return_fit=False,
                                            batch_points=batched)  # fmt: skip
        timing[batched] = (time.process_time() - t0) / b
    (v1, s1, _), (v0, s0, _) = result[True], result[False]

    res = {
        "n_galaxies": n,
        "draws": args.draws,
        "cpu_s_per_galaxy_ppc": round(cpu / n, 4),
        "stage_seconds": stages,
        "rchi2_ppc_median": float(out["rchi2_ppc"][ok].median()),
        "misfit_rate": float(out["misfit"][ok].float().mean()),
        "kinematics_s_per_galaxy_batched": round(timing[True], 4),
        "kinematics_s_per_galaxy_pointwise": round(timing[False], 4),
        "kinematics_pointwise_over_batched": round(timing[False] / timing[True], 3),
        "kinematics_max_abs_dv_kms": float((v1 - v0).abs().max()),
        "kinematics_max_rel_dsigma": float(((s1 - s0) / s0).abs().max()),
        "own_resolution": args.own_resolution,
        "threads": torch.get_num_threads(),
    }
    print(f"PPC: {cpu / n:.4f} CPU-s per galaxy ({n} galaxies, K = {args.draws}); stages {stages}")
    print(f"kinematics scan: {timing[True]:.4f} s/galaxy batched, {timing[False]:.4f} point by "
          f"point ({timing[False] / timing[True]:.2f}x)")  # fmt: skip
    print(json.dumps(res))


if __name__ == "__main__":
    main()
