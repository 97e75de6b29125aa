"""The one writer of simulated sets: prior draws through the real SPS simulator, to HDF5.

Two layouts, one mechanism (chunk i drawn from its own generator of (seed, i), so a file is the
same whatever the chunking of the work; written to ``<out>.partial`` and renamed only when every
chunk is done, so a killed run never leaves a truncated ``<out>``):

**Rest-frame sets** (:func:`simulate_to_hdf5`; ``python -m sedvae.simulation n=20000 seed=1
out=cache/train.h5``, config ``conf/simulate.yaml``), per unit formed mass so that logM* is a
pure scale; read by the emulator's data module and by :func:`write_mocks`:

- ``theta`` (N, 12) float32: PROVABGS parameters (``sedvae.sps.PARAM_NAMES``)
- ``z`` (N,) float32: redshift, uniform in [z_min, z_max] (it sets where the SFH is cut)
- ``wave`` (L,) float64: rest-frame wavelength, Angstrom (the raw BC03 pixels)
- ``lum`` (N, L) float32: dust-attenuated stellar L_lambda, L_sun/A per M_sun formed
- ``derived/<name>`` (N,): ``SEDModel.derived`` (surviving mass etc., for the drawn logM*)
- with ``nebular=true``: ``nuisance/logU``, ``nuisance/sigma_v`` (km/s) and ``lum_nebular``
  (N, L): attenuated nebular lines + continuum per M_sun formed, unbroadened (mocks broaden
  stars and gas by sigma_v with ``SEDModel.broaden``).

A rerun of the same command resumes from the finished chunks. Both cores are used by torch's
intra-op threads (the work is a few large matrix products per chunk).

**Observed mock sets** (:func:`write_mocks`, a :class:`~sedvae.simulation.mocks.MockGenerator`
observed through the DESI instrument; noiseless, noise is drawn when read so that every training
epoch sees new noise and a test set is fixed by its seed); read by the autoencoder's and the
posterior's data modules and the catalog's mock source:

- ``theta`` (N, 12), ``z`` (N,), ``logU`` (N,), ``sigma_v`` (N,) km/s, ``aperture`` (N,)
- ``flux_true`` (N, M) float32, 1e-17 erg/s/cm^2/A, on the instrument pixels (``wave``, ``arm``)
- ``photometry_true`` (N, nb) nanomaggies (``bands`` attribute)
- ``line_lum`` (N, n_lines) L_sun, attenuated, summed per :data:`~sedvae.physics.lines.BENCH_LINES`
  entry (``line_names`` attribute); ``line_lum_all`` (N, 123) every Cloudy line
  (``cloudy_wave``)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py
import numpy as np
import torch

from .. import __version__
from ..physics.noise import rng_for
from ..sps import THETA

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of both layouts


def partial_path(path: Path) -> Path:
    """Where a set is written until every chunk is done (then renamed to ``path``)."""
    return path.with_name(path.name + ".partial")


def chunk_rows(n: int, chunk_size: int, index: int) -> slice:
    """Rows of chunk ``index`` of a set of ``n`` rows."""
    return slice(index * chunk_size, min(n, (index + 1) * chunk_size))


def _chunk_generator(seed: int, index: int) -> torch.Generator:
    state = np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] % (2**63)))


def _settings(n, seed, chunk_size, z_min, z_max, nebular, logu_range, sigma_v_range) -> dict:
    return {
        "n": int(n),
        "seed": int(seed),
        "chunk_size": int(chunk_size),
        "z_min": float(z_min),
        "z_max": float(z_max),
        "nebular": bool(nebular),
        "logu_min": float(logu_range[0]),
        "logu_max": float(logu_range[1]),
        "sigma_v_min": float(sigma_v_range[0]),
        "sigma_v_max": float(sigma_v_range[1]),
        "format_version": FORMAT_VERSION,
    }


def _matches(f: h5py.File, settings: dict) -> bool:
    return all(f.attrs.get(k) == v for k, v in settings.items())


def draw_chunk(model, index: int, settings: dict) -> dict[str, np.ndarray]:
    """Draw and simulate chunk ``index`` (reproducible from the seed alone)."""
    n, size = settings["n"], settings["chunk_size"]
    count = min(size, n - index * size)
    gen = _chunk_generator(settings["seed"], index)
    theta = model.prior.sample(count, gen, dtype=torch.float64)
    z = settings["z_min"] + (settings["z_max"] - settings["z_min"]) * torch.rand(
        count, generator=gen, dtype=torch.float64
    )
    logu = settings["logu_min"] + (settings["logu_max"] - settings["logu_min"]) * torch.rand(
        count, generator=gen, dtype=torch.float64
    )
    sigma_v = settings["sigma_v_min"] + (
        settings["sigma_v_max"] - settings["sigma_v_min"]
    ) * torch.rand(count, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        th, zz = model.check_inputs(theta, z)
        h = model.history(th, zz)
        out = {
            "theta": theta.float().numpy(),
            "z": z.float().numpy(),
            "lum": model.spectrum_from_history(h, th[:, THETA.DUST]).float().numpy(),
        }
        for key, value in model.derived(th, zz).items():
            out[f"derived/{key}"] = value.double().numpy()
        if settings["nebular"]:
            out["nuisance/logU"] = logu.float().numpy()
            out["nuisance/sigma_v"] = sigma_v.float().numpy()
            out["lum_nebular"] = (
                model.nebular_spectrum(h, th[:, THETA.DUST], logu.to(th.dtype)).float().numpy()
            )
    return out


def simulate_to_hdf5(
    path: str | os.PathLike,
    n: int,
    seed: int,
    chunk_size: int = 1024,
    z_min: float = 0.0,
    z_max: float = 0.6,
    nebular: bool = False,
    logu_range: tuple[float, float] = (-4.0, -1.0),
    sigma_v_range: tuple[float, float] = (30.0, 300.0),
    progress: bool = True,
    overwrite: bool = False,
    model=None,
    compile: bool = False,
) -> Path:
    """Write (or finish) a simulated training set; returns the final path.

    An existing complete file written with the same settings is reused; a ``.partial`` file
    with the same settings is resumed; anything else is rebuilt (``overwrite`` forces it).
    """
    from tqdm.auto import tqdm

    from ..sps import SEDModel

    if n <= 0 or chunk_size <= 0:
        raise ValueError(f"n and chunk_size must be positive; got {n}, {chunk_size}")
    if not 0.0 <= z_min <= z_max:
        raise ValueError(f"need 0 <= z_min <= z_max; got {z_min}, {z_max}")
    path = Path(path)
    settings = _settings(n, seed, chunk_size, z_min, z_max, nebular, logu_range, sigma_v_range)
    if path.exists() and not overwrite:
        with h5py.File(path, "r") as f:
            if _matches(f, settings) and f.attrs.get("complete", False):
                log.info("%s is complete with these settings: reused", path)
                return path
        raise FileExistsError(
            f"{path} exists with other settings; pass overwrite=true to replace it"
        )
    if model is None:
        model = SEDModel(z_max=max(z_max, 1e-3), nebular=nebular, compile=compile)
    if z_max > model.z_max:
        raise ValueError(f"z_max = {z_max} exceeds the simulator's supported z_max = {model.z_max}")
    partial = partial_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_chunks = -(-n // chunk_size)
    f = _open_partial(partial, settings, model, n_chunks, overwrite)
    try:
        done = f["done"]
        todo = [i for i in range(n_chunks) if not done[i]]
        if len(todo) < n_chunks:
            log.info(
                "resuming %s: %d of %d chunks already done", partial, n_chunks - len(todo), n_chunks
            )
        for i in tqdm(todo, desc=f"simulate {path.name}", disable=not progress, unit="chunk"):
            chunk = draw_chunk(model, i, settings)
            sl = chunk_rows(n, chunk_size, i)
            for key, value in chunk.items():
                f[key][sl] = value
            done[i] = True
            f.flush()  # a killed run keeps every chunk marked done
        f.attrs["complete"] = True
    finally:
        f.close()
    os.replace(partial, path)
    return path


def _open_partial(
    partial: Path, settings: dict, model, n_chunks: int, overwrite: bool
) -> h5py.File:
    if partial.exists() and not overwrite:
        try:
            f = h5py.File(partial, "r+")
            if _matches(f, settings) and f["done"].shape == (n_chunks,):
                return f
            f.close()
        except (OSError, KeyError):
            pass  # a partial file damaged mid-write: start again
        log.warning("discarding %s (other settings or unreadable)", partial)
    partial.unlink(missing_ok=True)
    f = h5py.File(partial, "w")
    n, n_wave = settings["n"], model.n_wave
    rows = min(settings["chunk_size"], 256)
    f.create_dataset("wave", data=model.wave.cpu().numpy())
    f.create_dataset("theta", (n, 12), "f4")
    f.create_dataset("z", (n,), "f4")
    f.create_dataset("lum", (n, n_wave), "f4", chunks=(rows, n_wave))
    for key in ("logmstar_surv", "sfr_100myr", "sfr_1gyr", "z_mw", "t_mw_gyr"):
        f.create_dataset(f"derived/{key}", (n,), "f8")
    if settings["nebular"]:
        f.create_dataset("nuisance/logU", (n,), "f4")
        f.create_dataset("nuisance/sigma_v", (n,), "f4")
        f.create_dataset("lum_nebular", (n, n_wave), "f4", chunks=(rows, n_wave))
    f.create_dataset("done", (n_chunks,), bool, fillvalue=False)
    f.attrs.update(settings)
    f.attrs["complete"] = False
    f.attrs["sedvae_version"] = __version__
    f.attrs["units"] = "lum: L_sun/A per M_sun formed (rest frame); wave: Angstrom"
    return f


def mock_sfh_prior(path) -> str:
    """The SFH prior a :func:`write_mocks` file was written with (its ``sfh`` attribute,
    ``MockGenerator.sfh_settings``); files written before the attribute existed hold PROVABGS
    histories: ``"provabgs"``."""
    with h5py.File(path, "r") as f:
        return f.attrs.get("sfh", "provabgs")


def write_mocks(
    path: str | os.PathLike,
    n: int,
    seed: int,
    generator=None,
    chunk_size: int = 256,
    simulation: str | os.PathLike | None = None,
    progress: bool = False,
) -> Path:
    """Write a noiseless mock file (layout in the module docstring); returns its path.

    ``generator``: a :class:`~sedvae.simulation.mocks.MockGenerator` (default: its defaults).

    Chunk i uses its own generator from (seed, i), so the file depends on (n, seed, chunk_size)
    only. With ``simulation`` (a :func:`simulate_to_hdf5` file made with ``nebular=true``),
    theta, z, logU, sigma_v and the rest-frame spectra are taken from it (its first n rows)
    instead of being drawn; the aperture is still drawn. Written to ``<path>.partial`` then renamed.
    """
    from tqdm.auto import tqdm

    from .mocks import MockGenerator

    gen = generator if generator is not None else MockGenerator()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    m, nb = gen.instrument.npix, len(gen.photometry.bands)
    n_cloudy = gen.sps.line_wavelengths.shape[0]
    sim = h5py.File(simulation, "r") if simulation is not None else None
    if sim is not None and (sim.attrs.get("nebular") is not True and "lum_nebular" not in sim):
        raise ValueError(f"{simulation} has no nebular emission: make it with nebular=true")
    if sim is not None and getattr(gen, "sfh", None) is not None:
        sim.close()
        raise ValueError("a simulation file fixes theta's histories: it cannot be combined "
                         "with the generator's sfh prior")  # fmt: skip
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
        sfh = getattr(gen, "sfh", None)
        f.attrs["sfh"] = gen.sfh_settings if hasattr(gen, "sfh_settings") else "provabgs"
        if sfh is not None:  # theta is then the NMF projection of the drawn history
            f.create_dataset("sfh_continuity", (n,), "i1")
            f.create_dataset("sfr_log_ratio", (n, sfh.n_bins - 1), "f4")
        n_chunks = -(-n // chunk_size)
        for i in tqdm(range(n_chunks), disable=not progress, desc=path.name):
            sl = chunk_rows(n, chunk_size, i)
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
            if sfh is not None:
                f["sfh_continuity"][sl] = params["sfh_continuity"].numpy().astype(np.int8)
                f["sfr_log_ratio"][sl] = params["sfr_log_ratio"].float().numpy()
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
