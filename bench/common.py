"""Helpers shared by the benchmark scripts and the studies (a module, not a script).

Benchmarks run as ``python bench/<name>.py`` import it as ``common``; studies run as
``python -m studies.<name>`` from the repository root import it as ``bench.common``.
"""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def test_batch(cache: Path, n_test: int, seed: int) -> dict[str, torch.Tensor]:
    """The data module's held-out test set with its fixed noise, as one batch."""
    from sedvae.autoencoder.data import MockDataModule, MockDataset
    from sedvae.simulation import desi_noise_model, write_mocks

    dm = MockDataModule(cache_dir=str(cache), n_test=n_test, seed=seed)
    path = dm.path("test")
    if not path.exists():
        import json

        from sedvae.simulation import MockGenerator
        from sedvae.simulation.writer import mock_sfh_prior

        gen = dm.generator
        for other in sorted(Path(cache).glob("mocks_*.h5")):  # a cache serves one SFH prior
            prior = mock_sfh_prior(other)
            if prior != "provabgs":  # e.g. experiment=posterior_flow_sfh's cache/mocks_sfh
                gen = MockGenerator(sps=gen.sps, instrument=gen.instrument, noise=gen.noise,
                                    sfh=json.loads(prior))  # fmt: skip
                break
        write_mocks(path, n_test, seed + 2, gen)
    # the data module's test noise: same model (conf/data/mocks.yaml = the defaults), same seed
    ds = MockDataset(path, desi_noise_model(), fixed_noise_seed=seed + 102, truth=True)
    items = [ds[i] for i in range(len(ds))]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}
