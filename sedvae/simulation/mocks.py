"""The generative model of mock DESI BGS observations: real SPS + nebular emission, the DESI
instrument and a BGS-like noise model.

Generative model of one mock (:class:`MockGenerator`):

- theta from the PROVABGS prior; z from a BGS-like n(z) ~ z^2 exp(-(z/0.15)^1.5) on
  [0.01, 0.6] (mode 0.18, 90 % below 0.37) or uniform; logU ~ U(-4, -1); sigma_v ~ U(30, 300)
  km/s (stars and gas alike, as ``SEDModel.simulate`` does);
- ``SEDModel.simulate`` (BC03 stars + Cloudy lines and continuum for stars < 10 Myr, broadened),
  observed through ``DESIInstrument`` with the bundled coadd's real resolution matrices;
- a fibre aperture: the spectrum (not the photometry) is scaled by f_ap ~ LogU(0.3, 1);
- Legacy Surveys photometry (north: BASS g, r, MzLS z, WISE W1, W2) of the whole galaxy;
- noise, ivar and masks from :class:`sedvae.physics.noise.SpectralNoiseModel` with the
  coadd's ivar shape (median S/N per pixel b 3.9, r 7.0, z 6.9 times a log-normal galaxy factor
  of scatter 0.5 in ln S/N).

Files of noiseless mocks are written by :func:`sedvae.simulation.writer.write_mocks` (layout
there); the data modules that read them draw the noise.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch

from ..io.batch import TRAINING_Z_RANGE
from ..paths import data_dir
from ..physics import LS_NORTH, DESIInstrument, Photometry
from ..physics.lines import BENCH_LINES, EMISSION_LINES
from ..physics.noise import SpectralNoiseModel

DESI_EXAMPLE = "desi_example/coadd-4-80613-thru20210324.fits"
DESI_EXAMPLE_REDROCK = "desi_example/redrock-4-80613-thru20210324.fits"


def load_desi_example():
    """The bundled real DESI BGS spectrum as a validated :class:`sedvae.io.Spectra`."""
    from ..io import read_spectra

    return read_spectra(
        "desi", data_dir() / DESI_EXAMPLE, redrock=data_dir() / DESI_EXAMPLE_REDROCK
    )


def desi_instrument(coadd: str | os.PathLike | None = None, index: int = 0) -> DESIInstrument:
    """DESI instrument with the pixels and resolution matrices of one coadd target
    (default: the bundled example)."""
    from ..io import read_spectra

    spectra = read_spectra("desi", coadd) if coadd is not None else load_desi_example()
    waves = [spectra.wave[spectra.arm == a] for a in range(len(spectra.arm_names))]
    return DESIInstrument.from_coadd_arrays(waves, spectra.resolution, index=index)


def desi_noise_model(coadd: str | os.PathLike | None = None, index: int = 0, **kwargs):
    """:class:`SpectralNoiseModel` with a coadd target's ivar shape (default: the example)."""
    from ..io import read_spectra

    spectra = read_spectra("desi", coadd) if coadd is not None else load_desi_example()
    return SpectralNoiseModel.from_spectra(spectra, index=index, **kwargs)


def sample_bgs_redshift(
    n: int, generator: torch.Generator | None, z_range=TRAINING_Z_RANGE, z0: float = 0.15
) -> torch.Tensor:
    """n redshifts from p(z) ~ z^2 exp(-(z/z0)^1.5) on ``z_range`` (inverse CDF, float64)."""
    grid = np.linspace(z_range[0], z_range[1], 4001)
    pdf = grid**2 * np.exp(-((grid / z0) ** 1.5))
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * np.diff(grid))])
    u = torch.rand(n, generator=generator, dtype=torch.float64).numpy() * cdf[-1]
    return torch.as_tensor(np.interp(u, cdf, grid))


class MockGenerator(torch.nn.Module):
    """Prior draws -> noiseless DESI spectra, photometry and line truths; plus noise.

    Parameters
    ----------
    sps : sedvae.sps.SEDModel, optional
        Built with ``nebular=True``; default ``SEDModel(2000, 60000, nebular=True)``.
    instrument : DESIInstrument, optional
        Default: the bundled coadd's pixels and resolution (:func:`desi_instrument`).
    photometry : Photometry, optional
        Default: Legacy Surveys north (the example's PHOTSYS).
    noise : SpectralNoiseModel, optional
        Default: :func:`desi_noise_model`.
    z_dist : {"bgs", "uniform"}
    z_range, logu_range, sigma_v_range, aperture_range : (float, float)
    sfh : dict, optional
        A broader star-formation-history prior, ``{"frac": f, "scale": s}``: a fraction f of
        the galaxies get a continuity history (Leja et al. 2019; log SFR ratios Student-t of
        scale s dex, :class:`sedvae.sps.continuity.ContinuitySFH`) instead of theta's NMF one,
        and their theta becomes the PROVABGS theta nearest that history
        (:func:`sedvae.sps.continuity.project_to_nmf`; ``"burst": true`` lets the projection
        move theta's burst to the history's last 100 Myr where that fits better): spectra from
        histories PROVABGS' 4 bases cannot make, labelled with the theta a head can learn.
        ``None``: theta's histories only.
    """

    def __init__(
        self,
        sps=None,
        instrument: DESIInstrument | None = None,
        photometry: Photometry | None = None,
        noise: SpectralNoiseModel | None = None,
        z_dist: str = "bgs",
        z_range: tuple[float, float] = TRAINING_Z_RANGE,
        logu_range: tuple[float, float] = (-4.0, -1.0),
        sigma_v_range: tuple[float, float] = (30.0, 300.0),
        aperture_range: tuple[float, float] = (0.3, 1.0),
        sfh: dict | None = None,
    ) -> None:
        super().__init__()
        if sps is None:
            from ..sps import SEDModel

            sps = SEDModel(2000.0, 60000.0, z_max=max(0.8, z_range[1]), nebular=True)
        if z_dist not in ("bgs", "uniform"):
            raise ValueError(f"z_dist must be 'bgs' or 'uniform'; got {z_dist!r}")
        self.sps = sps
        self.instrument = instrument if instrument is not None else desi_instrument()
        self.photometry = photometry if photometry is not None else Photometry(LS_NORTH)
        self.noise = noise if noise is not None else desi_noise_model()
        self.z_dist = z_dist
        self.z_range = tuple(map(float, z_range))
        self.logu_range = tuple(map(float, logu_range))
        self.sigma_v_range = tuple(map(float, sigma_v_range))
        self.aperture_range = tuple(map(float, aperture_range))
        self.sfh, self.sfh_burst = None, False
        if sfh is not None:
            from ..sps.continuity import ContinuitySFH

            unknown = set(sfh) - {"frac", "scale", "burst"}
            if unknown:
                raise ValueError(f"sfh takes frac, scale and burst; got {sorted(unknown)}")
            self.sfh = ContinuitySFH(frac=float(sfh["frac"]), scale=float(sfh["scale"]))
            self.sfh_burst = bool(sfh.get("burst", False))
        wave = self.sps.line_wavelengths.numpy()
        self.line_names = tuple(BENCH_LINES)
        sel = torch.zeros(len(BENCH_LINES), len(wave))
        for i, members in enumerate(BENCH_LINES.values()):
            for name in members:
                j = int(np.argmin(np.abs(wave - EMISSION_LINES[name])))
                if abs(wave[j] - EMISSION_LINES[name]) > 0.5:
                    raise ValueError(f"line {name} not in the simulator's line list")
                sel[i, j] = 1.0
        self.register_buffer("line_select", sel, persistent=False)  # (n_bench, n_cloudy)

    def draw(self, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Prior draws (float64): theta (n, 12), z, logU, sigma_v, aperture (n,)."""

        def uniform(lo, hi):
            return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)

        theta = self.sps.prior.sample(n, generator, dtype=torch.float64)
        if self.z_dist == "bgs":
            z = sample_bgs_redshift(n, generator, self.z_range)
        else:
            z = uniform(*self.z_range)
        lo, hi = self.aperture_range
        params = {
            "theta": theta,
            "z": z,
            "logU": uniform(*self.logu_range),
            "sigma_v": uniform(*self.sigma_v_range),
            "aperture": torch.exp(uniform(math.log(lo), math.log(hi))),
        }
        if self.sfh is not None:  # drawn last: the other draws are those of sfh=None
            from ..sps.continuity import project_to_nmf

            params.update(self.sfh.draw(n, generator))
            pick = params["sfh_continuity"]
            if pick.any():
                th, zz = self.sps.check_inputs(theta[pick], z[pick])
                sub = {k: params[k][pick] for k in ("sfh_continuity", "sfr_log_ratio")}
                h = self.sfh.history(self.sps, th, zz, sub)
                theta = theta.clone()
                theta[pick] = project_to_nmf(self.sps, th, zz, h, burst=self.sfh_burst).to(theta)
                params["theta"] = theta
        return params

    @property
    def sfh_settings(self) -> str:
        """The SFH prior as a JSON string (a mock file's ``sfh`` attribute)."""
        if self.sfh is None:
            return "provabgs"
        settings = {"frac": self.sfh.frac, "scale": self.sfh.scale}
        if self.sfh_burst:
            settings["burst"] = True
        return json.dumps(settings)

    def history(self, params: dict[str, torch.Tensor]):
        """The star-formation history of drawn parameters: theta's, or for ``sfh`` the
        continuity one where drawn (its metallicity history and burst are theta's, which the
        projection keeps). ``None`` when theta's histories are the only ones."""
        if self.sfh is None or "sfh_continuity" not in params:
            return None
        dt = self.sps.dtype
        theta, z = self.sps.check_inputs(params["theta"].to(dt), params["z"].to(dt))
        return self.sfh.history(self.sps, theta, z, params)

    @torch.no_grad()
    def rest_frame(self, params: dict[str, torch.Tensor], history=None) -> torch.Tensor:
        """Rest-frame L_sun/A (n, L) on ``sps.wave`` of drawn parameters: stars x 10^logM*,
        nebular lines and continuum, velocity broadening (``sps.simulate``). ``history``:
        :meth:`history` of ``params`` where the caller has it already."""
        dt = self.sps.dtype
        if history is None:
            history = self.history(params)
        return self.sps.simulate(params["theta"].to(dt), params["z"].to(dt),
                                 params["logU"].to(dt), params["sigma_v"].to(dt),
                                 history=history)  # fmt: skip

    def noiseless(self, params: dict[str, torch.Tensor], lum_rest=None) -> dict:
        """Noiseless observations of drawn parameters (float32 outputs).

        ``lum_rest`` (n, L) L_sun/A (incl. mass, nebular, broadening) on ``sps.wave`` may be
        given (e.g. from a :func:`~sedvae.simulation.writer.simulate_to_hdf5` file); otherwise
        :meth:`rest_frame` makes it.
        """
        dt = self.sps.dtype
        theta, z, logu = params["theta"].to(dt), params["z"].to(dt), params["logU"].to(dt)
        history = self.history(params)  # one for the continuum and the lines
        if lum_rest is None:
            lum_rest = self.rest_frame(params, history)
        flux, phot = self.observe(lum_rest, z)
        flux = flux * params["aperture"].to(dt)[:, None]
        lines = self.sps.line_luminosities(theta, z, logu, history=history)
        return {
            "flux_true": flux.float(),
            "photometry_true": phot.float(),
            "line_lum": (lines @ self.line_select.T.to(lines.dtype)).float(),
            "line_lum_all": lines.float(),
        }

    @torch.no_grad()
    def observe(self, lum_rest: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rest-frame spectra (B, L) on ``sps.wave`` at redshifts z (B,) -> the noiseless DESI
        spectra at aperture 1 (B, M) and the photometry of the whole galaxy (B, nb)."""
        from ..physics import redshift_spectrum

        flux = self.spectrum(lum_rest, z)
        wave_obs, f_obs = redshift_spectrum(self.sps.wave, lum_rest, z)
        return flux, self.photometry(wave_obs, f_obs)

    def spectrum(self, lum_rest: torch.Tensor, z: torch.Tensor, resolution=None,
                 repeat: int = 1) -> torch.Tensor:  # fmt: skip
        """Rest-frame spectra (B, L) on ``sps.wave`` at redshifts z (B,) -> the DESI spectra
        (B, M), 1e-17 erg/s/cm^2/A, at aperture 1: redshift, d_L, pixel integration and the
        resolution matrix (``resolution`` (B, 11, M): each galaxy's own, or (B / repeat, 11,
        M), each serving ``repeat`` consecutive rows; default the instrument's). The one path
        from the SPS to the pixels, shared by the mocks and the catalog's
        posterior-predictive check (:mod:`sedvae.catalog.ppc`)."""
        return self.instrument(self.sps.wave, lum_rest, z, resolution=resolution, repeat=repeat)

    def noisy(self, flux_true, photometry_true, generator=None) -> dict:
        """Noise, ivar and masks (see :class:`SpectralNoiseModel`)."""
        return self.noise(flux_true, photometry_true, generator)

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict:
        """Draw, observe and add noise: a complete batch of n mocks (float32)."""
        params = self.draw(n, generator)
        clean = self.noiseless(params)
        obs = self.noisy(clean["flux_true"], clean["photometry_true"], generator)
        out = {k: v.float() for k, v in params.items()}
        out.update(clean)
        out.update(obs)
        return out
