"""Joint, exact solve of line fluxes (non-negative) and calibration (Gaussian prior) per galaxy.

Given the continuum C (B, M) on the instrument pixels, the model

    model = C (1 + sum_j c_j P_j) + sum_k a_k D_k

is linear in u = (c, a). With weights w = ivar on good pixels, the posterior mode under the
prior c_j ~ N(0, sigma_j^2) and the constraint a >= 0 minimises

    chi^2(u) + sum_j c_j^2 / sigma_j^2 = u^T A u - 2 b^T u + const,
    A = X W X^T + diag(1 / sigma^2, 0),   b = X W (y - C),   X = [C P_j ; D_k]   (n x M),

a non-negative least-squares problem on the small (n x n) normal equations, solved here for the
whole batch at once by block principal pivoting (Kim & Park 2011, SIAM J. Sci. Comput. 33,
3261; the active-set method of Lawson & Hanson 1974 exchanging whole blocks, with Murty's single
exchange as the fall-back that guarantees termination) with c unconstrained.

Differentiable path: the active set is found without gradients; the returned solution is then
one linear solve on that set, differentiable with respect to the continuum and the design (so
the line kinematics). That is the exact gradient wherever the active set is locally constant,
i.e. almost everywhere.

Errors: the covariance of the free variables is the inverse of A on the active set (continuum
and kinematics fixed). A line at its bound (a = 0) gets the 1-sigma error it would have if freed
alone, 1 / sqrt(A_kk - A_kF A_FF^-1 A_Fk), a usable upper limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sedvae.linear.design import (
    LineDesign,
    LSFTable,
    _crop,
    arm_index,
    calibration_basis,
    default_calibration_degree,
    line_design,
    model_diagonals,
)
from sedvae.linear.lines import CATALOG_LINES, LineList, line_list
from sedvae.physics.checks import as_tensor, check_ndim


def _masked_system(a, b, free):
    """A, b restricted to ``free`` (B, n): identity rows/columns elsewhere, so x = 0 there."""
    pair = free.unsqueeze(-1) & free.unsqueeze(-2)
    eye = torch.diag_embed((~free).to(a.dtype))
    return torch.where(pair, a, torch.zeros_like(a)) + eye, torch.where(free, b, 0.0)


def _solve_spd(a, b):
    """Batched SPD solve (Cholesky; LU where a factor fails, e.g. a degenerate blend)."""
    chol, info = torch.linalg.cholesky_ex(a)
    x = torch.cholesky_solve(b.unsqueeze(-1), chol).squeeze(-1)
    bad = info != 0
    if bool(bad.any()):
        x = torch.where(
            bad.unsqueeze(-1), torch.linalg.lstsq(a, b.unsqueeze(-1)).solution[..., 0], x
        )
    return x


@dataclass
class NNLSResult:
    """x (B, n) solution; free (B, n) bool: the passive set (variables not held at 0);
    converged (B,) bool; n_iter: iterations the batch took."""

    x: torch.Tensor
    free: torch.Tensor
    converged: torch.Tensor
    n_iter: int


def nnls_normal(
    a: torch.Tensor,
    b: torch.Tensor,
    nonneg: torch.Tensor | None = None,
    *,
    max_iter: int | None = None,
    tol: float = 1e-10,
) -> NNLSResult:
    """Minimise x^T A x / 2 - b^T x subject to x_i >= 0 where ``nonneg``, for a batch.

    Equivalent to ``scipy.optimize.nnls(X, y)`` with A = X^T X, b = X^T y when every variable
    is non-negative.

    Parameters
    ----------
    a : (B, n, n) tensor, symmetric positive definite
    b : (B, n) tensor
    nonneg : (n,) or (B, n) bool tensor, optional
        Constrained variables (default all); the others are unconstrained.
    max_iter : int, optional
        Pivoting iterations (default 5 n); each is one batched Cholesky solve.
    tol : float
        Feasibility tolerance on the diagonally scaled problem (unit diagonal).

    Returns
    -------
    NNLSResult, in the dtype of ``a``; computed without gradients.
    """
    check_ndim("a", a, (3,), "(B, n, n)")
    bsz, n, _ = a.shape
    if b.shape != (bsz, n):
        raise ValueError(f"b must have shape ({bsz}, {n}); got {tuple(b.shape)}")
    if nonneg is None:
        nonneg = torch.ones(n, dtype=torch.bool, device=a.device)
    nonneg = nonneg.to(a.device).expand(bsz, n)
    max_iter = 5 * n if max_iter is None else max_iter
    with torch.no_grad():
        d = a.diagonal(dim1=-2, dim2=-1).clamp(min=torch.finfo(a.dtype).tiny).rsqrt()  # (B, n)
        a_s = a * d.unsqueeze(-1) * d.unsqueeze(-2)  # unit diagonal: one tolerance for all
        b_s = b * d
        tol_b = tol * (1.0 + b_s.abs().amax(-1, keepdim=True))  # (B, 1)
        free = torch.ones_like(nonneg)  # start from the unconstrained solution
        best = torch.full((bsz,), n + 1, dtype=torch.long, device=a.device)
        backup = torch.full((bsz,), 3, dtype=torch.long, device=a.device)
        done = torch.zeros(bsz, dtype=torch.bool, device=a.device)
        idx = torch.arange(n, device=a.device)
        u = torch.zeros_like(b_s)
        it = 0
        for it in range(1, max_iter + 1):  # noqa: B007 (reported)
            u = _solve_spd(*_masked_system(a_s, b_s, free))
            grad = a_s @ u.unsqueeze(-1)
            grad = grad.squeeze(-1) - b_s  # KKT: grad_i >= 0 where held at 0
            infeasible = nonneg & ((free & (u < -tol_b)) | (~free & (grad < -tol_b)))
            n_inf = infeasible.sum(-1)
            done = n_inf == 0
            if bool(done.all()):
                break
            # Kim & Park's rule: exchange the whole infeasible block while the count falls
            # (or a few backup times), else only the largest index (Murty), which terminates.
            fewer = n_inf < best
            best = torch.where(fewer, n_inf, best)
            backup = torch.where(fewer, torch.full_like(backup, 3), backup)
            block = fewer | (backup > 0)
            backup = torch.where(~fewer & block, backup - 1, backup)
            last = torch.where(infeasible, idx, -1).amax(-1, keepdim=True)
            exchange = torch.where(block.unsqueeze(-1), infeasible, idx == last) & ~done[:, None]
            free = free ^ exchange
        x = torch.where(free, u, torch.zeros_like(u)) * d
        x = torch.where(nonneg, x.clamp(min=0.0), x)  # round-off below 0 within tol
    return NNLSResult(x=x, free=free, converged=done, n_iter=it)


@dataclass
class LinearFit:
    """Result of :func:`solve_linear` (B galaxies, K components, L lines, J calibration terms).

    Attributes
    ----------
    amplitude, amplitude_err : (B, K) 1e-17 erg/s/cm^2
        Component amplitudes (= flux of each component's primary line) and 1-sigma errors.
    line_flux, line_flux_err : (B, L) 1e-17 erg/s/cm^2
        Per-line fluxes (tied lines: amplitude x ratio) and 1-sigma errors; NaN error where the
        line is not measured.
    line_ew : (B, L) Angstrom, rest frame
        flux / (calibrated continuum under the line profile) / (1 + z); NaN where not measured
        or the continuum is not positive.
    calib, calib_err : (B, J) dimensionless
        Calibration coefficients (per-arm Legendre, arm-major) and 1-sigma errors.
    calibration : (B, M) dimensionless
        The factor 1 + sum_j c_j P_j multiplying the continuum.
    lines_model, model : (B, M) 1e-17 erg/s/cm^2/A
        Emission lines alone; calibrated continuum + lines.
    chi2 : (B,) data chi^2 on good pixels (no prior term)
    n_pix : (B,) good pixels; n_free : (B,) free parameters at the solution (dof = n_pix - n_free)
    measured : (B, K) bool: component visible on at least half a line's worth of good pixels
    converged : (B,) bool: the pivoting reached the KKT conditions
    """

    amplitude: torch.Tensor
    amplitude_err: torch.Tensor
    line_flux: torch.Tensor
    line_flux_err: torch.Tensor
    line_ew: torch.Tensor
    calib: torch.Tensor
    calib_err: torch.Tensor
    calibration: torch.Tensor
    lines_model: torch.Tensor
    model: torch.Tensor
    chi2: torch.Tensor
    n_pix: torch.Tensor
    n_free: torch.Tensor
    measured: torch.Tensor
    converged: torch.Tensor

    @property
    def rchi2(self) -> torch.Tensor:
        """(B,) chi2 / (n_pix - n_free)."""
        return self.chi2 / (self.n_pix - self.n_free).clamp(min=1)


def solve_linear(
    continuum: torch.Tensor,
    flux: torch.Tensor,
    ivar: torch.Tensor,
    design: LineDesign,
    tie: torch.Tensor,
    calib_basis: torch.Tensor,
    calib_sigma: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    pixel_width: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    max_iter: int | None = None,
    line_gram: torch.Tensor | None = None,
) -> LinearFit:
    """Solve line amplitudes (>= 0) and calibration (Gaussian prior) given the continuum.

    Parameters
    ----------
    continuum : (B, M) tensor, 1e-17 erg/s/cm^2/A
        Model continuum on the instrument pixels (e.g. the instrument's ``forward``).
    flux, ivar : (B, M) tensors, 1e-17 erg/s/cm^2/A and its inverse variance
    design : LineDesign
        Per-line profiles (:func:`sedvae.linear.design.line_design`), L lines.
    tie : (K, L) tensor
        :meth:`LineList.tie_matrix`: component k's design is sum_l tie[k, l] D_l.
    calib_basis : (J, M) tensor
        Per-arm Legendre basis (:func:`sedvae.linear.design.calibration_basis`); J may be 0.
    calib_sigma : (J,) tensor
        Prior standard deviation of each calibration coefficient (> 0).
    mask : (B, M) bool tensor, optional
        True for a bad pixel, as in :class:`sedvae.io.Spectra` (pixels with ivar <= 0 are
        excluded anyway).
    pixel_width : (M,) tensor, Angstrom, optional
        Output pixel widths, for the ``measured`` test (default: 1 A, i.e. a row-sum test).
    z : (B,) tensor, optional
        Redshifts, for rest-frame equivalent widths (default: observed-frame, z = 0).
    max_iter : int, optional
        Passed to :func:`nnls_normal`.
    line_gram : (B, K, K) tensor, optional
        ``tie @ design.gram(w) @ tie.T`` with w = ivar on good pixels, when the caller has it:
        rows that share their design and weights (K posterior draws of one galaxy) need it
        once, not K times.

    Returns
    -------
    LinearFit
        Amplitudes, calibration, model and chi2 are differentiable with respect to
        ``continuum`` and the design's kinematics (see the module docstring); errors and EWs
        are too.
    """
    check_ndim("continuum", continuum, (2,), "(B, M)")
    bsz, m = continuum.shape
    for name, t in (("flux", flux), ("ivar", ivar)):
        if t.shape != (bsz, m):
            raise ValueError(f"{name} must have shape ({bsz}, {m}); got {tuple(t.shape)}")
    if design.batch != bsz or design.npix != m:
        raise ValueError(
            f"design is for {design.batch} galaxies x {design.npix} pixels; data are {bsz} x {m}"
        )
    dt = continuum.dtype
    tie = tie.to(continuum.device, dt)
    if tie.ndim != 2 or tie.shape[1] != design.n_lines:
        raise ValueError(f"tie must have shape (K, {design.n_lines}); got {tuple(tie.shape)}")
    calib_basis = calib_basis.to(continuum.device, dt)
    if calib_basis.ndim != 2 or calib_basis.shape[-1] != m:
        raise ValueError(f"calib_basis must have shape (J, {m}); got {tuple(calib_basis.shape)}")
    n_j, n_k = calib_basis.shape[0], tie.shape[0]
    calib_sigma = as_tensor("calib_sigma", calib_sigma, dtype=torch.float64).to(continuum.device)
    if calib_sigma.shape != (n_j,) or not bool((calib_sigma > 0).all()):
        raise ValueError(f"calib_sigma must be ({n_j},) and > 0; got {tuple(calib_sigma.shape)}")
    if line_gram is not None and line_gram.shape != (bsz, n_k, n_k):
        raise ValueError(f"line_gram must have shape ({bsz}, {n_k}, {n_k})")
    terms = _data_terms(continuum, flux, ivar, calib_basis, mask)
    return _solve(continuum, flux, design, tie, calib_basis, calib_sigma, terms,
                  line_gram=line_gram, pixel_width=pixel_width, z=z, max_iter=max_iter)  # fmt: skip


def _data_terms(continuum, flux, ivar, calib_basis, mask) -> dict[str, torch.Tensor]:
    """The parts of the normal equations that do not depend on the lines (nor on their
    kinematics): weights, residual, and the calibration block. ``calib_basis`` in the
    continuum's dtype and device."""
    bsz, m = continuum.shape
    n_j = calib_basis.shape[0]
    dt = continuum.dtype
    good = ivar > 0
    if mask is not None:
        good = good & ~mask.to(torch.bool)
    w = torch.where(good, ivar, torch.zeros_like(ivar)).to(dt)  # (B, M)
    resid = torch.where(good, flux - continuum, torch.zeros_like(flux)).to(dt)
    # Normal equations: lines through their windows (O(B L W)), calibration by products with
    # the (J, M) basis (no (B, J, M) array: memory traffic, not arithmetic, bounds this).
    cw = continuum * w  # (B, M)
    pp = (calib_basis.unsqueeze(0) * calib_basis.unsqueeze(1)).reshape(n_j * n_j, m)
    a_cc = ((cw * continuum) @ pp.T).reshape(bsz, n_j, n_j)  # sum_m C^2 w P_i P_j
    b_c = (cw * resid) @ calib_basis.T  # (B, J)
    return {"good": good, "w": w, "resid": resid, "cw": cw, "a_cc": a_cc, "b_c": b_c}


def _solve(continuum, flux, design, tie, calib_basis, calib_sigma, terms, *, line_gram=None,
           pixel_width=None, z=None, max_iter=None, full=True):  # fmt: skip
    """:func:`solve_linear` after its checks, from :func:`_data_terms`; ``full=False``
    returns only the chi^2 (B,), the same numbers, without errors and equivalent widths."""
    bsz, m = continuum.shape
    n_j, n_k = calib_basis.shape[0], tie.shape[0]
    dt = continuum.dtype
    good, w, resid, cw = terms["good"], terms["w"], terms["resid"], terms["cw"]
    a_cc, b_c = terms["a_cc"], terms["b_c"]
    a_kc = tie @ design.project_basis(cw, calib_basis).transpose(1, 2)  # (B, K, J)
    a_kk = tie @ design.gram(w) @ tie.T if line_gram is None else line_gram.to(dt)  # (B, K, K)
    b_k = design.project(w * resid) @ tie.T  # (B, K)
    a = torch.cat([torch.cat([a_cc, a_kc.transpose(1, 2)], 2), torch.cat([a_kc, a_kk], 2)], 1)
    a = a.to(torch.float64)
    b = torch.cat([b_c, b_k], 1).to(torch.float64)
    prior = torch.cat([calib_sigma**-2, calib_sigma.new_zeros(n_k)])
    a = a + torch.diag_embed(prior).unsqueeze(0)

    # A component with (almost) none of its light on good pixels is held at 0, unmeasured.
    width = torch.ones(m, dtype=dt, device=continuum.device)
    if pixel_width is not None:
        width = pixel_width.to(continuum.device, dt)
    with torch.no_grad():
        seen = design.project(good.to(dt) * width) @ tie.T  # (B, K)
        measured = seen >= 0.5  # at least half of the primary line's unit flux
        measured = measured & (a_kk.diagonal(dim1=1, dim2=2) > 0)
    keep = torch.cat([torch.ones(bsz, n_j, dtype=torch.bool, device=a.device), measured], 1)
    a, b = _masked_system(a, b, keep)

    nonneg = torch.cat([torch.zeros(n_j, dtype=torch.bool), torch.ones(n_k, dtype=torch.bool)])
    nonneg = nonneg.to(a.device)
    # Normal equations formed in float32 carry relative errors ~1e-6: a KKT test finer than
    # that would chase round-off.
    tol = max(1e-10, 30.0 * torch.finfo(dt).eps)
    res = nnls_normal(a, b, nonneg, max_iter=max_iter, tol=tol)
    free = res.free & keep
    # The differentiable step: one solve on the active set, with gradients.
    a_f, b_f = _masked_system(a, b, free)
    u = _solve_spd(a_f, b_f)
    u = torch.where(free, u, torch.zeros_like(u))
    u = torch.where(nonneg, u.clamp(min=0.0), u)
    calib = u[:, :n_j].to(dt)
    amp = u[:, n_j:].to(dt)
    calibration = 1.0 + calib @ calib_basis  # (B, M)
    line_flux = amp @ tie  # (B, L)
    lines_model = design.combine(line_flux)  # (B, M)
    model = continuum * calibration + lines_model
    chi2 = (w * (flux - model) ** 2).sum(-1)
    if not full:
        return chi2

    cov = torch.cholesky_inverse(torch.linalg.cholesky_ex(a_f)[0])  # (B, n, n)
    var = torch.where(free, cov.diagonal(dim1=1, dim2=2), torch.zeros_like(u))
    # Held at 0: variance if freed alone, 1 / (A_kk - A_kF A_FF^-1 A_Fk).
    a_fcol = torch.where(free.unsqueeze(-1), a, torch.zeros_like(a))  # rows in F only
    schur = a.diagonal(dim1=1, dim2=2) - (a_fcol * (cov @ a_fcol)).sum(1)
    var = torch.where(free, var, 1.0 / schur.clamp(min=torch.finfo(a.dtype).tiny))
    err = var.sqrt()
    err = torch.where(keep, err, torch.full_like(err, float("nan")))

    amp_err = err[:, n_j:].to(dt)
    # Each line belongs to one component, so its error is that component's times its ratio
    # (gathered, not a matrix product, so that one unmeasured component's NaN stays its own).
    comp = tie.abs().argmax(0)  # (L,)
    ratio = tie.gather(0, comp.unsqueeze(0)).squeeze(0)  # (L,)
    line_flux_err = amp_err[:, comp] * ratio
    # Equivalent width against the calibrated continuum weighted by the line's own profile.
    prof_sum = design.project(torch.ones_like(continuum))  # (B, L)
    cont_line = design.project(continuum * calibration) / prof_sum.clamp(min=torch.finfo(dt).tiny)
    onepz = 1.0 if z is None else (1.0 + as_tensor("z", z, dtype=dt, device=amp.device)[:, None])
    line_measured = measured[:, comp]  # (B, L)
    ok = line_measured & (cont_line > 0) & (prof_sum > 0)
    ew = line_flux / cont_line.clamp(min=torch.finfo(dt).tiny) / onepz
    line_ew = torch.where(ok, ew, torch.full_like(ew, float("nan")))

    return LinearFit(
        amplitude=amp,
        amplitude_err=amp_err,
        line_flux=line_flux,
        line_flux_err=line_flux_err,
        line_ew=line_ew,
        calib=calib,
        calib_err=err[:, :n_j].to(dt),
        calibration=calibration,
        lines_model=lines_model,
        model=model,
        chi2=chi2,
        n_pix=good.sum(-1),
        n_free=free.sum(-1),
        measured=measured,
        converged=res.converged,
    )


class LinearModel(nn.Module):
    """Lines and calibration for one instrument: builds the design and calls :func:`solve_linear`.

    Prior on the calibration (a Tikhonov term on the normal equations): every higher-order
    coefficient c_{a,k} (k >= 1) ~ N(0, ``calib_sigma``^2); P_k has RMS 1 / sqrt(2k + 1) over
    an arm, so 0.05 allows smooth warps of a few per cent, the size of spectrophotometric and
    fibre-aperture colour errors. The constant of each arm, c_{a,0} ~ N(0, ``scale_sigma``^2),
    is a free per-arm scale with a prior rather than tied to 1: DESI's three arms are
    calibrated separately and stitched, so arm-to-arm offsets of a few per cent are real,
    while the common scale is degenerate with the continuum's normalisation (stellar mass):
    the prior keeps the overall level with the continuum (a scale error of 5 % is 0.02 dex in
    mass). ``scale_sigma=0`` ties every arm's constant to 1 (no P_0 terms).

    Parameters
    ----------
    instrument : DESIInstrument, SDSSInstrument or GenericInstrument
    lines : LineList, optional
        Default :func:`sedvae.linear.lines.line_list` (narrow lines, tied doublets).
    degree : int, optional
        Highest Legendre order per arm (default :func:`default_calibration_degree`).
    calib_sigma : float
        Prior sigma of the coefficients of P_1..P_degree.
    scale_sigma : float
        Prior sigma of each arm's constant (0: tied, no constant term).
    """

    def __init__(
        self,
        instrument: nn.Module,
        lines: LineList | None = None,
        *,
        degree: int | None = None,
        calib_sigma: float = 0.05,  # smooth warps of a few per cent (see above)
        scale_sigma: float = 0.05,  # arm-to-arm throughput offsets of a few per cent
    ) -> None:
        super().__init__()
        # Buffers are float64 (1/2.98 and the Legendre values exact); the solve casts them to
        # the continuum's dtype. They derive from the arguments, so checkpoints leave them out
        # (persistent=False); the instrument's own buffers are saved with it.
        if calib_sigma <= 0 or scale_sigma < 0:
            raise ValueError("calib_sigma must be > 0 and scale_sigma >= 0")
        self.instrument = instrument
        self.lines = lines or line_list()
        self.degree = default_calibration_degree(instrument) if degree is None else int(degree)
        arm = arm_index(instrument)
        centres = (0.5 * (instrument.model_lo + instrument.model_hi))[_crop(instrument)]  # float64
        basis = calibration_basis(centres, arm, self.degree)
        order = torch.arange(basis.shape[0]) % (self.degree + 1)  # arm-major: P_0..P_K per arm
        keep = order > 0 if scale_sigma == 0 else torch.ones_like(order, dtype=torch.bool)
        sigma = torch.full(order.shape, calib_sigma, dtype=torch.float64)
        sigma[order == 0] = scale_sigma
        derived = {
            "calib_basis": basis[keep],  # (J, M) float64
            "calib_sigma": sigma[keep],  # (J,)
            "calib_order": order[keep],  # (J,) Legendre order of each term
            "pixel_width": (instrument.model_hi - instrument.model_lo)[_crop(instrument)],  # (M,) A
            "tie": self.lines.tie_matrix(dtype=torch.float64),  # (K, L)
        }
        for name, value in derived.items():
            self.register_buffer(name, value, persistent=False)

    def design(self, z, velocity, sigma, **kwargs) -> LineDesign:
        """Per-line profiles through the instrument; ``kwargs`` as
        :func:`sedvae.linear.design.line_design`."""
        return line_design(self.instrument, self.lines, z, velocity, sigma, **kwargs)

    def forward(
        self,
        continuum: torch.Tensor,
        flux: torch.Tensor,
        ivar: torch.Tensor,
        z,
        velocity,
        sigma,
        *,
        mask: torch.Tensor | None = None,
        sigma_broad=None,
        velocity_broad=None,
        resolution=None,
        lsf_sigma=None,
        max_iter: int | None = None,
    ) -> LinearFit:
        """Solve lines and calibration for a batch.

        Parameters
        ----------
        continuum : (B, M) tensor, 1e-17 erg/s/cm^2/A
            The continuum through this instrument (``instrument(wave_rest, lum_rest, z)``).
        flux, ivar, mask : (B, M) tensors: the data (mask True = bad pixel, as in
            :class:`sedvae.io.Spectra`)
        z : (B,) tensor
        velocity, sigma : (B,) tensors, km/s: narrow-line offset and intrinsic dispersion
        sigma_broad, velocity_broad : (B,) tensors, km/s, optional: broad Balmer kinematics
        resolution, lsf_sigma : optional per-galaxy LSF, as the instrument's ``forward``
        max_iter : int, optional: pivoting iterations of :func:`nnls_normal`

        Returns
        -------
        LinearFit
        """
        design = self.design(
            z,
            velocity,
            sigma,
            sigma_broad=sigma_broad,
            velocity_broad=velocity_broad,
            resolution=resolution,
            lsf_sigma=lsf_sigma,
            dtype=continuum.dtype,
        )
        return solve_linear(
            continuum,
            flux,
            ivar,
            design,
            self.tie,
            self.calib_basis,
            self.calib_sigma,
            mask=mask,
            pixel_width=self.pixel_width,
            z=z,
            max_iter=max_iter,
        )

    def columns(self, fit: LinearFit, names=CATALOG_LINES) -> dict[str, torch.Tensor]:
        """Catalog columns for ``names``: ``flux_<name>``, ``flux_err_<name>`` (1e-17
        erg/s/cm^2) and ``ew_<name>`` (rest-frame Angstrom), each (B,); names are those of
        :attr:`lines` (e.g. ``"Halpha"``, ``"[OIII]5007"``)."""
        out = {}
        for name in names:
            i = self.lines.index(name)
            out[f"flux_{name}"] = fit.line_flux[:, i]
            out[f"flux_err_{name}"] = fit.line_flux_err[:, i]
            out[f"ew_{name}"] = fit.line_ew[:, i]
        return out

    @torch.no_grad()
    def fit_kinematics(
        self,
        continuum: torch.Tensor,
        flux: torch.Tensor,
        ivar: torch.Tensor,
        z,
        *,
        velocity=None,
        sigma=None,
        mask: torch.Tensor | None = None,
        velocity_range: float = 300.0,  # km/s: redshift errors of DESI/SDSS pipelines are smaller
        sigma_range: tuple[float, float] = (10.0, 500.0),  # km/s: narrow (nebular) lines
        n_grid: int = 13,
        n_refine: int = 4,
        return_fit: bool = True,
        batch_points: bool = True,
        max_rows: int | None = 256,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor, LinearFit | None]:
        """Narrow-line velocity and width minimising the solved chi^2, by batched scans.

        A grid in width (log-spaced over ``sigma_range``) at the starting velocity, then a grid
        in velocity (``+-velocity_range`` around the start) at the best width, then
        ``n_refine`` rounds of a three-point parabola in each, the step halving every round.
        Lines and calibration are solved exactly at every point, giving the chi^2 that
        :meth:`forward` gives there. All points of one grid (or one parabola step) are solved
        together, galaxies x points as rows of one batch (``max_rows`` at a time), instead of
        one batch per point: the same chi^2 at the same points (to float round-off: a
        design's windows are as wide as the widest line among the rows solved together, so the
        far Gaussian tails summed, < 2e-9 of the flux, differ), so the same minimum, at a
        fraction of the fixed cost per solve. Use it where no encoder gives the kinematics, or
        to refine them.

        Parameters
        ----------
        continuum, flux, ivar, z, mask : as :meth:`forward`
        velocity, sigma : (B,) tensors, km/s, optional
            Starting values (default 0 and the scan's best width).
        return_fit : bool
            Solve once more at the result for ``fit`` (else ``fit`` is None).
        batch_points : bool
            Solve the points of a grid or parabola step together (default) or one batch per
            point (the same numbers to round-off, slower).
        max_rows : int or None
            Rows (galaxy, point) per solve when ``batch_points``: bounds the memory of a scan
            (each row holds a few (M,) arrays and its line windows; past a few hundred rows
            the windows fall out of cache); ``None``: no bound.
        kwargs : passed to :meth:`forward` (sigma_broad, resolution, lsf_sigma, ...)

        Returns
        -------
        velocity, sigma : (B,) tensors, km/s
        fit : LinearFit at them, or None
        """
        bsz = continuum.shape[0]
        kw = dict(mask=mask, **kwargs)
        dt, dev = continuum.dtype, continuum.device
        def per_galaxy_start(x):  # a (B,), (1,) or scalar start -> (B,)
            return torch.as_tensor(x, device=dev).to(dt).reshape(-1).expand(bsz).clone()

        v = torch.zeros(bsz, dtype=dt, device=dev) if velocity is None else (
            per_galaxy_start(velocity))
        # What every point of the scan shares, computed once: the resolution diagonals (checked
        # once), the calibration block of the normal equations; each point then builds its line
        # design and solves, returning the chi^2 that forward() returns.
        skip = ("resolution", "lsf_sigma", "max_iter")
        design_kw = {k: x for k, x in kwargs.items() if k not in skip}
        diag = model_diagonals(self.instrument, resolution=kwargs.get("resolution"),
                               lsf_sigma=kwargs.get("lsf_sigma"))  # fmt: skip
        tie = self.tie.to(dev, dt)
        basis = self.calib_basis.to(dev, dt)
        sigma_c = self.calib_sigma.to(dev, torch.float64)
        terms = _data_terms(continuum, flux, ivar, basis, mask)

        z_t = torch.as_tensor(z, device=dev) if torch.is_tensor(z) else torch.tensor(
            z, dtype=torch.float64, device=dev
        )
        z_t = z_t.reshape(-1).expand(bsz)
        per_galaxy = diag.ndim == 3 and diag.shape[0] == bsz
        lsf = LSFTable(diag, dt)  # laid out once for every design of the scan

        def chi2_rows(gal, vel, sig):
            """chi^2 (N,) of galaxies ``gal`` (N,) at (vel, sig) (N,): one solve."""
            if gal is None:
                c, f, t, rows, zz, kw_r = continuum, flux, terms, None, z_t, design_kw
            else:
                c, f, zz = continuum[gal], flux[gal], z_t[gal]
                t = {k: x[gal] for k, x in terms.items()}
                rows = gal if per_galaxy else None
                kw_r = {k: (x[gal] if torch.is_tensor(x) and x.ndim >= 1 and x.shape[0] == bsz
                            else x) for k, x in design_kw.items()}  # fmt: skip
            design = self.design(zz, vel, sig, diagonals=lsf, diagonal_rows=rows, dtype=dt,
                                 **kw_r)
            return _solve(c, f, design, tie, basis, sigma_c, t, pixel_width=self.pixel_width,
                          max_iter=kwargs.get("max_iter"), full=False)  # fmt: skip

        def chi2_point(vel, sig):  # (B,) each -> (B,): the batch at one point each
            group = torch.bucketize(sig.detach().contiguous(), sig.new_tensor(WIDTH_GROUPS_KMS))
            if bool((group == group[0]).all()):
                return chi2_rows(None, vel, sig)
            out = continuum.new_empty(bsz)
            for gi in group.unique():
                rows = (group == gi).nonzero().squeeze(1)
                out[rows] = chi2_rows(rows, vel[rows], sig[rows])
            return out

        def chi2(vel, sig):  # (B, G) each -> (B, G): every galaxy at its G points
            g = vel.shape[1]
            if g == 1 or not batch_points:
                return torch.stack([chi2_point(vel[:, j], sig[:, j]) for j in range(g)], 1)
            vel, sig = vel.reshape(-1), sig.reshape(-1)  # row b G + j
            gal = torch.arange(bsz, device=dev).repeat_interleave(g)
            # A design's profile windows are as wide as its widest line: rows are solved in
            # groups of similar widths (SCAN_WIDTH_RATIO), so that the broad points of a scan
            # do not widen the narrow ones' windows.
            group = torch.floor((sig.detach().clamp_min(0.0) + SCAN_WIDTH_OFFSET).log()
                                / math.log(SCAN_WIDTH_RATIO))
            step = bsz * g if max_rows is None else max(int(max_rows), 1)
            out = continuum.new_empty(bsz * g)
            for gi in group.unique():
                for part in (group == gi).nonzero().squeeze(1).split(step):
                    out[part] = chi2_rows(gal[part], vel[part], sig[part])
            return out.reshape(bsz, g)

        def scan(values, make):  # values (G,) or (B, G) -> best value (B,)
            vals = values.expand(bsz, -1) if values.ndim == 1 else values
            c = chi2(*make(vals))
            return vals.gather(1, c.argmin(1, keepdim=True))[:, 0]

        lo, hi = sigma_range
        log_s = torch.linspace(math.log(lo), math.log(hi), n_grid, dtype=dt, device=dev)
        s = scan(log_s.exp(), lambda x: (v[:, None].expand_as(x), x)) if sigma is None else (
            per_galaxy_start(sigma)
        )
        dv = torch.linspace(-velocity_range, velocity_range, n_grid, dtype=dt, device=dev)
        v = scan(v[:, None] + dv, lambda x: (x, s[:, None].expand_as(x)))
        step_v = torch.full_like(v, float(dv[1] - dv[0]))
        step_ls = torch.full_like(s, float(log_s[1] - log_s[0]))
        for _ in range(n_refine):
            v = _parabola_step(lambda x, s=s: chi2(x, s[:, None].expand_as(x)), v, step_v)
            ls = _parabola_step(lambda x, v=v: chi2(v[:, None].expand_as(x), x.exp()), s.log(),
                                step_ls)  # fmt: skip
            s = ls.exp().clamp(lo, hi)
            step_v, step_ls = step_v / 2, step_ls / 2
        return v, s, self(continuum, flux, ivar, z, v, s, **kw) if return_fit else None


# km/s: galaxies with narrow-line widths in these bins are solved apart (a line design's
# windows are as wide as its widest line, and their cost grows with the width)
WIDTH_GROUPS_KMS = (60.0, 150.0, 300.0)
# Rows of one batched kinematics scan are solved in groups whose sigma + SCAN_WIDTH_OFFSET
# (km/s) lie within a factor SCAN_WIDTH_RATIO: a line window's cost grows with the widest line
# of its group, ~ 12 lambda sigma / c pixels plus the resolution matrix's band (on DESI ~0.5
# pixel per km/s at 9800 A plus ~13: the offset). Measured on 64 mocks (2 scans): ratio
# 1.25-2 and max_rows 128-1024 all within 8 % of each other, 10 % faster than point by point.
SCAN_WIDTH_RATIO = 1.25
SCAN_WIDTH_OFFSET = 25.0


def _parabola_step(f, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Vertex of the parabola through f(x - step), f(x), f(x + step), kept within one step;
    the best of the three points where the parabola opens downwards. ``f`` maps (B, 3) points
    to their (B, 3) values (the three solved together)."""
    pts = torch.stack([x - step, x, x + step], 1)
    vals = f(pts)
    fm, f0, fp = vals.unbind(1)
    curv = fp + fm - 2 * f0
    shift = 0.5 * step * (fm - fp) / curv.clamp(min=torch.finfo(x.dtype).tiny)
    shift = torch.minimum(torch.maximum(shift, -step), step)
    best = pts.gather(1, vals.argmin(1, keepdim=True))[:, 0]
    return torch.where(curv > 0, x + shift, best)
