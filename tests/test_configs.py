"""Every entry point, experiment, evaluation, source and sweep composes; every _target_ imports;
each experiment resolves to the values stored in ``tests/expected_configs.yaml``.

After a deliberate change of what an experiment resolves to, rewrite that file with
``python tests/test_configs.py`` and review its diff."""

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
SOURCES = sorted(p.stem for p in (CONF / "source").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
SWEEPS = sorted((CONF / "sweep").glob("*.yaml"))
EXPECTED = Path(__file__).with_name("expected_configs.yaml")
# placeholders for the machine-dependent paths, so the stored values are the same everywhere
FIXED_PATHS = ["paths.root_dir=ROOT", "paths.output_dir=OUT"]
# what an experiment must keep resolving to: its data module, callbacks, trainer and the parts
# of the model that shared files supply (a restated or dropped value shows up here)
EXPERIMENT_KEYS = (
    "task_name",
    "data",
    "callbacks",
    "trainer",
    "model._target_",
    "model.optimizer",
    "model.init_from",
    "model.net._target_",
    "model.net.decoder.instrument",
    "model.net.decoder.sps",
    "model.net.embedding.instrument",
    "model.net.embedding.trunk",
)


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


@pytest.mark.parametrize("source", SOURCES)
def test_catalog_composes_with_every_source(hydra_ctx, tmp_path, source):
    cfg = compose(
        "evaluate",
        overrides=["evaluation=catalog", f"source={source}", f"paths.output_dir={tmp_path}"],
    )
    _check_targets(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert resolved["evaluation"]["source"] == resolved["source"]


def test_training_data_modules_and_evaluation_sources_are_apart(hydra_ctx, tmp_path):
    """`data=` (training data modules) and `source=` (galaxies for evaluate.py) hold only their
    kind: a data module, or a source that is not one. A data module named like a source (the
    real spectra of data=desi|sdss|table) reads its files through that very source."""
    import pytorch_lightning as pl

    assert SOURCES and DATA
    for name in DATA:
        cfg = compose("train", overrides=[f"data={name}", f"paths.output_dir={tmp_path}"])
        assert issubclass(hydra.utils.get_class(cfg.data._target_), pl.LightningDataModule), name
        if name in SOURCES:
            source = compose("evaluate", overrides=[f"source={name}", *FIXED_PATHS]).source
            mine = OmegaConf.to_container(cfg.data.source)
            theirs = OmegaConf.to_container(source)
            assert mine.pop("path") == "${..path}", name  # data.path, as the command line gives
            theirs.pop("path")
            assert mine == theirs, name
    for name in SOURCES:
        cfg = compose("evaluate", overrides=[f"source={name}", f"paths.output_dir={tmp_path}"])
        target = hydra.utils.get_object(cfg.source._target_)
        assert not issubclass(target, pl.LightningDataModule), name
    assert compose("evaluate", overrides=FIXED_PATHS).source.kind == "desi"  # the default


def _resolved_views() -> dict:
    """What each experiment (and each evaluation source) resolves to, for the stored file."""
    views = {}
    for experiment in EXPERIMENTS:
        cfg = compose("train", overrides=[f"experiment={experiment}", *FIXED_PATHS])
        view = {}
        for key in EXPERIMENT_KEYS:
            node = OmegaConf.select(cfg, key, default=None)
            if OmegaConf.is_config(node):
                node = OmegaConf.to_container(node, resolve=True)
            if node is not None:
                view[key] = node
        views[f"experiment={experiment}"] = view
    for source in SOURCES:
        cfg = compose("evaluate", overrides=[f"source={source}", *FIXED_PATHS])
        views[f"source={source}"] = OmegaConf.to_container(
            cfg.source, resolve=True, throw_on_missing=False
        )
    return views


def test_experiments_resolve_to_the_stored_values(hydra_ctx):
    """Experiments override only what differs; this pins what they resolve to, so a change in a
    shared file or a restated value that drifts from it cannot pass unnoticed."""
    expected = yaml.safe_load(EXPECTED.read_text())
    views = _resolved_views()
    assert sorted(views) == sorted(expected), "experiments or sources added or removed"
    for name, view in views.items():
        assert view == expected[name], name


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


if __name__ == "__main__":  # rewrite tests/expected_configs.yaml after a deliberate change

    class _Dumper(yaml.SafeDumper):  # mappings as blocks, lists on one line
        pass

    _Dumper.add_representer(
        list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)
    )
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        text = yaml.dump(_resolved_views(), Dumper=_Dumper, sort_keys=True, width=100)
    header = "# What each experiment and evaluation source resolves to (tests/test_configs.py).\n"
    EXPECTED.write_text(header + "# Rewrite with: python tests/test_configs.py\n" + text)
