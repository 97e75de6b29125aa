"""The shipped posterior on other instruments' grids: the same mock galaxies observed on the
DESI pixels it was trained on, on an SDSS legacy grid and on a MaNGA-like grid, in one run.

    python bench/grids.py [--n 200] [--seed 11] [--samples 1000] [--posterior FILE]
                          [--baseline FILE]

Mocks: prior draws of the generative model (``sedvae.simulation.MockGenerator``: BC03+MILES,
nebular emission, BGS-like z, fibre apertures 0.3-1, DESI noise and Legacy Surveys photometry).
Each galaxy is observed four times (``sedvae.simulation.grids.observe_on_grid``): on the DESI
coadd pixels (3600-9824 A, 0.8 A, the coadd's resolution matrix), on the SDSS legacy lattice
(1e-4 dex, 3800-9200 A, wdisp = 0.9 pixel, sigma ~ 1.7 A at 5000 A, in the batch as
``lsf_sigma``), on the BOSS lattice (the same, 3600-10400 A) and on a MaNGA-like grid (1e-4
dex from 3622 to 10354 A, 4563 pixels, R = 2000), with the same depth per Angstrom and the same
photometry; with ``--no-photometry`` the photometry is hidden. Figures per grid: the median
bias and the scatter (1.4826 MAD) of the posterior median logM* against the truth, the fraction
of truths inside the 16-84 % interval, the median 16-84 % half-width; and, for SDSS, BOSS and
MaNGA, the median and scatter of their
posterior medians minus the DESI ones, in units of the DESI half-width. Last line: JSON.

The grids differ in coverage: the shipped network was trained on DESI pixels only, so at
every z it saw the rest-frame bins of 3600-9824 A covered; a grid that stops short of that
(SDSS legacy: 3800-9200 A) gives it bins it never saw empty, which costs accuracy (measured
here), while grids that cover DESI's range (BOSS, MaNGA) read as well as DESI.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from sedvae.io.batch import Flag
from sedvae.physics import GenericInstrument, SDSSInstrument
from sedvae.physics.instruments import SDSS_DLOGLAM
from sedvae.posterior import load_posterior
from sedvae.simulation import MockGenerator
from sedvae.simulation.grids import observe_on_grid
from sedvae.sps import THETA

SDSS_WDISP = 0.9  # pixels: the legacy spectrographs' LSF sigma (0.8-1.0)


def sdss_lattice(lo: float, hi: float) -> np.ndarray:
    """loglam of the SDSS 1e-4 dex lattice pixels from lo to hi Angstrom."""
    n0, n1 = round(np.log10(lo) / SDSS_DLOGLAM), round(np.log10(hi) / SDSS_DLOGLAM)
    return np.arange(n0, n1 + 1) * SDSS_DLOGLAM


def grids() -> dict:
    """The other instruments and the galaxies' LSF on them (Angstrom)."""
    out = {}
    for name, (lo, hi) in (("sdss", (3800.0, 9200.0)), ("boss", (3600.0, 10400.0))):
        loglam = sdss_lattice(lo, hi)
        inst = SDSSInstrument(loglam, wdisp=np.full(len(loglam), SDSS_WDISP))
        out[name] = (inst, inst.sigma.double())
    out["manga"] = (GenericInstrument(np.geomspace(3622.0, 10354.0, 4563), resolution=2000.0),
                    None)  # fmt: skip
    return out


def make_batches(n: int, seed: int, photometry: bool = True) -> tuple[dict, torch.Tensor]:
    """Batches of the same n mocks on the four grids, and their true logM*."""
    mocks = MockGenerator()
    gen = torch.Generator().manual_seed(seed)
    params = mocks.draw(n, gen)
    sps = mocks.sps
    lum = mocks.rest_frame(params)  # also observed on the other grids below
    clean = mocks.noiseless(params, lum)
    obs = mocks.noisy(clean["flux_true"], clean["photometry_true"], gen)
    inst = mocks.instrument
    phot = {"photometry": obs["photometry"], "photometry_ivar": obs["photometry_ivar"]}
    if not photometry:
        phot["photometry_ivar"] = torch.zeros_like(phot["photometry_ivar"])
    z = params["z"].float()
    desi = {"flux": obs["flux"], "ivar": obs["ivar"], "mask": obs["mask"], "z": z,
            "wave": inst.wave.double(), "arm": inst.arm, **phot}  # fmt: skip
    out = {"desi": desi}
    for name, (grid_inst, lsf) in grids().items():
        o = observe_on_grid(sps.wave, lum, params["z"], params["aperture"], grid_inst, desi, gen,
                            lsf_sigma=lsf)  # fmt: skip
        o.pop("flux_true")
        out[name] = {**o, "z": z, **phot}
    return out, params["theta"][:, THETA.LOGMSTAR]


def score(post, batches: dict, truth: torch.Tensor, samples: int, seed: int,
          label: str = "") -> dict:
    """logM* bias, scatter, 68 % coverage and half-width of ``post`` per grid, the fraction
    flagged OOD, and the other grids' posterior medians against the DESI ones."""
    q = torch.tensor([0.16, 0.5, 0.84], dtype=torch.float64)
    stats, med, half = {}, {}, {}
    for name, batch in batches.items():
        t = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        s, flags = post.sample(batch, samples, gen, return_flags=True)
        p16, p50, p84 = torch.quantile(s[..., THETA.LOGMSTAR].double(), q, dim=0)
        err = (p50 - truth).numpy()
        inside = ((truth >= p16) & (truth <= p84)).double().mean().item()
        med[name], half[name] = p50.numpy(), (0.5 * (p84 - p16)).numpy()
        stats[name] = {
            "bias": float(np.median(err)),
            "scatter": float(1.4826 * np.median(np.abs(err - np.median(err)))),
            "coverage68": inside,
            "half_width": float(np.median(half[name])),
            "n_fatal": int(((flags & 7) > 0).sum()),
            "ood_frac": float(((flags & int(Flag.OOD)) > 0).float().mean()),
            "seconds": time.perf_counter() - t,
        }
        print(f"{label}{name:6s} logM* bias {stats[name]['bias']:+.3f} scatter "
              f"{stats[name]['scatter']:.3f} dex, 68% coverage {inside:.2f}, half-width "
              f"{stats[name]['half_width']:.3f}, OOD {stats[name]['ood_frac']:.3f}, "
              f"{stats[name]['seconds']:.1f} s")  # fmt: skip
    for name in ("sdss", "boss", "manga"):
        ok = half["desi"] > 0  # a posterior pinned at a prior edge has no width
        d = (med[name][ok] - med["desi"][ok]) / half["desi"][ok]
        stats[name]["vs_desi_median"] = float(np.median(d))
        stats[name]["vs_desi_scatter"] = float(1.4826 * np.median(np.abs(d - np.median(d))))
        print(f"{label}{name:6s} - desi posterior medians: median {np.median(d):+.2f}, scatter "
              f"{stats[name]['vs_desi_scatter']:.2f} DESI half-widths")  # fmt: skip
    out = {f"{g}_{k}": round(v, 4) for g, st in stats.items() for k, v in st.items()
           if k != "seconds"}  # fmt: skip
    out["sdss_over_desi_scatter"] = round(stats["sdss"]["scatter"] / stats["desi"]["scatter"], 3)
    out["boss_over_desi_scatter"] = round(stats["boss"]["scatter"] / stats["desi"]["scatter"], 3)
    print(f"{label}logM* scatter ratio to DESI: SDSS legacy {out['sdss_over_desi_scatter']:.2f}, "
          f"BOSS {out['boss_over_desi_scatter']:.2f}")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--no-photometry", action="store_true")
    ap.add_argument("--posterior", default="data/posterior/posterior.pt",
                    help="the head to score (default: the shipped one)")
    ap.add_argument("--baseline", default=None,
                    help="a second head scored on the same mocks (keys prefixed baseline_)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    batches, truth = make_batches(args.n, args.seed, not args.no_photometry)
    print(f"{args.n} mocks on 4 grids in {time.perf_counter() - t0:.1f} s")
    result = {"n": args.n, "photometry": not args.no_photometry}
    result.update(score(load_posterior(args.posterior), batches, truth, args.samples, args.seed))
    if args.baseline:
        base = score(load_posterior(args.baseline), batches, truth, args.samples, args.seed,
                     label="baseline ")  # fmt: skip
        result.update({f"baseline_{k}": v for k, v in base.items()})
        for k in ("sdss_bias", "sdss_scatter", "desi_scatter"):
            print(f"{k}: {result[k]:+.3f} (baseline {base[k]:+.3f})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
