"""Training entry point: everything is built by Hydra from ``conf/train.yaml``.

``python train.py experiment=<emulator|autoencoder|posterior|posterior_flow|smoke> [debug=fdr]
[key=value ...]``
"""

from __future__ import annotations

import logging

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig

from .hydra_utils import instantiate_collection, output_dir, save_config, write_json_atomic
from .paths import config_dir

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit ``cfg.model`` on ``cfg.data`` with ``cfg.trainer``; return the final metrics."""
    if cfg.get("model") is None or cfg.get("data") is None:
        raise ValueError(
            "no model/data configured: choose one with experiment=<emulator|autoencoder|"
            "posterior|smoke>"
        )
    pl.seed_everything(cfg.seed, workers=True)
    out = output_dir(cfg)
    save_config(cfg, out / "config.yaml")
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    callbacks = instantiate_collection(cfg.get("callbacks"))
    loggers = instantiate_collection(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test"):
        ckpt = "best" if trainer.checkpoint_callback and not trainer.fast_dev_run else None
        for result in trainer.test(model, datamodule=datamodule, ckpt_path=ckpt):
            metrics.update({k: float(v) for k, v in result.items()})
    write_json_atomic(out / "metrics.json", metrics)
    log.info("metrics: %s", metrics)
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
