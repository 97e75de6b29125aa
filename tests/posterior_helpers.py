"""Tiny posterior networks, configs and batches shared by the posterior tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sedvae.posterior import MLPTrunk, NeuralPosterior, PosteriorFlow, SpectrumEmbedding

N_BINS = 64


def arm_waves(npix_per_arm: int = 150) -> list[list[float]]:
    """Three overlapping arms like DESI's, with few (coarse) pixels: fast."""
    return [
        np.linspace(lo, hi, npix_per_arm).tolist()
        for lo, hi in ((3600, 5930), (5660, 7720), (7520, 9824))
    ]


def fake_instrument(npix_per_arm: int = 150):
    from sedvae.physics import DESIInstrument

    return DESIInstrument(waves=arm_waves(npix_per_arm))


def net_config(npix_per_arm: int = 150, hidden=(32,)) -> dict:
    """A Hydra config of a tiny NeuralPosterior on the fake instrument."""
    return {
        "_target_": "sedvae.posterior.NeuralPosterior",
        "embedding": {
            "_target_": "sedvae.posterior.SpectrumEmbedding",
            "instrument": {
                "_target_": "sedvae.physics.DESIInstrument",
                "waves": arm_waves(npix_per_arm),
            },  # fmt: skip
            "n_bins": N_BINS,
            "head": [32],
            "n_out": 16,
            "trunk": {
                "_target_": "sedvae.posterior.MLPTrunk",
                "n_bins": N_BINS,
                "hidden": [32],
                "n_out": 32,
            },  # fmt: skip
        },
        "flow": {
            "_target_": "sedvae.posterior.PosteriorFlow",
            "context": 16,
            "transforms": 3,
            "hidden": list(hidden),
            "bins": 4,
        },  # fmt: skip
    }


def tiny_net(bins: int | None = 4, **kwargs) -> NeuralPosterior:
    """A small head on the fake instrument; ``kwargs`` go to ``NeuralPosterior``."""
    inst = fake_instrument()
    emb = SpectrumEmbedding(inst, MLPTrunk(N_BINS, (32,), 32), n_bins=N_BINS, head=(32,), n_out=16)
    return NeuralPosterior(emb, PosteriorFlow(16, transforms=3, hidden=(32,), bins=bins), **kwargs)


def fake_batch(b: int = 5, npix: int = 450, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    wave = fake_instrument().wave.float()
    flux = (1 + 0.2 * torch.sin(wave / 300))[None] * (1 + torch.rand(b, 1, generator=g))
    return {
        "flux": flux + 0.05 * torch.randn(b, npix, generator=g),
        "ivar": torch.full((b, npix), 400.0),
        "mask": torch.zeros(b, npix, dtype=torch.bool),
        "z": 0.05 + 0.4 * torch.rand(b, generator=g),
        "photometry": 10 + torch.rand(b, 5, generator=g),
        "photometry_ivar": torch.full((b, 5), 100.0),
    }


def hydra_net(cfg: dict) -> NeuralPosterior:
    import hydra

    return hydra.utils.instantiate(cfg)


def assert_widened_start(net, src, batch: dict, n_new: int) -> None:
    """A net widened from ``src`` (``model.init_widen``) has exactly its loss on ``batch``,
    and the head's weights for the ``n_new`` new (last) inputs get gradients."""
    net.eval()
    loss = net.loss(batch)[0]
    with torch.no_grad():
        assert loss.item() == pytest.approx(src.loss(batch)[0].item(), rel=1e-6)
    loss.backward()
    assert net.embedding.head[0].weight.grad[:, -n_new:].abs().sum() > 0
