"""Frozen summaries: what the trained embedding passes to the flow, computed once, so that the
conditional density and the summary can be trained and tested apart.

The NPE loss of :class:`~sedvae.posterior.NeuralPosterior` is -log q(y | s(x)) with
s = the embedding's summary and y the flow's coordinates of theta (relative to the mass
anchor). With the embedding fixed, (s, y) pairs can be made once per noise draw
(:func:`summarise_dataset`) and the flow trained on them alone
(:class:`~sedvae.posterior.data.FrozenSummaryDataModule`): the noise model and the embedding cost
~0.5 ms per galaxy, ~15 times a flow's training step per galaxy. :func:`summary_nll` is the
NPE loss of a flow on such pairs.
"""

from __future__ import annotations

import torch

from .flow import PosteriorFlow
from .model import BATCH_KEYS, NeuralPosterior

TRUTH_KEYS = ("z", "logU", "sigma_v", "aperture")  # carried along when a batch has them


@torch.no_grad()
def summarise_batch(net: NeuralPosterior, batch: dict) -> dict[str, torch.Tensor]:
    """Frozen summary of a clean batch with its truths (``theta`` (B, 12) among its keys):
    ``context`` (B, C) the summary, ``shift`` (B, 11) the mass anchor's shift, ``y`` (B, 11)
    the flow's coordinates of the true theta minus the shift (what ``net.flow.log_prob``
    sees), ``log_dy_du`` (B,) log|dy/du| (so -log q(u | x) = -flow.log_prob(y, context) -
    log_dy_du, the NPE loss), ``theta`` (B, 12), and those of ``z``, ``logU``, ``sigma_v``,
    ``aperture`` (B,) that the batch holds (truths, for oracle tests)."""
    context, shift = net.embed({k: batch.get(k) for k in BATCH_KEYS})
    u = net.prior.to_unconstrained(batch["theta"].double()).to(context.dtype)
    y, log_dy_du = net.flow_coordinates(u)
    out = {
        "context": context,
        "y": y - shift,
        "log_dy_du": log_dy_du,
        "shift": shift,
        "theta": batch["theta"].to(context.dtype),
    }
    out.update({k: batch[k].to(context.dtype) for k in TRUTH_KEYS if batch.get(k) is not None})
    return out


@torch.no_grad()
def summarise_dataset(
    net: NeuralPosterior,
    dataset,
    n_draws: int = 1,
    batch_size: int = 1024,
    seed: int = 0,
    augment: bool = True,
    features=None,
) -> dict[str, torch.Tensor]:
    """Frozen summaries of every galaxy of a
    :class:`~sedvae.posterior.data.BatchNoiseMocks` (fresh noise per draw, from ``seed``, so
    the same seed gives the same summaries), ``n_draws`` times,
    with the training augmentation (``net.augment``: photometry hidden for a share of the
    galaxies) unless ``augment`` is False. Returns :func:`summarise_batch`'s keys, each
    concatenated over draws and batches, and ``features`` when a callable ``features(batch)
    -> (B, k)`` is given: candidate inputs computed on the same noisy batches (e.g. extra
    inputs of a regressor)."""
    gen = torch.Generator().manual_seed(int(seed))
    parts: dict[str, list[torch.Tensor]] = {}
    was_training = net.training
    net.eval()
    try:
        for _ in range(int(n_draws)):
            perm = torch.randperm(len(dataset), generator=gen)
            for i in range(0, len(dataset), batch_size):
                batch = dataset.batch(perm[i : i + batch_size].tolist(), gen)
                if augment:
                    batch = net.augment(batch, gen)
                out = summarise_batch(net, batch)
                if features is not None:
                    out["features"] = features(batch)
                for k, v in out.items():
                    parts.setdefault(k, []).append(v)
    finally:
        net.train(was_training)
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def summary_nll(flow: PosteriorFlow, summaries: dict, chunk: int = 1000) -> float:
    """Mean -log q(u | x) (nats, the NPE loss and the training logs' ``nll_u``) of a flow on
    frozen summaries."""
    was_training = flow.training
    flow.eval()
    lp = [flow.log_prob(summaries["y"][i : i + chunk], summaries["context"][i : i + chunk])
          for i in range(0, summaries["y"].shape[0], chunk)]  # fmt: skip
    flow.train(was_training)
    return float(-(torch.cat(lp) + summaries["log_dy_du"]).mean())


__all__ = [
    "TRUTH_KEYS",
    "summarise_batch",
    "summarise_dataset",
    "summary_nll",
]
