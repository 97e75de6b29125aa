"""The SBI head trained on the generative model (issue 26): a few steps of
``train.py experiment=posterior_generative`` from the shipped head, then ``evaluate.py`` with
the file it wrote."""

from __future__ import annotations

import json

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sedvae.paths import config_dir


def test_a_head_trained_on_the_generative_simulator_runs_through_evaluate(tmp_path):
    from astropy.table import Table

    from sedvae.checkpoint import load_checkpoint
    from sedvae.evaluation.evaluate import evaluate
    from sedvae.train import train

    run = tmp_path / "train"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=posterior_generative", f"paths.output_dir={run}", "~logger",
            "data.batch_size=16", "data.steps_per_epoch=3", "data.n_val=16",
            "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
            "callbacks.lr_monitor=null", "model.warmup_steps=0",
        ])  # fmt: skip
        metrics = train(cfg)
        assert np.isfinite(metrics["val/loss"])
        net, _ = load_checkpoint(run / "posterior.pt", "posterior")
        shipped, _ = load_checkpoint(cfg.model.init_from, "posterior")
        # warm-started from the shipped head and moved by the 3 steps
        moved = [not torch.equal(a, b) for a, b in
                 zip(net.state_dict().values(), shipped.state_dict().values(), strict=True)]
        assert any(moved)
        out = tmp_path / "eval"
        ecfg = compose("evaluate", overrides=[
            "evaluation=catalog", "source=mock", "source.n=4", f"source.path={tmp_path}/m.h5",
            f"evaluation.fitter.posterior={run}/posterior.pt",
            "evaluation.fitter.autoencoder=null", "evaluation.fitter.n_samples=100",
            "evaluation.fitter.line_fluxes=false", "evaluation.fitter.ppc=false",
            "evaluation.n_plots=0", "evaluation.progress=false", f"paths.output_dir={out}",
        ])  # fmt: skip
    GlobalHydra.instance().clear()
    result = evaluate(ecfg)
    table = Table.read(out / "catalog.fits")
    assert len(table) == 4 and result["n_galaxies"] == 4
    # every galaxy got a posterior within the prior, and its truth beside it
    assert np.all(np.isfinite(table["logmstar_p50"]))
    assert np.all((table["logmstar_p16"] <= table["logmstar_p50"])
                  & (table["logmstar_p50"] <= table["logmstar_p84"]))  # fmt: skip
    assert np.all(np.abs(table["logmstar_p50"] - table["logmstar_true"]) < 2.0)
    assert json.loads((out / "metrics.json").read_text())["n_galaxies"] == 4
