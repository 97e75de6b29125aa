"""Frozen summaries (sedvae.posterior.summaries): they reproduce the NPE loss, cover every
galaxy once per draw, take their noise from their seed and line up with candidate features."""

from __future__ import annotations

import pytest
import torch
from posterior_helpers import fake_batch, tiny_net

from sedvae.posterior.summaries import summarise_batch, summarise_dataset, summary_nll
from sedvae.sps import THETA, PROVABGSPrior

pytestmark = pytest.mark.usefixtures("one_thread")


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
