"""sedvae.linear: line list, line and calibration designs, batched NNLS, the joint solve."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from sedvae.linear import (
    CATALOG_LINES,
    LinearModel,
    arm_index,
    calibration_basis,
    component_design,
    line_design,
    line_list,
    nnls_normal,
)
from sedvae.linear.design import C_KMS
from sedvae.physics import DESIInstrument, GenericInstrument, SDSSInstrument
from sedvae.physics.lsf import FWHM_PER_SIGMA
from sedvae.physics.redshift import redshift_spectrum

COADD = Path(__file__).resolve().parents[1] / "data/desi_example/coadd-4-80613-thru20210324.fits"
F64 = torch.float64


def _mock(lm: LinearModel, b: int, *, dtype=F64, calib_scale=0.02, seed=0):
    """Continuum with a Balmer break and absorption, random lines and calibration: the truth."""
    g = torch.Generator().manual_seed(seed)
    wave = lm.instrument.wave.to(dtype)
    z = 0.02 + 0.25 * torch.rand(b, generator=g, dtype=dtype)
    vel = 40.0 * torch.randn(b, generator=g, dtype=dtype)
    sig = 40.0 + 100.0 * torch.rand(b, generator=g, dtype=dtype)
    rest = wave / (1.0 + z[:, None])
    cont = 2.0 + torch.tanh((rest - 4000.0) / 50.0) + 0.3 * (rest / 6000.0)
    for w0 in (4102.9, 4341.7, 4862.7, 6564.6):  # stellar Balmer absorption
        cont = cont - 0.4 * torch.exp(-0.5 * ((rest - w0) / 8.0) ** 2)
    cont = cont * (0.5 + torch.rand(b, 1, generator=g, dtype=dtype))
    rows = lm.design(z, vel, sig, dtype=dtype).dense()
    comps = component_design(rows, lm.lines)
    visible = (comps * lm.pixel_width.to(dtype)).sum(-1) >= 0.5
    amp = 5.0 + 60.0 * torch.rand(b, lm.lines.n_components, generator=g, dtype=dtype)
    amp = torch.where(visible, amp, torch.zeros_like(amp))
    c_true = calib_scale * torch.randn(b, lm.calib_basis.shape[0], generator=g, dtype=dtype)
    model = cont * (1.0 + c_true @ lm.calib_basis.to(dtype)) + (amp.unsqueeze(1) @ comps)[:, 0]
    return dict(z=z, vel=vel, sig=sig, cont=cont, amp=amp, calib=c_true, model=model, rows=rows)


# --- line list ---------------------------------------------------------------------------------


def test_line_list_covers_strong_lines_in_vacuum():
    lines = line_list()
    assert lines.n_lines >= 30
    assert all(3700.0 <= w <= 9600.0 for w in lines.wave)
    for name in CATALOG_LINES:
        lines.index(name)
    # Vacuum, not air (air: H alpha 6562.80, [O III] 5006.84).
    assert lines.wave[lines.index("Halpha")] == pytest.approx(6564.61, abs=0.02)
    assert lines.wave[lines.index("[OIII]5007")] == pytest.approx(5008.24, abs=0.02)
    tie = lines.tie_matrix()
    assert tie.shape == (lines.n_components, lines.n_lines)
    k = lines.component[lines.index("[OIII]5007")]
    assert tie[k, lines.index("[OIII]4959")] == pytest.approx(1 / 2.98)
    k = lines.component[lines.index("[NII]6584")]
    assert tie[k, lines.index("[NII]6548")] == pytest.approx(1 / 2.94)
    # Density-sensitive doublets stay free.
    assert lines.component[lines.index("[SII]6716")] != lines.component[lines.index("[SII]6731")]
    assert lines.component[lines.index("[OII]3726")] != lines.component[lines.index("[OII]3729")]


def test_broad_balmer_components_have_their_own_width():
    lines = line_list(broad_balmer=True)
    inst = GenericInstrument(np.arange(4000.0, 7000.0, 1.0), resolution=3000.0)
    z = torch.tensor([0.01], dtype=F64)
    rows = line_design(
        inst, lines, z, torch.zeros(1), torch.tensor([50.0]), sigma_broad=torch.tensor([2000.0])
    ).dense()
    narrow, broad = rows[0, lines.index("Halpha")], rows[0, lines.index("Halpha_broad")]
    assert lines.broad[lines.index("Halpha_broad")]
    # Same flux, ~ 2000 / sqrt(50^2 + LSF^2) times wider, so a much lower peak.
    assert float(narrow.sum()) == pytest.approx(float(broad.sum()), rel=1e-5)
    assert float(narrow.max()) > 10 * float(broad.max())
    with pytest.raises(ValueError, match="sigma_broad"):
        line_design(inst, lines, z, torch.zeros(1), torch.tensor([50.0]))


# --- designs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("instrument", ["desi", "sdss"])
def test_design_row_integrates_to_line_flux(instrument):
    inst = DESIInstrument() if instrument == "desi" else SDSSInstrument()
    lm = LinearModel(inst)
    z = torch.tensor([0.05, 0.1, 0.2])
    sigma = torch.tensor([0.0, 30.0, 300.0])  # a delta line too: no aliasing, flux kept
    rows = line_design(inst, lm.lines, z, torch.zeros(3), sigma, dtype=torch.float32).dense()
    total = (rows * lm.pixel_width).sum(-1)  # (B, L)
    obs = torch.tensor(lm.lines.wave)[None] * (1 + z[:, None])
    ends = [
        (float(inst.wave[arm_index(inst) == a].min()), float(inst.wave[arm_index(inst) == a].max()))
        for a in range(int(arm_index(inst).max()) + 1)
    ]
    # A line lands once in every arm that holds it (DESI's arms overlap); lines within 30 A of
    # an arm end are cut by the detector and left out.
    expected = sum(((obs > lo + 30) & (obs < hi - 30)).double() for lo, hi in ends)
    near_end = sum(((obs - lo).abs() < 30) | ((obs - hi).abs() < 30) for lo, hi in ends) > 0
    inside = (expected > 0) & ~near_end
    assert int(inside.sum()) > 40
    assert torch.allclose(total[inside].double(), expected[inside], atol=2e-6, rtol=0)


@pytest.mark.parametrize("kind", ["sdss", "generic_per_galaxy_lsf", "desi_per_galaxy_matrix"])
def test_line_takes_the_continuum_path_through_the_instrument(kind):
    """A resolved rest-frame Gaussian through ``instrument.forward`` equals the design row."""
    z = torch.tensor([0.08, 0.1], dtype=F64)
    if kind == "sdss":
        inst, fwd, kw = SDSSInstrument().to(F64), {}, {}
    elif kind == "generic_per_galaxy_lsf":
        inst = GenericInstrument(np.arange(6500.0, 7500.0, 1.2), resolution=2500.0).to(F64)
        sig = inst.sigma.double() * torch.tensor([[0.7], [1.0]], dtype=F64)
        fwd, kw = {"sigma": sig}, {"lsf_sigma": sig}
    else:
        inst = DESIInstrument().to(F64)
        res = inst.resolution.double().expand(2, -1, -1).clone()
        res[1] = res[1] * (1.0 + 0.2 * torch.rand(inst.npix, dtype=F64))  # not a Gaussian
        fwd, kw = {"resolution": res}, {"resolution": res}
    lines = line_list(wave_min=6500.0, wave_max=6600.0)
    sigma_v, vel = 80.0, 30.0
    wave_rest = torch.arange(6300.0, 6800.0, 0.02, dtype=F64)
    k = lines.index("Halpha")
    mu = lines.wave[k] * math.exp(vel / C_KMS)
    s = mu * sigma_v / C_KMS
    unit = torch.exp(-0.5 * ((wave_rest - mu) / s) ** 2) / (s * math.sqrt(2 * math.pi))
    # L_sun/A giving an observed line flux of 1e-17 erg/s/cm^2 after redshift_spectrum
    _, scale = redshift_spectrum(wave_rest, torch.ones(2, wave_rest.shape[0], dtype=F64), z)
    lum = unit[None] / (scale[:, :1] * (1 + z[:, None]))
    via_instrument = inst(wave_rest, lum, z, **fwd)
    vel_t, sig_t = torch.full((2,), vel), torch.full((2,), sigma_v)
    design = line_design(inst, lines, z, vel_t, sig_t, dtype=F64, **kw).dense()[:, k]
    assert float((via_instrument - design).abs().max()) < 1e-4 * float(design.max())


def test_desi_matrix_path_equals_gaussian_lsf_of_same_width():
    fwhm = 1.8
    desi = DESIInstrument(fwhm=fwhm)
    # The arm's pixel centres in float64 (``wave`` is a float32 buffer, 5e-4 A round-off).
    arm_r = (0.5 * (desi.model_lo + desi.model_hi))[desi.arm == 1]
    generic = GenericInstrument(arm_r, sigma=fwhm / FWHM_PER_SIGMA)
    lines = line_list(wave_min=6500.0, wave_max=6600.0)
    z = torch.tensor([0.01], dtype=F64)
    args = (z, torch.tensor([10.0]), torch.tensor([20.0]))
    r_desi = line_design(desi, lines, *args, dtype=F64).dense()[0][:, desi.arm == 1]
    r_gauss = line_design(generic, lines, *args, dtype=F64).dense()[0]
    assert float((r_desi - r_gauss).abs().max()) < 1e-6 * float(r_gauss.max())


def test_real_desi_resolution_matrix_agrees_with_gaussian_of_its_width():
    fits = pytest.importorskip("astropy.io.fits")
    if not COADD.exists():
        pytest.skip(f"missing {COADD}")
    with fits.open(COADD) as hdul:
        waves = {arm: np.array(hdul[f"{arm}_WAVELENGTH"].data, dtype=np.float64) for arm in "BRZ"}
        res = {arm: np.array(hdul[f"{arm}_RESOLUTION"].data[0], dtype=np.float64) for arm in "BRZ"}
    desi = DESIInstrument(waves, res)
    lines = line_list(wave_min=6500.0, wave_max=6600.0)
    z = torch.tensor([0.02], dtype=F64)
    args = (z, torch.tensor([0.0]), torch.tensor([40.0]))
    r_desi = line_design(desi, lines, *args, dtype=F64).dense()[0, lines.index("Halpha")]
    on = desi.arm == 1
    wave_r = desi.wave[on].double()
    prof = r_desi[on]
    # Width of the real LSF at the line: second moment of the matrix column there.
    j = int(torch.argmax(prof))
    col = torch.as_tensor(res["R"][:, j])
    offs = torch.arange(5, -6, -1, dtype=F64) * 0.8
    lsf_sigma = float(torch.sqrt((col * offs**2).sum() / col.sum()))
    generic = GenericInstrument(wave_r, sigma=lsf_sigma)
    r_gauss = line_design(generic, lines, *args, dtype=F64).dense()[0, lines.index("Halpha")]
    width = 0.8
    # Same flux (the real matrix is row-normalised: columns sum to 1 within ~1 %),
    # same centroid, and the profiles differ by a few per cent of the peak (a real LSF is
    # not exactly Gaussian).
    assert float(prof.sum() * width) == pytest.approx(float(r_gauss.sum() * width), rel=0.02)
    c_desi = float((prof * wave_r).sum() / prof.sum())
    c_gauss = float((r_gauss * wave_r).sum() / r_gauss.sum())
    assert abs(c_desi - c_gauss) < 0.05
    assert float((prof - r_gauss).abs().max()) < 0.1 * float(r_gauss.max())


def test_calibration_basis_is_per_arm_legendre():
    desi = DESIInstrument()
    basis = calibration_basis(desi.wave.double(), desi.arm, 2)
    assert basis.shape == (9, desi.npix)
    for a in range(3):
        on = desi.arm == a
        assert torch.all(basis[3 * a, on] == 1) and torch.all(basis[3 * a, ~on] == 0)
        assert (
            float(basis[3 * a + 1, on].min()) == -1.0 and float(basis[3 * a + 1, on].max()) == 1.0
        )


# --- NNLS --------------------------------------------------------------------------------------


def test_batched_nnls_equals_scipy():
    g = torch.Generator().manual_seed(1)
    b, m, n = 64, 80, 30
    x = torch.randn(b, m, n, generator=g, dtype=F64)
    y = torch.randn(b, m, generator=g, dtype=F64)
    res = nnls_normal(x.transpose(1, 2) @ x, (x.transpose(1, 2) @ y[..., None])[..., 0])
    assert bool(res.converged.all())
    ref = np.stack([nnls(x[i].numpy(), y[i].numpy())[0] for i in range(b)])
    assert np.abs(res.x.numpy() - ref).max() < 1e-9
    assert (ref == 0).sum() > b * n // 4  # the bounds are active in these problems


def test_nnls_with_free_variables_meets_kkt():
    g = torch.Generator().manual_seed(2)
    b, m, n = 32, 60, 20
    x = torch.randn(b, m, n, generator=g, dtype=F64)
    y = torch.randn(b, m, generator=g, dtype=F64)
    a, rhs = x.transpose(1, 2) @ x, (x.transpose(1, 2) @ y[..., None])[..., 0]
    nonneg = torch.arange(n) >= 5  # the first five unconstrained
    res = nnls_normal(a, rhs, nonneg)
    grad = (a @ res.x[..., None])[..., 0] - rhs
    assert bool(res.converged.all())
    assert float(res.x[:, 5:].min()) >= 0
    assert bool((res.x[:, :5] < 0).any())  # free variables do go negative
    pos = res.x > 0
    assert float(grad[pos | ~nonneg].abs().max()) < 1e-9  # stationary where free
    assert float(grad[~pos & nonneg].min()) > -1e-9  # no descent into the bound


# --- the joint solve ---------------------------------------------------------------------------


@pytest.mark.parametrize(("instrument", "dtype"), [("desi", F64), ("sdss", torch.float32)])
def test_noiseless_solve_recovers_fluxes_and_calibration(instrument, dtype):
    inst = DESIInstrument() if instrument == "desi" else SDSSInstrument()
    lm = LinearModel(inst).to(dtype)
    t = _mock(lm, 6, dtype=dtype)
    # Noiseless data: weights so large that the calibration prior does not bias the mode.
    ivar = torch.full_like(t["model"], 1e10)
    fit = lm(t["cont"], t["model"], ivar, t["z"], t["vel"], t["sig"])
    on = fit.measured & (t["amp"] > 0)
    assert int(on.sum()) > 6 * 25
    rel = ((fit.amplitude - t["amp"]) / t["amp"])[on]
    assert float(rel.abs().max()) < 1e-4
    assert float((fit.calib - t["calib"]).abs().max()) < 1e-5
    assert bool(fit.converged.all())


def test_doublet_ratios_hold_in_the_model():
    inst = DESIInstrument()
    lm = LinearModel(inst).to(F64)
    t = _mock(lm, 4)
    lines = lm.lines
    # Data whose [O III] 4959 is too strong: the fit still keeps 5007/4959 = 2.98.
    extra = 20.0 * t["rows"][:, lines.index("[OIII]4959")]
    flux = t["model"] + extra + torch.randn_like(t["model"]) * 0.1
    fit = lm(t["cont"], flux, torch.full_like(flux, 100.0), t["z"], t["vel"], t["sig"])
    for strong, weak, ratio in (
        ("[OIII]5007", "[OIII]4959", 2.98),
        ("[NII]6584", "[NII]6548", 2.94),
    ):
        i, j = lines.index(strong), lines.index(weak)
        assert torch.allclose(
            fit.line_flux[:, i] / fit.line_flux[:, j], torch.tensor(ratio, dtype=F64)
        )
    # The model's line spectrum is exactly these per-line fluxes times the per-line profiles.
    per_line = (fit.line_flux.unsqueeze(1) @ t["rows"])[:, 0]
    assert torch.allclose(fit.lines_model, per_line, rtol=0, atol=1e-9 * float(per_line.max()))
    # And in the spectrum itself: [O III] integrated over +-20 A around each line (alone there).
    wave = inst.wave.double()
    i, j = lines.index("[OIII]5007"), lines.index("[OIII]4959")
    for b in range(4):
        f = [
            float(
                (fit.lines_model[b] * lm.pixel_width.double())[
                    (wave - lines.wave[k] * (1 + t["z"][b])).abs() < 20.0
                ].sum()
            )
            for k in (i, j)
        ]
        assert f[0] / f[1] == pytest.approx(2.98, rel=1e-6)


def test_calibration_recovers_injected_tilt():
    inst = DESIInstrument()
    lm = LinearModel(inst).to(F64)
    t = _mock(lm, 8, calib_scale=0.0)
    basis = lm.calib_basis.double()
    tilt = 1.0 + 0.04 * basis[1::3].sum(0) - 0.02 * basis[2::3].sum(0)  # P_1, P_2 of each arm
    lines_part = t["model"] - t["cont"]
    sigma = 0.01 * t["cont"]  # S/N 100 per pixel
    data = t["cont"] * tilt + lines_part + sigma * torch.randn_like(sigma)
    fit = lm(t["cont"], data, sigma**-2, t["z"], t["vel"], t["sig"])
    assert float((fit.calibration - tilt).abs().max()) < 2e-3
    assert torch.allclose(fit.calib[:, 1::3], torch.full((8, 3), 0.04, dtype=F64), atol=2e-3)


def test_flux_errors_are_calibrated():
    inst = SDSSInstrument()
    lm = LinearModel(inst).to(F64)
    t = _mock(lm, 1)
    n = 300
    rep = {k: v.expand(n, *v.shape[1:]) for k, v in t.items()}
    sigma = 0.05 * rep["cont"] + 0.05
    data = rep["model"] + sigma * torch.randn(n, inst.npix, dtype=F64)
    fit = lm(rep["cont"], data, sigma**-2, rep["z"], rep["vel"], rep["sig"])
    strong = fit.measured[0] & (t["amp"][0] > 10 * fit.amplitude_err.median(0).values)
    assert int(strong.sum()) >= 15
    pull = ((fit.amplitude - rep["amp"]) / fit.amplitude_err)[:, strong]  # (n, K)
    assert float(pull.std(0).median()) == pytest.approx(1.0, abs=0.08)
    assert float(pull.mean(0).abs().max()) < 0.3
    cpull = (fit.calib - rep["calib"]) / fit.calib_err  # the prior shrinks: std <= 1
    assert float(cpull.std(0).max()) < 1.15


def test_fluxes_are_non_negative_and_bound_lines_get_upper_limits():
    inst = DESIInstrument()
    lm = LinearModel(inst).to(F64)
    t = _mock(lm, 16)
    noise = torch.randn_like(t["cont"])
    fit = lm(t["cont"], t["cont"] + noise, torch.ones_like(noise), t["z"], t["vel"], t["sig"])
    assert float(fit.line_flux.min()) >= 0.0
    at_zero = fit.measured & (fit.amplitude == 0)
    assert int(at_zero.sum()) > 100  # pure noise: about half the lines sit on the bound
    err = fit.amplitude_err[at_zero]
    assert bool(torch.isfinite(err).all()) and float(err.min()) > 0
    assert bool(torch.isnan(fit.amplitude_err[~fit.measured]).all())


def test_equivalent_width_of_a_line_on_a_flat_continuum():
    inst = SDSSInstrument()
    lm = LinearModel(inst, line_list(wave_min=6500.0, wave_max=6600.0)).to(F64)
    z = torch.tensor([0.1], dtype=F64)
    rows = lm.design(z, torch.zeros(1), torch.tensor([60.0]), dtype=F64).dense()
    cont = torch.full((1, inst.npix), 3.0, dtype=F64)
    k = lm.lines.index("Halpha")
    data = cont + 90.0 * rows[:, k]
    fit = lm(cont, data, torch.full_like(cont, 1e8), z, torch.zeros(1), torch.tensor([60.0]))
    assert float(fit.line_flux[0, k]) == pytest.approx(90.0, rel=1e-6)
    assert float(fit.line_ew[0, k]) == pytest.approx(90.0 / 3.0 / 1.1, rel=1e-5)


def test_solution_is_differentiable_in_the_continuum():
    wave = torch.arange(6400.0, 6800.0, 1.0, dtype=F64)
    inst = GenericInstrument(wave, resolution=3000.0).to(F64)
    lm = LinearModel(inst, line_list(wave_min=6500.0, wave_max=6600.0), degree=1).to(F64)
    z = torch.tensor([0.0], dtype=F64) + 1e-3
    rows = lm.design(z, torch.zeros(1), torch.tensor([50.0]), dtype=F64).dense()
    comps = component_design(rows, lm.lines)
    data = 2.0 + 40.0 * comps[:, 1] + 10.0 * comps[:, 0] + 0.05 * torch.randn(1, wave.shape[0])

    def f(level):
        cont = level * torch.ones(1, wave.shape[0], dtype=F64)
        out = lm(cont, data, torch.full_like(cont, 400.0), z, torch.zeros(1), torch.tensor([50.0]))
        return out.amplitude.sum() + out.chi2.sum() * 1e-3

    level = torch.tensor(1.9, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (level,), eps=1e-6, atol=1e-6)


def test_windowed_design_operations_equal_dense_products():
    """project / gram / combine on the windows equal the dense (B, L, M) matrix products."""
    desi = DESIInstrument()
    lines = line_list(broad_balmer=True)
    b = 5
    z = torch.tensor([0.02, 0.05, 0.2, 0.31, 0.45], dtype=F64)  # lines on arm overlaps too
    res = desi.resolution.double().expand(b, -1, -1) * (1 + 0.1 * torch.rand(b, 1, desi.npix))
    design = line_design(
        desi,
        lines,
        z,
        30.0 * torch.randn(b),
        80.0 + 50.0 * torch.rand(b),
        sigma_broad=2500.0 * torch.ones(b),
        resolution=res,
        dtype=F64,
    )
    dense = design.dense()
    w = torch.rand(b, desi.npix, dtype=F64)
    x = torch.randn(b, 3, desi.npix, dtype=F64)
    f = torch.rand(b, lines.n_lines, dtype=F64)
    assert torch.allclose(design.gram(w), (dense * w[:, None]) @ dense.transpose(1, 2))
    assert torch.allclose(design.project(x), x @ dense.transpose(1, 2))
    assert torch.allclose(design.project(w), (dense @ w[..., None])[..., 0])
    assert torch.allclose(design.combine(f), (f[:, None] @ dense)[:, 0])
    # With the (flux-conserving) Gaussian matrices, lines in both overlapping arms carry their
    # flux twice, once per arm.
    plain = line_design(desi, lines, z, torch.zeros(b), 80.0 * torch.ones(b), sigma_broad=2500.0)
    assert float((plain.dense() * 0.8).sum(-1).max()) == pytest.approx(2.0, abs=1e-3)


def test_solution_is_differentiable_in_the_line_kinematics():
    """The chi^2 of the solved fit has exact gradients in velocity and width (refinement)."""
    wave = torch.arange(6400.0, 6800.0, 1.0, dtype=F64)
    inst = GenericInstrument(wave, resolution=3000.0).to(F64)
    lm = LinearModel(inst, line_list(wave_min=6500.0, wave_max=6600.0), degree=1).to(F64)
    z = torch.tensor([0.001], dtype=F64)
    rows = lm.design(z, torch.tensor([20.0]), torch.tensor([70.0]), dtype=F64).dense()
    data = 2.0 + 40.0 * rows[:, 1] + 10.0 * rows[:, 2] + 0.05 * torch.randn(1, wave.shape[0])
    cont = torch.full_like(data, 2.0)

    def chi2(vel, sig):
        return lm(cont, data, torch.full_like(cont, 400.0), z, vel, sig).chi2.sum()

    vel = torch.tensor([0.0], dtype=F64, requires_grad=True)
    sig = torch.tensor([50.0], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(chi2, (vel, sig), eps=1e-4, atol=1e-4, rtol=1e-4)
    g_vel, g_sig = torch.autograd.grad(chi2(vel, sig), (vel, sig))
    assert float(g_vel) < 0 and float(g_sig) < 0  # towards the truth (20, 70) km/s


def test_broad_balmer_component_recovered_beside_the_narrow_line():
    inst = SDSSInstrument()
    lm = LinearModel(inst, line_list(broad_balmer=True)).to(F64)
    b = 4
    z = torch.full((b,), 0.05, dtype=F64)
    vel, sig, sig_b = torch.zeros(b), torch.full((b,), 60.0), torch.full((b,), 1500.0)
    rows = lm.design(z, vel, sig, sigma_broad=sig_b, dtype=F64).dense()
    cont = torch.full((b, inst.npix), 2.0, dtype=F64)
    i_n, i_b = lm.lines.index("Halpha"), lm.lines.index("Halpha_broad")
    truth_n, truth_b = 50.0, 400.0
    sigma = torch.full_like(cont, 0.05)
    data = cont + truth_n * rows[:, i_n] + truth_b * rows[:, i_b]
    data = data + sigma * torch.randn_like(cont)
    fit = lm(cont, data, sigma**-2, z, vel, sig, sigma_broad=sig_b)
    for i, truth in ((i_n, truth_n), (i_b, truth_b)):
        pull = (fit.line_flux[:, i] - truth) / fit.line_flux_err[:, i]
        assert float(pull.abs().max()) < 4.0
    # Without the broad component, the narrow H alpha cannot reproduce the data.
    narrow_only = LinearModel(inst).to(F64)(cont, data, sigma**-2, z, vel, sig)
    assert float(narrow_only.rchi2.min()) > 2.0 * float(fit.rchi2.max())
    cols = lm.columns(fit)
    assert torch.equal(cols["flux_Halpha"], fit.line_flux[:, i_n])
    assert set(cols) >= {"flux_err_[OIII]5007", "ew_[SII]6731"}


def test_masked_line_is_held_at_zero_and_unmeasured():
    inst = SDSSInstrument()
    lm = LinearModel(inst).to(F64)
    t = _mock(lm, 2)
    k = lm.lines.index("Halpha")
    near = (inst.wave.double() - lm.lines.wave[k] * (1 + t["z"][:, None])).abs() < 8.0
    ivar = torch.full_like(t["model"], 1e4)
    fit = lm(t["cont"], t["model"], ivar, t["z"], t["vel"], t["sig"], mask=near)
    c = lm.lines.component[k]
    assert not bool(fit.measured[:, c].any())
    assert bool((fit.line_flux[:, k] == 0).all()) and bool(fit.line_flux_err[:, k].isnan().all())
    assert bool(fit.line_ew[:, k].isnan().all())
    # The other lines are still measured, and the masked pixels do not count.
    j = lm.lines.index("[OIII]5007")
    assert bool(fit.measured[:, lm.lines.component[j]].all())
    assert torch.equal(fit.n_pix, (~near).sum(-1))


def test_tied_arm_scales_leave_out_the_constant_terms():
    desi = DESIInstrument()
    free, tied = LinearModel(desi), LinearModel(desi, scale_sigma=0.0)
    assert free.calib_basis.shape[0] == 9 and tied.calib_basis.shape[0] == 6
    assert bool((tied.calib_order > 0).all())
    assert torch.equal(free.calib_sigma, torch.full((9,), 0.05, dtype=F64))
    # Derived buffers are rebuilt from the arguments, not saved.
    assert not any(k.startswith(("calib", "tie", "pixel")) for k in free.state_dict())


def test_fit_kinematics_recovers_injected_velocity_and_width():
    inst = SDSSInstrument()
    lm = LinearModel(inst).to(F64)
    t = _mock(lm, 6, seed=3)
    sigma = 0.02 * t["cont"]
    data = t["model"] + sigma * torch.randn_like(sigma)
    v, s, fit = lm.fit_kinematics(t["cont"], data, sigma**-2, t["z"])
    assert float((v - t["vel"]).abs().max()) < 3.0  # km/s
    assert float(((s - t["sig"]) / t["sig"]).abs().max()) < 0.03
    truth = lm(t["cont"], data, sigma**-2, t["z"], t["vel"], t["sig"])
    assert float((fit.chi2 - truth.chi2).max()) < 1.0  # as good as the true kinematics


def test_shared_line_gram_and_scan_chi2_reproduce_the_solve_exactly():
    """The PPC's shortcuts change no number: a line gram summed once for rows that share
    design and weights, and the kinematics scan's chi^2-only path, equal the full solve."""
    from sedvae.catalog.ppc import _repeat_design
    from sedvae.linear.solve import _data_terms, _solve, solve_linear

    desi = DESIInstrument()
    lm = LinearModel(desi)
    t = _mock(lm, 3, dtype=torch.float32, seed=5)
    g = torch.Generator().manual_seed(6)
    sigma = 0.03 * t["cont"]
    data = t["model"] + sigma * torch.randn(sigma.shape, generator=g)
    ivar = sigma**-2
    k = 4  # four continua per galaxy (posterior draws)
    cont = t["cont"].repeat_interleave(k, 0) * (1 + 0.05 * torch.rand(3 * k, 1, generator=g))
    base = lm.design(t["z"], t["vel"], t["sig"], dtype=torch.float32)
    design = _repeat_design(base, k)
    tie = lm.tie.float()
    gram = (tie @ base.gram(ivar) @ tie.T).repeat_interleave(k, 0)
    rep = (data.repeat_interleave(k, 0), ivar.repeat_interleave(k, 0), design, lm.tie,
           lm.calib_basis, lm.calib_sigma)  # fmt: skip
    full = solve_linear(cont, *rep, pixel_width=lm.pixel_width)
    shared = solve_linear(cont, *rep, pixel_width=lm.pixel_width, line_gram=gram)
    for name in ("line_flux", "line_flux_err", "calib", "model", "chi2"):
        a, b = getattr(full, name), getattr(shared, name)  # NaN: unmeasured lines
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)
    # the scan's path at other kinematics
    terms = _data_terms(t["cont"], data, ivar, lm.calib_basis.float(), None)
    for dv, s in ((-30.0, 20.0), (0.0, 90.0), (50.0, 400.0)):
        vel, sig = t["vel"] + dv, torch.full_like(t["sig"], s)
        want = lm(t["cont"], data, ivar, t["z"], vel, sig).chi2
        d = lm.design(t["z"], vel, sig, dtype=torch.float32)
        got = _solve(t["cont"], data, d, tie, lm.calib_basis.float(), lm.calib_sigma, terms,
                     pixel_width=lm.pixel_width, full=False)  # fmt: skip
        assert torch.equal(got, want)


def test_batched_kinematics_scan_equals_one_point_at_a_time():
    """fit_kinematics solves all points of a grid or parabola step in one batch (galaxies x
    points as rows): the same chi^2 as one batch per point, to float32 round-off, so the
    same (v, sigma); per-galaxy resolution matrices, read from one LSFTable by row, too."""
    from sedvae.linear.design import LSFTable

    desi = DESIInstrument()
    lm = LinearModel(desi)
    t = _mock(lm, 12, dtype=torch.float32, seed=8)
    g = torch.Generator().manual_seed(9)
    sigma = 0.03 * t["cont"]
    data = t["model"] + sigma * torch.randn(sigma.shape, generator=g)
    # each galaxy its own matrix: the instrument's, broadened a little by a random factor
    res = desi.resolution.unsqueeze(0).repeat(12, 1, 1)
    res = res * (1 + 0.05 * torch.rand(12, 1, 1, generator=g))
    res = res / res.sum(1, keepdim=True)
    # the design through the shared table equals the per-galaxy design, row by row
    rows = torch.tensor([3, 3, 0, 11])
    vel, sig = torch.tensor([0.0, 40.0, -20.0, 10.0]), torch.tensor([30.0, 30.0, 200.0, 80.0])
    got = lm.design(t["z"][rows], vel, sig, diagonals=LSFTable(res, torch.float32),
                    diagonal_rows=rows, dtype=torch.float32).dense()  # fmt: skip
    want = lm.design(t["z"][rows], vel, sig, resolution=res[rows], dtype=torch.float32).dense()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    args = (t["cont"], data, sigma**-2, t["z"])
    for kw in ({}, {"velocity": t["vel"] + 30.0, "sigma": t["sig"], "n_grid": 5}):
        v1, s1, f1 = lm.fit_kinematics(*args, resolution=res, batch_points=False, **kw)
        vb, sb, fb = lm.fit_kinematics(*args, resolution=res, max_rows=40, **kw)
        assert float((vb - v1).abs().max()) < 0.5  # km/s
        assert float(((sb - s1) / s1).abs().max()) < 2e-3
        torch.testing.assert_close(fb.chi2, f1.chi2, rtol=1e-5, atol=0)
        assert float((v1 - t["vel"]).abs().max()) < 5.0  # and both find the truth
