"""Evaluation entry point: ``python evaluate.py evaluation=<name> ...`` (``conf/evaluate.yaml``).

The task is built by Hydra from ``cfg.evaluation`` (a ``_target_`` callable taking
``output_dir``); its metrics are written atomically to ``metrics.json`` in the run directory.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from .hydra_utils import output_dir, save_config, write_json_atomic
from .paths import config_dir

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict:
    out = output_dir(cfg)
    save_config(cfg, out / "config.yaml")
    metrics = hydra.utils.instantiate(cfg.evaluation, output_dir=out)
    write_json_atomic(out / "metrics.json", metrics)
    log.info("metrics: %s", metrics)
    log.info("outputs in %s", out)
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
