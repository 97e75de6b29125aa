"""Frozen summaries (sedvae.posterior.summaries): they reproduce the NPE loss, a deepened flow
starts at the trained density, and the flow and regressor fitted on them recover known
conditional densities and means."""

from __future__ import annotations

import math

import pytest
import torch
from test_posterior import _one_thread, fake_batch, tiny_net  # noqa: F401 (autouse fixture)

from sedvae.posterior import PosteriorFlow
from sedvae.posterior.summaries import (
    SummaryRegressor,
    deepen_flow,
    fit_flow,
    fit_regressor,
    summarise_batch,
    summarise_dataset,
    summary_nll,
)
from sedvae.sps import THETA, PROVABGSPrior


def _net(gaussianize: bool):
    net = tiny_net()
    net.mass_anchor = True
    net.gaussianize_prior = gaussianize
    return net.eval()


@pytest.mark.parametrize("gaussianize", [True, False])
def test_frozen_summaries_reproduce_the_npe_loss(gaussianize):
    """-flow.log_prob(y, context) - log|dy/du| on the frozen summary equals the network's own
    NPE loss on the same batch, in both flow coordinates and with the mass anchor's shift."""
    net = _net(gaussianize)
    batch = fake_batch(6)
    batch["theta"] = PROVABGSPrior().sample(6, torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = net.loss(batch)[0].item()
        s = summarise_batch(net, batch)
        assert s["shift"][:, 0].abs().min() > 0  # the anchor is in use
        assert torch.equal(s["z"], batch["z"])  # truths the batch holds come along
        assert summary_nll(net.flow, s) == pytest.approx(loss, rel=1e-5)


class _Batches:
    """A BatchNoiseMocks stand-in: rows -> a batch with fresh noise."""

    def __init__(self, n: int = 10) -> None:
        self.theta = PROVABGSPrior().sample(n, torch.Generator().manual_seed(1))
        self.calls = 0

    def __len__(self) -> int:
        return self.theta.shape[0]

    def __getitem__(self, rows):
        return self.batch(rows)

    def batch(self, rows, generator=None):
        """Noise from ``generator`` when given (as ``BatchNoiseMocks.batch``)."""
        self.calls += 1
        seed = (
            self.calls if generator is None else int(torch.randint(2**31, (), generator=generator))
        )
        batch = fake_batch(len(rows), seed=seed)
        batch["theta"] = self.theta[torch.as_tensor(rows)]
        return batch


def test_summarise_dataset_covers_every_galaxy_per_draw():
    net = _net(True)
    data = _Batches(10)
    s = summarise_dataset(net, data, n_draws=2, batch_size=4, seed=0, augment=False)
    assert s["context"].shape == (20, net.flow.context) and s["y"].shape == (20, 11)
    # each draw holds every galaxy once (rows are shuffled, truths are not duplicated)
    logm = torch.sort(s["theta"][:, THETA.LOGMSTAR]).values
    assert torch.allclose(logm[::2], torch.sort(data.theta[:, THETA.LOGMSTAR]).values)
    assert torch.allclose(logm[1::2], logm[::2])
    assert net.training is False  # left as it was found


def test_summarise_dataset_noise_comes_from_its_seed():
    """The same seed gives the same summaries (noise included); another seed other noise."""
    net = _net(True)

    def run(seed):
        return summarise_dataset(net, _Batches(10), n_draws=2, batch_size=4, seed=seed)

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first["context"], again["context"])
    assert not torch.allclose(first["context"], other["context"])


def test_summarise_dataset_features_come_from_the_same_noisy_batches():
    """Candidate inputs computed by ``features`` line up with the summaries row by row."""
    net = _net(True)

    def features(batch):
        return torch.stack([batch["z"], batch["flux"][:, 0]], -1)

    s = summarise_dataset(net, _Batches(10), n_draws=2, batch_size=4, seed=0, features=features)
    assert s["features"].shape == (20, 2)
    assert torch.equal(s["features"][:, 0], s["z"])
    assert s["features"][:, 1].unique().numel() == 20  # fresh noise in every draw


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
