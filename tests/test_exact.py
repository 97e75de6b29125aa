"""The exact fit (sedvae.autoencoder.exact): the autoencoder's continuum refined with the lines
and the calibration solved exactly at every step, on a real SDSS spectrum and on mocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sedvae.io import read_spectra
from sedvae.paths import data_dir
from sedvae.sps import THETA

SHIPPED = data_dir() / "autoencoder" / "autoencoder_laptop.pt"
NGC3073 = data_dir() / "sdss_example" / "NGC3073_SDSS_DR18.fits"


@pytest.fixture(scope="module")
def net(one_thread):
    from sedvae.checkpoint import load_checkpoint

    net, _ = load_checkpoint(SHIPPED, "autoencoder")
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def test_exact_fit_real_sdss_spectrum(net):
    """NGC 3073 (SDSS DR18, on its own 3848 pixels, z = 0.0038): the encoder's continuum with
    lines and calibration solved leaves reduced chi^2 3.4; refining the continuum's physical
    latents brings it near 1 (pPXF with 105 free SSP templates reaches 0.92)."""
    s = read_spectra("sdss", NGC3073)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    res = net.fit_exact(s.to_batch(dtype=torch.float32), steps=100, lr=0.2)
    assert float(res.rchi2_encoder[0]) > 3.0
    assert float(res.rchi2[0]) < 1.2
    assert float(res.rchi2[0]) < 0.4 * float(res.rchi2_encoder[0])
    # the model is the calibrated continuum plus the solved lines, on the file's pixels
    good = res.weight[0] > 0
    chi2 = (res.weight[0] * (res.batch["flux"][0] - res.model[0]) ** 2)[good].sum()
    assert torch.isclose(chi2, res.fit.chi2[0], rtol=1e-4)
    assert res.model.shape == s.flux.shape
    # emission lines of a star-forming dwarf: H alpha detected, narrow
    ha = res.linear.lines.index("Halpha")
    assert float(res.fit.line_flux[0, ha]) > 10 * float(res.fit.line_flux_err[0, ha])
    assert 10.0 <= float(res.sigma[0]) < 150.0
    # the networks are not changed
    for k, v in net.state_dict().items():
        assert torch.equal(v, weights[k])


def test_exact_fit_mocks_recovers(net):
    """Held-out mocks through the DESI instrument: the exact fit reaches the noise level
    (reduced chi^2 ~ 1), never ends worse than the encoder's continuum, recovers the
    injected H alpha flux, and its stellar mass is no worse than the encoder's."""
    from sedvae.simulation import MockGenerator

    b = MockGenerator(instrument=net.decoder.instrument).sample(8, torch.Generator().manual_seed(3))
    res = net.fit_exact(b, steps=60)
    r, r0 = res.rchi2.numpy(), res.rchi2_encoder.numpy()
    assert 0.95 <= float(np.median(r)) <= 1.05
    assert np.all(r <= r0 * 1.005)
    i = THETA.LOGMSTAR
    with torch.no_grad():
        enc = net(b)["latents"]["theta"][:, i]
    err_enc = (enc - b["theta"][:, i]).abs().median()
    err_exact = (res.latents["theta"][:, i] - b["theta"][:, i]).abs().median()
    assert float(err_exact) <= float(err_enc) + 0.02


def test_exact_fit_steps_zero_is_the_amortised_fit(net):
    from sedvae.simulation import MockGenerator

    b = MockGenerator(instrument=net.decoder.instrument).sample(3, torch.Generator().manual_seed(5))
    res = net.fit_exact(b, steps=0)
    assert torch.equal(res.rchi2, res.rchi2_encoder)
    with torch.no_grad():
        enc = net(b)["latents"]["theta"]
    assert torch.allclose(res.latents["theta"], enc)


def test_exact_fit_rejects_bad_arguments(net):
    b = read_spectra("sdss", NGC3073).to_batch(dtype=torch.float32)
    with pytest.raises(ValueError, match="steps"):
        net.fit_exact(b, steps=-1)
    bad = b.clean()
    bad.ivar[:] = 0.0
    with pytest.raises(ValueError, match="no usable pixel"):
        net.fit_exact(bad, steps=1)


def test_catalog_rchi2_and_plot_are_the_exact_fit(tmp_path):
    """evaluation=catalog with ``refine: exact`` on the SDSS file: the catalog's rchi2 is the
    exact fit's chi^2 / N_pix (well below the amortised fit's), the reconstruction figure
    draws that same fit, and the manifest records the choice."""
    import json

    from astropy.table import Table

    from sedvae.catalog.fitter import PosteriorFitter
    from sedvae.catalog.run import run_catalog
    from sedvae.catalog.sources import SpectraSource

    fitter = PosteriorFitter(n_samples=64, seed=1, ppc=False, line_fluxes=False,
                             refine="exact", refine_steps=60, autoencoder=SHIPPED)  # fmt: skip
    assert fitter.manifest()["refine"] == "exact"
    metrics = run_catalog(SpectraSource("sdss", NGC3073), fitter, tmp_path / "out",
                          shard_size=1, n_plots=1, progress=False)  # fmt: skip
    json.dumps(metrics)
    assert metrics["plot_failures"] == []
    row = Table.read(tmp_path / "out" / "catalog.fits")[0]
    assert 0.8 < float(row["rchi2"]) < 1.5  # the amortised exact fit: 3.3
    (shown,) = metrics["plots_shown"].values()
    assert shown["rchi2"] == pytest.approx(float(row["rchi2"]), rel=1e-6)
    assert shown["rchi2_fit"] == pytest.approx(float(row["rchi2"]), rel=1e-3)
    with pytest.raises(ValueError, match="refine"):
        PosteriorFitter(refine="lbfgs")
