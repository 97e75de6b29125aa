"""Small helpers shared by the Hydra entry points (train.py, evaluate.py, simulate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .fileio import write_json_atomic, write_text_atomic


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


def save_config(cfg: DictConfig, path: Path) -> None:
    """The run's resolved config, written atomically (``sedvae.checkpoint.export`` reads it)."""
    write_text_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))


__all__ = ["instantiate_collection", "output_dir", "save_config", "write_json_atomic"]
