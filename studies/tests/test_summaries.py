"""Fits to frozen summaries (studies.summaries): a deepened flow starts at the trained
density, and the flow and regressor fitted on summaries recover known conditional densities
and means."""

from __future__ import annotations

import math

import pytest
import torch

from sedvae.posterior import PosteriorFlow
from studies.summaries import SummaryRegressor, deepen_flow, fit_flow, fit_regressor

pytestmark = pytest.mark.usefixtures("one_thread")


def test_deepened_flow_starts_at_the_trained_density_and_samples():
    torch.manual_seed(0)
    flow = PosteriorFlow(context=3, transforms=2, hidden=(16,), bins=4, features=11)
    with torch.no_grad():  # a "trained" flow: random spline parameters
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    y, c = torch.randn(50, 11), torch.randn(50, 3)
    before = flow.log_prob(y, c).detach()
    deep = deepen_flow(flow, transforms=2, hidden=(8,), bins=8)
    assert len(deep.flow.transform.transforms) == 4
    assert torch.allclose(deep.log_prob(y, c), before, atol=1e-5)
    s = deep.sample(c[:2], 7, torch.Generator().manual_seed(0))
    assert s.shape == (7, 2, 11) and torch.isfinite(s).all()
    # the new layers get gradients
    (-deep.log_prob(y, c).mean()).backward()
    assert deep.flow.transform.transforms[0].hyper[-1].weight.grad.abs().sum() > 0


def test_fit_flow_learns_a_known_conditional_density():
    """y = (c, -c/2) + N(0, 0.3^2): the flow's NLL approaches the true conditional entropy
    2 (ln(0.3 sqrt(2 pi e))) = -0.57 nats from the N(0, I) start, and its samples have the
    right mean and width."""
    torch.manual_seed(0)
    n = 8192
    c = torch.randn(n, 1)
    y = torch.cat([c, -0.5 * c], 1) + 0.3 * torch.randn(n, 2)
    data = {"y": y, "context": c, "log_dy_du": torch.zeros(n)}
    flow = PosteriorFlow(context=1, transforms=2, hidden=(32,), bins=4, features=2)
    history = fit_flow(flow, data, data, epochs=30, lr=1e-2, warmup_steps=0, batch_size=256)
    entropy = 2 * math.log(0.3 * math.sqrt(2 * math.pi * math.e))
    assert history[0]["val_nll"] > history[-1]["val_nll"]
    assert history[-1]["val_nll"] < entropy + 0.1
    with torch.no_grad():
        s = flow.sample(torch.tensor([[1.0]]), 4000, torch.Generator().manual_seed(0))[:, 0]
    assert torch.allclose(s.mean(0), torch.tensor([1.0, -0.5]), atol=0.05)
    assert torch.allclose(s.std(0), torch.tensor([0.3, 0.3]), atol=0.05)


def test_regressor_recovers_the_conditional_mean():
    """t = sin(2 c_0) + c_1 + N(0, 0.1^2): the held-out RMS error comes within 15 % of the
    noise (the error of the true conditional mean; 0.107 here), far below the constant
    predictor's; given the noise itself as an extra (oracle) input, it falls far below it."""
    torch.manual_seed(0)

    def draw(n):
        c = torch.randn(n, 2)
        noise = 0.1 * torch.randn(n)
        t = torch.sin(2 * c[:, 0]) + c[:, 1] + noise
        return {"context": c, "shift": torch.zeros(n, 11), "noise": noise[:, None]}, t

    train, t_train = draw(8192)
    test, t_test = draw(2000)
    reg = fit_regressor(train, t_train, hidden=(64, 64), epochs=40, lr=3e-3, batch_size=256)
    assert isinstance(reg, SummaryRegressor)
    with torch.no_grad():
        rms = (reg(reg.features(test)) - t_test).pow(2).mean().sqrt().item()
    assert rms < 0.115
    assert rms < 0.2 * t_test.std().item()
    oracle = fit_regressor(train, t_train, extra=train["noise"], hidden=(64, 64), epochs=40,
                           lr=3e-3, batch_size=256)  # fmt: skip
    with torch.no_grad():
        pred = oracle(oracle.features(test, test["noise"]))
    assert (pred - t_test).pow(2).mean().sqrt().item() < 0.5 * rms
