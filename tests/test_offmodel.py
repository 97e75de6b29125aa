"""The off-model test set (bagpipes spectra observed as sedvae's mocks): reproducible from its
seed, physical truths, a flux scale consistent with the photometry, vacuum wavelengths, and the
systematics recorded."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

pytest.importorskip("bagpipes")


@pytest.fixture(scope="module")
def generator():
    from sedvae.offmodel import OffModelGenerator

    return OffModelGenerator()


@pytest.fixture(scope="module")
def offmodel_file(generator, tmp_path_factory):
    from sedvae.offmodel import write_offmodel

    return write_offmodel(tmp_path_factory.mktemp("off") / "a.h5", n=4, seed=5, chunk_size=4,
                          generator=generator)  # fmt: skip


def _read(path) -> dict[str, np.ndarray]:
    out = {}

    def visit(name, item):
        if isinstance(item, h5py.Dataset):
            out[name] = item[()]

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return out


def test_reproducible_from_seed(generator, offmodel_file, tmp_path):
    from sedvae.offmodel import write_offmodel

    again = write_offmodel(tmp_path / "b.h5", n=4, seed=5, chunk_size=3, generator=generator)
    other = write_offmodel(tmp_path / "c.h5", n=4, seed=6, chunk_size=4, generator=generator)
    a, b, c = _read(offmodel_file), _read(again), _read(other)
    assert set(a) == set(b)
    assert "theta" not in a  # no PROVABGS parameters for bagpipes galaxies
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # chunking does not matter
    assert not np.array_equal(a["flux_true"], c["flux_true"])
    assert not np.array_equal(a["offmodel/logmstar_surv"], c["offmodel/logmstar_surv"])


def test_flags_in_file_as_drawn(offmodel_file):
    from sedvae.offmodel import draw_galaxy

    t = _read(offmodel_file)
    draws = [draw_galaxy(5, i) for i in range(4)]
    np.testing.assert_array_equal(t["offmodel/warp"], [d["warp"] for d in draws])
    np.testing.assert_array_equal(t["offmodel/sky"], [d["sky"] for d in draws])
    np.testing.assert_array_equal(t["offmodel/n_sky"], [len(d["sky_lines"]) for d in draws])
    np.testing.assert_array_equal(t["offmodel/burst"], [d["burst"] for d in draws])
    assert np.all(t["offmodel/warp_coeffs"][~t["offmodel/warp"]] == 0)
    np.testing.assert_allclose(t["z"], [d["z"] for d in draws], rtol=1e-6)


def test_truths_physical(offmodel_file):
    from astropy.cosmology import Planck18

    t = _read(offmodel_file)
    surv, formed = t["offmodel/logmstar_surv"], t["offmodel/logmstar_formed"]
    assert np.all(np.isfinite(surv)) and np.all(surv < formed)
    assert np.all(formed - surv < 0.5)  # BC03 return fraction < 70 %
    sfr100, sfr1 = t["offmodel/sfr_100myr"], t["offmodel/sfr_1gyr"]
    assert np.all(sfr100 >= 0) and np.all(sfr1 >= 0)
    assert np.all(sfr1 * 1e9 <= 10**formed * (1 + 1e-9))
    frac = t["offmodel/frac_100myr"]
    np.testing.assert_allclose(frac, sfr100 * 1e8 / 10**formed, rtol=1e-9)
    age_u = Planck18.age(t["z"]).value
    assert np.all(t["offmodel/t_mw_gyr"] > 0)
    assert np.all(t["offmodel/t_mw_gyr"] < t["offmodel/age_universe_gyr"])
    assert np.all(t["offmodel/age_universe_gyr"] < age_u)
    assert np.all((t["offmodel/z_mw"] > 0.02 * 0.005) & (t["offmodel/z_mw"] < 0.02 * 5))
    assert np.all((t["offmodel/av"] >= 0) & (t["offmodel/av"] <= 1.5))
    assert np.all((t["sigma_v"] >= 50) & (t["sigma_v"] <= 300))
    assert np.all((t["z"] >= 0.01) & (t["z"] <= 0.6))
    assert np.all(t["line_lum"] >= 0) and np.all(t["line_lum"] > 0).any()


def test_flux_scale_matches_photometry(generator, offmodel_file):
    """The spectrum's synthetic g and r photometry (aperture and warp divided out) equals the
    galaxy's photometry: the spectrum carries the mass, d_L and aperture it should."""
    from numpy.polynomial import legendre

    from sedvae.physics import Photometry

    t = _read(offmodel_file)
    flux = t["flux_true"].astype(np.float64) / t["aperture"][:, None]
    warp = 1.0 + np.stack([legendre.legval(generator.x, c) for c in t["offmodel/warp_coeffs"]])
    flux = flux / warp
    phot = Photometry(("BASS-g", "BASS-r"))
    # one increasing grid: each arm up to where the next begins (arms overlap)
    arm, wave = t["arm"], t["wave"]
    keep = np.ones(wave.shape, bool)
    for a in np.unique(arm)[:-1]:
        keep &= ~((arm == a) & (wave >= wave[arm == a + 1].min()))
    synth = phot(torch.as_tensor(wave[keep]), torch.as_tensor(flux[:, keep])).numpy()
    np.testing.assert_allclose(synth, t["photometry_true"][:, :2], rtol=0.005)
    # a physical mass-to-light ratio: r-band nanomaggies from the surviving mass at Planck18 d_L
    from astropy.cosmology import Planck18

    dist_mod = Planck18.distmod(t["z"]).value
    abs_r = 22.5 - 2.5 * np.log10(t["photometry_true"][:, 1]) - dist_mod
    log_l_r = -0.4 * (abs_r - 4.65)  # L_sun in r (no K correction: z < 0.6, loose bounds)
    ml = t["offmodel/logmstar_surv"] - log_l_r
    assert np.all((ml > -1.5) & (ml < 1.5)), ml


def test_vacuum_wavelengths(generator):
    """bagpipes' air Halpha (6562.80 A) lands at its vacuum wavelength (6564.61 A)."""
    comp = {
        "redshift": 0.1, "veldisp": 60.0,
        "delayed": {"age": 1.0, "tau": 5.0, "massformed": 10.0, "metallicity": 1.0},
        "dust": {"type": "Calzetti", "Av": 0.2, "eta": 1.0},
        "nebular": {"logU": -3.0, "metallicity": 1.0},
    }  # fmt: skip
    out = generator.bagpipes(comp)
    wave, lum = generator.bagpipes.wave, out["lum"]
    win = np.abs(wave - 6563.7) < 8.0
    side = (np.abs(wave - 6563.7) > 12.0) & (np.abs(wave - 6563.7) < 18.0)
    excess = np.clip(lum[win] - np.median(lum[side]), 0.0, None)
    centre = np.sum(wave[win] * excess) / np.sum(excess)
    assert abs(centre - 6564.61) < 0.3, centre
    assert out["sfr_100myr"] > 0


def test_systematics_recorded(generator):
    """Warp and sky flags are in the file as drawn; the warp is smooth and a few %, the sky
    residuals sit at the sky lines only."""
    from sedvae.offmodel import draw_galaxy

    draws = [draw_galaxy(11, i) for i in range(60)]
    warp = np.array([d["warp"] for d in draws])
    sky = np.array([d["sky"] for d in draws])
    assert 0.15 < warp.mean() < 0.5 and sky.any()
    i = int(np.flatnonzero(sky & ~warp)[0])
    flux = np.full(generator.instrument.npix, 1.0)
    out = generator.systematics(flux, draws[i])
    changed = np.abs(out - flux) > 1e-6
    near = np.min(np.abs(generator.wave_obs[:, None] - generator.sky_wave[None]), 1) < 6.0
    assert changed.any() and not (changed & ~near).any()
    j = int(np.flatnonzero(warp & ~sky)[0])
    ratio = generator.systematics(flux, draws[j])
    assert np.all(np.abs(ratio - 1.0) < 0.15) and np.std(ratio) > 1e-4
    for a in np.unique(generator.instrument.arm.numpy()):  # smooth along each arm
        assert np.abs(np.diff(ratio[generator.instrument.arm.numpy() == a])).max() < 1e-3


def test_mock_source_reads_it(offmodel_file):
    from sedvae.catalog.sources import MockSource

    source = MockSource(offmodel_file, n=4, seed=5, noise_seed=0)
    batch = source(0, 4)
    assert "theta" not in batch
    assert batch["flux"].shape == (4, 7958) and torch.isfinite(batch["flux"]).all()
    assert (batch["ivar"] > 0).float().mean() > 0.9
    assert batch["photometry"].shape == (4, 5)
