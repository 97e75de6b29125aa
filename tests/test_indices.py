"""Spectral-index summary features: equivalent widths and D4000n of spectra with known
answers, redshift invariance, error propagation, coverage flags."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sedvae.posterior.indices import LICK_INDICES, SpectralIndices
from sedvae.sps.ssp import air_to_vacuum

# DESI-like pixels: three overlapping arms at 0.8 A
PIX_WAVES = [np.arange(lo, hi, 0.8) for lo, hi in ((3600, 5930), (5660, 7720), (7520, 9824))]
pix_wave = torch.as_tensor(np.concatenate(PIX_WAVES))
pix_arm = torch.as_tensor(np.concatenate([np.full(len(w), i) for i, w in enumerate(PIX_WAVES)]))


@pytest.fixture(scope="module")
def indices() -> SpectralIndices:
    return SpectralIndices(pix_wave, pix_arm)


def observe(rest_flux, z: float) -> torch.Tensor:
    """A rest-frame f_lambda(lambda_rest) callable seen at redshift z on the pixels (1, M)."""
    return torch.as_tensor(rest_flux(pix_wave.numpy() / (1 + z)))[None].float()


def absorption(name: str, ew: float, slope: float = 0.3):
    """Linear continuum with one Gaussian absorption line of equivalent width ``ew`` (A),
    well inside the index band of ``name``."""
    band = air_to_vacuum(np.array(LICK_INDICES[name][1]))
    centre, sigma = band.mean(), 0.1 * (band[1] - band[0])

    def flux(lam):
        cont = 1.0 + slope * (lam - centre) / 1000.0
        line = ew / (sigma * math.sqrt(2 * math.pi)) * np.exp(-0.5 * ((lam - centre) / sigma) ** 2)
        return cont * (1.0 - line)

    return flux


@pytest.mark.parametrize("name", ["HdeltaA", "Mgb", "Fe5270"])
@pytest.mark.parametrize("z", [0.05, 0.3])
def test_equivalent_width_of_a_known_line(indices, name, z):
    """A 3 A line on a sloped continuum: the index returns 3 A (rest frame) at any z (the
    pseudo-continuum through the side bands is exact for a linear continuum)."""
    flux = observe(absorption(name, 3.0), z)
    ew = indices.equivalent_widths(flux, torch.full_like(flux, 100.0), torch.tensor([z]))
    assert float(ew[name][0]) == pytest.approx(3.0, abs=0.03)
    # indices without a line read zero on a linear continuum
    assert float(ew["Fe5335" if name != "Fe5335" else "Mgb"][0]) == pytest.approx(0.0, abs=0.02)


def test_emission_line_is_negative_and_d4000_of_a_step(indices):
    """An emission line of EW 20 A reads -20 A; a continuum that doubles in f_nu across
    4000 A has D4000n = 2."""

    def step(lam):  # f_nu = 1 blueward of 3975 A, 2 redward, as f_lambda ~ f_nu / lambda^2
        return np.where(lam < 3975.0, 1.0, 2.0) / (lam / 4000.0) ** 2

    f = observe(step, 0.1)
    ew = indices.equivalent_widths(f, torch.full_like(f, 100.0), torch.tensor([0.1]))
    # window means of f_lambda converted at the window centres: exact to ~(50 A / 4000 A)^2
    assert float(ew["D4000n"][0]) == pytest.approx(2.0, rel=0.005)
    f = observe(absorption("Hbeta", -20.0), 0.1)
    ew = indices.equivalent_widths(f, torch.full_like(f, 100.0), torch.tensor([0.1]))
    assert float(ew["Hbeta"][0]) == pytest.approx(-20.0, abs=0.2)


def test_errors_match_the_scatter_over_noise_draws(indices):
    """The propagated errors are the standard deviation of the index over noise draws."""
    g = torch.Generator().manual_seed(0)
    clean = observe(absorption("HdeltaA", 4.0), 0.2).repeat(400, 1)
    ivar = torch.full_like(clean, 25.0)  # S/N 5 per pixel
    noisy = clean + torch.randn(clean.shape, generator=g) / ivar.sqrt()
    z = torch.full((400,), 0.2)
    ew = indices.equivalent_widths(noisy, ivar, z)
    k = len(indices.names)
    feats = indices(noisy, ivar, z)
    for j, name in enumerate(indices.names):
        if name == "D4000n":
            continue
        sigma_pred = 10 ** feats[:, k + j].double() * 2.0  # EW_SCALE
        assert float(ew[name].std()) == pytest.approx(float(sigma_pred.median()), rel=0.15), name


def test_uncovered_or_masked_windows_are_flagged_zero(indices):
    """At z = 0.6 the [O II] window (3727 A) is observed at 5960 A (covered), H alpha at
    10,500 A (not): flag 0 and zero features. Masking the H delta band flags H delta too."""
    f = observe(absorption("HdeltaA", 2.0), 0.6)
    ivar = torch.full_like(f, 100.0)
    band = air_to_vacuum(np.array(LICK_INDICES["HdeltaA"][1])) * 1.6
    ivar[0, (pix_wave > band[0]) & (pix_wave < band[1])] = 0.0
    feats = indices(f, ivar, torch.tensor([0.6]))
    k = len(indices.names)
    flags = dict(zip(indices.names, feats[0, 2 * k :].tolist(), strict=True))
    assert flags["OII3727"] == 1.0 and flags["Mgb"] == 1.0
    assert flags["HalphaNII"] == 0.0 and flags["HdeltaA"] == 0.0
    for name in ("HalphaNII", "HdeltaA"):
        j = indices.names.index(name)
        assert feats[0, j] == 0 and feats[0, k + j] == 0
    assert torch.isfinite(feats).all()


def test_coverage_is_the_fraction_of_each_window_with_good_pixels(indices):
    """Half of a window masked: coverage 0.5 (pixel widths drop out)."""
    f = observe(lambda lam: np.ones_like(lam), 0.0)
    ivar = torch.full_like(f, 100.0)
    mean, den, cov = indices._window_means(f, ivar, torch.tensor([0.0]))
    assert torch.allclose(cov[0], torch.ones_like(cov[0]), atol=0.02)
    lo, hi = indices.window_edges[0].tolist()
    ivar[0, pix_wave < 0.5 * (lo + hi)] = 0.0
    cov = indices._window_means(f, ivar, torch.tensor([0.0]))[2]
    assert float(cov[0, 0]) == pytest.approx(0.5, abs=0.02)


def test_needs_exactly_one_pixel_description(indices):
    with pytest.raises(ValueError, match="either wave_obs"):
        SpectralIndices()
    with pytest.raises(ValueError, match="either wave_obs"):
        SpectralIndices(pix_wave, pix_arm, pixels=indices._pixels)
    shared = SpectralIndices(pixels=indices._pixels)
    f = observe(absorption("Mgb", 2.0), 0.1)
    ivar, z = torch.full_like(f, 100.0), torch.tensor([0.1])
    assert torch.equal(shared(f, ivar, z), indices(f, ivar, z))
