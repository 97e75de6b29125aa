"""Speed of the exact line + calibration solve (sedvae.linear) against scipy's NNLS, in one run.

    python bench/linear_solve.py [--batch 256] [--instrument desi] [--repeats 3]

Problems: DESI (or SDSS) spectra of ``--batch`` galaxies at 0.02 < z < 0.3: a smooth continuum
with a 4000 A break and Balmer absorption, the canonical line list with random fluxes (a third
of the components at zero), a random per-arm calibration warp within the prior, Gaussian noise
at S/N ~ 20 per pixel. sedvae: ``LinearModel.forward`` in float32 (``--dtype``) on the whole
batch, split
into building the line design and the solve (normal equations, batched NNLS, errors, EWs).
The named alternative on the *same* problems (same design, continuum, data, weights and prior):
``scipy.optimize.nnls`` in a Python loop, one galaxy at a time, in float64, with the
unconstrained calibration eliminated exactly (QR projection of the whitened, prior-augmented
system), which is the same minimisation. Both fluxes are compared. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy.optimize import nnls

from sedvae.linear import LinearModel, component_design
from sedvae.linear.solve import solve_linear
from sedvae.physics import DESIInstrument, SDSSInstrument


def make_problems(lm: LinearModel, b: int, seed: int, dtype) -> dict[str, torch.Tensor]:
    """Continuum, data, ivar and kinematics for b galaxies (see module docstring)."""
    g = torch.Generator().manual_seed(seed)
    wave = lm.instrument.wave.double()
    z = 0.02 + 0.28 * torch.rand(b, generator=g, dtype=torch.float64)
    vel = 50.0 * torch.randn(b, generator=g, dtype=torch.float64)
    sig = 30.0 + 150.0 * torch.rand(b, generator=g, dtype=torch.float64)
    rest = wave / (1.0 + z[:, None])
    cont = 2.0 + torch.tanh((rest - 4000.0) / 50.0) + 0.3 * rest / 6000.0
    for w0 in (4102.9, 4341.7, 4862.7, 6564.6):
        cont = cont - 0.4 * torch.exp(-0.5 * ((rest - w0) / 8.0) ** 2)
    cont = cont * (0.5 + torch.rand(b, 1, generator=g, dtype=torch.float64))
    comps = component_design(lm.design(z, vel, sig, dtype=torch.float64).dense(), lm.lines)
    amp = 30.0 * torch.rand(b, lm.lines.n_components, generator=g, dtype=torch.float64)
    amp = amp * (torch.rand(amp.shape, generator=g, dtype=torch.float64) > 1 / 3)
    calib = 0.02 * torch.randn(b, lm.calib_basis.shape[0], generator=g, dtype=torch.float64)
    model = cont * (1.0 + calib @ lm.calib_basis.double()) + (amp.unsqueeze(1) @ comps)[:, 0]
    sigma = cont / 20.0
    flux = model + sigma * torch.randn(model.shape, generator=g, dtype=torch.float64)
    out = {"cont": cont, "flux": flux, "ivar": sigma**-2, "z": z, "vel": vel, "sig": sig}
    return {k: v.to(dtype) for k, v in out.items()}


def scipy_loop(
    lm: LinearModel, p: dict, comps: np.ndarray, measured: np.ndarray
) -> tuple[np.ndarray, float]:
    """Amplitudes (B, K) by scipy.optimize.nnls per galaxy, calibration eliminated; seconds.

    Components sedvae holds at zero as unmeasured (under half a line on good pixels) are left
    out here too, so that both solve the same problem."""
    basis = lm.calib_basis.double().numpy()
    prior = 1.0 / lm.calib_sigma.double().numpy()
    cont, flux, ivar = (p[k].double().numpy() for k in ("cont", "flux", "ivar"))
    basis, prior = basis.astype(np.float64), prior.astype(np.float64)
    b, k, _ = comps.shape
    out = np.zeros((b, k))
    t0 = time.perf_counter()
    for i in range(b):
        sw = np.sqrt(ivar[i])
        # Whitened columns: calibration C P_j and lines D_k; prior rows for the calibration.
        xc = np.vstack([(cont[i] * basis * sw).T, np.diag(prior)])  # (M + J, J)
        on = measured[i]
        xl = np.vstack([(comps[i, on] * sw).T, np.zeros((len(prior), int(on.sum())))])
        y = np.concatenate([(flux[i] - cont[i]) * sw, np.zeros(len(prior))])
        q, _ = np.linalg.qr(xc)  # eliminate c: project onto the complement of its columns
        xl_p = xl - q @ (q.T @ xl)
        y_p = y - q @ (q.T @ y)
        out[i, on] = nnls(xl_p, y_p, maxiter=50 * k)[0]
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--instrument", choices=("desi", "sdss"), default="desi")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    inst = DESIInstrument() if args.instrument == "desi" else SDSSInstrument()
    dtype = getattr(torch, args.dtype)
    lm = LinearModel(inst)  # float64 buffers; the solve casts them to the data dtype
    p = make_problems(lm, args.batch, args.seed, dtype)
    b = args.batch

    t_design, t_solve, t_total = [], [], []
    with torch.no_grad():
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            design = lm.design(p["z"], p["vel"], p["sig"], dtype=dtype)
            t1 = time.perf_counter()
            fit = solve_linear(
                p["cont"],
                p["flux"],
                p["ivar"],
                design,
                lm.tie,
                lm.calib_basis,
                lm.calib_sigma,
                pixel_width=lm.pixel_width,
                z=p["z"],
            )
            t2 = time.perf_counter()
            fit_full = lm(p["cont"], p["flux"], p["ivar"], p["z"], p["vel"], p["sig"])
            t3 = time.perf_counter()
            t_design.append(t1 - t0)
            t_solve.append(t2 - t1)
            t_total.append(t3 - t2)
    ms = {
        k: 1e3 * float(np.median(v)) / b
        for k, v in (("design", t_design), ("solve", t_solve), ("total", t_total))
    }

    design64 = lm.design(p["z"].double(), p["vel"].double(), p["sig"].double(), dtype=torch.float64)
    comps64 = component_design(design64.dense(), lm.lines).numpy()
    meas = fit.measured.numpy()
    amp_scipy, t_scipy = scipy_loop(lm, p, comps64, meas)
    ms_scipy = 1e3 * t_scipy / b
    amp = fit.amplitude.double().numpy()
    err = fit.amplitude_err.double().numpy()
    # Agreement, in units of each flux's 1-sigma error (``--dtype`` solve vs float64 scipy).
    diff_sigma = np.abs(amp - amp_scipy)[meas] / err[meas]
    same_zero = ((amp == 0) == (amp_scipy == 0))[meas].mean()

    print(
        f"instrument {args.instrument}, batch {b}, {lm.lines.n_components} line components, "
        f"{lm.calib_basis.shape[0]} calibration terms, {inst.npix} pixels, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"sedvae design   {ms['design']:.3f} ms/galaxy")
    print(f"sedvae solve    {ms['solve']:.3f} ms/galaxy (normal equations, NNLS, errors, EWs)")
    print(f"sedvae total    {ms['total']:.3f} ms/galaxy (LinearModel.forward)")
    print(f"scipy nnls loop {ms_scipy:.3f} ms/galaxy (same problems, design given)")
    print(f"speed-up: solve {ms_scipy / ms['solve']:.1f}x, total {ms_scipy / ms['total']:.1f}x")
    print(
        f"agreement: median |sedvae - scipy| = {np.median(diff_sigma):.2e} sigma, "
        f"max {diff_sigma.max():.2e} sigma; same lines at zero: {same_zero:.4f}; "
        f"converged {bool(fit_full.converged.all())}"
    )
    print(
        json.dumps(
            {
                "instrument": args.instrument,
                "batch": b,
                "dtype": args.dtype,
                "threads": torch.get_num_threads(),
                "ms_per_galaxy_design": round(ms["design"], 4),
                "ms_per_galaxy_solve": round(ms["solve"], 4),
                "ms_per_galaxy_total": round(ms["total"], 4),
                "ms_per_galaxy_scipy_nnls": round(ms_scipy, 4),
                "speedup_solve_vs_scipy": round(ms_scipy / ms["solve"], 2),
                "speedup_total_vs_scipy": round(ms_scipy / ms["total"], 2),
                "max_abs_diff_sigma": float(f"{diff_sigma.max():.3g}"),
                "same_zero_fraction": round(float(same_zero), 4),
            }
        )
    )


if __name__ == "__main__":
    main()
