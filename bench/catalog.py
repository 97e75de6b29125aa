"""End-to-end catalog throughput: DESI FITS files -> catalog.fits, on this CPU.

    python bench/catalog.py [--n-files 64] [--n-samples 1000] [--refine-steps 0] [--threads 0]

The bundled DESI coadd is copied ``--n-files`` times (with its redrock file) into a temporary
folder, and ``evaluation=catalog``'s code path runs over them: reading, the posterior head (1000
samples per galaxy, percentiles of theta and derived properties), the autoencoder's reduced
chi^2, sharded writing and merging. Compared with PROVABGS' reported MCMC cost of 5-10 CPU
minutes per galaxy, projected to the 238,516 BGS galaxies of the DESI One-Percent Survey.
Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sedvae.catalog.fitter import PosteriorFitter
from sedvae.catalog.run import run_catalog
from sedvae.catalog.sources import SpectraSource
from sedvae.paths import data_dir

N_ONEPERCENT = 238_516  # BGS Bright 143,017 + BGS Faint 95,499
PROVABGS_MIN_PER_GALAXY = (5.0, 10.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-files", type=int, default=64)
    parser.add_argument("--n-samples", type=int, default=1000)
    parser.add_argument("--refine-steps", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    src = data_dir() / "desi_example"
    coadd = src / "coadd-4-80613-thru20210324.fits"
    redrock = src / "redrock-4-80613-thru20210324.fits"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i in range(args.n_files):
            shutil.copy(coadd, tmp / f"coadd-{i:04d}.fits")
            shutil.copy(redrock, tmp / f"redrock-{i:04d}.fits")
        fitter = PosteriorFitter(
            n_samples=args.n_samples,
            autoencoder=data_dir() / "autoencoder" / "autoencoder_laptop.pt",
            refine_steps=args.refine_steps,
        )
        t0 = time.perf_counter()
        source = SpectraSource("desi", str(tmp / "coadd-*.fits"), redrock="auto")
        metrics = run_catalog(
            source, fitter, tmp / "out", shard_size=args.shard_size, n_plots=0, progress=False
        )
        wall = time.perf_counter() - t0
    n = metrics["n_galaxies"]
    per_s = n / wall
    cores = torch.get_num_threads()
    cpu_hours = N_ONEPERCENT / per_s / 3600 * cores
    provabgs = [N_ONEPERCENT * m / 60 for m in PROVABGS_MIN_PER_GALAXY]
    result = {
        "galaxies_per_s": round(per_s, 3),
        "onepercent_cpu_hours": round(cpu_hours, 2),
        "provabgs_onepercent_cpu_hours": [round(h) for h in provabgs],
        "speedup_vs_provabgs": [round(h / cpu_hours) for h in provabgs],
        "n_galaxies": n,
        "n_samples": args.n_samples,
        "refine_steps": args.refine_steps,
        "threads": cores,
        "wall_s": round(wall, 2),
    }
    print(f"{n} galaxies in {wall:.1f} s: {per_s:.2f} galaxies/s on {cores} threads")
    print(
        f"DESI One-Percent BGS ({N_ONEPERCENT} galaxies): {cpu_hours:.1f} CPU-hours with sedvae, "
        f"{provabgs[0]:.0f}-{provabgs[1]:.0f} with PROVABGS' MCMC (5-10 min per galaxy)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
