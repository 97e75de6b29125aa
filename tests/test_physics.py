"""Tests of the observation model (sedvae.physics): accuracy against known ground truth."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sedvae.physics import (
    LS_NORTH,
    LS_SOUTH,
    DESIInstrument,
    GaussianLSF,
    GenericInstrument,
    Photometry,
    SDSSInstrument,
    apply_resolution,
    integrate_bins,
    pixel_edges,
    redshift_spectrum,
    redshift_wavelength,
    resample,
)
from sedvae.physics.cosmology import L_SUN_ERG_S, MPC_CM
from sedvae.physics.lsf import diagonals_to_dense
from sedvae.physics.photometry import mag_to_nanomaggies

COADD = Path(__file__).resolve().parents[1] / "data/desi_example/coadd-4-80613-thru20210324.fits"
C_AA = 2.99792458e18  # Angstrom/s


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def _gauss(x, mu, sigma, flux=1.0):
    return flux * np.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))


def _moments(wave, flux):
    """Flux-weighted centroid and sigma of (B, M) pixel values."""
    w = flux / flux.sum(-1, keepdim=True)
    mu = (w * wave).sum(-1)
    return mu, ((w * (wave - mu.unsqueeze(-1)) ** 2).sum(-1)).sqrt()


@pytest.fixture(scope="module")
def coadd():
    """Per-arm wavelengths and resolution diagonals of the bundled real DESI coadd."""
    fits = pytest.importorskip("astropy.io.fits")
    if not COADD.exists():
        pytest.skip(f"missing {COADD}")
    with fits.open(COADD) as hdul:
        waves = {arm: np.array(hdul[f"{arm}_WAVELENGTH"].data) for arm in "BRZ"}
        res = {arm: np.array(hdul[f"{arm}_RESOLUTION"].data) for arm in "BRZ"}
    return waves, res


# --- resampling --------------------------------------------------------------------------------


def test_pixel_edges_are_midpoints():
    edges = pixel_edges(torch.tensor([1.0, 2.0, 4.0]))
    assert edges.tolist() == [0.5, 1.5, 3.0, 5.0]


def test_resample_conserves_continuum_flux():
    # Per-galaxy, non-uniform input grids; output pixels tile exactly [4000, 6000] A.
    base = torch.sort(4000.0 + 2000.0 * torch.rand(3000, dtype=torch.float64)).values
    wave = torch.cat([torch.tensor([4000.0], dtype=torch.float64), base, torch.tensor([6000.0])])
    wave = wave.unsqueeze(0).repeat(2, 1)
    wave[1, 1:-1] = torch.linspace(4000.0, 6000.0, wave.shape[1])[1:-1]
    flux = (1.0 + 0.3 * torch.sin(wave / 37.0)) * (wave / 5000.0) ** -2  # (2, L)
    centres = torch.arange(4000.4, 6000.0, 0.8, dtype=torch.float64)
    out = resample(wave, flux.float(), centres)
    assert out.shape == (2, centres.numel()) and out.dtype == torch.float32
    total_in = torch.trapezoid(flux, wave, dim=-1)
    total_out = (out.double() * 0.8).sum(-1)
    torch.testing.assert_close(total_out, total_in, rtol=1e-4, atol=0.0)


def test_resample_conserves_line_narrower_than_a_pixel():
    wave = np.concatenate(
        [np.arange(4000.0, 4990.0, 1.0), np.arange(4990.0, 5010.0, 0.01), np.arange(5010, 6001.0)]
    )
    centres = np.arange(4000.4, 6000.0, 0.8)
    mu = 5000.0 + 0.37  # between two pixel centres (4999.6, 5000.4)
    flux = _gauss(wave, mu, 0.1, flux=3.0)[None]  # sigma = 0.125 pixel
    out = resample(torch.tensor(wave), torch.tensor(flux), torch.tensor(centres))
    assert float((out * 0.8).sum()) == pytest.approx(3.0, rel=1e-4)
    # Point interpolation (what spender does) loses most of such a line.
    interp = np.interp(centres, wave, flux[0]) * 0.8
    assert abs(interp.sum() - 3.0) > 0.3


def test_resample_reproduces_linear_function_exactly():
    wave = torch.linspace(3000.0, 9000.0, 6001, dtype=torch.float64)
    flux = (2.0 + 1e-3 * wave).unsqueeze(0)
    centres = torch.linspace(3500.0, 8500.0, 333, dtype=torch.float64)
    torch.testing.assert_close(resample(wave, flux, centres)[0], 2.0 + 1e-3 * centres)


def test_resample_outside_input_is_zero_and_masked():
    wave = torch.linspace(5000.0, 6000.0, 101)
    flux = torch.ones(1, 101)
    centres = torch.tensor([4990.0, 5000.0, 5000.8, 5500.0, 5999.6, 6000.0, 6010.0])
    out, mask = resample(wave, flux, centres, return_mask=True)
    # The pixel centred on 5000 starts below the grid: partially covered -> invalid.
    assert mask[0].tolist() == [False, False, True, True, True, False, False]
    assert out[0][~mask[0]].abs().max() == 0.0
    torch.testing.assert_close(out[0][mask[0]], torch.ones(int(mask.sum())))


def test_integrate_bins_accepts_unsorted_overlapping_bins():
    wave = torch.linspace(0.0, 10.0, 11, dtype=torch.float64)
    flux = wave.unsqueeze(0)  # f = x, F = x^2 / 2
    lo = torch.tensor([2.0, 0.5, 2.5], dtype=torch.float64)
    hi = torch.tensor([4.0, 3.3, 9.7], dtype=torch.float64)
    integral, covered = integrate_bins(wave, flux, lo, hi)
    torch.testing.assert_close(integral[0], (hi**2 - lo**2) / 2)
    assert bool(covered.all())


def test_resample_gradcheck():
    wave = torch.linspace(4000.0, 4100.0, 40, dtype=torch.float64)
    flux = torch.rand(2, 40, dtype=torch.float64, requires_grad=True)
    centres = torch.linspace(4005.0, 4095.0, 17, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: resample(wave, f, centres), (flux,))


@pytest.mark.parametrize("n_out", [37, 400])  # coarser and finer than the input
def test_resample_operator_equals_resample(n_out):
    """The sparse operator (SEDModel.broaden's two resamplings) is resample's integrals."""
    from sedvae.physics.resample import ResampleOperator

    rng = np.random.default_rng(3)
    wave = torch.tensor(np.sort(rng.uniform(4000.0, 5000.0, 120)), dtype=torch.float64)
    # the output runs past both ends: uncovered pixels are zero in both
    centres = torch.linspace(3990.0, 5010.0, n_out, dtype=torch.float64)
    flux = torch.tensor(rng.lognormal(0.0, 1.0, (3, 120)), dtype=torch.float64)
    op = ResampleOperator(wave, centres)
    want = resample(wave, flux, centres)
    torch.testing.assert_close(op(flux), want, rtol=1e-12, atol=1e-12)
    assert bool((op(flux)[:, 0] == 0).all()) and bool((op(flux)[:, -1] == 0).all())
    # the torch sparse path (gradients, GPUs): same values, gradients of the same linear map
    f = flux.clone().requires_grad_(True)
    torch.testing.assert_close(op(f), want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(op, (flux[:1].clone().requires_grad_(True),))
    torch.testing.assert_close(op(flux.float()), want.float())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"wave": torch.linspace(1, 2, 5), "flux": torch.ones(5)}, "flux"),
        ({"wave": torch.linspace(1, 2, 6), "flux": torch.ones(1, 5)}, "wave"),
        ({"wave": torch.linspace(2, 1, 5), "flux": torch.ones(1, 5)}, "wave"),
        ({"wave": torch.linspace(1, 2, 5), "flux": torch.full((1, 5), float("nan"))}, "flux"),
    ],
)
def test_resample_bad_input_raises(kwargs, name):
    with pytest.raises(ValueError, match=name):
        resample(wave_out=torch.tensor([1.2, 1.4]), **kwargs)


# --- redshift ----------------------------------------------------------------------------------


def test_redshift_wavelength_identity_at_z0():
    wave = torch.linspace(1000.0, 10000.0, 50)
    out = redshift_wavelength(wave, torch.zeros(3))
    assert out.shape == (3, 50)
    assert torch.equal(out, wave.expand(3, -1))
    torch.testing.assert_close(redshift_wavelength(wave, torch.tensor([1.0]))[0], 2 * wave)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_redshift_conserves_energy(dtype):
    from astropy.cosmology import Planck18

    wave = torch.linspace(1000.0, 20000.0, 19001, dtype=dtype)
    lum = (1e7 * (1.0 + torch.rand(3, 1)) * (wave / 5000.0) ** -1.5).to(dtype)  # L_sun/A
    z = torch.tensor([0.05, 0.3, 1.2], dtype=dtype)
    wave_obs, flux = redshift_spectrum(wave, lum, z)
    assert flux.dtype == dtype and wave_obs.shape == flux.shape == (3, 19001)
    bolometric_obs = torch.trapezoid(flux.double(), wave_obs.double(), dim=-1)  # 1e-17 erg/s/cm^2
    d_l_cm = Planck18.luminosity_distance(z.double().numpy()).to_value("Mpc") * MPC_CM
    lum_bol = torch.trapezoid(lum.double(), wave.double(), dim=-1).numpy() * L_SUN_ERG_S
    expected = lum_bol / (4 * np.pi * d_l_cm**2) / 1e-17
    rtol = 1e-5 if dtype == torch.float64 else 1e-4
    np.testing.assert_allclose(bolometric_obs.numpy(), expected, rtol=rtol)


def test_redshift_flux_gradients_reach_lum_and_z():
    wave = torch.linspace(3000.0, 8000.0, 100)
    lum = torch.rand(2, 100, requires_grad=True)
    z = torch.tensor([0.1, 0.4], requires_grad=True)
    _, flux = redshift_spectrum(wave, lum, z)
    flux.sum().backward()
    assert bool((lum.grad > 0).all()) and bool((z.grad < 0).all())  # farther = fainter


@pytest.mark.parametrize("z", [0.0, -0.1])
def test_redshift_spectrum_nonpositive_z_raises(z):
    with pytest.raises(ValueError, match="z must be > 0"):
        redshift_spectrum(torch.linspace(1, 2, 5), torch.ones(2, 5), torch.tensor([0.1, z]))


def test_redshift_wavelength_negative_z_raises():
    with pytest.raises(ValueError, match="z must be >= 0"):
        redshift_wavelength(torch.linspace(1, 2, 5), torch.tensor([-0.01]))


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((torch.linspace(1, 2, 5), torch.ones(2, 4), torch.ones(2)), "lum_rest"),
        ((torch.linspace(1, 2, 5), torch.ones(5), torch.ones(1)), "lum_rest"),
        ((torch.linspace(1, 2, 5), torch.ones(2, 5), torch.ones(3)), "z"),
        ((torch.linspace(1, 2, 5), torch.ones(2, 5), torch.tensor([0.1, np.nan])), "z"),
        ((torch.linspace(1, 2, 5), torch.tensor([[1.0, np.nan, 1, 1, 1]]), torch.ones(1)), "lum"),
        ((torch.linspace(2, 1, 5), torch.ones(1, 5), torch.ones(1)), "wave_rest"),
    ],
)
def test_redshift_spectrum_bad_input_raises(args, name):
    with pytest.raises(ValueError, match=name):
        redshift_spectrum(*args)


# --- line-spread functions ---------------------------------------------------------------------


def test_gaussian_lsf_keeps_flux_and_adds_width_in_quadrature():
    wave = torch.arange(4000.0, 6000.0, 0.5, dtype=torch.float64)
    sigma_line, sigma_lsf = 2.0, 1.5
    line = torch.tensor(_gauss(wave.numpy(), 5000.1, sigma_line, flux=5.0)).unsqueeze(0)
    out = GaussianLSF(wave, sigma=sigma_lsf).double()(line)
    assert float((out * 0.5).sum()) == pytest.approx(5.0, rel=1e-6)
    mu, sig = _moments(wave, out)
    assert float(mu) == pytest.approx(5000.1, abs=1e-6)
    assert float(sig) == pytest.approx(math.hypot(sigma_line, sigma_lsf), rel=1e-4)


def test_gaussian_lsf_conserves_flux_with_varying_sigma_on_log_grid():
    wave = torch.tensor(10 ** np.arange(3.6, 3.7, 1e-4))
    sigma = torch.linspace(0.5, 3.0, wave.numel(), dtype=torch.float64)  # Angstrom
    flux = torch.rand(3, wave.numel(), dtype=torch.float64)
    flux[:, :40] = 0
    flux[:, -40:] = 0  # keep the light away from the ends, where it may leave the grid
    width = torch.diff(pixel_edges(wave))
    out = GaussianLSF(wave, sigma=sigma).double()(flux)  # kernel buffers are float32
    torch.testing.assert_close((out * width).sum(-1), (flux * width).sum(-1), rtol=1e-6, atol=0)


def test_gaussian_lsf_from_resolving_power():
    wave = torch.arange(5000.0, 5200.0, 0.25, dtype=torch.float64)
    lsf = GaussianLSF(wave, resolution=3000.0)
    torch.testing.assert_close(lsf.sigma.double(), wave / (3000.0 * 2.3548200450309493))
    with pytest.raises(ValueError, match="exactly one"):
        GaussianLSF(wave)


def test_desi_diagonal_convention_matches_scipy_dia(coadd):
    # desispec.resolution.Resolution is scipy's dia_matrix with offsets +5 .. -5; the real
    # matrices are asymmetric, so a transposed convention would fail here.
    from scipy.sparse import dia_matrix

    _, res = coadd
    diags = res["B"][0].astype(np.float64)  # (11, N)
    n = diags.shape[1]
    matrix = dia_matrix((diags, np.arange(5, -6, -1)), shape=(n, n))
    flux = np.random.rand(3, n)
    got = apply_resolution(torch.tensor(diags), torch.tensor(flux)).numpy()
    np.testing.assert_allclose(got, (matrix @ flux.T).T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(diagonals_to_dense(torch.tensor(diags)).numpy(), matrix.toarray())


def test_resolution_repeat_equals_repeated_matrices(coadd):
    """One matrix per galaxy serving its k consecutive rows (``repeat=k``: posterior draws)
    gives the very numbers of the matrices repeated k times, through the whole instrument;
    a batch that k does not divide is refused."""
    _, res = coadd
    g = torch.Generator().manual_seed(3)
    inst = DESIInstrument()
    base = torch.cat([torch.tensor(res[a][0].astype(np.float32)) for a in "BRZ"], -1)
    mats = base * (1 + 0.1 * torch.rand(3, 1, base.shape[-1], generator=g))  # 3 galaxies
    wave = torch.linspace(2500.0, 9500.0, 3000, dtype=torch.float64)
    lum = 1 + torch.rand(3 * 4, 3000, generator=g, dtype=torch.float64)
    z = torch.tensor([0.05, 0.2, 0.31], dtype=torch.float64).repeat_interleave(4)
    want = inst(wave, lum, z, resolution=mats.repeat_interleave(4, 0))
    got = inst(wave, lum, z, resolution=mats, repeat=4)
    assert torch.equal(got, want)
    # the same on a Gaussian instrument with each galaxy's own LSF sigma (SDSS wdisp)
    sdss = SDSSInstrument()
    sig = sdss.sigma.double() * (1 + 0.2 * torch.rand(3, sdss.npix, generator=g,
                                                       dtype=torch.float64))  # fmt: skip
    want = sdss(wave, lum, z, sigma=sig.repeat_interleave(4, 0))
    assert torch.equal(sdss(wave, lum, z, sigma=sig, repeat=4), want)
    with pytest.raises(ValueError, match="divide"):
        apply_resolution(mats, torch.rand(10, mats.shape[-1]), repeat=4)
    with pytest.raises(ValueError, match="batch"):
        apply_resolution(mats, torch.rand(8, mats.shape[-1]), repeat=4)


def test_desi_matrix_from_gaussian_equals_gaussian_broadening():
    wave = torch.arange(5000.0, 5400.0, 0.8, dtype=torch.float64)
    sigma = 0.9  # Angstrom
    # DESI storage built by hand: column j holds the kernel of input pixel j at rows j-5..j+5.
    offsets = (np.arange(11) - 5) * 0.8
    column = np.exp(-0.5 * (offsets / sigma) ** 2)
    diags = np.repeat((column / column.sum())[:, None], wave.numel(), axis=1)
    flux = torch.tensor(_gauss(wave.numpy(), 5200.3, 1.1, flux=4.0))[None]
    flux = flux + 1.0 + 0.1 * torch.rand(1, wave.numel(), dtype=torch.float64)
    by_desi = apply_resolution(torch.tensor(diags), flux)
    lsf = GaussianLSF(wave, sigma=sigma, n_sigma=4.4).double()  # 4.4 sigma = 5 pixels
    assert lsf.diagonals.shape == (11, wave.numel())
    by_gauss = lsf(flux)
    # Interior: identical kernels. Ends: the hand-built matrix renormalises within the grid.
    # (The GaussianLSF buffers are float32, hence 1e-6.)
    torch.testing.assert_close(by_desi[:, 5:-5], by_gauss[:, 5:-5], rtol=1e-6, atol=0)
    conv = np.convolve(flux[0].numpy(), column / column.sum(), mode="same")
    np.testing.assert_allclose(by_desi[0, 5:-5].numpy(), conv[5:-5], rtol=1e-12)


def test_real_desi_resolution_rows_sum_to_one_and_conserve_flux(coadd):
    _, res = coadd
    for arm in "BRZ":
        diags = torch.tensor(res[arm][0].astype(np.float64))
        rows = diagonals_to_dense(diags).sum(1)[5:-5]  # the 5 end rows are truncated
        assert float((rows - 1).abs().median()) < 2e-3
        assert float((rows - 1).abs().max()) < 0.08
        n = diags.shape[1]
        x = torch.linspace(0, 1, n, dtype=torch.float64)
        smooth = (1.0 + 0.5 * torch.sin(6 * x) + x).unsqueeze(0)
        out = apply_resolution(diags, smooth)
        ratio = out[0, 20:-20].sum() / smooth[0, 20:-20].sum()
        assert float(ratio) == pytest.approx(1.0, abs=3e-3)


# --- instruments -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rest_model():
    """A rest-frame continuum with one emission line (L_sun/A), 0.5 A sampling."""
    wave = torch.arange(1500.0, 9500.0, 0.5, dtype=torch.float64)
    cont = 1e7 * (wave / 5000.0) ** -1.0
    line = torch.tensor(_gauss(wave.numpy(), 5000.0, 1.0, flux=3e8))
    return wave, torch.stack([cont, cont + line])


def test_generic_instrument_line_flux_and_width(rest_model):
    wave_rest, lum = rest_model
    z = torch.tensor([0.3, 0.3], dtype=torch.float64)
    pix = 1.0  # Angstrom
    sigma_lsf = 1.7
    inst = GenericInstrument(torch.arange(6000.0, 7000.0, pix), sigma=sigma_lsf).double()
    flux = inst(wave_rest, lum, z)
    line = (flux[1] - flux[0]).unsqueeze(0)  # continuum subtracted, observed frame
    _, scale = redshift_spectrum(wave_rest, torch.ones(1, wave_rest.numel()).double(), z[:1])
    assert float((line * pix).sum()) == pytest.approx(3e8 * float(scale[0, 0]) * 1.3, rel=1e-5)
    mu, sig = _moments(inst.wave.double(), line)
    assert float(mu) == pytest.approx(6500.0, abs=1e-3)
    # Variances add: the line, the LSF, the pixel boxcar (pix^2 / 12) and the piecewise-linear
    # reading of the 0.5 A rest-frame samples (a triangle of variance h^2 / 6, h = 0.5 (1 + z)).
    expected = math.sqrt(1.3**2 + sigma_lsf**2 + pix**2 / 12 + (0.5 * 1.3) ** 2 / 6)
    assert float(sig) == pytest.approx(expected, rel=1e-3)


def test_instrument_edges_and_coverage(rest_model):
    wave_rest, lum = rest_model
    inst = GenericInstrument(torch.arange(3600.0, 10400.0, 1.0), resolution=2000.0)
    z = torch.tensor([0.1, 0.2])
    flux = inst(wave_rest.float(), lum.float(), z)
    cov = inst.coverage(wave_rest, z)
    assert cov.shape == flux.shape == (2, inst.npix)
    # 9500 A rest at z = 0.1 ends at 10450 A: every pixel of galaxy 1 is modelled;
    # at z = 0.2 the blue end 1800 A is fine and the red end 11400 A too.
    assert bool(cov.all())
    z_far = torch.tensor([1.5, 0.01])
    cov = inst.coverage(wave_rest, z_far)
    assert not bool(cov[0].all()) and not bool(cov[1].all())
    flux = inst(wave_rest, lum, z_far.double())
    assert float(flux[0][inst.wave < 1500.0 * 2.5 - 10].abs().max()) == 0.0


def test_sdss_instrument_grid_and_wdisp():
    inst = SDSSInstrument()
    loglam = torch.log10(inst.wave.double())
    torch.testing.assert_close(torch.diff(loglam), torch.full_like(loglam[1:], 1e-4))
    assert float(inst.wave[0]) == pytest.approx(3600.0, rel=1.2e-4)
    wave = torch.tensor([4000.0, 8000.0])
    sigma = SDSSInstrument.wdisp_to_sigma(wave, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(sigma, wave.double() * math.log(10) * 1e-4)
    wdisp = torch.full((inst.npix,), 1.1)
    from_wdisp = SDSSInstrument(loglam, wdisp=wdisp)
    torch.testing.assert_close(from_wdisp.sigma, 1.1 * inst.wave * math.log(10) * 1e-4)


def test_desi_default_instrument_layout():
    inst = DESIInstrument()
    assert inst.arm_npix == (2751, 2326, 2881)
    assert inst.resolution.shape == (11, inst.npix)
    torch.testing.assert_close(inst.wave[:2], torch.tensor([3600.0, 3600.8]))
    assert float(inst.wave[-1]) == pytest.approx(9824.0)
    assert inst.arm.tolist().count(1) == 2326
    # Default Gaussian: FWHM 1.8 A, columns normalised.
    torch.testing.assert_close(inst.resolution.sum(0), torch.ones(inst.npix), rtol=0, atol=1e-5)
    assert {"wave", "arm", "resolution", "model_lo", "model_hi"} <= set(inst.state_dict())


def test_desi_instrument_from_real_coadd(coadd, rest_model):
    waves, res = coadd
    inst = DESIInstrument.from_coadd_arrays(waves, res, index=0).double()
    assert inst.arm_npix == tuple(len(waves[a]) for a in "BRZ")
    wave_rest, lum = rest_model
    z = torch.tensor([0.36874, 0.36874], dtype=torch.float64)
    flux = inst(wave_rest, lum, z)
    arms = inst.split(flux)
    assert [tuple(a.shape) for a in arms.values()] == [(2, 2751), (2, 2326), (2, 2881)]
    assert bool(inst.coverage(wave_rest, z).all())
    # The line lands at 5000 (1 + z) = 6843.7 A in the r arm; R conserves its flux to ~1 %.
    line = arms["r"][1] - arms["r"][0]
    _, scale = redshift_spectrum(wave_rest, torch.ones(1, wave_rest.numel()).double(), z[:1])
    assert float((line * 0.8).sum()) == pytest.approx(3e8 * float(scale[0, 0]) * 1.36874, rel=0.02)
    # A per-galaxy resolution passed at call time is the same as a built-in one.
    per_galaxy = inst.resolution.expand(2, -1, -1)
    torch.testing.assert_close(inst(wave_rest, lum, z, resolution=per_galaxy), flux)
    per_arm = [np.repeat(res[arm][:1], 2, axis=0) for arm in "BRZ"]  # as sedvae.io.Spectra
    torch.testing.assert_close(inst(wave_rest, lum, z, resolution=per_arm), flux)
    with pytest.raises(ValueError, match="resolution"):
        inst(wave_rest, lum, z, resolution=per_galaxy[..., :-1])


def test_instruments_gradients_flow_to_lum_rest(rest_model):
    wave_rest, lum = rest_model
    lum = lum.float().clone().requires_grad_(True)
    z = torch.tensor([0.2, 0.25], requires_grad=True)
    loss = DESIInstrument()(wave_rest.float(), lum, z).square().mean()
    loss = loss + SDSSInstrument()(wave_rest.float(), lum, z).square().mean()
    loss.backward()
    assert torch.isfinite(lum.grad).all() and float(lum.grad.abs().sum()) > 0
    assert torch.isfinite(z.grad).all() and float(z.grad.abs().sum()) > 0


def test_instrument_float64_and_bad_input(rest_model):
    wave_rest, lum = rest_model
    inst = GenericInstrument(torch.arange(5000.0, 6000.0, 1.0), resolution=3000.0).double()
    assert inst(wave_rest, lum, torch.tensor([0.1, 0.1])).dtype == torch.float64
    with pytest.raises(ValueError, match="lum_rest"):
        inst(wave_rest, lum[:, :-1], torch.tensor([0.1, 0.1]))
    with pytest.raises(ValueError, match="z"):
        inst(wave_rest, lum, torch.tensor([0.1, -0.1]))
    with pytest.raises(ValueError, match="sigma"):
        inst(wave_rest, lum, torch.tensor([0.1, 0.1]), sigma=torch.ones(2, 7))


# --- photometry --------------------------------------------------------------------------------

ALL_BANDS = tuple(dict.fromkeys(LS_SOUTH + LS_NORTH))


@pytest.fixture(scope="module")
def phot():
    return Photometry(ALL_BANDS)


def _obs_grid(n_gal=2):
    wave = torch.arange(3000.0, 60000.0, 2.0, dtype=torch.float64)
    return wave.expand(n_gal, -1) * torch.tensor([[1.0], [1.0003]], dtype=torch.float64)[:n_gal]


def test_photometry_flat_fnu_gives_ab_magnitude(phot):
    mag = torch.tensor([[18.0], [22.5]], dtype=torch.float64)
    wave = _obs_grid()
    f_nu = 3631e-23 * 10 ** (-0.4 * mag)  # erg/s/cm^2/Hz
    flux = (f_nu * C_AA / wave**2 / 1e-17).float()  # 1e-17 erg/s/cm^2/A
    nmgy = phot(wave, flux)
    assert nmgy.shape == (2, len(ALL_BANDS)) and nmgy.dtype == torch.float32
    expected = mag_to_nanomaggies(mag).float().expand_as(nmgy)
    torch.testing.assert_close(nmgy, expected, rtol=1e-3, atol=0)


def test_photometry_agrees_with_speclite(phot):
    import speclite.filters

    wave = _obs_grid(1)[0]
    w = wave.numpy()
    # Power law with a 4000 A-like break and narrow emission lines inside several filters.
    spec = 5.0 * (w / 5000.0) ** -1.2 * np.where(w < 4800.0, 0.6, 1.0)
    for mu in (4960.0, 6563.0, 8820.0, 34000.0):
        spec = spec + _gauss(w, mu, 3.0, flux=200.0)
    nmgy = phot(wave, torch.tensor(spec)[None])[0].numpy()
    table = speclite.filters.load_filters(*ALL_BANDS).get_ab_maggies(spec * 1e-17, w)
    reference = np.array([float(np.asarray(table[b])[0]) for b in ALL_BANDS]) * 1e9
    np.testing.assert_allclose(nmgy, reference, rtol=3e-4)


def test_photometry_gradient_and_coverage(phot):
    wave = _obs_grid(1)
    flux = torch.ones(1, wave.shape[1], dtype=torch.float64, requires_grad=True)
    phot(wave, flux).sum().backward()
    assert float(flux.grad.abs().sum()) > 0
    short = torch.linspace(3600.0, 9800.0, 1000)  # a DESI spectrum alone misses g and W1/W2
    with pytest.raises(ValueError, match="wave_obs does not cover"):
        phot(short, torch.ones(1, 1000))
    partial = Photometry(("BASS-r",), strict=False)(short, torch.ones(1, 1000))
    assert partial.shape == (1, 1)
