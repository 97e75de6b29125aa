"""A thin LightningModule for catalog inference: ``predict_step`` calls a fitter on a shard."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch


class CatalogModule(pl.LightningModule):
    """Runs ``fitter(batch) -> dict of per-galaxy columns`` on each shard for ``trainer.predict``.

    The fitter is any ``nn.Module`` (e.g. the posterior head) whose outputs have the shard's
    galaxies on their leading axis; ``shard`` and ``index`` are passed through for the writer.
    """

    def __init__(self, fitter: torch.nn.Module):
        super().__init__()
        self.fitter = fitter

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict:
        with torch.no_grad():
            columns = dict(self.fitter(batch))
        columns["index"] = batch["index"]
        columns["shard"] = batch["shard"]
        return columns
