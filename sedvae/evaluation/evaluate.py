"""Evaluation entry point: ``python evaluate.py evaluation=<name> ...`` (``conf/evaluate.yaml``).

The task is built by Hydra from ``cfg.evaluation`` (a ``_target_`` callable taking
``output_dir``); its metrics are written atomically to ``metrics.json`` in the run directory.
With ``logger=wandb`` (or ``logger=csv``) the metrics, and with W&B also every figure the task
drew, are logged too; W&B runs offline unless the user is logged in (``conf/logger/wandb.yaml``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from ..hydra_utils import instantiate_collection, output_dir, save_config, write_json_atomic
from ..paths import config_dir

log = logging.getLogger(__name__)
MAX_LOGGED_FIGURES = 50


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested metrics as ``{"a/b": value}`` (what loggers take)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{name}/"))
        elif isinstance(value, bool | int | float) and value is not None:
            flat[name] = float(value)
    return flat


def log_results(loggers: list[Any], metrics: dict, out: Path) -> None:
    """Send the metrics (and, to loggers that take images, the run's figures) to the loggers."""
    flat = {f"eval/{k}": v for k, v in flatten_metrics(metrics).items()}
    figures = sorted(out.rglob("*.png"))[:MAX_LOGGED_FIGURES]
    for logger in loggers:
        logger.log_metrics(flat)
        if figures and hasattr(logger, "log_image"):
            for fig in figures:
                key = str(fig.relative_to(out).with_suffix("")).replace("\\", "/")
                logger.log_image(key=key, images=[str(fig)])
        logger.finalize("success")
        if type(logger).__name__ == "WandbLogger":
            import wandb

            logger.experiment.finish()
            # finish() can return before the service has written the offline run's record file
            # (seen: only its 7-byte header right after, complete seconds later); stopping the
            # service waits for it, so the run is on disk when evaluate returns
            wandb.teardown()


def evaluate(cfg: DictConfig) -> dict:
    out = output_dir(cfg)
    save_config(cfg, out / "config.yaml")
    loggers = instantiate_collection(cfg.get("logger"))
    metrics = hydra.utils.instantiate(cfg.evaluation, output_dir=out)
    write_json_atomic(out / "metrics.json", metrics)
    log.info("metrics: %s", metrics)
    if loggers:
        log_results(loggers, metrics, out)
    log.info("outputs in %s", out)
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
