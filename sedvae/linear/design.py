"""Design matrices of the linear parts of the model: emission lines and flux calibration.

Lines. A line of rest wavelength lambda_0 and flux F (1e-17 erg/s/cm^2) in a galaxy at
redshift z with velocity offset v and intrinsic dispersion sigma_v (km/s) is, before the
spectrograph, the Gaussian

    f(lambda) = F N(lambda; mu, s),   mu = lambda_0 (1 + z) exp(v / c),   s = mu sigma_v / c,

in the observed frame (exp(v/c): velocities on ln(lambda) as in pPXF). It then takes the
continuum's path through the instrument (:mod:`sedvae.physics.instruments`): averaged over the
instrument's model pixels, then the same banded resolution matrix (DESI: per arm, per galaxy
if given; Gaussian instruments: on the padded grid, then cropped). The pixel average is exact,
the difference of two erfs over the pixel edges, so a line narrower than a pixel keeps its flux
(no aliasing) and the result does not depend on a rest-frame sampling. For a spectrum given on
a rest-frame grid the instrument computes the same pixel integral of its piecewise-linear
interpolant, so the two paths agree as the rest grid resolves the line (tested).

Rows are in 1e-17 erg/s/cm^2/A per unit line flux: sum_m row_m dlambda_m = 1 for a line well
inside the grid under a flux-conserving (column-normalised) LSF, and the amplitudes that
multiply the rows are line fluxes.

Calibration. Per spectrograph arm a (DESI b, r, z; one segment otherwise), Legendre
polynomials P_0..P_K of x = 2 (lambda - lambda_lo,a) / (lambda_hi,a - lambda_lo,a) - 1 on the
arm's pixels and zero elsewhere: the model's calibration factor is 1 + sum c_{a,k} P_k(x).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sedvae.linear.lines import LineList
from sedvae.physics.calibration import legendre_basis
from sedvae.physics.checks import as_tensor, check_finite, check_ndim
from sedvae.physics.instruments import DESIInstrument, GenericInstrument
from sedvae.physics.lsf import check_diagonals

C_KMS = 299792.458  # speed of light, km/s
N_SIGMA = 6.0  # profile window half-width in Gaussian sigma: flux beyond it is < 2e-9
MIN_SIGMA_A = 1e-3  # Angstrom: floor on the observed width, so sigma_v = 0 is a delta line


def _segments(instrument: nn.Module) -> list[tuple[int, int]]:
    """(start, length) of each monotonic run of model pixels (DESI arms; one otherwise)."""
    if isinstance(instrument, DESIInstrument):
        starts = [0, *torch.tensor(instrument.arm_npix).cumsum(0)[:-1].tolist()]
        return list(zip(starts, instrument.arm_npix, strict=True))
    if isinstance(instrument, GenericInstrument):
        return [(0, instrument.model_lo.shape[0])]
    raise TypeError(f"unsupported instrument {type(instrument).__name__}")


def _crop(instrument: nn.Module) -> slice:
    """Model pixels -> output pixels."""
    if isinstance(instrument, GenericInstrument):
        return slice(instrument.pad, instrument.model_lo.shape[0] - instrument.pad)
    return slice(None)


def model_diagonals(instrument: nn.Module, *, resolution=None, lsf_sigma=None) -> torch.Tensor:
    """The resolution diagonals the instrument's ``forward`` applies, on its model pixels.

    Parameters
    ----------
    instrument : DESIInstrument or GenericInstrument (SDSSInstrument)
    resolution : (B, ndiag, M) or (ndiag, M) tensor or a b, r, z list, optional
        DESI only: per-galaxy diagonals, as ``DESIInstrument.forward(resolution=...)``.
    lsf_sigma : (B, M) or (M,) tensor, Angstrom, optional
        Gaussian instruments only: per-galaxy LSF sigma, as
        ``GenericInstrument.forward(sigma=...)``.

    Returns
    -------
    (ndiag, M_model) or (B, ndiag, M_model) tensor
    """
    if isinstance(instrument, DESIInstrument):
        if lsf_sigma is not None:
            raise ValueError("lsf_sigma is for Gaussian instruments; DESI takes resolution")
        if resolution is None:
            return instrument.resolution
        if isinstance(resolution, list | tuple):
            resolution = torch.cat([as_tensor("resolution", r) for r in resolution], dim=-1)
        return check_diagonals("resolution", resolution, instrument.npix).to(instrument.wave.device)
    if resolution is not None:
        raise ValueError("resolution matrices are for DESI; Gaussian instruments take lsf_sigma")
    if lsf_sigma is None:
        return instrument.diagonals
    sigma_t = as_tensor("lsf_sigma", lsf_sigma, dtype=torch.float64, device=instrument.wave.device)
    check_ndim("lsf_sigma", sigma_t, (1, 2), f"(M,) or (B, M) with M={instrument.npix}")
    if sigma_t.shape[-1] != instrument.npix:
        raise ValueError(f"lsf_sigma must have {instrument.npix} pixels; got {sigma_t.shape}")
    return instrument._diagonals(sigma_t)


def _window_profiles(lo, hi, mu, sig, n_sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-averaged unit Gaussians in a window of contiguous pixels around each centre.

    lo, hi (N,) float64 sorted edges of one segment; mu, sig (B, L) float64 Angstrom.
    Returns the first pixel of each window (B, L) long and the values (B, L, W) float64, 1/A.
    """
    n = lo.shape[0]
    width = (hi - lo).min()
    w = min(n, 2 * math.ceil(n_sigma * float(sig.detach().max()) / float(width)) + 3)
    centre = torch.searchsorted(lo.contiguous(), mu.contiguous()) - 1  # (B, L)
    start = (centre - w // 2).clamp(0, n - w)  # (B, L)
    idx = start.unsqueeze(-1) + torch.arange(w, device=lo.device)  # (B, L, W)
    e_lo, e_hi = lo[idx], hi[idx]
    mu3, s3 = mu.unsqueeze(-1), sig.unsqueeze(-1) * math.sqrt(2.0)
    # 0.5 [erf((hi - mu) / (sqrt 2 s)) - erf((lo - mu) / (sqrt 2 s))] / (hi - lo)
    if w < n and torch.equal(hi[:-1], lo[1:]):  # adjacent pixels: each edge's erf once
        edges = torch.cat([lo, hi[-1:]])[start.unsqueeze(-1) + torch.arange(w + 1)]
        cdf = torch.erf((edges - mu3) / s3)  # (B, L, W + 1), the same numbers
        val = 0.5 * (cdf[..., 1:] - cdf[..., :-1]) / (e_hi - e_lo)
    else:
        val = 0.5 * (torch.erf((e_hi - mu3) / s3) - torch.erf((e_lo - mu3) / s3)) / (e_hi - e_lo)
    return start, val


class LSFTable:
    """Resolution diagonals (B0, ndiag, N) laid out as a (B0 N, ndiag) table, one model
    pixel's ndiag values contiguous: the layout :func:`line_design` reads its windows from.
    Built once for many designs of the same galaxies (a kinematics scan, which would
    otherwise transpose every galaxy's whole matrix for every point)."""

    def __init__(self, diagonals: torch.Tensor, dtype: torch.dtype) -> None:
        diag = diagonals if diagonals.ndim == 3 else diagonals.unsqueeze(0)
        self.batch, self.ndiag, self.npix = diag.shape
        self.table = diag.to(dtype).transpose(1, 2).reshape(-1, self.ndiag).contiguous()
        self.dtype = dtype


def _lsf_window(lsf: LSFTable, rows, s0: int, start: torch.Tensor,
                val: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Apply DESI-layout diagonals of the segment starting at model pixel ``s0`` to values
    living in a window of its columns.

    lsf: the diagonals; rows (B,) long: the galaxy of ``lsf`` each row uses (None: the row's
    own, or the one shared matrix); start (B, L); val (B, L, W). out[i] = sum_k D[k, j] v[j]
    with j = i + h - k, exactly as :func:`sedvae.physics.lsf.apply_resolution`; the output
    window covers rows start - h .. start + W + h - 1. Returns (B, L, W + 2h).
    """
    ndiag = lsf.ndiag
    h = ndiag // 2
    b, n_l, w = val.shape
    cols = s0 + start.unsqueeze(-1) + torch.arange(w, device=val.device)  # (B, L, W)
    # Rows of the (columns, ndiag) table picked by flat indices: a column's ndiag values are
    # contiguous, far faster than fancy indexing of (ndiag, N).
    if lsf.batch > 1:  # per-galaxy matrices: column j of galaxy g at g N + j
        gal = torch.arange(b, device=val.device) if rows is None else rows
        cols = cols + (lsf.npix * gal)[:, None, None]
    d = lsf.table.index_select(0, cols.flatten()).reshape(b, n_l, w, ndiag)
    # Row i = j - h + k sits at window position (j - start) + k in a window starting at -h.
    out = val.new_zeros(b, n_l, w + 2 * h)
    for k in range(ndiag):
        out[..., k : k + w] += d[..., k] * val  # column j's contribution on diagonal k
    return out


class LineDesign:
    """Line profiles stored as windows: the design matrix (B, L, M) without its zeros.

    Block i holds, for the lines ``ids`` (G,) of one profile group (narrow or broad) on one
    monotonic pixel segment (a DESI arm), the values (B, G, W) of each line's profile on the
    output pixels ``start .. start + W - 1`` (B, G). A line on two overlapping DESI arms has a
    window in each. Every operation the solve needs costs O(B L W) instead of O(B L M).

    Values are in 1e-17 erg/s/cm^2/A per 1e-17 erg/s/cm^2 of line flux.
    """

    def __init__(self, blocks, n_lines: int, npix: int, batch: int, dtype, device) -> None:
        # list of (segment, ids (G,), start (B, G), values (B, G, W), on (B, G)); ``on`` is
        # False where the line is far off the segment for that galaxy (values zero there).
        self.blocks = blocks
        self.n_lines, self.npix, self.batch = n_lines, npix, batch
        self.dtype, self.device = dtype, device
        self._pos_cache: dict[int, torch.Tensor] = {}

    def _pos(self, start: torch.Tensor, w: int) -> torch.Tensor:
        """(B, G, W) output pixels of the windows (clamped: values there are zero)."""
        return (start.unsqueeze(-1) + torch.arange(w, device=start.device)).clamp(0, self.npix - 1)

    def _block_pos(self, i: int) -> torch.Tensor:
        """:meth:`_pos` of block i, computed once (every product of a solve needs it)."""
        pos = self._pos_cache.get(i)
        if pos is None:
            _, _, start, val, _ = self.blocks[i]
            pos = self._pos_cache[i] = self._pos(start, val.shape[-1])
        return pos

    def dense(self) -> torch.Tensor:
        """The full design (B, L, M)."""
        out = torch.zeros(self.batch, self.n_lines, self.npix, dtype=self.dtype, device=self.device)
        for i, (_, ids, _, val, _) in enumerate(self.blocks):
            tmp = torch.zeros(
                val.shape[:2] + (self.npix,), dtype=val.dtype, device=val.device
            ).scatter_add(2, self._block_pos(i), val)
            out = out.index_add(1, ids, tmp)
        return out

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """sum_m D_lm x_m: x (B, M) -> (B, L), or (B, J, M) -> (B, J, L)."""
        x3 = x.unsqueeze(1) if x.ndim == 2 else x
        b, j, _ = x3.shape
        out = x3.new_zeros(b, j, self.n_lines)
        for i, (_, ids, _, val, _) in enumerate(self.blocks):
            g, w = val.shape[1:]
            pos = self._block_pos(i).reshape(b, 1, g * w).expand(b, j, g * w)
            xg = x3.gather(2, pos).reshape(b, j, g, w)
            out = out.index_add(2, ids, (xg * val.unsqueeze(1).to(x3.dtype)).sum(-1))
        return out[:, 0] if x.ndim == 2 else out

    def project_basis(self, y: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """sum_m D_lm y_m basis_jm: y (B, M), basis (J, M) -> (B, J, L), never forming the
        (B, J, M) product (the calibration columns C P_j against the lines)."""
        b, j = y.shape[0], basis.shape[0]
        out = y.new_zeros(b, j, self.n_lines)
        for i, (_, ids, _, val, _) in enumerate(self.blocks):
            pos = self._block_pos(i)  # (B, G, W)
            # only the basis rows not zero over the block's pixels (a DESI arm's windows meet
            # its own Legendre terms only): the other sums are exactly zero
            lo, hi = int(pos.min()), int(pos.max()) + 1
            jj = (basis[:, lo:hi] != 0).any(1).nonzero().squeeze(1)
            vy = val.to(y.dtype) * y.gather(1, pos.flatten(1)).reshape(pos.shape)
            basis_t = basis[jj, lo:hi].T.contiguous()  # (pixels, J'): J' values contiguous
            bp = basis_t.index_select(0, (pos - lo).flatten()).reshape(pos.shape + (len(jj),))
            part = out[:, jj].index_add(2, ids, torch.einsum("bgw,bgwj->bjg", vy, bp))
            out = out.index_copy(1, jj, part)
        return out

    def combine(self, flux: torch.Tensor) -> torch.Tensor:
        """sum_l flux_l D_l: line fluxes (B, L) -> spectrum (B, M)."""
        out = flux.new_zeros(flux.shape[0], self.npix)
        for i, (_, ids, _, val, _) in enumerate(self.blocks):
            contrib = val.to(flux.dtype) * flux[:, ids].unsqueeze(-1)
            out = out.scatter_add(1, self._block_pos(i).flatten(1), contrib.flatten(1))
        return out

    def gram(self, weight: torch.Tensor) -> torch.Tensor:
        """sum_m D_lm w_m D_l'm: (B, M) weights -> (B, L, L), only windows that overlap.

        Only the (galaxy, line, line) triples whose windows meet in that galaxy are summed
        (not every pair that meets in some galaxy of the batch): the same sums, fewer zeros."""
        b, n_l = weight.shape[0], self.n_lines
        out = weight.new_zeros(b * n_l * n_l)
        w_flat = weight.reshape(-1)
        for seg in {blk[0] for blk in self.blocks}:
            here = [blk for blk in self.blocks if blk[0] == seg]
            for _, ids1, s1, v1, on1 in here:
                for _, ids2, s2, v2, on2 in here:
                    w1, w2 = v1.shape[-1], v2.shape[-1]
                    d = s2.unsqueeze(1) - s1.unsqueeze(2)  # (B, G1, G2)
                    meet = (d < w1) & (d > -w2) & on1.unsqueeze(2) & on2.unsqueeze(1)
                    gal, p, q = meet.nonzero(as_tuple=True)  # (T,) triples that overlap
                    if gal.numel() == 0:
                        continue
                    pos = s1[gal, p].unsqueeze(-1) + torch.arange(w1, device=s1.device)
                    idx = pos - s2[gal, q].unsqueeze(-1)  # (T, W1) into window q
                    inside = (idx >= 0) & (idx < w2)
                    vq = v2[gal, q].gather(1, idx.clamp(0, w2 - 1)) * inside
                    flat = pos.clamp(0, self.npix - 1) + (gal * self.npix).unsqueeze(-1)
                    wv = w_flat.index_select(0, flat.flatten()).reshape(pos.shape)
                    prod = v1[gal, p].to(weight.dtype) * wv * vq.to(weight.dtype)
                    out = out.index_add(0, (gal * n_l + ids1[p]) * n_l + ids2[q], prod.sum(-1))
        return out.reshape(b, n_l, n_l)


def line_design(
    instrument: nn.Module,
    lines: LineList,
    z,
    velocity,
    sigma,
    *,
    sigma_broad=None,
    velocity_broad=None,
    resolution=None,
    lsf_sigma=None,
    dtype: torch.dtype | None = None,
    diagonals: torch.Tensor | LSFTable | None = None,
    diagonal_rows: torch.Tensor | None = None,
) -> LineDesign:
    """Every line of ``lines`` for unit flux, observed through ``instrument``.

    Parameters
    ----------
    instrument : DESIInstrument, SDSSInstrument or GenericInstrument
    lines : LineList
    z : (B,) tensor, > 0
    velocity : (B,) tensor, km/s
        Velocity offset of the narrow lines from z.
    sigma : (B,) tensor, km/s
        Intrinsic (pre-instrument) Gaussian dispersion of the narrow lines.
    sigma_broad, velocity_broad : (B,) tensors, km/s, optional
        Width (required when ``lines`` has broad lines) and offset (default ``velocity``) of
        the broad Balmer lines.
    resolution, lsf_sigma : optional
        Per-galaxy LSF, as :func:`model_diagonals`.
    dtype : torch.dtype, optional
        Values' dtype (default: torch's default dtype). Positions are computed in float64.
    diagonals : tensor, optional
        :func:`model_diagonals` of ``resolution``/``lsf_sigma`` computed (and checked) once by
        the caller, for many designs of the same galaxies (a kinematics scan), or its
        :class:`LSFTable` (built once for all of them); then ``resolution`` and ``lsf_sigma``
        are not read.
    diagonal_rows : (B,) long tensor, optional
        With per-galaxy ``diagonals`` (B0, ...), the galaxy each row of this design is (a row
        per galaxy and scan point); default row b uses galaxy b.

    Returns
    -------
    LineDesign
        ``.dense()`` is the (B, L, M) design in 1e-17 erg/s/cm^2/A per 1e-17 erg/s/cm^2 of
        line flux; differentiable with respect to z, velocity and the widths.
    """
    dtype = dtype or torch.get_default_dtype()
    dev = instrument.wave.device
    z_t = as_tensor("z", z, dtype=torch.float64, device=dev).reshape(-1)
    b = z_t.shape[0]

    def per_galaxy(name, x):
        t = as_tensor(name, x, dtype=torch.float64, device=dev).reshape(-1).expand(b)
        check_finite(name, t)
        return t

    if bool((z_t <= -1).any()):
        raise ValueError("z must be > -1")
    v_n = per_galaxy("velocity", velocity)
    s_n = per_galaxy("sigma", sigma)
    broad = torch.tensor(lines.broad, device=dev)
    if bool(broad.any()):
        if sigma_broad is None:
            raise ValueError("lines has broad components: give sigma_broad (km/s)")
        s_b = per_galaxy("sigma_broad", sigma_broad)
        v_b = v_n if velocity_broad is None else per_galaxy("velocity_broad", velocity_broad)
    else:
        s_b, v_b = s_n, v_n
    if bool((s_n < 0).any()) or bool((s_b < 0).any()):
        raise ValueError("line widths must be >= 0 km/s")
    wave0 = torch.tensor(lines.wave, dtype=torch.float64, device=dev)  # (L,)
    vel = torch.where(broad, v_b.unsqueeze(1), v_n.unsqueeze(1))  # (B, L)
    sig_v = torch.where(broad, s_b.unsqueeze(1), s_n.unsqueeze(1))  # (B, L)
    mu = wave0 * (1.0 + z_t).unsqueeze(1) * torch.exp(vel / C_KMS)  # (B, L) Angstrom
    sig = (mu * sig_v / C_KMS).clamp(min=MIN_SIGMA_A)  # (B, L) Angstrom

    if diagonals is None:
        diagonals = model_diagonals(instrument, resolution=resolution, lsf_sigma=lsf_sigma)
    # The LSF runs in the output dtype (the instruments store their diagonals in float32).
    lsf = diagonals if isinstance(diagonals, LSFTable) else LSFTable(diagonals.to(dev), dtype)
    if lsf.dtype != dtype:
        raise ValueError(f"LSFTable is {lsf.dtype}; the design is {dtype}")
    if diagonal_rows is not None:
        if diagonal_rows.shape != (b,):
            raise ValueError(f"diagonal_rows must have shape ({b},)")
        if lsf.batch == 1:
            diagonal_rows = None
    elif lsf.batch not in (1, b):
        raise ValueError(f"resolution batch {lsf.batch} does not match z batch {b}")
    h = lsf.ndiag // 2
    crop = _crop(instrument)
    c0 = crop.start or 0  # model pixel of output pixel 0
    npix = instrument.npix
    blocks = []
    for group in (~broad, broad):
        for si, (s0, n) in enumerate(_segments(instrument)):
            lo = instrument.model_lo[s0 : s0 + n]
            hi = instrument.model_hi[s0 : s0 + n]
            # Lines whose window reaches this segment for some galaxy of the batch.
            margin = N_SIGMA * sig + (h + 2) * float((hi - lo).max())
            on = (mu + margin > lo[0]) & (mu - margin < hi[-1])  # (B, L)
            gi = (group & on.any(0)).nonzero().squeeze(1)
            if gi.numel() == 0:
                continue
            start, val = _window_profiles(lo, hi, mu[:, gi], sig[:, gi], N_SIGMA)
            conv = _lsf_window(lsf, diagonal_rows, s0, start, val.to(dtype))  # (B, G, W + 2h)
            rows = start.unsqueeze(-1) - h + torch.arange(conv.shape[-1], device=dev)
            out_pix = s0 + rows - c0  # output pixel of every window row
            # Rows beyond the segment fall off the detector; beyond the output grid, cropped.
            keep = (rows >= 0) & (rows < n) & (out_pix >= 0) & (out_pix < npix)
            keep = keep & on[:, gi].unsqueeze(-1)  # (erf tails beyond 6 sigma are < 2e-9)
            conv = torch.where(keep, conv, torch.zeros_like(conv))
            blocks.append((si, gi, s0 + start - h - c0, conv, on[:, gi]))
    return LineDesign(blocks, lines.n_lines, npix, b, dtype, dev)


def component_design(design: torch.Tensor, lines: LineList) -> torch.Tensor:
    """Dense line design (B, L, M) -> component design (B, K, M): tied lines summed with their
    ratios; an amplitude multiplying a component row is the flux of its primary line."""
    ratio = torch.tensor(lines.ratio, dtype=design.dtype, device=design.device)
    comp = torch.tensor(lines.component, device=design.device)
    out = design.new_zeros(design.shape[0], lines.n_components, design.shape[-1])
    return out.index_add(1, comp, design * ratio[:, None])


def arm_index(instrument: nn.Module) -> torch.Tensor:
    """(M,) long: the calibration segment of every output pixel (DESI arms 0, 1, 2; else 0)."""
    if isinstance(instrument, DESIInstrument):
        return instrument.arm
    return torch.zeros(instrument.npix, dtype=torch.long, device=instrument.wave.device)


def default_calibration_degree(instrument: nn.Module) -> int:
    """Highest Legendre order per segment: 2 per DESI arm (~2000 A each), 4 for one segment
    spanning the whole optical range (SDSS/BOSS 3600-10400 A): about one order per 1000-1500 A,
    smooth enough that it cannot imitate lines or stellar absorption features."""
    return 2 if isinstance(instrument, DESIInstrument) else 4


def calibration_basis(wave, arm, degree: int) -> torch.Tensor:
    """Per-arm Legendre basis P_0..P_degree, each zero outside its arm.

    Parameters
    ----------
    wave : (M,) tensor, Angstrom
        Output pixel wavelengths (DESI: arms concatenated).
    arm : (M,) long tensor
        Segment of every pixel, 0 .. n_arm - 1.
    degree : int >= 0

    Returns
    -------
    basis : (n_arm (degree + 1), M) tensor in ``wave``'s dtype, ordered arm-major
        (arm 0: P_0..P_degree, arm 1: ...).
    """
    if degree < 0:
        raise ValueError(f"degree must be >= 0; got {degree}")
    wave64 = as_tensor("wave", wave, dtype=torch.float64)
    arm = torch.as_tensor(arm, device=wave64.device)
    rows = []
    for a in range(int(arm.max()) + 1):
        on = arm == a
        w = wave64[on]
        x = 2.0 * (wave64 - w.min()) / (w.max() - w.min()) - 1.0
        p = torch.cat([torch.ones_like(x).unsqueeze(0), legendre_basis(x, degree)])
        rows.append(torch.where(on, p, torch.zeros_like(p)))
    return torch.cat(rows).to(as_tensor("wave", wave).dtype)
