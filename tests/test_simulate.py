"""The training-set command: reproducible from its seed, atomic, resumable."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from sedvae.simulation import writer as sim
from sedvae.sps import PROVABGSPrior


def _read(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("theta", "z", "lum")} | {
            f"derived/{k}": f["derived"][k][()] for k in f["derived"]
        }


def test_reproducible_and_physical(tmp_path, sed_model):
    a = sim.simulate_to_hdf5(
        tmp_path / "a.h5", n=250, seed=7, chunk_size=100, progress=False, model=sed_model
    )
    b = sim.simulate_to_hdf5(
        tmp_path / "b.h5", n=250, seed=7, chunk_size=100, progress=False, model=sed_model
    )
    da, db = _read(a), _read(b)
    for key in da:
        np.testing.assert_array_equal(da[key], db[key])
    theta = torch.as_tensor(da["theta"], dtype=torch.float64)
    assert torch.isfinite(PROVABGSPrior().log_prob(theta)).all()
    assert ((da["z"] >= 0) & (da["z"] <= 0.6)).all()
    assert np.isfinite(da["lum"]).all() and (da["lum"] >= 0).all()
    assert (da["derived/logmstar_surv"] < da["theta"][:, 0]).all()
    with h5py.File(a) as f:
        assert f.attrs["complete"] and f.attrs["seed"] == 7
        np.testing.assert_array_equal(f["wave"][()], sed_model.wave.numpy())
    other = sim.simulate_to_hdf5(
        tmp_path / "c.h5", n=250, seed=8, chunk_size=100, progress=False, model=sed_model
    )
    assert not np.array_equal(_read(other)["theta"], da["theta"])


def test_interrupted_run_leaves_no_file_and_resumes(tmp_path, sed_model, monkeypatch):
    out = tmp_path / "train.h5"
    reference = sim.simulate_to_hdf5(
        tmp_path / "ref.h5", n=300, seed=3, chunk_size=100, progress=False, model=sed_model
    )
    calls = []
    real = sim.draw_chunk

    def dies_on_third(model, index, settings):
        calls.append(index)
        if index == 2:
            raise KeyboardInterrupt("killed")
        return real(model, index, settings)

    monkeypatch.setattr(sim, "draw_chunk", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        sim.simulate_to_hdf5(out, n=300, seed=3, chunk_size=100, progress=False, model=sed_model)
    assert not out.exists()  # never a truncated final file
    partial = out.with_name(out.name + ".partial")
    with h5py.File(partial) as f:
        assert f["done"][()].tolist() == [True, True, False]

    calls.clear()
    monkeypatch.setattr(sim, "draw_chunk", lambda m, i, s: (calls.append(i), real(m, i, s))[1])
    sim.simulate_to_hdf5(out, n=300, seed=3, chunk_size=100, progress=False, model=sed_model)
    assert calls == [2]  # only the missing chunk was drawn
    assert not partial.exists()
    for key, value in _read(reference).items():
        np.testing.assert_array_equal(_read(out)[key], value)


def test_existing_file_with_other_settings_is_not_clobbered(tmp_path, sed_model):
    out = sim.simulate_to_hdf5(
        tmp_path / "t.h5", n=50, seed=1, chunk_size=50, progress=False, model=sed_model
    )
    assert (
        sim.simulate_to_hdf5(out, n=50, seed=1, chunk_size=50, progress=False, model=sed_model)
        == out
    )
    with pytest.raises(FileExistsError, match="overwrite"):
        sim.simulate_to_hdf5(out, n=50, seed=2, chunk_size=50, progress=False, model=sed_model)


def test_bad_arguments(tmp_path, sed_model):
    with pytest.raises(ValueError, match="positive"):
        sim.simulate_to_hdf5(tmp_path / "x.h5", n=0, seed=1, model=sed_model)
    with pytest.raises(ValueError, match="z_max"):
        sim.simulate_to_hdf5(tmp_path / "x.h5", n=10, seed=1, z_max=2.0, model=sed_model)


def test_nebular_training_set(tmp_path):
    from sedvae.sps import SEDModel

    model = SEDModel(nebular=True)
    out = sim.simulate_to_hdf5(
        tmp_path / "n.h5", n=40, seed=2, chunk_size=40, nebular=True, progress=False, model=model
    )
    with h5py.File(out) as f:
        logu = f["nuisance/logU"][()]
        assert ((logu >= -4) & (logu <= -1)).all()
        assert np.isfinite(f["lum_nebular"][()]).all() and f["lum_nebular"][()].max() > 0
