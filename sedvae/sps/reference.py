"""bagpipes' own ``model_galaxy`` as the reference for sedvae's simulator.

One stated bagpipes configuration (its wavelength grid, and so its lines, depend on it):

- ``model_galaxy(components, spec_wavs=np.arange(2900, 9101, 1.0))``, no filter list, no
  nebular emission, redshift 0 (rest frame, erg/s/A, divided here by bagpipes' L_sun);
- the SFH is bagpipes' ``custom`` component: a step function in lookback time equal to the
  binned SFR of the sedvae history, normalised to the same formed mass;
- one metallicity (``metallicity`` in units of bagpipes' Z_sun = 0.02), a grid value;
- dust ``Salim`` with ``delta = 0`` and ``B = 0.85``, which is exactly the Kriek & Conroy
  curve at n_dust = 0 (bump E_b = 0.85 - 1.9 n); A_V = 1.0857 tau_ISM * 4.05 / (k'+E_b D)(5500);
  no extra birth-cloud dust (eta = 1, sedvae tau_BC = 0), since bagpipes' birth-cloud
  attenuation uses the ISM curve while sedvae's uses lambda^-1.

bagpipes' cosmology is not Planck18: its age of the universe at z = 0 is 13.47 Gyr, where
sedvae's is 13.79. sedvae is therefore evaluated at the redshift where the Planck18 age equals
bagpipes' z = 0 age (z ~ 0.024), so that both cut the SFH at the same lookback time; the
comparison is in the rest frame, where the redshift plays no other role.
"""

from __future__ import annotations

import functools
import io
from contextlib import redirect_stdout

import numpy as np
import torch

from ..physics.cosmology import age_of_universe_gyr
from .dust import LAMBDA_V, calzetti_kprime, drude_profile
from .model import History, SEDModel
from .provabgs import THETA

L_SUN_BAGPIPES = 3.826e33  # erg/s, the value bagpipes multiplies by
SPEC_WAVS = np.arange(2900.0, 9101.0, 1.0)


@functools.lru_cache(maxsize=1)
def import_bagpipes():
    """Import bagpipes quietly (it prints banners and may build its IGM table once)."""
    with redirect_stdout(io.StringIO()):
        import bagpipes

    return bagpipes


def bagpipes_age_now_gyr() -> float:
    pipes = import_bagpipes()
    return float(np.interp(0.0, pipes.utils.z_array, pipes.utils.age_at_z))


def matched_redshift() -> float:
    """Redshift at which the Planck18 age equals bagpipes' age of the universe at z = 0."""
    target = bagpipes_age_now_gyr()
    lo, hi = 0.0, 0.2
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float(age_of_universe_gyr(torch.tensor(mid, dtype=torch.float64))) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def av_from_tau_ism(tau_ism: float) -> float:
    """bagpipes' Salim A_V (delta = 0, B = 0.85) giving sedvae's tau_ISM at n_dust = 0."""
    k_v = calzetti_kprime(np.array([LAMBDA_V]))[0]
    d_v = drude_profile(np.array([LAMBDA_V]))[0]
    return 2.5 * np.log10(np.e) * tau_ism * 4.05 / (k_v + 0.85 * d_v)


class BagpipesReference:
    """A bagpipes ``model_galaxy`` fed with sedvae histories (see the module docstring)."""

    def __init__(self):
        self.pipes = import_bagpipes()
        self._model = None

    def components(self, sfh_steps: np.ndarray, log_mass: float, z_over_zsun: float, av: float):
        return {
            "redshift": 0.0,
            "t_bc": 0.01,
            "custom": {"massformed": log_mass, "metallicity": z_over_zsun, "history": sfh_steps},
            "dust": {"type": "Salim", "Av": av, "delta": 0.0, "B": 0.85, "eta": 1.0},
        }

    def spectrum(self, sfh_steps: np.ndarray, log_mass: float, z_over_zsun: float, av: float):
        """Rest-frame (wave (L,) A, L_lambda (L,) L_sun/A) from bagpipes."""
        comps = self.components(sfh_steps, log_mass, z_over_zsun, av)
        with redirect_stdout(io.StringIO()):
            if self._model is None:
                self._model = self.pipes.model_galaxy(comps, spec_wavs=SPEC_WAVS)
            else:
                self._model.update(comps)
        return self._model.wavelengths, self._model.spectrum_full / L_SUN_BAGPIPES

    @property
    def model(self):
        return self._model


def sfh_steps(bin_lo_gyr: np.ndarray, bin_hi_gyr: np.ndarray, bin_mass: np.ndarray) -> np.ndarray:
    """A step-function SFR (age yr, SFR) array for bagpipes' custom SFH, constant in each bin."""
    rows = []
    for lo, hi, m in zip(bin_lo_gyr, bin_hi_gyr, bin_mass, strict=True):
        if hi <= lo:
            continue
        sfr = m / ((hi - lo) * 1e9)
        rows += [(lo * 1e9 * (1 + 1e-9) + 1e-3, sfr), (hi * 1e9 * (1 - 1e-9), sfr)]
    return np.array(rows)


def constant_z_history(
    model: SEDModel, theta: torch.Tensor, z: torch.Tensor, zmet: float
) -> History:
    """sedvae's history for theta at z, without burst and with every bin at metallicity zmet."""
    theta = theta.clone()
    theta[:, THETA.F_BURST] = 0.0  # bagpipes bins a burst into its 0.1-dex age bins; not compared
    theta, z = model.check_inputs(theta, z)
    h = model.history(theta, z)
    h.bin_z = torch.full_like(h.bin_z, zmet)
    h.burst_z = torch.full_like(h.burst_z, zmet)
    return h


def compare_with_bagpipes(
    model: SEDModel,
    theta: torch.Tensor,
    zmet: float,
    wave_range: tuple[float, float] = (3000.0, 9000.0),
    reference: BagpipesReference | None = None,
) -> list[np.ndarray]:
    """|df/f| of sedvae against bagpipes over ``wave_range`` (rest frame), one array per galaxy.

    theta's dust must be expressible by bagpipes: tau_BC = 0 and n_dust = 0. f_burst is ignored.
    """
    if (theta[:, THETA.TAU_BC] != 0).any() or (theta[:, THETA.N_DUST] != 0).any():
        raise ValueError("compare_with_bagpipes needs tau_bc = 0 and n_dust = 0")
    reference = reference or BagpipesReference()
    model64 = model.to(torch.float64)
    z = torch.full((theta.shape[0],), matched_redshift(), dtype=torch.float64)
    theta = theta.to(torch.float64)
    h = constant_z_history(model64, theta, z, zmet)
    mass = 10 ** theta[:, THETA.LOGMSTAR]
    ours = model64.spectrum_from_history(h, theta[:, THETA.DUST], mass).numpy()
    wave = model64.wave_air.numpy()  # bagpipes works on the grid's own (air) wavelengths
    out = []
    for i in range(theta.shape[0]):
        steps = sfh_steps(
            model64.bin_edges[:-1].numpy(), h.bin_hi_gyr[i].numpy(), h.bin_mass[i].numpy()
        )
        w_ref, f_ref = reference.spectrum(
            steps,
            float(theta[i, THETA.LOGMSTAR]),
            zmet / 0.02,
            av_from_tau_ism(float(theta[i, THETA.TAU_ISM])),
        )
        sel = (w_ref >= wave_range[0]) & (w_ref <= wave_range[1])
        f_ours = np.interp(w_ref[sel], wave, ours[i])
        out.append(np.abs(f_ours / f_ref[sel] - 1))
    return out
