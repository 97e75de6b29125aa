"""End-to-end catalog throughput on survey-like DESI files, with the time of every stage.

    python bench/catalog.py [--n-files 10] [--targets-per-file 500] [--n-samples 1000]
                            [--refine exact] [--devices 1] [--strategy auto] [--large]

Inputs: ``--n-files`` DESI coadd files of ``--targets-per-file`` mock BGS targets each, in the
bundled coadd's exact layout (FIBERMAP with Legacy Surveys photometry, per-arm WAVELENGTH,
FLUX, IVAR, MASK, RESOLUTION) with a redrock file beside each (``sedvae.io.desi_write``). The
mocks are ``MockGenerator`` draws (PROVABGS prior, BGS n(z), nebular lines, the DESI instrument
with the real resolution matrices, BGS-like noise and masks); 1 % of the targets have a whole
arm masked and 2 % a redrock ZWARN. The files are written once and cached under
``cache/bench_catalog/`` (about 225 MB per 500 targets).

Run: ``evaluation=catalog``'s code path, ``sedvae.catalog.run.run_catalog`` with the posterior
head (1000 samples per galaxy, percentiles of theta and derived properties), the
autoencoder's reduced chi^2 (``--refine exact``, as ``evaluation=catalog``: its continuum
with lines and calibration solved, here with ``--refine-steps`` 0, the amortised fit for
survey-size runs, where the catalog's default refines 100 steps; ``--refine autoencoder``: its
own reconstruction), the line fluxes and posterior-predictive check from 16 draws
(``--ppc-draws``; ``--no-ppc`` leaves them out), sharded writing and merging;
``--devices 2 --strategy ddp`` runs it on two Lightning DDP processes. ``--large`` cycles the
cached files to 100,000 galaxies (a memory test: shards stream, so the peak RSS must stay flat).

Per-stage seconds come from ``sedvae.timing`` (process rank 0; stages overlap when
reading runs ahead of inference); ``line_calibration_solve`` (kinematics, lines and
calibration of every draw) and ``posterior_predictive`` (the draws' continua through SPS and
instrument, and the statistics) are null with ``--no-ppc``. Measured with ``--n-files 1``
(500 galaxies, one thread, ``--refine exact`` with 0 steps, the other core busy): flow_sampling
3.2 s, reconstruction (the exact fit) 28.1 s, line_calibration_solve 41.0 s,
posterior_predictive 41.2 s, 4.17 galaxies/s and 0.236 CPU-s per galaxy in all (the code
before the batched kinematics scans and shared resolution matrices, same run conditions: 35.0,
48.1, 49.5 s, 3.52 galaxies/s, 0.281 CPU-s; docs/results.md); the check costs ~26x the
sampling on CPU.
``cpu_s_per_galaxy`` is the process's CPU time per galaxy, steadier than the wall time on a
shared host. ``--large --large-n N --rss-log S`` prints the resident memory every S seconds
against the galaxies written. Compared
with PROVABGS' reported MCMC cost of 5-10 CPU minutes per galaxy, projected to the 238,516 BGS
galaxies of the DESI One-Percent Survey. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

from sedvae.catalog.fitter import PosteriorFitter
from sedvae.catalog.run import run_catalog
from sedvae.catalog.sources import SpectraSource
from sedvae.paths import data_dir
from sedvae.timing import STAGES, TIMER

N_ONEPERCENT = 238_516  # BGS Bright 143,017 + BGS Faint 95,499
PROVABGS_MIN_PER_GALAXY = (5.0, 10.0)
N_LARGE = 100_000
REPO = Path(__file__).resolve().parents[1]
MOCK_SEED = 2800
PPC_STAGES = ("line_calibration_solve", "posterior_predictive")


def mock_generator():
    """The project's mock generator (its module is moving into ``sedvae.simulation``)."""
    from sedvae.simulation import MockGenerator

    return MockGenerator()


def mock_files(folder: Path, n_files: int, per_file: int) -> list[Path]:
    """``n_files`` cached coadds of ``per_file`` mocks (file i from seed MOCK_SEED + i)."""
    from sedvae.io import read_spectra
    from sedvae.io.desi_write import (
        EXAMPLE_COADD,
        EXAMPLE_REDROCK,
        mock_coadd_spectra,
        write_desi_coadd,
    )

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"coadd-mock-{i:04d}.fits" for i in range(n_files)]
    todo = [
        i
        for i, p in enumerate(paths)
        if not (p.is_file() and p.with_name(p.name.replace("coadd-", "redrock-")).is_file())
    ]
    if todo:
        print(f"writing {len(todo)} mock DESI files of {per_file} targets to {folder}", flush=True)
        gen = mock_generator()
        like = read_spectra(
            "desi", data_dir() / EXAMPLE_COADD, redrock=data_dir() / EXAMPLE_REDROCK
        )
        for i in todo:
            t0 = time.perf_counter()
            spectra, _ = mock_coadd_spectra(
                gen, per_file, MOCK_SEED + i, like,
                first_targetid=39633345008634465 + 1_000_000 * i,
            )  # fmt: skip
            write_desi_coadd(paths[i], spectra)
            print(f"  {paths[i].name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return paths


def peak_rss_gb() -> float:
    """Peak resident memory of this process and of its finished children (Linux: KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024**2


def rss_gb() -> float:
    """Current resident memory of this process (Linux /proc), GB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def log_rss(out: Path, every: float, shard_size: int, stop: threading.Event) -> None:
    """Print (seconds, galaxies in written shards, RSS GB) every ``every`` seconds."""
    t0 = time.perf_counter()
    while not stop.wait(every):
        n = len(list((out / "shards").glob("*.fits"))) * shard_size
        print(f"rss: {time.perf_counter() - t0:.0f} s, ~{n} galaxies written, "
              f"{rss_gb():.3f} GB", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-files", type=int, default=10)
    parser.add_argument("--targets-per-file", type=int, default=500)
    parser.add_argument("--n-samples", type=int, default=1000)
    parser.add_argument("--refine", choices=("autoencoder", "exact"), default="exact",
                        help="the fit of the rchi2 column (conf/evaluation/catalog.yaml: exact)")
    parser.add_argument("--refine-steps", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--devices", type=int, default=1, help="Lightning processes")
    parser.add_argument("--strategy", default="auto", help="Lightning strategy (ddp for >1)")
    parser.add_argument("--large", action="store_true", help=f"{N_LARGE:,} galaxies")
    parser.add_argument("--large-n", type=int, default=N_LARGE,
                        help="galaxies of --large (a shorter memory test)")  # fmt: skip
    parser.add_argument("--rss-log", type=float, default=0.0,
                        help="print the resident memory and galaxies written every this many "
                             "seconds (0: never): shows whether memory grows with the run")
    parser.add_argument("--compile", action="store_true", help="torch.compile the flow sampler")
    parser.add_argument("--no-prefetch", action="store_true", help="read files in the loop")
    parser.add_argument("--no-ppc", action="store_true", help="no line fluxes and PPC")
    parser.add_argument("--ppc-draws", type=int, default=16)
    parser.add_argument("--cache", type=Path, default=REPO / "cache" / "bench_catalog")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.cache / f"desi_n{args.targets_per_file}_seed{MOCK_SEED}"
    files = mock_files(folder, args.n_files, args.targets_per_file)
    if args.large:  # the same files again and again: a long run without 45 GB of inputs
        files = files * -(-args.large_n // (len(files) * args.targets_per_file))
    fitter = PosteriorFitter(
        n_samples=args.n_samples,
        autoencoder=data_dir() / "autoencoder" / "autoencoder_laptop.pt",
        refine_steps=args.refine_steps,
        refine=args.refine,
        compile=args.compile,
        line_fluxes=not args.no_ppc,
        ppc=not args.no_ppc,
        ppc_draws=args.ppc_draws,
    )
    # one output folder for every DDP rank (the launcher reruns this script for rank 1, ...)
    out = Path(os.environ.setdefault("SEDVAE_BENCH_OUT", str(args.cache / f"out_{os.getpid()}")))
    rank0 = os.environ.get("LOCAL_RANK", "0") == "0"
    if rank0:
        shutil.rmtree(out, ignore_errors=True)
    TIMER.enable()
    TIMER.reset()
    stop = threading.Event()
    if args.rss_log > 0 and rank0:
        threading.Thread(target=log_rss, args=(out, args.rss_log, args.shard_size, stop),
                         daemon=True).start()  # fmt: skip
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    source = SpectraSource(
        "desi", [str(p) for p in files], redrock="auto", prefetch=not args.no_prefetch
    )
    metrics = run_catalog(
        source, fitter, out, shard_size=args.shard_size, n_plots=0, progress=False,
        devices=args.devices, strategy=args.strategy,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0  # this process (rank 0), every thread
    stop.set()
    if not metrics:  # a DDP rank other than 0
        sys.exit(0)
    shutil.rmtree(out, ignore_errors=True)
    n = metrics["n_galaxies"]
    per_s = n / wall
    threads = torch.get_num_threads()
    cores = threads * args.devices
    cpu_hours = N_ONEPERCENT / per_s / 3600 * cores
    provabgs = [N_ONEPERCENT * m / 60 for m in PROVABGS_MIN_PER_GALAXY]
    stage_seconds: dict[str, float | None] = {
        k: round(TIMER.seconds[k], 3) for k in STAGES + PPC_STAGES if k in TIMER.seconds
    }
    stage_seconds.update({k: None for k in PPC_STAGES if k not in TIMER.seconds})
    result = {
        "galaxies_per_s": round(per_s, 3),
        "onepercent_cpu_hours": round(cpu_hours, 2),
        "stage_seconds": stage_seconds,
        "peak_rss_gb": round(peak_rss_gb(), 3),
        "n_galaxies": n,
        "targets_per_file": args.targets_per_file,
        "n_files": len(files),
        "provabgs_onepercent_cpu_hours": [round(h) for h in provabgs],
        "speedup_vs_provabgs": [round(h / cpu_hours) for h in provabgs],
        "n_samples": args.n_samples,
        "refine": args.refine,
        "refine_steps": args.refine_steps,
        "threads": threads,
        "devices": args.devices,
        "strategy": args.strategy,
        "compile": args.compile,
        "prefetch": not args.no_prefetch,
        "n_flagged": metrics["n_flagged"],
        "n_warnings": metrics.get("n_warnings"),
        "median_rchi2_ppc": metrics.get("median_rchi2_ppc"),
        "ppc_draws": None if args.no_ppc else args.ppc_draws,
        "wall_s": round(wall, 2),
        # CPU seconds of this process per galaxy: on a host shared with other jobs, wall time
        # counts their share too; this does not (rank 0 only under DDP)
        "cpu_s_per_galaxy": round(cpu / n, 4),
    }
    print(f"{n} galaxies in {wall:.1f} s: {per_s:.2f} galaxies/s on {cores} threads")
    print(f"stage seconds (rank 0): {stage_seconds}")
    print(
        f"DESI One-Percent BGS ({N_ONEPERCENT} galaxies): {cpu_hours:.1f} CPU-hours with sedvae, "
        f"{provabgs[0]:.0f}-{provabgs[1]:.0f} with PROVABGS' MCMC (5-10 min per galaxy)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
