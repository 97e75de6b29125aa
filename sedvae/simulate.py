"""Simulated training sets: prior draws through the real SPS simulator, written to HDF5.

``python -m sedvae.simulate n=20000 seed=1 out=cache/train.h5`` (config: ``conf/simulate.yaml``)

File layout (all rest frame; per unit formed mass so that logM* is a pure scale):

- ``theta`` (N, 12) float32: PROVABGS parameters (``sedvae.sps.PARAM_NAMES``)
- ``z`` (N,) float32: redshift, uniform in [z_min, z_max] (it sets where the SFH is cut)
- ``wave`` (L,) float64: rest-frame wavelength, Angstrom (the raw BC03 pixels)
- ``lum`` (N, L) float32: dust-attenuated stellar L_lambda, L_sun/A per M_sun formed
- ``derived/<name>`` (N,): ``SEDModel.derived`` (surviving mass etc., for the drawn logM*)
- with ``nebular=true``: ``nuisance/logU``, ``nuisance/sigma_v`` (km/s) and ``lum_nebular``
  (N, L): attenuated nebular lines + continuum per M_sun formed, unbroadened (mocks broaden
  stars and gas by sigma_v with ``SEDModel.broaden``).

Guarantees: chunk i is drawn from its own child of ``SeedSequence(seed)``, so the file is the
same whatever the interruptions; a run writes ``<out>.partial`` and renames it only when every
chunk is done (a killed run never leaves a truncated ``<out>``); rerunning the same command
resumes from the finished chunks. Both cores are used by torch's intra-op threads (the work is
a few large matrix products per chunk).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py
import numpy as np
import torch

from . import __version__
from .sps import THETA

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


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

    from .sps import SEDModel

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
    partial = path.with_name(path.name + ".partial")
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
            sl = slice(i * chunk_size, i * chunk_size + len(chunk["z"]))
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


def main() -> None:
    import hydra

    from .paths import config_dir

    @hydra.main(version_base="1.3", config_path=config_dir(), config_name="simulate")
    def _run(cfg) -> None:
        from .hydra_utils import output_dir

        path = simulate_to_hdf5(
            cfg.out,
            n=cfg.n,
            seed=cfg.seed,
            chunk_size=cfg.chunk_size,
            z_min=cfg.z_min,
            z_max=cfg.z_max,
            nebular=cfg.nebular,
            logu_range=tuple(cfg.logu_range),
            sigma_v_range=tuple(cfg.sigma_v_range),
            progress=cfg.progress,
            overwrite=cfg.overwrite,
            compile=cfg.compile,
        )
        log.info("training set: %s", path)
        if cfg.plot:
            import matplotlib

            matplotlib.use("Agg")
            from .plots import plot_training_examples

            fig, _ = plot_training_examples(path, n=cfg.plot_n)
            figure = output_dir(cfg) / "training_examples.png"
            fig.savefig(figure, dpi=110)
            log.info("figure: %s", figure)

    _run()


if __name__ == "__main__":
    main()
