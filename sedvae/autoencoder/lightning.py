"""LightningModule for :class:`sedvae.autoencoder.SpectrumAutoencoder`: it calls ``net.augment`` and
``net.loss`` (or ``net.mixed_loss`` on real + mock batches) and logs; reconstruction figures go
to W&B each validation epoch when W&B is the logger (``logger=wandb``)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch

from ..checkpoint import CheckpointError, load_checkpoint
from .model import SpectrumAutoencoder

log = logging.getLogger(__name__)


def stored_net_config(path, overrides: dict | None = None) -> dict:
    """The allow-list checked net config of an autoencoder file (a checkpoint file or a
    Lightning checkpoint with a sedvae header), with ``overrides`` merged as
    :func:`sedvae.checkpoint.load_checkpoint` merges them."""
    from omegaconf import OmegaConf

    from ..checkpoint import FORMAT, LIGHTNING_KEY, check_config, read_torch_file

    payload = read_torch_file(path)
    header = payload if payload.get("format") == FORMAT else payload.get(LIGHTNING_KEY) or {}
    config = check_config(header.get("config"), path)
    if overrides:
        merged = OmegaConf.merge(OmegaConf.create(config), dict(overrides))
        config = check_config(OmegaConf.to_container(merged), path)
    return config


class AutoencoderModule(pl.LightningModule):
    """Parameters
    ----------
    net : SpectrumAutoencoder, optional
        The network; None with ``init_from``: the file's own network (its config and weights).
    optimizer : callable(params) -> torch.optim.Optimizer (a Hydra ``_partial_``)
    scheduler : callable(optimizer) -> LR scheduler, optional (stepped per epoch)
    augment : bool
        Apply ``net.augment`` to training batches (real and mock alike).
    n_plot : int
        Validation galaxies drawn in the W&B reconstruction figures.
    init_from : str, optional
        An autoencoder file (``sedvae.checkpoint``, e.g. the shipped
        ``data/autoencoder/autoencoder_laptop.pt``) to start from: fine-tuning. With ``net``
        its weights are loaded into ``net`` (same config, else refused with the mismatch);
        without, the file's network is built from the file's config, which then goes with
        every checkpoint of this run and into the exported file.
    net_overrides : dict, optional
        With ``init_from`` and no ``net``: merged into the file's config before building
        (e.g. ``{p_redshift: 0.3}``: re-redshifting augmentation for training on data).
    mock_weight : float
        On ``{"real", "mock"}`` batches (:class:`~sedvae.autoencoder.data.SpectraDataModule`):
        the weight of the supervised mock loss next to the unsupervised real one
        (:meth:`SpectrumAutoencoder.mixed_loss`). Plain mock batches ignore it.
    """

    def __init__(
        self,
        net: SpectrumAutoencoder | None = None,
        optimizer=None,
        scheduler=None,
        augment: bool = True,
        n_plot: int = 2,
        init_from: str | None = None,
        net_overrides: dict | None = None,
        mock_weight: float = 1.0,
    ) -> None:  # fmt: skip
        super().__init__()
        if optimizer is None:
            raise ValueError("an optimizer factory is needed (model.optimizer)")
        self.net_config = None  # the config the exported file stores (None: the run's model.net)
        if net is None:
            if not init_from:
                raise ValueError("give model.net or an autoencoder file to start from (init_from)")
            self.net_config = stored_net_config(init_from, net_overrides)
            net, _ = load_checkpoint(init_from, "autoencoder", config_overrides=net_overrides,
                                     trainable=True)  # fmt: skip
        elif init_from:
            if net_overrides:
                raise ValueError("net_overrides applies to the file's own net (model.net=null)")
            file_net, _ = load_checkpoint(init_from, "autoencoder")
            try:
                net.load_state_dict(file_net.state_dict())
            except RuntimeError as err:
                raise CheckpointError(
                    f"init_from={init_from}: its network differs from the configured one; "
                    "set model.net=null to fine-tune the file's own network. "
                    + " ".join(str(err).split())
                ) from err
        if mock_weight < 0:
            raise ValueError(f"mock_weight must be >= 0; got {mock_weight}")
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.augment = augment
        self.n_plot = n_plot
        self.init_from = init_from
        self.mock_weight = float(mock_weight)
        self.data_info: dict = {}
        self._plot_batch = None

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        self.data_info = dict(getattr(dm, "info", None) or {})
        if self.init_from:  # the file name only: an exported file must not carry machine paths
            self.data_info.update(init_from=Path(self.init_from).name, mock_weight=self.mock_weight)

    def _step(self, batch, augment: bool) -> tuple[torch.Tensor, dict, int]:
        if "real" in batch:  # fine-tuning on data: {"real": ..., "mock": ...}
            real, mock = batch["real"], batch.get("mock")
            if augment:
                real = self.net.augment(real)
                mock = self.net.augment(mock) if mock is not None else None
            loss, metrics = self.net.mixed_loss(real, mock, self.mock_weight)
            return loss, metrics, real["z"].shape[0]
        if augment:
            batch = self.net.augment(batch)
        loss, metrics = self.net.loss(batch)
        return loss, metrics, batch["z"].shape[0]

    def training_step(self, batch, batch_idx):
        loss, metrics, n = self._step(batch, self.augment)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=n)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, metrics, n = self._step(batch, augment=False)
        self.log("val/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, batch_size=n)
        if batch_idx == 0:
            shown = batch.get("real", batch)
            self._plot_batch = {k: v[: self.n_plot] for k, v in shown.items()}
        return loss

    def test_step(self, batch, batch_idx):
        loss, metrics, n = self._step(batch, augment=False)
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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """A run that built the file's network carries its config in every checkpoint, so that
        ``load_checkpoint`` and ``python -m sedvae.checkpoint export`` read it like a file."""
        if self.net_config is None:
            return
        from ..checkpoint import LIGHTNING_KEY, checkpoint_header

        checkpoint[LIGHTNING_KEY] = checkpoint_header(
            "autoencoder", self.net, self.net_config, training=self.data_info
        )
