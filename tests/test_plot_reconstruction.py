"""The reconstruction figure shows the catalog's numbers and the posterior-predictive band.

Issue 25 item 8: the catalog, the plots and ``metrics.json`` describe one fit. The figure
records the numbers of its title (``fig.shown``); these are checked against the same numbers
computed independently (``galaxy_metrics``, the catalog row). Seeded; CPU.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def net():
    from sedvae.checkpoint import load_checkpoint
    from sedvae.paths import data_dir

    net, _ = load_checkpoint(data_dir() / "autoencoder" / "autoencoder_laptop.pt", "autoencoder")
    return net


def test_title_chi2_is_the_metrics_chi2(net):
    """The title's reduced chi^2 is ``galaxy_metrics``'s (metrics.json of evaluation=autoencoder
    and the catalog's ``rchi2``): chi^2 over the pixels with ivar > 0 that the model covers,
    also when some unmasked pixels carry ivar = 0 (the old title counted those in N)."""
    import matplotlib.pyplot as plt

    from sedvae.evaluation.autoencoder import galaxy_metrics
    from sedvae.plotting import plot_reconstruction
    from sedvae.simulation.mocks import MockGenerator

    batch = MockGenerator().sample(2, torch.Generator().manual_seed(3))
    batch["ivar"][:, 1000:1400] = 0.0  # unmasked pixels without weight
    batch["mask"][:, 1000:1400] = False
    with torch.no_grad():
        out = net(batch, components=True)
    chi2 = galaxy_metrics(net, out)["chi2_red"]
    for i in range(2):
        fig, _ = plot_reconstruction(net, batch, index=i, output=out)
        assert fig.shown["rchi2"] == pytest.approx(float(chi2[i]), rel=1e-5)
        assert fig.shown["logmstar"] == pytest.approx(float(out["latents"]["theta"][i, 0]))
        plt.close(fig)


def test_catalog_plot_shows_the_catalog_row_and_the_ppc_band(tmp_path):
    """evaluation=catalog with the autoencoder (refined) and the PPC: the reconstruction's
    title quotes the catalog row (rchi2, posterior-median logM*, rchi2_ppc); the fit it draws,
    recomputed by the plot, has the catalog's rchi2; the band's own PPC (other posterior
    draws of the same galaxy) agrees with the catalog's rchi2_ppc within its spread."""
    import json

    from astropy.table import Table

    from sedvae.catalog.fitter import PosteriorFitter
    from sedvae.catalog.run import run_catalog
    from sedvae.catalog.sources import MockSource
    from sedvae.paths import data_dir

    source = MockSource(tmp_path / "m.h5", n=2, seed=5)
    fitter = PosteriorFitter(n_samples=64, seed=1, ppc=True, line_fluxes=False, refine_steps=3,
                             autoencoder=data_dir() / "autoencoder" / "autoencoder_laptop.pt")
    metrics = run_catalog(source, fitter, tmp_path / "out", shard_size=2, n_plots=1,
                          progress=False)
    json.dumps(metrics)  # what evaluate.py writes to metrics.json
    assert metrics["plot_failures"] == []
    table = Table.read(tmp_path / "out" / "catalog.fits")
    (what, shown), = metrics["plots_shown"].items()
    row = table[int(np.flatnonzero(table["flags"] == 0)[0])] if (table["flags"] == 0).any() \
        else table[0]
    assert what == f"galaxy {row['ID'] if 'ID' in table.colnames else row['index']}"
    assert shown["rchi2"] == pytest.approx(float(row["rchi2"]), rel=1e-6)
    assert shown["logmstar"] == pytest.approx(float(row["logmstar_p50"]), rel=1e-6)
    assert shown["rchi2_ppc"] == pytest.approx(float(row["rchi2_ppc"]), rel=1e-6)
    # the drawn fit is the catalog's fit (same cleaned batch, same refinement)
    assert shown["rchi2_fit"] == pytest.approx(float(row["rchi2"]), rel=1e-3)
    spread = max(float(row["rchi2_ppc_spread"]), 1e-3)
    assert abs(shown["rchi2_ppc_band"] - float(row["rchi2_ppc"])) <= 3 * spread
    assert len(list((tmp_path / "out" / "plots").glob("reconstruction_*.png"))) == 1


@pytest.mark.slow
def test_evaluation_autoencoder_metrics_are_the_titles(tmp_path, net):
    """evaluation=autoencoder: metrics (metrics.json) hold the numbers of the figures' titles,
    equal to galaxy_metrics recomputed here, and each figure carries the PPC band: an
    in-model mock's rchi2_ppc is near 1, the bundled DESI galaxy's is finite."""
    from sedvae.evaluation.autoencoder import evaluate_autoencoder, galaxy_metrics
    from sedvae.paths import data_dir
    from sedvae.simulation.mocks import MockGenerator

    metrics = evaluate_autoencoder(str(data_dir() / "autoencoder" / "autoencoder_laptop.pt"),
                                   tmp_path, n_mocks=1, seed=7, ppc_draws=16)  # fmt: skip
    batch = MockGenerator().sample(1, torch.Generator().manual_seed(7))
    with torch.no_grad():
        chi2 = galaxy_metrics(net, net(batch, components=True))["chi2_red"]
    assert metrics["reduced_chi2_mock0"] == pytest.approx(float(chi2[0]), rel=1e-5)
    assert 0.9 < metrics["rchi2_ppc_mock0"] < 1.3
    assert np.isfinite(metrics["rchi2_ppc_desi"]) and np.isfinite(metrics["reduced_chi2_desi"])
    assert {p.name for p in tmp_path.glob("*.png")} == {"reconstruction_mock0.png",
                                                        "reconstruction_desi.png"}
