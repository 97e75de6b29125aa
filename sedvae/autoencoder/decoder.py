"""Physics decoder: SPS x 10^logM* + ResidualNet(s, theta) on the rest-frame grid, then the
observation model (redshift, instrument, calibration, aperture, Milky Way) and photometry.

    continuum = broaden(resample(SPS(theta, z)), sigma_star)          L_sun/A, rest frame
    residual  = lines(s, theta; sigma_gas) + smooth(s, theta) [+ free]
    flux      = calib(c) * aperture * Instrument(continuum + residual, z)   [x MW(E(B-V))]
    photometry = Photometry(redshift(continuum + residual))                [x MW]

The SPS is any module with ``forward(theta (B,12), z (B,)) -> L_lambda (B, L_sps)`` in L_sun/A
including 10^logM* and a ``wave`` buffer (Angstrom): ``sedvae.sps.SEDModel`` (``model/sps=direct``)
or the Speculator emulator (``model/sps=emulator``). Its output is resampled (flux-conserving)
onto the decoder's grid, so either backend works unchanged.

Checkpoints: the SPS, instrument and photometry are rebuilt from the config, so their buffers
(the SPS tables are ~100 MB) are left out of ``state_dict`` and refilled on load.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import nn

from ..physics.calibration import SmoothCalibration, milky_way_transmission
from ..physics.instruments import DEFAULT_GRID_R, instrument_for_grid
from ..physics.redshift import redshift_spectrum
from ..physics.resample import resample
from .grid import LogGrid
from .residual import ResidualNet

_REBUILT = ("sps.", "instrument.", "photometry.")  # submodules rebuilt from the config
log = logging.getLogger(__name__)


class GridPixels(NamedTuple):
    """How the decoder observes on a batch's own grid: ``instrument``, its ``calibration``
    basis and the per-galaxy Gaussian LSF ``sigma`` (B, M) Angstrom (None: the instrument's
    own, or per-galaxy resolution matrices for DESI-like grids)."""

    instrument: nn.Module
    calibration: SmoothCalibration
    sigma: torch.Tensor | None


class PhysicsDecoder(nn.Module):
    """Latents -> rest-frame model -> instrument pixels and photometry.

    Parameters
    ----------
    sps : nn.Module
        Stellar population model (see module docstring).
    instrument : nn.Module
        ``forward(wave_rest, lum_rest, z[, resolution]) -> (B, M)`` and ``coverage``, e.g.
        ``sedvae.physics.DESIInstrument``.
    residual : ResidualNet
    grid : LogGrid
    photometry : sedvae.physics.Photometry, optional
    calibration_order : int
        Legendre order of the smooth calibration nuisance (0 = none).
    norm_window : (float, float), Angstrom
        Rest-frame range whose mean continuum is the residual's unit ``norm``.
    """

    def __init__(
        self,
        sps: nn.Module,
        instrument: nn.Module,
        residual: ResidualNet,
        grid: LogGrid,
        photometry: nn.Module | None = None,
        calibration_order: int = 2,
        norm_window: tuple[float, float] = (4000.0, 7000.0),
    ) -> None:
        super().__init__()
        self.sps = sps
        self.instrument = instrument
        self.photometry = photometry
        self.grid = grid
        self.residual = residual
        residual.bind(grid)
        self.calibration = SmoothCalibration(instrument.wave, calibration_order)
        w = grid.wave
        self.register_buffer(
            "norm_weight",
            ((w >= norm_window[0]) & (w <= norm_window[1])).float(),
            persistent=False,
        )
        self.norm_weight /= self.norm_weight.sum()
        self._register_state_dict_hook(_drop_rebuilt)
        self._register_load_state_dict_pre_hook(self._fill_rebuilt, with_module=False)

    def _fill_rebuilt(self, state_dict, prefix, *args) -> None:
        """Complete a loaded ``state_dict`` with this module's own rebuilt buffers."""
        for name in ("sps", "instrument", "photometry"):
            module = getattr(self, name)
            if module is None:
                continue
            for key, value in module.state_dict(keep_vars=True).items():
                state_dict.setdefault(f"{prefix}{name}.{key}", value)

    # ---- rest frame ---------------------------------------------------------------------
    def stellar(self, theta, z, sigma_star) -> torch.Tensor:
        """Broadened stellar continuum (B, L) on the grid, L_sun/A."""
        lum = self.sps(theta, z)
        wave_sps = self.sps.wave.to(torch.float64)
        on_grid = resample(wave_sps, lum, self.grid.wave)
        return self.grid.broaden(on_grid, sigma_star)

    def rest_frame(self, latents: dict[str, torch.Tensor], z: torch.Tensor) -> dict:
        """Rest-frame components, each (B, L) L_sun/A on ``grid.wave``.

        Returns ``continuum``, ``lines``, ``smooth``, ``free``, ``residual`` (their sum),
        ``total``, ``norm`` (B,) and the residual net's outputs (``line_lum`` ...).
        """
        continuum = self.stellar(latents["theta"], z, latents["sigma_star"])
        norm = (continuum * self.norm_weight).sum(-1).detach().clamp_min(1e-30)
        res = self.residual(latents["s"], latents["u"], norm, latents["sigma_gas"])
        n = self.grid.n_fine
        tail = continuum.new_zeros(continuum.shape[0], continuum.shape[1] - n)
        out = dict(res)
        for key in ("lines", "smooth", "free"):
            out[key] = torch.cat([res[key], tail], -1)
        out["residual"] = out["lines"] + out["smooth"] + out["free"]
        out["continuum"] = continuum
        out["total"] = continuum + out["residual"]
        out["norm"] = norm
        return out

    # ---- observed frame ---------------------------------------------------------------------
    def observe(
        self,
        lum_rest: torch.Tensor,
        z: torch.Tensor,
        latents: dict[str, torch.Tensor],
        resolution=None,
        mw_ebv: torch.Tensor | None = None,
        pixels: GridPixels | None = None,
    ) -> torch.Tensor:
        """Rest-frame (B, L) -> instrument flux (B, M), 1e-17 erg/s/cm^2/A, with the
        aperture and calibration nuisances (and Galactic extinction when ``mw_ebv``);
        ``pixels``: another grid than the decoder's instrument (:meth:`pixels_for`)."""
        if mw_ebv is not None:
            wave_obs = self.grid.wave[None, :] * (1 + z.to(torch.float64))[:, None]
            lum_rest = lum_rest * _mw(wave_obs, mw_ebv).to(lum_rest.dtype)
        instrument, calibration = self.instrument, self.calibration
        kwargs = {} if resolution is None else {"resolution": resolution}
        if pixels is not None:
            instrument, calibration = pixels.instrument, pixels.calibration
            if pixels.sigma is not None:  # Gaussian LSF per galaxy (SDSS wdisp, tables)
                kwargs = {"sigma": pixels.sigma}
        flux = instrument(self.grid.wave, lum_rest, z, **kwargs)
        flux = flux * latents["aperture"][:, None]
        return calibration(flux, latents["calib"])

    def pixels_for(self, wave, arm=None, lsf_sigma=None) -> GridPixels:
        """The instrument (and calibration basis) that observes the model on a batch's own
        pixels ``wave`` (M,) (arms ``arm``), with the galaxies' Gaussian LSF ``lsf_sigma``
        (B, M) Angstrom where given (else R = 2000, logged):
        :func:`sedvae.physics.instrument_for_grid`. DESI-like grids of three arms take the
        galaxies' resolution matrices as the decoder's own instrument does."""
        if lsf_sigma is None and (arm is None or int(torch.as_tensor(arm).max()) == 0):
            log.warning("no LSF given for a grid of %d pixels: assuming R = %.0f",
                        len(wave), DEFAULT_GRID_R)  # fmt: skip
        instrument, sigma = instrument_for_grid(wave, arm, lsf_sigma)
        instrument = instrument.to(self.grid.wave.device)
        calibration = SmoothCalibration(instrument.wave, self.calibration.order)
        return GridPixels(instrument, calibration.to(self.grid.wave.device), sigma)

    def model_photometry(
        self, lum_rest: torch.Tensor, z: torch.Tensor, mw_ebv: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Total (not fibre) photometry (B, nb), nanomaggies."""
        wave_obs, flux = redshift_spectrum(self.grid.wave, lum_rest, z)
        if mw_ebv is not None:
            flux = flux * _mw(wave_obs, mw_ebv).to(flux.dtype)
        return self.photometry(wave_obs, flux)

    def forward(
        self,
        latents: dict[str, torch.Tensor],
        z: torch.Tensor,
        resolution=None,
        mw_ebv: torch.Tensor | None = None,
        components: bool = False,
        pixels: GridPixels | None = None,
    ) -> dict[str, torch.Tensor]:
        """Model of a batch.

        Parameters
        ----------
        latents : dict from the encoder (``theta``, ``u``, ``sigma_star``, ``sigma_gas``,
            ``aperture``, ``calib``, ``s``)
        z : (B,) tensor
        resolution : per-galaxy resolution diagonals for the instrument, optional
        mw_ebv : (B,) tensor, mag, optional
        components : bool
            Also return the observed continuum-only flux ``flux_continuum`` (for plots).
        pixels : GridPixels, optional
            Observe on another grid than the instrument's (:meth:`pixels_for`).

        Returns
        -------
        dict: ``flux`` (B, M), ``coverage`` (B, M) bool, ``photometry`` (B, nb) (when the
        decoder has photometry), ``rest`` (the :meth:`rest_frame` dict).
        """
        rest = self.rest_frame(latents, z)
        obs = (z, latents, resolution, mw_ebv, pixels)
        out = {"rest": rest, "flux": self.observe(rest["total"], *obs)}
        instrument = self.instrument if pixels is None else pixels.instrument
        out["coverage"] = instrument.coverage(self.grid.wave, z)
        if self.photometry is not None:
            out["photometry"] = self.model_photometry(rest["total"], z, mw_ebv)
        if components:
            out["flux_continuum"] = self.observe(rest["continuum"], *obs)
        return out


def _mw(wave_obs: torch.Tensor, ebv: torch.Tensor) -> torch.Tensor:
    """Galactic transmission on per-galaxy observed grids (B, L)."""
    return torch.stack(
        [milky_way_transmission(w, e[None])[0] for w, e in zip(wave_obs, ebv, strict=True)]
    )


def _drop_rebuilt(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if key[len(prefix) :].startswith(_REBUILT):
            del state_dict[key]
