"""Every entry point, experiment, evaluation and sweep composes; every _target_ imports."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from sedvae.paths import config_dir

CONF = Path(config_dir())
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
EVALUATIONS = sorted(p.stem for p in (CONF / "evaluation").glob("*.yaml"))
SWEEPS = sorted((CONF / "sweep").glob("*.yaml"))


@pytest.fixture()
def hydra_ctx():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def _targets(node):
    if isinstance(node, dict):
        if "_target_" in node:
            yield node["_target_"]
        for value in node.values():
            yield from _targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets(value)


def _check_targets(cfg) -> None:
    container = OmegaConf.to_container(cfg, resolve=False)
    for target in _targets(container):
        assert hydra.utils.get_object(target) is not None, target


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("debug", [None, "fdr"])
def test_experiment_composes(hydra_ctx, tmp_path, experiment, debug):
    overrides = [f"experiment={experiment}", f"paths.output_dir={tmp_path}"]
    if debug:
        overrides.append(f"debug={debug}")
    cfg = compose("train", overrides=overrides)
    assert cfg.model is not None and cfg.data is not None
    _check_targets(cfg)


@pytest.mark.parametrize("evaluation", EVALUATIONS)
def test_evaluation_composes(hydra_ctx, tmp_path, evaluation):
    cfg = compose(
        "evaluate", overrides=[f"evaluation={evaluation}", f"paths.output_dir={tmp_path}"]
    )
    _check_targets(cfg)


def test_simulate_composes(hydra_ctx, tmp_path):
    cfg = compose(
        "simulate", overrides=["n=10", "seed=3", "nebular=true", f"paths.cache_dir={tmp_path}"]
    )
    assert cfg.out == f"{tmp_path}/simulated_n10_seed3_nebular.h5"
    assert compose("simulate", overrides=["n=10", f"paths.cache_dir={tmp_path}"]).out.endswith(
        "simulated_n10_seed0.h5"
    )


@pytest.mark.parametrize("sweep", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_parameters_are_hydra_keys(hydra_ctx, tmp_path, sweep):
    """A W&B sweep file: its command runs train.py, and every parameter is a Hydra key that
    composes with the sweep's experiment."""
    spec = yaml.safe_load(sweep.read_text())
    assert spec["program"] == "train.py"
    assert "${args_no_hyphens}" in spec["command"]  # W&B passes parameters as Hydra overrides
    experiment = next(
        c.split("=", 1)[1] for c in spec["command"] if str(c).startswith("experiment=")
    )
    for key, values in spec["parameters"].items():
        value = (
            values["values"][0] if "values" in values else values.get("min", values.get("value"))
        )
        cfg = compose(
            "train",
            overrides=[
                f"experiment={experiment}",
                f"{key}={value}",
                f"paths.output_dir={tmp_path}",
            ],
        )
        assert OmegaConf.select(cfg, key) is not None, key


def test_train_without_experiment_says_what_to_do(hydra_ctx, tmp_path):
    from sedvae.train import train

    cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="experiment="):
        train(cfg)
