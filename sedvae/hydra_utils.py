"""Small helpers shared by the Hydra entry points (train.py, evaluate.py, simulate)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def instantiate_collection(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a mapping of configs (callbacks, loggers)."""
    import hydra

    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def output_dir(cfg: DictConfig) -> Path:
    """The run's output folder (Hydra's run dir unless ``paths.output_dir`` is given)."""
    path = Path(cfg.paths.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON through a temporary file, fsync and an atomic rename (``sedvae.fileio``):
    readers never see half a file, and a failed write leaves no temporary file."""
    from .fileio import write_json_atomic as write

    write(path, payload)


def save_config(cfg: DictConfig, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, path)


def net_from_lightning_checkpoint(checkpoint: str | os.PathLike, run_config: str | os.PathLike):
    """The ``model.net`` of a training run, rebuilt from its ``config.yaml`` with the weights of
    a Lightning checkpoint (whose module keeps it as ``net``); returns ``(net, net_config)``."""
    import hydra
    import torch

    net_cfg = OmegaConf.load(run_config).model.net
    net = hydra.utils.instantiate(net_cfg)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
    return net, net_cfg
