"""Which summary network and flow for the SBI head: equal-wall-time training, held-out NLL.

    python -m studies.posterior_embeddings [--minutes 6] [--train-seeds 11] [--cache cache/mocks]

Every candidate trains for the same wall time on the same files (``write_mocks``, noise drawn
per batch) with Adam (lr 1e-3, batch 256), one thread, and is scored by the mean
-log q(u_true | x) on the fixed-noise validation file (lower is better; nats, u-space) and by
its sampling speed (1000 samples for each of 100 galaxies). Candidates:

- ``mlp+affine``: MLP trunk on 512 rest-frame bins, 10 affine couplings (64, 64);
- ``conv+affine``: spender-like conv trunk (16, 32, 64 filters) with attention pooling;
- ``mlp+spline``: the MLP trunk with 6 rational-quadratic spline couplings (64,), 4 bins;
- ``mlp+spline_final``: the shipped configuration (6 spline couplings (64, 64), 4 bins, mass
  anchor, Gaussianised prior coordinates);
- ``ae_frozen+spline_final``: the same flow on the frozen encoder of the trained autoencoder
  (``--autoencoder``, default ``data/autoencoder/autoencoder_laptop.pt``; skipped if absent);
- ``ae_finetune+spline_final``: the same, the encoder fine-tuned with the flow.

The held-out score is the NLL in u-space (``nll_u``), comparable between all of them.

Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sedvae.autoencoder.data import MockDataset
from sedvae.posterior.data import BatchNoiseMocks
from sedvae.posterior.embedding import ConvTrunk, MLPTrunk, SpectrumEmbedding
from sedvae.posterior.flow import PosteriorFlow
from sedvae.posterior.model import NeuralPosterior
from sedvae.simulation import desi_instrument, desi_noise_model

N_BINS = 512


def candidates(instrument, autoencoder: str | None = None):
    def emb(trunk):
        return SpectrumEmbedding(instrument, trunk, n_bins=N_BINS, n_out=64)

    def final_flow():
        return PosteriorFlow(64, 6, (64, 64), bins=4)

    def ae(freeze: bool):
        from sedvae.posterior import AutoencoderEmbedding

        return NeuralPosterior(
            AutoencoderEmbedding(autoencoder=autoencoder, freeze=freeze, n_out=64),
            final_flow(), gaussianize_prior=True,
        )  # fmt: skip

    out = {
        "mlp+affine": lambda: NeuralPosterior(
            emb(MLPTrunk(N_BINS)), PosteriorFlow(64, 10, (64, 64), bins=None)
        ),
        "conv+affine": lambda: NeuralPosterior(
            emb(ConvTrunk(N_BINS)), PosteriorFlow(64, 10, (64, 64), bins=None)
        ),
        "mlp+spline": lambda: NeuralPosterior(
            emb(MLPTrunk(N_BINS)), PosteriorFlow(64, 6, (64,), bins=4)
        ),
        "mlp+spline_final": lambda: NeuralPosterior(
            emb(MLPTrunk(N_BINS)), final_flow(), mass_anchor=True, gaussianize_prior=True
        ),
    }
    if autoencoder and Path(autoencoder).exists():
        out["ae_frozen+spline_final"] = lambda: ae(True)
        out["ae_finetune+spline_final"] = lambda: ae(False)
    return out


def collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--cache", default="cache/mocks")
    parser.add_argument("--n-train", type=int, default=50000)
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[11])
    parser.add_argument("--val", default="mocks_val_n2000_seed12.h5")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--autoencoder", default="data/autoencoder/autoencoder_laptop.pt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = Path(args.cache)
    noise = desi_noise_model()
    train = BatchNoiseMocks(
        [cache / f"mocks_train_n{args.n_train}_seed{s}.h5" for s in args.train_seeds], noise
    )
    val_ds = MockDataset(cache / args.val, noise, fixed_noise_seed=112)
    val = collate([val_ds[i] for i in range(len(val_ds))])
    instrument = desi_instrument()
    results = {}
    for name, build in candidates(instrument, args.autoencoder).items():
        if args.only and name not in args.only:
            continue
        torch.manual_seed(0)
        net = build()
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
        t0, steps = time.perf_counter(), 0
        while time.perf_counter() - t0 < 60 * args.minutes:
            rows = torch.randint(len(train), (256,)).tolist()
            loss, _ = net.loss(train[rows])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            steps += 1
        net.eval()
        with torch.no_grad():
            nll = float(net.loss(val)[1]["nll_u"])
            ctx, _ = net.embed({k: v[:100] for k, v in val.items()})
            t1 = time.perf_counter()
            for i in range(0, 100, 20):
                net.flow.sample(ctx[i : i + 20], 1000)
            ms = (time.perf_counter() - t1) * 10  # per galaxy
        n_par = sum(p.numel() for p in net.parameters())
        results[name] = {"val_nll_u": round(nll, 3), "steps": steps, "sample_ms": round(ms, 2),
                         "params": n_par}  # fmt: skip
        print(name, results[name], flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
