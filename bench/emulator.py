"""The Speculator emulator against the direct SPS simulator, on new prior draws.

    python bench/emulator.py [--n 10000] [--checkpoint data/emulator/speculator_bc03_provabgs.ckpt]
                             [--seed 20251125] [--threads 1]

Hold-out set: ``--n`` draws of the PROVABGS prior with z ~ U(0, z_max of the emulator), from a
generator seeded with ``--seed``; the script refuses the seed the training file was simulated
with (recorded in the checkpoint), so no hold-out galaxy was seen in training.

Measured:

- fractional error |f_emu / f_direct - 1| of the rest-frame spectrum per unit formed mass over
  all (galaxy, pixel) pairs: percentiles 50, 95, 99 and the worst, over 3000-9000 A and over
  the whole emulated range;
- g, r, z (DECam) and W1 (WISE) magnitudes of both spectra redshifted to z = 0.1 and z = 0.4
  (speclite filters, photon-counting AB): |m_emu - m_direct| percentiles per band;
- throughput at batch 1024 on the CPU (``--threads`` torch threads) of both models, forward
  only and forward + backward (gradient of a scalar of the spectra with respect to theta);
  the direct simulator runs on the emulator's wavelength range, so both make the same pixels.

Last line: JSON (fractions, not percent; magnitudes in mag; speedups as ratios).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sedvae.sps import THETA

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CKPT = REPO / "data" / "emulator" / "speculator_bc03_provabgs.ckpt"
BANDS = ("decam2014-g", "decam2014-r", "decam2014-z", "wise2010-W1")
GOALS = {"frac_err_p50": 0.003, "frac_err_p99": 0.015, "mag_err_p99": 0.01}
CHUNK = 1024


def direct_on(emu, z_max: float):
    """The direct simulator on the emulator's pixels: (model, column index into its grid)."""
    from sedvae.sps import SEDModel

    # the simulator cuts its grid in air wavelengths: ask a little more, then match pixels
    model = SEDModel(float(emu.wave[0]) - 5.0, float(emu.wave[-1]) + 50.0, z_max=z_max)
    idx = torch.searchsorted(model.wave, emu.wave)
    if not torch.equal(model.wave[idx.clamp_max(model.n_wave - 1)], emu.wave):
        raise RuntimeError("the emulator's wavelengths are not pixels of the simulator's grid")
    return model, idx


def log_lum_direct(model, cols, theta, z) -> torch.Tensor:
    """ln L per unit formed mass (B, L_emu) from the simulator."""
    theta, z = model.check_inputs(theta, z)
    lum = model.spectrum_from_history(model.history(theta, z), theta[:, THETA.DUST])
    return torch.log(lum[:, cols].clamp_min(1e-37))


def magnitudes(wave_rest, log_lum_unit, theta, z: float) -> np.ndarray:
    """AB magnitudes (B, 4) in ``BANDS`` of spectra redshifted to ``z``."""
    import astropy.units as u
    import speclite.filters

    from sedvae.physics import redshift_spectrum

    log_mass = theta[:, THETA.LOGMSTAR, None].double()
    lum = torch.exp(log_lum_unit.double() + np.log(10.0) * log_mass)
    wave_obs, flux = redshift_spectrum(wave_rest, lum, torch.full((len(lum),), z).double())
    filters = speclite.filters.load_filters(*BANDS)
    table = filters.get_ab_magnitudes(
        flux.numpy() * 1e-17 * u.erg / (u.s * u.cm**2 * u.AA), wave_obs[0].numpy() * u.AA
    )
    return np.stack([np.asarray(table[name]) for name in table.colnames], -1)


def timed(fn, reps: int = 5) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10000, help="hold-out prior draws")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT)
    parser.add_argument("--seed", type=int, default=20251125, help="hold-out draws' seed")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sedvae.checkpoint import load_checkpoint
    from sedvae.sps import PROVABGSPrior

    emu, meta = load_checkpoint(args.checkpoint, "emulator")
    trained = meta["training"]
    if trained.get("training_seed") == args.seed:
        raise SystemExit(f"--seed {args.seed} is the training set's seed: pick another")
    z_max = float(emu.z_max)
    direct, cols = direct_on(emu, z_max)
    wave = emu.wave
    print(f"emulator {args.checkpoint.name}: {emu.n_wave} pixels, {float(wave[0]):.0f}-"
          f"{float(wave[-1]):.0f} A, z <= {z_max:.3f}; trained on {trained.get('n_train')} "
          f"spectra (seed {trained.get('training_seed')}); hold-out seed {args.seed}")  # fmt: skip

    gen = torch.Generator().manual_seed(args.seed)
    theta = PROVABGSPrior().sample(args.n, gen)
    z = z_max * torch.rand(args.n, generator=gen)

    # ---- accuracy of the spectra ----------------------------------------------------------
    errs = np.empty((args.n, emu.n_wave), dtype=np.float32)
    with torch.no_grad():
        for a in range(0, args.n, CHUNK):
            b = min(a + CHUNK, args.n)
            d = emu.log_lum_unit(theta[a:b], z[a:b]) - log_lum_direct(
                direct, cols, theta[a:b], z[a:b]
            )
            errs[a:b] = torch.expm1(d).abs().numpy()
    optical = ((wave >= 3000) & (wave <= 9000)).numpy()
    qs = (50, 95, 99)
    res = {}
    print(f"\n|df/f| over {args.n} hold-out galaxies (percent)")
    print(f"{'range':>16} {'p50':>8} {'p95':>8} {'p99':>8} {'worst':>8}")
    for name, sel in [("3000-9000 A", optical), ("full range", slice(None))]:
        e = errs[:, sel].ravel()
        p = np.percentile(e, qs)
        print(f"{name:>16} " + " ".join(f"{100 * v:8.3f}" for v in (*p, e.max())))
        key = "frac_err" if name.startswith("3000") else "frac_err_full"
        res.update({f"{key}_p{q}": float(v) for q, v in zip(qs, p, strict=True)})
        res[f"{key}_max"] = float(e.max())
    bounds = emu.bounds
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        e = errs[:, lo:hi].ravel()
        p = np.percentile(e, qs)
        label = f"{float(wave[lo]):.0f}-{float(wave[hi - 1]):.0f} A"
        print(f"{label:>16} " + " ".join(f"{100 * v:8.3f}" for v in (*p, e.max())))
    per_gal = np.median(errs[:, optical], axis=1)
    print(f"per-galaxy median |df/f| (3000-9000 A): p50 {100 * np.median(per_gal):.3f} %, "
          f"p99 {100 * np.percentile(per_gal, 99):.3f} %")  # fmt: skip
    del errs

    # ---- magnitudes ---------------------------------------------------------------------------
    mag_p99 = {}
    print(f"\n|delta m| (mmag), {args.n} galaxies      p50      p95      p99    worst")
    for zz in (0.1, 0.4):
        zt = torch.full((args.n,), zz)
        with torch.no_grad():
            log_e = torch.cat([emu.log_lum_unit(theta[a : a + CHUNK], zt[a : a + CHUNK])
                               for a in range(0, args.n, CHUNK)])  # fmt: skip
            log_d = torch.cat([log_lum_direct(direct, cols, theta[a : a + CHUNK], zt[a : a + CHUNK])
                               for a in range(0, args.n, CHUNK)])  # fmt: skip
        dm = np.abs(magnitudes(wave, log_e, theta, zz) - magnitudes(wave, log_d, theta, zz))
        for j, band in enumerate(BANDS):
            p = np.percentile(dm[:, j], qs)
            mag_p99[f"{band}@z={zz}"] = float(p[2])
            print(
                f"{band:>14} z={zz}  " + " ".join(f"{1e3 * v:8.2f}" for v in (*p, dm[:, j].max()))
            )
    res["mag_err_p99"] = max(mag_p99.values())
    res["mag_err_p99_by_band"] = mag_p99

    # ---- throughput ---------------------------------------------------------------------------
    th, zb = theta[:1024], z[:1024]

    def fwd_emu():
        with torch.no_grad():
            emu(th, zb)

    def fwd_direct():
        with torch.no_grad():
            direct(th, zb)

    weight = torch.rand(emu.n_wave)

    def grad_of(model, weights):
        def step():
            t = th.clone().requires_grad_(True)
            (model(t, zb) * weights).sum().backward()

        return step

    weight_direct = torch.zeros(direct.n_wave)
    weight_direct[cols] = weight
    t_emu, t_dir = timed(fwd_emu), timed(fwd_direct)
    g_emu, g_dir = timed(grad_of(emu, weight)), timed(grad_of(direct, weight_direct))
    print(f"\nbatch 1024, {args.threads} CPU thread(s)   forward   fwd+grad   (spectra/s)")
    print(f"{'emulator':>30} {1024 / t_emu:9.0f} {1024 / g_emu:10.0f}")
    print(f"{'direct simulator':>30} {1024 / t_dir:9.0f} {1024 / g_dir:10.0f}")
    res.update(
        speedup_vs_direct=t_dir / t_emu,
        grad_speedup_vs_direct=g_dir / g_emu,
        emulator_spectra_per_s=1024 / t_emu,
        direct_spectra_per_s=1024 / t_dir,
        n_holdout=args.n,
        holdout_seed=args.seed,
        threads=args.threads,
        checkpoint=str(args.checkpoint),
    )
    print("\ngoals: " + ", ".join(
        f"{k} {res[k]:.4g} {'<=' if res[k] <= v else '>'} {v} "
        f"({'met' if res[k] <= v else f'x{res[k] / v:.1f} over'})" for k, v in GOALS.items()
    ))  # fmt: skip
    print(json.dumps(res))


if __name__ == "__main__":
    main()
