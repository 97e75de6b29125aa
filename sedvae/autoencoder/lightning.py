"""LightningModule for :class:`sedvae.autoencoder.SpectrumAutoencoder`: it calls ``net.augment`` and
``net.loss`` and logs; reconstruction figures go to W&B each validation epoch when W&B is the
logger (``logger=wandb``)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from .model import SpectrumAutoencoder


class AutoencoderModule(pl.LightningModule):
    """Parameters
    ----------
    net : SpectrumAutoencoder
    optimizer : callable(params) -> torch.optim.Optimizer (a Hydra ``_partial_``)
    scheduler : callable(optimizer) -> LR scheduler, optional (stepped per epoch)
    augment : bool
        Apply ``net.augment`` to training batches.
    n_plot : int
        Validation galaxies drawn in the W&B reconstruction figures.
    """

    def __init__(self, net: SpectrumAutoencoder, optimizer, scheduler=None, augment: bool = True,
                 n_plot: int = 2) -> None:  # fmt: skip
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.augment = augment
        self.n_plot = n_plot
        self._plot_batch = None

    def training_step(self, batch, batch_idx):
        if self.augment:
            batch = self.net.augment(batch)
        loss, metrics = self.net.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["z"].shape[0])
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=batch["z"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss, metrics = self.net.loss(batch)
        n = batch["z"].shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, batch_size=n)
        if batch_idx == 0:
            self._plot_batch = {k: v[: self.n_plot] for k, v in batch.items()}
        return loss

    def test_step(self, batch, batch_idx):
        loss, metrics = self.net.loss(batch)
        n = batch["z"].shape[0]
        self.log("test/loss", loss, batch_size=n)
        self.log_dict({f"test/{k}": v for k, v in metrics.items()}, batch_size=n)

    def on_validation_epoch_end(self) -> None:
        from pytorch_lightning.loggers import WandbLogger

        loggers = [lg for lg in self.loggers if isinstance(lg, WandbLogger)]
        if not loggers or self._plot_batch is None or self.trainer.sanity_checking:
            return
        import matplotlib.pyplot as plt
        import wandb

        from ..plotting.reconstruction import plot_reconstruction

        with torch.no_grad():
            fig, _ = plot_reconstruction(self.net, self._plot_batch, index=0)
        for lg in loggers:
            lg.experiment.log({"val/reconstruction": wandb.Image(fig), "epoch": self.current_epoch})
        plt.close(fig)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer=optimizer)}
