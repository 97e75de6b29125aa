"""evaluate.py end to end: W&B logging (offline) and Hydra launchers (SLURM config, local run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from sedvae.io.batch import Flag
from sedvae.paths import config_dir

REPO = Path(__file__).resolve().parents[1]
FAST = [
    "evaluation=catalog",
    "source=mock",
    "source.n=4",
    "evaluation.fitter.autoencoder=null",
    "evaluation.fitter.n_samples=200",
    "evaluation.n_plots=1",
    "evaluation.progress=false",
]


def test_evaluate_logs_metrics_and_figures_to_wandb_offline(tmp_path, monkeypatch):
    from sedvae.evaluation.evaluate import evaluate

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "evaluate",
            overrides=FAST
            + ["logger=wandb", f"paths.output_dir={tmp_path}", f"source.path={tmp_path}/m.h5"],
        )
    metrics = evaluate(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "one offline W&B run in the Hydra run directory"
    # the offline run's record file (what `wandb sync` uploads) holds the flattened metrics
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in ("eval/n_galaxies", "eval/coverage_68/logmstar", "eval/logmstar_scatter"):
        assert key.encode() in record, key
    images = {p.name.split("_")[0] for p in (runs[0] / "files/media/images/plots").glob("*.png")}
    assert {"coverage", "recovery", "corner", "sfh"} <= images  # every figure, as W&B images
    assert metrics["n_galaxies"] == 4
    assert json.loads((tmp_path / "metrics.json").read_text())["n_galaxies"] == 4


@pytest.mark.parametrize("launcher, gpus", [("slurm", None), ("slurm_gpu", 4)])
def test_slurm_launchers_compose(launcher, gpus, tmp_path):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        for task in ("evaluate", "train"):
            extra = ["evaluation=catalog"] if task == "evaluate" else ["experiment=posterior"]
            cfg = compose(
                task,
                overrides=[f"hydra/launcher={launcher}", f"paths.output_dir={tmp_path}", *extra],
                return_hydra_config=True,
            )
            lc = cfg.hydra.launcher
            assert lc._target_.endswith("submitit_launcher.SlurmLauncher")
            assert lc.gpus_per_node == gpus
            assert lc.tasks_per_node == (gpus or 1)  # one Lightning DDP process per GPU


def test_multirun_through_a_submitit_launcher(tmp_path):
    """The launcher path SLURM takes (pickled Hydra jobs run by submitit), on this machine."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "evaluate.py", "-m", "hydra/launcher=submitit_local", *FAST,
        "evaluation.n_plots=0", f"source.path={tmp_path}/a.h5,{tmp_path}/b.h5",
        f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=10",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    for job, name in ((0, "a.h5"), (1, "b.h5")):
        metrics = json.loads((sweep / str(job) / "metrics.json").read_text())
        assert metrics["n_galaxies"] == 4
        assert (tmp_path / name).is_file()
        assert (sweep / str(job) / "catalog.fits").is_file()


def test_main_job_default_is_the_catalog_of_the_bundled_desi_spectrum(tmp_path):
    """`python evaluate.py` with no argument (the README's main job), as configured."""
    from astropy.table import Table

    from sedvae.evaluation.evaluate import evaluate
    from sedvae.posterior import load_posterior

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"paths.output_dir={tmp_path}"])
    assert cfg.evaluation._target_ == "sedvae.catalog.run.run_catalog"
    metrics = evaluate(cfg)
    table = Table.read(tmp_path / "catalog.fits")
    # the warnings: MISFIT, the posterior-predictive check of this strong line emitter
    # (H alpha EW ~ 340 A) gives rchi2_ppc ~ 1.5, above the chi^2 0.999 quantile (~1.05); OOD,
    # its summary lies outside the shipped head's training summaries (sedvae.posterior.ood)
    assert list(table["TARGETID"]) == [39633345008634465]
    assert table["flags"][0] == int(Flag.MISFIT | Flag.OOD)
    # rchi2: the exact fit (refine: exact), lines and calibration solved with the continuum
    # refined; this real spectrum's best fit is near 1.5 (pPXF: 1.52), the amortised one 1.53
    assert metrics["n_flagged"] == 0 and 1.0 < metrics["median_rchi2"] < 1.55
    assert metrics["n_warnings"] == {"MISFIT": 1, "OOD": 1}
    threshold = load_posterior(cfg.evaluation.fitter.posterior).ood.threshold
    assert float(table["ood_score"][0]) < threshold
    # the posterior's draws fit no better than the best fit, and well enough to show no
    # large continuum error
    assert 1.05 < float(table["rchi2_ppc"][0]) < 2.0
    assert metrics["median_rchi2"] <= float(table["rchi2_ppc"][0])
    assert float(table["flux_halpha"][0]) > 10 * float(table["flux_err_halpha"][0])
    plots = {p.name.split("_")[0] for p in (tmp_path / "plots").glob("*.png")}
    assert plots == {"reconstruction", "corner", "sfh"}
