"""LightningModule for the Speculator emulator: it fits the PCA in ``setup`` (training split
only), then calls ``net.loss``; the checkpoint carries the PCA bases, the normalisations and
the header (kind, config, metadata) that :func:`sedvae.checkpoint.load_checkpoint` checks, so a
Lightning checkpoint of this module loads and exports like a checkpoint file."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytorch_lightning as pl
import torch

from .speculator import Speculator

log = logging.getLogger(__name__)


class EmulatorModule(pl.LightningModule):
    """Parameters
    ----------
    net : callable(wave=..., z_max=...) -> Speculator (a Hydra ``_partial_``: the wavelength
        grid and redshift range come from the training data), or a built Speculator.
    optimizer : callable(params) -> torch.optim.Optimizer (a Hydra ``_partial_``)
    scheduler : callable(optimizer) -> LR scheduler, optional; stepped per epoch and given
        ``val/loss`` when it is a ReduceLROnPlateau.
    pca_spectra : int
        Training spectra used for the PCA and the input standardisation (the first rows of the
        training split: independent prior draws).
    init_from : str, optional
        Start from this emulator checkpoint (its architecture, PCA and weights; ``net`` is then
        not used), e.g. to continue training with a new learning-rate cycle.
    """

    def __init__(
        self,
        net: Callable[..., Speculator] | Speculator,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable | None = None,
        pca_spectra: int = 20000,
        init_from: str | None = None,
    ):
        super().__init__()
        self.net_factory = None if isinstance(net, Speculator) else net
        self.net = net if isinstance(net, Speculator) else None
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.pca_spectra = pca_spectra
        self.init_from = init_from
        self.data_info: dict = {}

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if self.net is None and self.init_from is not None:
            from ..checkpoint import load_checkpoint

            self.net, _ = load_checkpoint(self.init_from, "emulator", trainable=True)
            log.info("starting from %s", self.init_from)
        elif self.net is None:
            self.net = self.net_factory(wave=dm.wave, z_max=dm.z_range[1])
        if not torch.equal(self.net.wave.cpu(), dm.wave.to(self.net.wave)):
            raise ValueError(
                f"the data's wavelengths ({len(dm.wave)} pixels, {float(dm.wave[0]):.0f}-"
                f"{float(dm.wave[-1]):.0f} A) differ from the emulator's ({self.net.n_wave} "
                "pixels): set data.wave_min/wave_max to the first/last model.net.segments"
            )
        self.data_info = {
            "training_set": str(dm.path),
            "training_seed": dm.attrs.get("seed"),  # bench/emulator.py draws with another
            "n_train": len(dm.train_set),
        }
        if stage == "fit" and bool(self.net.fitted):
            # continuing on this data: its nominal z range is covered by training from here on
            self.net.z_max.fill_(max(float(self.net.z_max), dm.z_range[1]))
            self.net.config["z_max"] = float(self.net.z_max)
        if stage == "fit" and not bool(self.net.fitted):
            info = self.net.fit_pca(dm.train_chunks(self.pca_spectra))
            log.info(
                "PCA on %d training spectra leaves %.2e of the ln L variance; z <= %.3f",
                info["n"], 1.0 - info["explained"], info["z_max"],
            )  # fmt: skip

    def training_step(self, batch, batch_idx):
        loss = self.net.loss(batch["theta"], batch["z"], batch["lum"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["z"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        n = batch["z"].shape[0]
        loss = self.net.loss(batch["theta"], batch["z"], batch["lum"])
        # |df/f| over all pixels, PCA truncation included (per-batch percentiles, averaged)
        err = self.net.log_lum_error(batch["theta"], batch["z"], batch["lum"]).abs().flatten()
        frac = torch.expm1(err[:: max(1, err.numel() // 1_000_000)])
        self.log("val/loss", loss, prog_bar=True, batch_size=n)
        self.log("val/frac_err_p50", frac.median(), batch_size=n)
        self.log("val/frac_err_p99", torch.quantile(frac, 0.99), batch_size=n)
        return loss

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.net.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "monitor": "val/loss"},
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from ..checkpoint import LIGHTNING_KEY, checkpoint_header

        checkpoint[LIGHTNING_KEY] = checkpoint_header("emulator", self.net, training=self.data_info)


__all__ = ["EmulatorModule"]
