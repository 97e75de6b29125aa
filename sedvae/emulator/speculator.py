"""Speculator (Alsing et al. 2020): a neural emulator of the SPS simulator ``sedvae.sps.SEDModel``.

What is emulated: the rest-frame spectrum per unit formed mass, before diffuse-ISM dust,

    ln L*(lambda) = ln[L_young(lambda) T_BC(lambda) + L_old(lambda)]        (L_sun/A per M_sun),

as a function of theta without logM* and of the age of the universe t_U(z) (the SFH is cut
there). Per wavelength segment, ln L* is expanded on a PCA basis fitted to training spectra and
an MLP with the Speculator activation predicts the PCA coefficients (eq. 8-9 of Alsing et al.).

The diffuse-ISM attenuation T_ISM(lambda; tau_ISM, n_dust) multiplies *every* star of the
simulator, so it is a closed-form factor: the emulator applies it exactly, with the
simulator's own dust module, instead of learning it. This takes tau_ISM and n_dust (the
largest source of variance in the UV, up to ~20 in ln L) out of the regression.

    L_lambda = 10^logM* exp(ln L*(theta, t_U)) T_ISM(lambda),   theta = (logM*, ..., n_dust)

Inputs of the MLPs (9, each standardised with the training mean and std):

- the simplex beta_1..4 as its 3 stick-breaking logits (``PROVABGSPrior.to_unconstrained``),
- f_burst_eff = f_burst [t_burst < t_U(z)]: the simulator drops the burst when it is older than
  the universe, a jump the network could not learn from (f_burst, t_burst, z) but which is
  continuous in f_burst_eff,
- log10 t_burst, log10 gamma_1, log10 gamma_2, tau_BC, t_U(z) in Gyr.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..physics.cosmology import age_of_universe_gyr
from ..sps.dust import CharlotFallKriekConroy
from ..sps.provabgs import THETA, PROVABGSPrior, check_theta_z

LN10 = math.log(10.0)
N_INPUTS = 9
INPUT_NAMES = (
    "simplex_logit1",
    "simplex_logit2",
    "simplex_logit3",
    "fburst_eff",
    "log10_tburst",
    "log10_gamma1",
    "log10_gamma2",
    "tau_bc",
    "t_univ_gyr",
)
LUM_FLOOR = 1e-37  # L_sun/A/M_sun: floor before ln (float32 normals end at 1.2e-38)


class SpeculatorActivation(nn.Module):
    """a(x) = [gamma + (1 - gamma) sigmoid(beta x)] x, per unit (eq. 8 of Alsing et al. 2020).

    Initialised at gamma = 0, beta = 1, i.e. SiLU; both are learned per unit, so each unit can
    move between linear (gamma -> 1) and a sharper or softer gate.
    """

    def __init__(self, n: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(n))
        self.beta = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.gamma + (1 - self.gamma) * torch.sigmoid(self.beta * x)) * x


class SegmentEmulator(nn.Module):
    """PCA basis of ln L* on one wavelength segment and the MLP predicting its coefficients.

    Buffers (filled by :meth:`Speculator.fit_pca`): ``mean`` (L_s,) ln L*, ``basis`` (K, L_s)
    orthonormal rows, ``scale`` (K,) standard deviation of each coefficient (the MLP predicts
    coefficients in units of it).
    """

    def __init__(self, n_inputs: int, n_wave: int, n_components: int, hidden: int, n_layers: int):
        super().__init__()
        if n_components > n_wave:
            raise ValueError(f"{n_components} PCA components for a segment of {n_wave} pixels")
        layers, width = [], n_inputs
        for _ in range(n_layers):
            layers += [nn.Linear(width, hidden), SpeculatorActivation(hidden)]
            width = hidden
        layers.append(nn.Linear(width, n_components))
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(n_wave))
        self.register_buffer("basis", torch.zeros(n_components, n_wave))
        self.register_buffer("scale", torch.ones(n_components))

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """PCA coefficients (B, K) for standardised inputs x (B, n_inputs)."""
        return self.mlp(x) * self.scale

    def project(self, log_lum: torch.Tensor) -> torch.Tensor:
        """PCA coefficients (B, K) of ln L* (B, L_s)."""
        return (log_lum - self.mean) @ self.basis.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ln L* (B, L_s) for standardised inputs x (B, n_inputs)."""
        return torch.addmm(self.mean, self.coefficients(x), self.basis)


class Speculator(nn.Module):
    """Speculator emulator of ``SEDModel`` with the same call contract (see the module docstring).

    Parameters
    ----------
    wave : (L_grid,) array, Angstrom
        The simulator's rest-frame wavelength grid (or any part of it). The emulator keeps the
        pixels with ``segments[0] <= wave <= segments[-1]``, unchanged: ``self.wave`` is a
        subset of ``SEDModel().wave``.
    segments : sequence of float, Angstrom
        Edges of the wavelength segments, each with its own PCA and MLP. Default: PROVABGS'
        segments, the last extended to 6 micron (WISE W2 at z = 0).
    n_components : sequence of int
        PCA components per segment (PROVABGS: 50, 50, 50, 30).
    hidden, n_layers : int
        Width and number of hidden layers of every segment's MLP (PROVABGS: 256 x 8).
    z_max : float
        Nominal largest redshift of the training set (``simulate_to_hdf5``'s z_max); inputs with
        larger z raise (the emulator would extrapolate in t_U). :meth:`fit_pca` raises it to
        the data's largest z if that is larger.
    """

    def __init__(
        self,
        wave: Sequence[float] | np.ndarray | torch.Tensor,
        segments: Sequence[float] = (2000.0, 3600.0, 5500.0, 7410.0, 60000.0),
        n_components: Sequence[int] = (50, 50, 50, 30),
        hidden: int = 256,
        n_layers: int = 4,
        z_max: float = 0.6,
    ):
        super().__init__()
        segments = [float(s) for s in segments]
        n_components = [int(k) for k in n_components]
        if len(n_components) != len(segments) - 1:
            raise ValueError(
                f"{len(segments) - 1} segments need as many n_components; got {n_components}"
            )
        if any(b <= a for a, b in zip(segments[:-1], segments[1:], strict=True)):
            raise ValueError(f"segment edges must increase; got {segments}")
        grid = torch.as_tensor(np.asarray(wave, dtype=np.float64))
        keep = (grid >= segments[0]) & (grid <= segments[-1])
        wave_emu = grid[keep]
        if (
            len(wave_emu) == 0
            or wave_emu[0] > segments[0] + 100
            or wave_emu[-1] < segments[-1] - 100
        ):
            raise ValueError(
                f"the wavelength grid ({float(grid.min()):.0f}-{float(grid.max()):.0f} A) does "
                f"not cover the segments {segments[0]:.0f}-{segments[-1]:.0f} A"
            )
        # segment s owns pixels [bounds[s], bounds[s+1]); contiguous, so torch.cat keeps order
        bounds = torch.searchsorted(wave_emu, torch.tensor(segments[1:-1], dtype=torch.float64))
        self.bounds = [0, *bounds.tolist(), len(wave_emu)]
        self.config = {
            "segments": segments,
            "n_components": n_components,
            "hidden": int(hidden),
            "n_layers": int(n_layers),
            "z_max": float(z_max),
        }
        self.prior = PROVABGSPrior()
        self.register_buffer("wave", wave_emu.clone())
        self.register_buffer("x_mean", torch.zeros(N_INPUTS))
        self.register_buffer("x_std", torch.ones(N_INPUTS))
        self.register_buffer("z_max", torch.tensor(float(z_max)))
        self.register_buffer("fitted", torch.tensor(False))
        self.segments = nn.ModuleList(
            SegmentEmulator(N_INPUTS, hi - lo, k, hidden, n_layers)
            for lo, hi, k in zip(self.bounds[:-1], self.bounds[1:], n_components, strict=True)
        )
        # the simulator's own ISM curve on the emulated pixels; rebuilt from wave, not saved
        self.dust = CharlotFallKriekConroy(wave_emu.numpy())
        for name, buf in list(self.dust.named_buffers(recurse=False)):
            self.dust.register_buffer(name, buf, persistent=False)

    # ---- inputs ---------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.x_mean.dtype

    @property
    def n_wave(self) -> int:
        return self.wave.shape[0]

    def check_inputs(self, theta: torch.Tensor, z) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate (theta, z) like ``SEDModel.check_inputs`` and cast to the module dtype.

        Raises ValueError for theta outside the prior support, a z of the wrong shape, NaN, or
        z outside [0, z_max] (the training set's range).
        """
        theta, z = check_theta_z(theta, z, float(self.z_max),
                                 range_note=" (the emulator's training range)")  # fmt: skip
        return theta.to(self.dtype), z.to(self.dtype)

    def features(self, theta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Raw MLP inputs (B, 9), see ``INPUT_NAMES``, for validated theta (B, 12), z (B,)."""
        t_u = age_of_universe_gyr(z).to(theta.dtype)
        logits = self.prior.to_unconstrained(theta)[:, 1:4]
        f_eff = theta[:, THETA.F_BURST] * (theta[:, THETA.T_BURST] < t_u).to(theta.dtype)
        return torch.cat(
            [
                logits,
                f_eff[:, None],
                torch.log10(theta[:, THETA.T_BURST, None]),
                torch.log10(theta[:, THETA.GAMMA]),
                theta[:, THETA.TAU_BC, None],
                t_u[:, None],
            ],
            -1,
        )

    def log_transmission_ism(self, theta: torch.Tensor) -> torch.Tensor:
        """ln T_ISM (B, L) = -tau_ISM x curve(n_dust), exactly as the simulator's dust."""
        return -theta[:, THETA.TAU_ISM, None] * self.dust.ism_curve(theta[:, THETA.N_DUST])

    # ---- spectra --------------------------------------------------------------------------
    def _require_fitted(self) -> None:
        if not bool(self.fitted):
            raise RuntimeError(
                "this Speculator has no PCA basis yet: call fit_pca() (training does it in "
                "setup) or load a trained one with sedvae.emulator.load_emulator"
            )

    def _log_lum_star(self, theta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """ln L* (B, L) before ISM dust, for validated inputs."""
        x = (self.features(theta, z) - self.x_mean) / self.x_std
        return torch.cat([seg(x) for seg in self.segments], -1)

    def log_lum_unit(self, theta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """ln L_lambda (B, L) per unit formed mass, ln(L_sun/A/M_sun), on ``self.wave``.

        Parameters
        ----------
        theta : (B, 12) PROVABGS parameters (logM* is ignored)
        z : (B,) redshift in [0, z_max] (sets t_U, where the SFH is cut)
        """
        self._require_fitted()
        theta, z = self.check_inputs(theta, z)
        return self._log_lum_star(theta, z) + self.log_transmission_ism(theta)

    def forward(self, theta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Rest-frame L_lambda (B, L) in L_sun/A, including 10^logM*, on ``self.wave``."""
        self._require_fitted()
        theta, z = self.check_inputs(theta, z)
        log_l = self._log_lum_star(theta, z) + self.log_transmission_ism(theta)
        return torch.exp(log_l + LN10 * theta[:, THETA.LOGMSTAR, None])

    # ---- training ---------------------------------------------------------------------------
    def target(self, theta: torch.Tensor, lum_unit: torch.Tensor) -> torch.Tensor:
        """ln L* (B, L): the simulator's ln L_lambda per unit mass with ISM dust divided out."""
        if lum_unit.shape != (theta.shape[0], self.n_wave):
            raise ValueError(
                f"lum_unit must have shape ({theta.shape[0]}, {self.n_wave}) on the emulator's "
                f"wavelengths; got {tuple(lum_unit.shape)}"
            )
        log_l = torch.log(lum_unit.to(self.dtype).clamp_min(LUM_FLOOR))
        return log_l - self.log_transmission_ism(theta)

    def loss(self, theta: torch.Tensor, z: torch.Tensor, lum_unit: torch.Tensor) -> torch.Tensor:
        """Mean squared error of ln L_lambda per pixel, inside the PCA subspace.

        The PCA rows are orthonormal, so the squared coefficient error summed over components
        equals the squared ln L error summed over pixels, minus the (constant) truncation
        error. Computing it on the coefficients saves expanding the prediction.

        Parameters
        ----------
        theta : (B, 12), z : (B,)
        lum_unit : (B, L) simulated L_lambda per unit formed mass (L_sun/A/M_sun) on ``wave``
        """
        self._require_fitted()
        theta, z = self.check_inputs(theta, z)
        target = self.target(theta, lum_unit)
        x = (self.features(theta, z) - self.x_mean) / self.x_std
        sq = 0.0
        for seg, lo, hi in zip(self.segments, self.bounds[:-1], self.bounds[1:], strict=True):
            sq = sq + ((seg.coefficients(x) - seg.project(target[:, lo:hi])) ** 2).sum(-1)
        return sq.mean() / self.n_wave

    def log_lum_error(
        self, theta: torch.Tensor, z: torch.Tensor, lum_unit: torch.Tensor
    ) -> torch.Tensor:
        """ln L_emulated - ln L_simulated (B, L) for simulated ``lum_unit`` (B, L) per unit mass;
        |df/f| = |expm1| of it."""
        log_emu = self.log_lum_unit(theta, z)
        return log_emu - torch.log(lum_unit.to(log_emu).clamp_min(LUM_FLOOR))

    def baseline_loss(self, theta: torch.Tensor, lum_unit: torch.Tensor) -> torch.Tensor:
        """``loss`` of the mean-PCA baseline (every coefficient 0, i.e. the mean spectrum)."""
        target = self.target(theta.to(self.dtype), lum_unit)
        sq = sum(
            (seg.project(target[:, lo:hi]) ** 2).sum(-1)
            for seg, lo, hi in zip(self.segments, self.bounds[:-1], self.bounds[1:], strict=True)
        )
        return sq.mean() / self.n_wave

    @torch.no_grad()
    def fit_pca(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> dict[str, float]:
        """Fit the input standardisation and every segment's PCA on training spectra.

        Parameters
        ----------
        batches : iterable of (theta (B, 12), z (B,), lum_unit (B, L))
            Training spectra per unit formed mass on ``wave`` (L_sun/A/M_sun); one pass.

        Returns
        -------
        dict: ``n`` spectra used, ``explained`` fraction of the ln L* variance kept by the
        PCA, and ``z_max``: the larger of the constructor's and the data's (larger z raise).
        """
        xs, ys, z_max = [], [], 0.0
        device = self.wave.device
        for theta, z, lum in batches:
            theta, z = self.check_inputs(theta.to(device), z.to(device))
            ys.append(self.target(theta, lum.to(device)).float().cpu())
            xs.append(self.features(theta, z).double().cpu())
            z_max = max(z_max, float(z.max()))
        if sum(len(x) for x in xs) < 2:
            raise ValueError("fit_pca needs at least 2 spectra")
        x, y = torch.cat(xs), torch.cat(ys)
        del xs, ys
        n = len(x)
        total, kept = 0.0, 0.0
        for seg, (lo, hi) in zip(self.segments, self._pairs(), strict=True):
            mean = y[:, lo:hi].mean(0)
            yc = y[:, lo:hi] - mean
            k = seg.basis.shape[0]
            q = min(k + 20, *yc.shape)
            if q < min(yc.shape):
                # randomized SVD: ~10 passes over the data instead of an L_s^3 eigensolve;
                # exact to float32 for these fast-decaying spectra (niter = 6)
                _, sv, v = torch.svd_lowrank(yc, q=q, niter=6)
            else:
                _, sv, vh = torch.linalg.svd(yc, full_matrices=False)
                v = vh.T
            if v.shape[1] < k:
                raise ValueError(f"{k} PCA components need at least {k} spectra; got {n}")
            v = v[:, :k]
            # fix each component's sign (SVD's is arbitrary) so that refits are reproducible
            v = v * torch.sign(v[v.abs().argmax(0), torch.arange(k)])
            seg.mean.copy_(mean.to(seg.mean))
            seg.basis.copy_(v.T.to(seg.basis))
            seg.scale.copy_((sv[:k] / n**0.5).clamp_min(1e-12).to(seg.scale))
            total += float((yc.double() ** 2).sum()) / n
            kept += float((sv[:k].double() ** 2).sum()) / n
        x_mean = x.mean(0)
        x_std = x.std(0).clamp_min(1e-6)
        self.x_mean.copy_(x_mean.to(self.x_mean))
        self.x_std.copy_(x_std.to(self.x_std))
        # the larger of the nominal range (constructor) and the data's largest z
        z_max = max(z_max, float(self.z_max))
        self.z_max.fill_(z_max)
        self.config["z_max"] = z_max
        self.fitted.fill_(True)
        return {"n": float(n), "explained": kept / max(total, 1e-300), "z_max": z_max}

    def _pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.bounds[:-1], self.bounds[1:], strict=True))


__all__ = ["Speculator", "SpeculatorActivation", "SegmentEmulator", "INPUT_NAMES"]
