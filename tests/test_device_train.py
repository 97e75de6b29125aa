"""The prepared accelerator run (bench/device_train.sh), exercised on the CPU at toy size with
the exported tables, as the device would run it: checkpoints that load, and the JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def device_dir(tmp_path_factory):
    """A folder laid out as bench/device_prepare.sh leaves .device/ (the table file; the wheels
    are not needed where hydra, omegaconf and zuko are installed)."""
    from sedvae.simulation.onthefly import observation_arrays
    from sedvae.sps.tables import export_tables

    # one export per test run, shared with tests/test_sps_tables.py (~40 s on one core)
    folder = tmp_path_factory.getbasetemp() / "sps_tables_export"
    if not (folder / "sps_tables.npz").is_file():
        export_tables(folder / "sps_tables.npz", observation=observation_arrays())
    return folder


def test_device_train_at_toy_size(device_dir, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, SEDVAE_DEVICE_DIR=str(device_dir),
               TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")  # fmt: skip
    env.pop("SEDVAE_SPS_TABLES", None)
    args = ["--toy", "--posterior-s", "4", "--emulator-s", "4", "--batch", "16",
            "--emulator-batch", "16", "--steps-per-epoch", "3", "--n-val", "32",
            "--pca-spectra", "128", "--throughput-batches", "1"]  # fmt: skip
    proc = subprocess.run(["bash", str(ROOT / "bench" / "device_train.sh"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["simulator"]["spectra_per_s"] > 0
    for key in ("posterior", "emulator"):
        assert report[key]["steps"] >= 1 and report[key]["steps_per_s"] > 0
        assert report[key]["val/loss"] == report[key]["val/loss"]  # finite, not NaN
    assert json.loads((out / "throughput.json").read_text()) == report
    # what comes back from a device: at most 8 files of at most 16 MiB, all in OUT itself
    files = sorted(p.name for p in out.iterdir())
    assert files == ["device_train.log", "emulator.pt", "emulator_metrics.csv", "posterior.pt",
                     "posterior_metrics.csv", "throughput.json"]  # fmt: skip
    assert all((out / f).stat().st_size <= 16 * 2**20 for f in files)

    from sedvae.checkpoint import load_checkpoint
    from sedvae.emulator import load_emulator
    from sedvae.sps import PROVABGSPrior

    net, meta = load_checkpoint(out / "posterior.pt", "posterior")
    assert meta["training"]["steps"] == report["posterior"]["steps"]
    emulator = load_emulator(out / "emulator.pt")
    import torch

    theta = PROVABGSPrior().sample(4, torch.Generator().manual_seed(0))
    lum = emulator(theta, torch.full((4,), 0.1))
    assert lum.shape == (4, emulator.n_wave) and torch.isfinite(lum).all()
