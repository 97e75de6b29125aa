"""LightningModule for :class:`sedvae.posterior.NeuralPosterior`: it calls ``net.augment`` and
``net.loss`` and logs; nothing else."""

from __future__ import annotations

import pytorch_lightning as pl

from ..posterior.model import NeuralPosterior


class PosteriorModule(pl.LightningModule):
    """Parameters
    ----------
    net : NeuralPosterior
    optimizer : callable(params) -> torch.optim.Optimizer (a Hydra ``_partial_``)
    scheduler : callable(optimizer) -> LR scheduler, optional (stepped per epoch)
    """

    def __init__(self, net: NeuralPosterior, optimizer, scheduler=None) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

    def _step(self, batch, stage: str):
        loss, metrics = self.net.loss(batch)
        n = batch["z"].shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", batch_size=n)
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, batch_size=n)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(self.net.augment(batch), "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._step(batch, "test")

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer=optimizer)}


__all__ = ["PosteriorModule"]
