"""Mock DESI BGS observations for the autoencoder: real SPS + nebular emission, the DESI
instrument and a BGS-like noise model; from a pre-generated HDF5 file or on the fly.

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

HDF5 layout of a mock file (:func:`write_mocks`; noiseless, noise is drawn when read so that
every training epoch sees new noise and a test set is fixed by its seed):

- ``theta`` (N, 12), ``z`` (N,), ``logU`` (N,), ``sigma_v`` (N,) km/s, ``aperture`` (N,)
- ``flux_true`` (N, M) float32, 1e-17 erg/s/cm^2/A, on the instrument pixels (``wave``, ``arm``)
- ``photometry_true`` (N, nb) nanomaggies (``bands`` attribute)
- ``line_lum`` (N, n_lines) L_sun, attenuated, summed per :data:`BENCH_LINES` entry
  (``line_names`` attribute); ``line_lum_all`` (N, 123) every Cloudy line (``cloudy_wave``)
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import h5py
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..nets.lines import BENCH_LINES, EMISSION_LINES
from ..paths import data_dir
from ..physics import LS_NORTH, DESIInstrument, Photometry
from ..physics.noise import SpectralNoiseModel, rng_for
from ..sps import THETA

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
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
    n: int, generator: torch.Generator | None, z_range=(0.01, 0.6), z0: float = 0.15
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
    """

    def __init__(
        self,
        sps=None,
        instrument: DESIInstrument | None = None,
        photometry: Photometry | None = None,
        noise: SpectralNoiseModel | None = None,
        z_dist: str = "bgs",
        z_range: tuple[float, float] = (0.01, 0.6),
        logu_range: tuple[float, float] = (-4.0, -1.0),
        sigma_v_range: tuple[float, float] = (30.0, 300.0),
        aperture_range: tuple[float, float] = (0.3, 1.0),
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
        return {
            "theta": theta,
            "z": z,
            "logU": uniform(*self.logu_range),
            "sigma_v": uniform(*self.sigma_v_range),
            "aperture": torch.exp(uniform(math.log(lo), math.log(hi))),
        }

    @torch.no_grad()
    def noiseless(self, params: dict[str, torch.Tensor], lum_rest=None) -> dict:
        """Noiseless observations of drawn parameters (float32 outputs).

        ``lum_rest`` (n, L) L_sun/A (incl. mass, nebular, broadening) on ``sps.wave`` may be
        given (e.g. from a ``sedvae.simulate`` file); otherwise ``sps.simulate`` makes it.
        """
        dt = self.sps.dtype
        theta, z = params["theta"].to(dt), params["z"].to(dt)
        logu, sigma_v = params["logU"].to(dt), params["sigma_v"].to(dt)
        if lum_rest is None:
            lum_rest = self.sps.simulate(theta, z, logu, sigma_v)
        flux, phot = self.observe(lum_rest, z)
        flux = flux * params["aperture"].to(dt)[:, None]
        lines = self.sps.line_luminosities(theta, z, logu)
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

        flux = self.instrument(self.sps.wave, lum_rest, z)
        wave_obs, f_obs = redshift_spectrum(self.sps.wave, lum_rest, z)
        return flux, self.photometry(wave_obs, f_obs)

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


def write_mocks(
    path: str | os.PathLike,
    n: int,
    seed: int,
    generator: MockGenerator | None = None,
    chunk_size: int = 256,
    simulation: str | os.PathLike | None = None,
    progress: bool = False,
) -> Path:
    """Write a noiseless mock file (layout in the module docstring); returns its path.

    Chunk i uses its own generator from (seed, i), so the file depends on (n, seed, chunk_size)
    only. With ``simulation`` (a ``sedvae.simulate`` file made with ``nebular=true``), theta, z,
    logU, sigma_v and the rest-frame spectra are taken from it (its first n rows) instead of
    being drawn; the aperture is still drawn. Written to ``<path>.partial`` then renamed.
    """
    from tqdm.auto import tqdm

    gen = generator if generator is not None else MockGenerator()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    m, nb = gen.instrument.npix, len(gen.photometry.bands)
    n_cloudy = gen.sps.line_wavelengths.shape[0]
    sim = h5py.File(simulation, "r") if simulation is not None else None
    if sim is not None and (sim.attrs.get("nebular") is not True and "lum_nebular" not in sim):
        raise ValueError(f"{simulation} has no nebular emission: make it with nebular=true")
    if sim is not None and len(sim["z"]) < n:
        raise ValueError(f"{simulation} holds {len(sim['z'])} galaxies; asked for {n}")
    f = None
    try:
        f = h5py.File(partial, "w")
        rows = min(chunk_size, 256, n)
        for key, shape in (("theta", (n, 12)), ("z", (n,)), ("logU", (n,)), ("sigma_v", (n,))):
            f.create_dataset(key, shape, "f4")
        f.create_dataset("aperture", (n,), "f4")
        f.create_dataset("flux_true", (n, m), "f4", chunks=(rows, m))
        f.create_dataset("photometry_true", (n, nb), "f4")
        f.create_dataset("line_lum", (n, len(gen.line_names)), "f4")
        f.create_dataset("line_lum_all", (n, n_cloudy), "f4")
        f.create_dataset("wave", data=gen.instrument.wave.double().numpy())
        f.create_dataset("arm", data=gen.instrument.arm.numpy())
        f.attrs.update(
            n=n, seed=seed, chunk_size=chunk_size, format_version=FORMAT_VERSION,
            bands=list(gen.photometry.bands), line_names=list(gen.line_names),
            z_dist=gen.z_dist, z_range=gen.z_range, source=str(simulation or "prior"),
            units="flux: 1e-17 erg/s/cm^2/A; photometry: nanomaggies; line_lum: L_sun",
        )  # fmt: skip
        f.create_dataset("cloudy_wave", data=gen.sps.line_wavelengths.numpy())
        n_chunks = -(-n // chunk_size)
        for i in tqdm(range(n_chunks), disable=not progress, desc=path.name):
            sl = slice(i * chunk_size, min(n, (i + 1) * chunk_size))
            rng = rng_for(seed, i)
            count = sl.stop - sl.start
            params = gen.draw(count, rng)
            lum = None
            if sim is not None:
                for key in ("theta", "z"):
                    params[key] = torch.as_tensor(sim[key][sl], dtype=torch.float64)
                params["logU"] = torch.as_tensor(sim["nuisance/logU"][sl], dtype=torch.float64)
                params["sigma_v"] = torch.as_tensor(sim["nuisance/sigma_v"][sl]).double()
                unit = torch.as_tensor(sim["lum"][sl]) + torch.as_tensor(sim["lum_nebular"][sl])
                mass = 10 ** params["theta"][:, THETA.LOGMSTAR, None].to(unit.dtype)
                lum = gen.sps.broaden(unit * mass, params["sigma_v"].to(unit.dtype))
            clean = gen.noiseless(params, lum)
            for key in ("theta", "z", "logU", "sigma_v", "aperture"):
                f[key][sl] = params[key].float().numpy()
            for key, value in clean.items():
                f[key][sl] = value.numpy()
        f.attrs["complete"] = True
    finally:
        if f is not None:
            f.close()
        if sim is not None:
            sim.close()
    os.replace(partial, path)
    return path


class MockDataset(Dataset):
    """Mocks from a :func:`write_mocks` file, held in memory, noise drawn per item.

    Parameters
    ----------
    path : str or PathLike
    noise : SpectralNoiseModel
    fixed_noise_seed : int, optional
        Noise of item i from (seed, i): a fixed validation/test set. None: fresh noise
        every time (training).
    truth : bool
        Also return ``flux_true``, ``photometry_true``, ``line_lum`` (benchmarks).
    """

    def __init__(self, path, noise: SpectralNoiseModel, fixed_noise_seed=None, truth=False):
        with h5py.File(path, "r") as f:
            if not f.attrs.get("complete", False):
                raise ValueError(f"{path} is incomplete; rerun write_mocks")
            self.data = {
                key: torch.as_tensor(f[key][:])
                for key in ("theta", "z", "logU", "sigma_v", "aperture", "flux_true",
                            "photometry_true", "line_lum")
            }  # fmt: skip
            self.line_names = tuple(f.attrs["line_names"])
            self.bands = tuple(f.attrs["bands"])
        self.noise = noise
        self.fixed_noise_seed = fixed_noise_seed
        self.truth = truth

    def __len__(self) -> int:
        return self.data["z"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        gen = rng_for(self.fixed_noise_seed, i) if self.fixed_noise_seed is not None else None
        obs = self.noise(self.data["flux_true"][i : i + 1], self.data["photometry_true"][i : i + 1],
                         gen)  # fmt: skip
        item = {k: v[0] for k, v in obs.items() if k != "snr"}
        for key in ("theta", "z", "logU", "sigma_v", "aperture"):
            item[key] = self.data[key][i]
        if self.truth:
            for key in ("flux_true", "photometry_true", "line_lum"):
                item[key] = self.data[key][i]
        return item


class OnTheFlyMocks(IterableDataset):
    """Fresh prior draws every epoch: ``n`` mocks made in chunks by a :class:`MockGenerator`."""

    def __init__(self, generator: MockGenerator, n: int, chunk_size: int = 256, seed=None):
        self.generator, self.n, self.chunk_size, self.seed = generator, n, chunk_size, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = None
        if self.seed is not None:
            rng = rng_for(self.seed, self.epoch)
        self.epoch += 1
        done = 0
        while done < self.n:
            count = min(self.chunk_size, self.n - done)
            batch = self.generator.sample(count, rng)
            keep = ("flux", "ivar", "mask", "z", "photometry", "photometry_ivar", "theta",
                    "logU", "sigma_v", "aperture")  # fmt: skip
            for j in range(count):
                yield {k: batch[k][j] for k in keep}
            done += count


class MockDataModule(pl.LightningDataModule):
    """Train/val/test mocks for the autoencoder.

    Parameters
    ----------
    cache_dir : str
        Where mock files live (``mocks_{split}_n{n}_seed{seed}.h5``); missing ones are written
        by :meth:`prepare_data`.
    n_train, n_val, n_test : int
    seed : int
        Base seed: train, val and test files use seed, seed + 1, seed + 2.
    on_the_fly : bool
        Train on fresh prior draws every epoch (``n_train`` per epoch) instead of a file.
    batch_size : int
    num_workers : int
    generator : MockGenerator, optional
        Built lazily with defaults when None.
    simulation : str, optional
        A ``sedvae.simulate`` file (nebular) to observe for the training set.
    """

    def __init__(
        self,
        cache_dir: str = "cache/mocks",
        n_train: int = 8192,
        n_val: int = 512,
        n_test: int = 1024,
        seed: int = 1,
        on_the_fly: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        generator: MockGenerator | None = None,
        simulation: str | None = None,
    ) -> None:
        super().__init__()
        self.cache_dir = Path(cache_dir)
        self.n = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
        self.seed = int(seed)
        self.on_the_fly = bool(on_the_fly)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self._generator = generator
        self.simulation = simulation
        self.datasets: dict[str, Dataset] = {}

    @property
    def generator(self) -> MockGenerator:
        if self._generator is None:
            self._generator = MockGenerator()
        return self._generator

    def path(self, split: str) -> Path:
        seed = self.seed + ("train", "val", "test").index(split)
        return self.cache_dir / f"mocks_{split}_n{self.n[split]}_seed{seed}.h5"

    def prepare_data(self) -> None:
        splits = ("val", "test") if self.on_the_fly else ("train", "val", "test")
        for split in splits:
            path = self.path(split)
            if not path.exists():
                log.info("writing %s", path)
                sim = self.simulation if split == "train" else None
                seed = self.seed + ("train", "val", "test").index(split)
                write_mocks(path, self.n[split], seed, self.generator, simulation=sim)

    def train_dataset(self, noise: SpectralNoiseModel) -> Dataset:
        """The training set (subclasses change this, not :meth:`setup`)."""
        if self.on_the_fly:
            return OnTheFlyMocks(self.generator, self.n["train"], seed=None)
        return MockDataset(self.path("train"), noise)

    def setup(self, stage: str | None = None) -> None:
        noise = self.generator.noise
        if "train" not in self.datasets:
            self.datasets["train"] = self.train_dataset(noise)
        for split, offset in (("val", 1), ("test", 2)):
            if split not in self.datasets and self.path(split).exists():
                self.datasets[split] = MockDataset(
                    self.path(split), noise, fixed_noise_seed=self.seed + 100 + offset,
                    truth=split == "test",
                )  # fmt: skip

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle and not self.on_the_fly,
            num_workers=self.num_workers,
            drop_last=split == "train",
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
