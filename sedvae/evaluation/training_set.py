"""Evaluation tasks run by ``evaluate.py``; each takes ``output_dir`` and returns metrics."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from sedvae.sps import THETA


def evaluate_training_set(path: str | Path, output_dir: str | Path, n_plot: int = 4) -> dict:
    """Summarise a simulated training set and save ``training_examples.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting.training_set import plot_training_examples

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no training set there; make one with python -m sedvae.simulation"
        )
    with h5py.File(path, "r") as f:
        if not f.attrs.get("complete", False):
            raise ValueError(f"{path} is incomplete (an interrupted simulate run?)")
        theta = f["theta"][()]
        derived = {k: f["derived"][k][()] for k in f["derived"]}
        surviving = 10 ** (derived["logmstar_surv"] - theta[:, THETA.LOGMSTAR])
        metrics = {
            "n": int(theta.shape[0]),
            "seed": int(f.attrs["seed"]),
            "z_min": float(f["z"][()].min()),
            "z_max": float(f["z"][()].max()),
            "median_logmstar_formed": float(np.median(theta[:, THETA.LOGMSTAR])),
            "median_logmstar_surv": float(np.median(derived["logmstar_surv"])),
            "median_surviving_fraction": float(np.median(surviving)),
        }
    fig, _ = plot_training_examples(path, n=n_plot)
    fig.savefig(Path(output_dir) / "training_examples.png", dpi=110)
    plt.close(fig)
    return metrics
