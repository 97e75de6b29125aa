"""Fits to frozen summaries, to tell the summary's limits from the flow's.

With the embedding fixed, (summary, theta) pairs are made once per noise draw
(:func:`sedvae.posterior.summaries.summarise_dataset`) and any density or estimator is fitted
to them in minutes on a CPU. Two questions follow:

- does a larger flow on the same summary narrow logM*? (:func:`deepen_flow`, :func:`fit_flow`:
  coupling layers added on the data side of the trained flow, starting as the identity, so
  the run starts at the trained file's density);
- how well can *any* function of the summary estimate logM*? (:func:`fit_regressor`: an MLP
  trained for the posterior mean by least squares, whose error is the smallest RMS error
  within reach of the summary, up to its own training; a flow's posterior median cannot do
  better by more than the mean-median difference).

``studies/posterior_summary.py`` runs both on the shipped file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from sedvae.posterior.flow import PosteriorFlow
from sedvae.posterior.summaries import summary_nll


def _cosine_warmup(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, cosine to 0 at ``total``."""
    ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return ramp * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def fit_flow(
    flow: PosteriorFlow,
    train: dict,
    val: dict | None = None,
    epochs: int = 10,
    lr: float = 2.5e-4,
    warmup_steps: int = 500,
    batch_size: int = 1024,
    weight_decay: float = 1e-5,
    clip: float = 1.0,
    seed: int = 0,
) -> list[dict]:
    """Maximum likelihood of the flow alone on frozen summaries (AdamW, linear warm-up, cosine
    decay to zero, gradient clipping as in ``experiment=posterior``). Returns one record per
    epoch: mean training loss (-log q in the flow's coordinates) and ``val_nll``
    (:func:`~sedvae.posterior.summaries.summary_nll`, when ``val`` is given)."""
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.AdamW(flow.parameters(), lr=lr, weight_decay=weight_decay)
    n = train["y"].shape[0]
    steps = max(n // batch_size, 1)
    total = steps * int(epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_warmup(s, total, warmup_steps))
    flow.train()
    history = []
    for epoch in range(int(epochs)):
        perm = torch.randperm(n, generator=gen)
        running = torch.zeros(())
        for i in range(steps):
            rows = perm[i * batch_size : (i + 1) * batch_size]
            loss = -flow.log_prob(train["y"][rows], train["context"][rows]).mean()
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(flow.parameters(), clip)
            opt.step()
            sched.step()
            running += loss.detach()
        record = {"epoch": epoch, "train_loss": float(running) / steps}
        if val is not None:
            record["val_nll"] = summary_nll(flow, val)
        history.append(record)
    return history


def deepen_flow(
    flow: PosteriorFlow,
    transforms: int = 4,
    hidden: Sequence[int] = (128, 128),
    bins: int = 8,
    mask_seed: int = 1,
) -> PosteriorFlow:
    """``flow`` with ``transforms`` more spline couplings on its data side (applied first by
    ``log_prob``, last when sampling), each conditioner's last layer zeroed so that every new
    layer starts as the identity and the deepened flow starts at exactly ``flow``'s density.
    Modifies and returns ``flow``; it then samples through zuko's generic inverse (its lean
    inverse assumes one bin count)."""
    from zuko.lazy import Flow

    extra = PosteriorFlow(flow.context, transforms=transforms, hidden=tuple(hidden), bins=bins,
                          features=flow.features, mask_seed=mask_seed)  # fmt: skip
    for layer in extra.flow.transform.transforms:
        nn.init.zeros_(layer.hyper[-1].weight)
        nn.init.zeros_(layer.hyper[-1].bias)
    layers = [*extra.flow.transform.transforms, *flow.flow.transform.transforms]
    flow.flow = Flow(layers, flow.flow.base)
    flow.bins = None  # zuko's inverse for sampling
    return flow


class SummaryRegressor(nn.Module):
    """MLP estimate of a target (e.g. logM*) from a frozen summary and the mass anchor's
    shift, with inputs and target standardised by the training set's moments."""

    def __init__(self, n_in: int, hidden: Sequence[int] = (256, 256, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_in
        for h in hidden:
            layers += [nn.Linear(width, h), nn.SiLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("x_loc", torch.zeros(n_in))
        self.register_buffer("x_scale", torch.ones(n_in))
        self.register_buffer("t_loc", torch.zeros(()))
        self.register_buffer("t_scale", torch.ones(()))

    @staticmethod
    def features(summaries: dict, extra: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C + 1 + k): the summary, the anchor's shift of the mass coordinate and
        optional extra columns (N, k) (e.g. true nuisances, for an oracle test)."""
        cols = [summaries["context"], summaries["shift"][:, :1]]
        if extra is not None:
            cols.append(extra.reshape(extra.shape[0], -1).to(summaries["context"].dtype))
        return torch.cat(cols, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) estimates for features x (N, n_in)."""
        return self.mlp((x - self.x_loc) / self.x_scale)[:, 0] * self.t_scale + self.t_loc


def fit_regressor(
    train: dict,
    target: torch.Tensor,
    extra: torch.Tensor | None = None,
    hidden: Sequence[int] = (256, 256, 256),
    epochs: int = 12,
    lr: float = 1e-3,
    batch_size: int = 512,
    seed: int = 0,
) -> SummaryRegressor:
    """Least-squares :class:`SummaryRegressor` of ``target`` (N,) (its minimiser is the
    posterior mean given the summary) on frozen summaries ``train``, with optional
    ``extra`` input columns (N, k) (then predict with ``model(model.features(s, extra))``):
    AdamW, cosine decay."""
    x = SummaryRegressor.features(train, extra)
    model = SummaryRegressor(x.shape[1], hidden)
    model.x_loc.copy_(x.mean(0))
    model.x_scale.copy_(x.std(0).clamp_min(1e-6))
    model.t_loc.copy_(target.mean())
    model.t_scale.copy_(target.std().clamp_min(1e-6))
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-5)
    n = x.shape[0]
    steps = max(n // batch_size, 1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps * int(epochs))
    t_std = (target - model.t_loc) / model.t_scale
    for _ in range(int(epochs)):
        perm = torch.randperm(n, generator=gen)
        for i in range(steps):
            rows = perm[i * batch_size : (i + 1) * batch_size]
            pred = model.mlp((x[rows] - model.x_loc) / model.x_scale)[:, 0]
            loss = ((pred - t_std[rows]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


__all__ = [
    "SummaryRegressor",
    "deepen_flow",
    "fit_flow",
    "fit_regressor",
]
