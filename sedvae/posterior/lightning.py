"""LightningModule for :class:`sedvae.posterior.NeuralPosterior`: it calls ``net.augment`` and
``net.loss`` and logs; the weight surgery of ``init_from``/``init_widen``/``freeze_embedding`` is
the net's own (:meth:`NeuralPosterior.load_weights`, :meth:`NeuralPosterior.freeze_embedding`)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from ..checkpoint import CheckpointError, load_checkpoint
from .model import NeuralPosterior

PCA_FIT_SPECTRA = 20000  # training spectra for the gappy-PCA basis (~1 min on one core)


def init_weights(net: NeuralPosterior, path, widen: bool = False) -> None:
    """Copy the weights of the posterior file ``path`` into ``net``
    (:meth:`NeuralPosterior.load_weights`), refusing another network with the mismatch named."""
    try:
        net.load_weights(load_checkpoint(path, "posterior")[0].state_dict(), widen=widen)
    except RuntimeError as err:  # torch lists the missing, unexpected and mis-shaped tensors
        raise CheckpointError(
            f"init_from={path}: its network differs from the configured one; start from a file "
            "trained with the same model.net config. " + " ".join(str(err).split())
        ) from err


class PosteriorModule(pl.LightningModule):
    """Parameters
    ----------
    net : NeuralPosterior
    optimizer : callable(params) -> torch.optim.Optimizer (a Hydra ``_partial_``)
    scheduler : callable(optimizer) -> LR scheduler, optional (stepped per epoch)
    init_from : str, optional
        A posterior checkpoint (``sedvae.checkpoint``, e.g. a previous run's
        ``posterior.pt``) whose weights start this run: fine-tuning, or a second cosine cycle
        with fresh optimiser state. Its network must be the one ``net`` is (same config); a
        different one is refused with the mismatch spelled out. Unlike ``ckpt_path`` (which
        resumes a run where it stopped, schedule included), only the weights are taken.
    init_widen : bool
        With ``init_from``: the configured network may read more inputs than the file's
        (e.g. ``embedding.indices=true`` added to a file trained without); those layers start
        from the file's weights with zeros for the new inputs (:func:`widened_state`). It may
        also add a flow affine head (``flow.affine_head``), which starts as the identity, or
        gappy-PCA inputs (``embedding.pca``), whose basis :meth:`setup` fits. Either way the
        run starts at exactly the file's density.
    freeze_embedding : bool
        Train the flow alone (needs ``init_from``): every weight outside ``net.flow`` (the
        summary network, the mass anchor, a gappy-PCA basis) stays as the file has it, in eval
        mode. Training batches may then be frozen summaries (``context``, ``y``,
        ``log_dy_du``: :class:`~sedvae.posterior.data.FrozenSummaryDataModule`), on which the
        loss is the same -log q(u | x) as on raw batches without running the embedding
        (``experiment=posterior_flow``).
    summary_from : str, optional
        The posterior file whose embedding made the data module's frozen summaries
        (``data.summary_from``, passed by ``conf/model/posterior.yaml``); :meth:`setup` refuses
        them unless that embedding is this net's own.
    warmup_steps : int
        Optimiser steps over which the learning rate ramps linearly from lr / warmup_steps to
        the scheduler's lr (0: none). For a cycle started from trained weights: fresh AdamW
        moments take steps of ~lr per weight at once, and a cycle without warm-up first loses
        ground it then spends epochs regaining. The ramp scales each step only; the
        scheduler's own lr is left as it set it.
    """

    def __init__(
        self,
        net: NeuralPosterior,
        optimizer,
        scheduler=None,
        init_from=None,
        warmup_steps=0,
        init_widen: bool = False,
        freeze_embedding: bool = False,
        summary_from: str | None = None,
    ) -> None:
        super().__init__()
        if init_from:
            init_weights(net, init_from, widen=init_widen)
        if freeze_embedding:
            if not init_from:
                raise ValueError(
                    "freeze_embedding trains the flow alone on a trained summary: give the "
                    "posterior file to start from (model.init_from)"
                )
            if init_widen:
                raise ValueError("freeze_embedding with init_widen would freeze untrained inputs")
            net.freeze_embedding()
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.warmup_steps = int(warmup_steps)
        self.freeze_embedding = bool(freeze_embedding)
        self.summary_from = summary_from or None

    def on_train_epoch_start(self) -> None:
        if self.freeze_embedding:  # Lightning puts the whole module in train mode
            self.net.embedding.eval()

    def setup(self, stage: str) -> None:
        """Before fitting: check that frozen summaries (``summary_from``) come from this net's
        embedding, and fit the embedding's gappy-PCA basis (``embedding.pca``) to noiseless
        spectra of the data module's training set unless it has one (from ``init_from`` or a
        checkpoint)."""
        if stage != "fit":
            return
        if self.summary_from is not None:
            source, _ = load_checkpoint(self.summary_from, "posterior")
            self._check_frozen_summaries(source.summary_state())
        pca = getattr(self.net.embedding, "pca", None)
        if pca is None or bool(pca.fitted):
            return
        data = self.trainer.datamodule
        if not hasattr(data, "clean_spectra"):
            raise ValueError(
                "embedding.pca needs a data module whose training set has noiseless spectra "
                "(sedvae.posterior.data.PosteriorMockDataModule) to fit its basis"
            )
        self.net.embedding.fit_pca(*data.clean_spectra(PCA_FIT_SPECTRA))

    def _check_frozen_summaries(self, frozen: dict) -> None:
        """Frozen summaries must come from this net's own embedding (the file it started from)."""
        if not self.freeze_embedding:
            raise ValueError("the data module serves frozen summaries: the flow must train "
                             "alone (model.freeze_embedding=true)")  # fmt: skip
        own = self.net.summary_state()
        same = own.keys() == frozen.keys() and all(
            torch.equal(own[k].cpu(), frozen[k].cpu()) for k in own
        )
        if not same:
            raise CheckpointError(
                "the frozen summaries were made by another embedding than the model's: set "
                "data.summary_from to the model's init_from file"
            )

    def _step(self, batch, stage: str):
        loss, metrics = self.net.loss(batch)
        n = batch["theta"].shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", batch_size=n)
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, batch_size=n)
        return loss

    def training_step(self, batch, batch_idx):
        if "context" in batch:  # frozen summaries, augmented when they were made
            if not self.freeze_embedding:
                raise ValueError("frozen-summary batches train the flow alone: set "
                                 "model.freeze_embedding=true")  # fmt: skip
            return self._step(batch, "train")
        return self._step(self.net.augment(batch), "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._step(batch, "test")

    def warmup_factor(self, step: int) -> float:
        """Learning-rate factor of optimiser step ``step`` (0-based): (step + 1) / warmup_steps
        during the warm-up, then 1."""
        if step >= self.warmup_steps:
            return 1.0
        return (step + 1) / self.warmup_steps

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        factor = self.warmup_factor(self.trainer.global_step)
        if factor == 1.0:
            return optimizer.step(closure=optimizer_closure)
        lrs = [group["lr"] for group in optimizer.param_groups]
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr * factor
        try:
            return optimizer.step(closure=optimizer_closure)
        finally:  # the scheduler reads and updates the unscaled lr
            for group, lr in zip(optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer=optimizer)}


__all__ = ["PosteriorModule"]
