"""``evaluation=catalog``: survey files -> posterior catalog, with Lightning predict.

Writes into ``output_dir``: ``shards/`` (one FITS table per finished shard, the resume state),
``catalog.fits`` (one row per galaxy), optionally ``samples.h5`` (posterior samples), and
``plots/`` (reconstructions, posterior corner plots and SFH bands for the first unflagged
galaxies; for sources with the truth, i.e. mocks, ``coverage.png`` and ``recovery.png`` over the
whole catalog). Returns the metrics that ``evaluate.py`` writes to ``metrics.json``
(``n_flagged``: galaxies a FATAL flag removed; ``n_warnings``: the other flags of the galaxies
kept, by name;
``median_rchi2_ppc`` with the posterior-predictive check; with the truth: 68 % coverage of
every quantity, the largest coverage deviation, and the bias (median), scatter (standard
deviation) and NMAD of the posterior medians of the headline properties; a figure that fails
is logged and listed in ``plot_failures``, never fails the run; ``plots_shown``: per plotted
galaxy, the numbers of its reconstruction's title, which are the catalog row's, and
``rchi2_fit``, the reduced chi^2 of the fit the figure draws, recomputed as the catalog does).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytorch_lightning as pl
import torch
from astropy.table import Table
from torch.utils.data import DataLoader

from ..fileio import atomic_path
from ..io.batch import FATAL, Flag
from ..timing import TIMER
from .manifest import check_manifest, run_manifest
from .module import CatalogModule
from .shards import ShardDataset, ShardWriter, finished_shards, merge_shards

log = logging.getLogger(__name__)


def run_catalog(
    source,
    fitter: torch.nn.Module,
    output_dir: str | os.PathLike,
    shard_size: int = 64,
    accelerator: str = "cpu",
    devices: int | str = 1,
    strategy: str = "auto",
    num_nodes: int = 1,
    write_samples: bool = False,
    n_plots: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the fitter over every galaxy of ``source`` and write the catalog (module docstring).

    Parameters
    ----------
    source : callable(start, stop) -> batch dict, with ``len()`` (e.g. ``SpectraSource``).
    fitter : module returning per-galaxy columns (e.g. ``PosteriorFitter``).
    shard_size : galaxies per shard (inference batch and resume unit).
    accelerator, devices, strategy, num_nodes : Lightning's; ``strategy=ddp devices=N`` (or a
        Hydra launcher, e.g. SLURM) spreads the shards over processes, GPUs and nodes.
    write_samples : also keep the posterior samples in ``samples.h5``.
    """
    out = Path(output_dir)
    shard_dir = out / "shards"
    if write_samples:
        fitter.keep_samples = True
    done = finished_shards(shard_dir)
    # refuse shards of another run (other files, checkpoints, seed, shard size) at once
    check_manifest(shard_dir, run_manifest(source, fitter, shard_size), has_shards=bool(done))
    dataset = ShardDataset(len(source), source, shard_size, skip=done)
    if done:
        log.info("resuming: %d of %d shards already written", len(done), dataset.n_shards)
    t0 = time.perf_counter()
    if len(dataset):
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            num_nodes=num_nodes,
            logger=False,
            enable_progress_bar=progress,
            inference_mode=False,  # the autoencoder's refinement needs autograd; no_grad elsewhere
            callbacks=[ShardWriter(shard_dir)],
        )
        loader = DataLoader(dataset, batch_size=None, shuffle=False)
        trainer.predict(CatalogModule(fitter), loader, return_predictions=False)
        if trainer.global_rank != 0:
            return {}
    elapsed = time.perf_counter() - t0
    t_write = time.perf_counter()
    table = merge_shards(shard_dir, dataset.n_shards)
    if "samples" in table.colnames:
        _write_samples(out / "samples.h5", table)
        table.remove_column("samples")
    _write_catalog(out / "catalog.fits", table, source)
    if TIMER.enabled:
        TIMER.add("write", time.perf_counter() - t_write)
    metrics = _metrics(table, dataset.n_galaxies_todo, elapsed)
    failures: list[dict[str, str]] = []
    if any(c.endswith("_rank") for c in table.colnames):
        metrics.update(truth_metrics(table))
        _guarded(failures, "coverage and recovery", _truth_plots, out / "plots", table)
    if n_plots:
        shown: dict[str, Any] = {}
        metrics["n_plotted"] = _plots(out / "plots", source, fitter, table, n_plots, failures,
                                      shown)  # fmt: skip
        metrics["plots_shown"] = shown
    metrics["plot_failures"] = failures
    return metrics


def _guarded(failures: list[dict[str, str]], what: str, plot, *args, shown=None) -> bool:
    """Run one plot; a failure is logged and recorded, never raised: the catalog is written
    already, and a figure must not turn a finished run into an error. What the plot returns
    (the numbers its title shows) goes to ``shown[what]`` when given."""
    try:
        values = plot(*args)
    except Exception as err:
        log.warning("plot of %s failed: %s: %s", what, type(err).__name__, err)
        failures.append({"plot": what, "error": f"{type(err).__name__}: {err}"})
        return False
    if shown is not None and values is not None:
        shown[what] = values
    return True


def _write_catalog(path: Path, table: Table, source) -> None:
    table = table.copy()
    if "ids" in table.colnames:
        table.rename_column("ids", "TARGETID" if getattr(source, "kind", "") == "desi" else "ID")
    table.meta["NSAMPLE"] = "posterior percentiles p16/p50/p84 from the sedvae SBI head"
    with atomic_path(path) as tmp:
        table.write(tmp, format="fits", overwrite=True)


def _write_samples(path: Path, table: Table) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("samples", data=np.asarray(table["samples"], dtype=np.float32))
        f.create_dataset("index", data=np.asarray(table["index"]))
        f.attrs["layout"] = "samples (galaxy, draw, 12) in sedvae.sps.PARAM_NAMES order"


def _metrics(table: Table, n_run: int, elapsed: float) -> dict[str, Any]:
    flags = np.asarray(table["flags"])
    rchi2 = (
        np.asarray(table["rchi2"], dtype=float) if "rchi2" in table.colnames else np.array([np.nan])
    )
    good = np.isfinite(np.asarray(table["logmstar_p50"], dtype=float))
    kept = (flags & int(FATAL)) == 0  # warnings are counted among the galaxies kept
    warnings = {f.name: int((kept & ((flags & f.value) != 0)).sum()) for f in Flag
                if not f.value & int(FATAL)}  # fmt: skip
    ppc = {}
    if "rchi2_ppc" in table.colnames:
        r = np.asarray(table["rchi2_ppc"], dtype=float)
        ppc["median_rchi2_ppc"] = float(np.nanmedian(r)) if np.isfinite(r).any() else None
    return {
        "n_galaxies": len(table),
        # galaxies a FATAL flag removed (no posterior); warnings are counted per flag below
        "n_flagged": int((~kept).sum()),
        "n_warnings": {k: v for k, v in warnings.items() if v},
        **ppc,
        "n_without_posterior": int((~good).sum()),
        "median_rchi2": float(np.nanmedian(rchi2)) if np.isfinite(rchi2).any() else None,
        "median_logmstar": float(np.nanmedian(np.asarray(table["logmstar_p50"], float)[good]))
        if good.any()
        else None,
        "inference_seconds": round(elapsed, 3),
        "galaxies_per_s_this_run": round(n_run / elapsed, 3) if elapsed > 0 and n_run else None,
    }


HEADLINE = ("logmstar", "logmstar_surv", "log_sfr_100myr", "log_z_mw", "t_mw_gyr", "tau_ism")


def truth_metrics(table: Table) -> dict[str, Any]:
    """Calibration and recovery from the ``_rank`` / ``_true`` columns of a mock catalog."""
    from ..plotting.posterior import marginal_coverage, recovery_columns
    from ..posterior.diagnostics import recovery

    levels = np.linspace(0, 1, 21)
    names = [c.removesuffix("_rank") for c in table.colnames if c.endswith("_rank")]
    cov68, worst = {}, {}
    for name in names:
        r = np.asarray(table[f"{name}_rank"], float)
        cov68[name] = round(float(marginal_coverage(r, [0.68])[0]), 4)
        worst[name] = round(float(np.nanmax(np.abs(marginal_coverage(r, levels) - levels))), 4)
    out: dict[str, Any] = {
        "coverage_68": cov68,
        "coverage_max_dev": worst,
        "coverage_max_dev_all": max(worst.values()) if worst else None,
    }
    for name in HEADLINE:
        if f"{name}_true" not in table.colnames:
            continue
        c = recovery_columns(table, name)
        if len(c["p50"]) > 1:
            # the same statistics as bench/posterior.py (median bias, standard deviation, NMAD)
            rec = recovery(torch.as_tensor(np.asarray(c["p50"], float)),
                           torch.as_tensor(np.asarray(c["truth"], float)))  # fmt: skip
            for key in ("bias", "scatter", "nmad"):
                out[f"{name}_{key}"] = round(rec[key], 4)
    return out


def _truth_plots(folder: Path, table: Table) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting.posterior import plot_coverage, plot_recovery

    folder.mkdir(parents=True, exist_ok=True)
    ranks = {c.removesuffix("_rank"): table[c] for c in table.colnames if c.endswith("_rank")}
    fig, _ = plot_coverage(ranks)
    fig.savefig(folder / "coverage.png", dpi=110)
    plt.close(fig)
    fig, _ = plot_recovery(table, [n for n in HEADLINE if f"{n}_true" in table.colnames])
    fig.savefig(folder / "recovery.png", dpi=110)
    plt.close(fig)


def _plots(folder: Path, source, fitter, table: Table, n_plots: int,
           failures: list[dict[str, str]], shown: dict | None = None) -> int:  # fmt: skip
    """Reconstruction, corner and SFH figures of the first ``n_plots`` galaxies without a flag,
    then with the fewest warning bits (a FATAL one has no posterior); returns how many
    galaxies were plotted, failures go to ``failures``."""
    flags = np.asarray(table["flags"]).astype(np.int64)
    # unflagged galaxies first, then those with fewer warnings (a FATAL one has no posterior)
    usable = np.flatnonzero((flags & int(FATAL)) == 0)
    n_bits = np.array([bin(int(f)).count("1") for f in flags[usable]], dtype=int)
    chosen = usable[np.argsort(n_bits, kind="stable")][:n_plots]
    ids = table["ids"] if "ids" in table.colnames else table["index"]
    if len(chosen) < min(n_plots, len(table)):
        log.info("plots: %d unflagged galaxies of %d", len(chosen), len(table))
    done = 0
    for row in chosen:
        index = int(table["index"][row])
        done += _guarded(failures, f"galaxy {ids[row]}", _plot_galaxy, folder, source, fitter,
                         index, ids[row], table[row], shown=shown)  # fmt: skip
    return done


def _plot_galaxy(folder: Path, source, fitter, index: int, name, row=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting.posterior import plot_corner, plot_sfh_bands

    folder.mkdir(parents=True, exist_ok=True)
    batch = source(index, index + 1)
    posterior = fitter.posterior
    gen = torch.Generator().manual_seed(0)
    samples, flags = posterior.sample(batch, fitter.n_samples, gen, return_flags=True)
    shown = None
    if getattr(fitter, "autoencoder", None) is not None:
        from ..plotting.reconstruction import plot_reconstruction

        # the fit the catalog's rchi2 comes from: the posterior's cleaned batch, refined as
        # the fitter refines it, and the catalog row's numbers in the title
        ae = fitter.autoencoder
        clean, _ = posterior.check(batch)
        output = fitter.reconstruct(clean, components=True)
        catalog = None
        if row is not None and "rchi2" in row.colnames:
            catalog = {k: row[k] for k in ("rchi2", "logmstar_p50", "rchi2_ppc")
                       if k in row.colnames}  # fmt: skip
        # the posterior-predictive band and solved lines: the catalog's check of these draws
        ppc = None
        predictive = getattr(fitter, "predictive", None)
        if predictive is not None and samples.shape[0] >= predictive.n_draws:
            res = predictive(samples, clean, (flags & int(FATAL)) == 0)
            if "fit" in res:
                ppc = {"model": res["fit"]["model"][0], "lines": res["fit"]["lines_model"][0],
                       "rchi2_ppc": float(res["rchi2_ppc"][0])}  # fmt: skip
        with torch.no_grad():
            fig, _ = plot_reconstruction(ae, output["batch"], index=0, output=output,
                                         catalog=catalog, ppc=ppc)  # fmt: skip
        shown = dict(fig.shown)
        if ppc is not None:
            shown["rchi2_ppc_band"] = ppc["rchi2_ppc"]
        fig.savefig(folder / f"reconstruction_{name}.png", dpi=90)
        plt.close(fig)
    truth = batch["theta"][0] if "theta" in batch else None
    fig, _ = plot_corner(samples[:, 0], truth=truth)
    fig.savefig(folder / f"corner_{name}.png", dpi=90)
    plt.close(fig)
    fig, _ = plot_sfh_bands(posterior.sfh_bands(samples, batch["z"]), index=0)
    fig.savefig(folder / f"sfh_{name}.png", dpi=90)
    plt.close(fig)
    return shown
