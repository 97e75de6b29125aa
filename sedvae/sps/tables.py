"""Portable simulator tables: what ``SEDModel`` and the mock pipeline need, without bagpipes,
astropy or speclite, in one compressed ``.npz`` file (``python -m sedvae.sps export-tables``).

The bagpipes grids (164 MB) cannot travel to a machine without network access; this file can.
It holds, for a rest-frame wavelength range (default 2000-60000 A, the mocks' and the
emulator's):

- ``ssp/``: the grid's wavelengths (vacuum and air), raw ages, metallicities and live-mass
  fractions (all float64, small); the raw SSP spectra (float32) of every age whose cell of
  age overlaps [10 Myr, 13.8 Gyr] or that the burst interpolates between (t_burst in the
  prior range): from these ``SEDModel`` rebuilds the old segments' time averages, the
  cut-bin partial integrals and the burst look-up exactly as from the grid; and the young
  segments' time averages (< 10 Myr, float32), so the 69 raw ages below 10 Myr stay behind;
- ``nebular/``: the Cloudy line and continuum tables of the young segments (float32), line
  wavelengths (vacuum) and names, the logU grid;
- ``cosmology/``: Planck18 d_L(z) and age(z) on ``sedvae.physics.cosmology``'s grid (float64:
  astropy's own numbers);
- ``obs/``: the bundled DESI coadd's arm wavelengths, resolution diagonals and ivar shape
  (galaxy 0: what ``desi_instrument()`` and ``desi_noise_model()`` use), and the Legacy
  Surveys filter curves (what ``Photometry`` reads from speclite).

float32 arrays are stored as their four byte planes (the exponent bytes compress well; the
values are exactly the float32 numbers). A model built from the file equals one built from
the grid to float32 round-off (tests/test_sps_tables.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .nebular import NebularGrid
from .provabgs import BIN_EDGES_GYR, T_BC_GYR, TBURST_RANGE
from .ssp import SSPGrid

FORMAT = "sedvae-sps-tables"
FORMAT_VERSION = 1
ENV_VAR = "SEDVAE_SPS_TABLES"  # where SEDModel looks for the file when bagpipes is absent
SIZE_BUDGET_MIB = 40.0  # what may travel to a device with the tree (64 MiB in all)
DEFAULT_RANGE = (2000.0, 60000.0)  # Angstrom: the mock simulator's and the emulator's range


def _shuffle(a: np.ndarray) -> np.ndarray:
    """float32 array -> (4, n) uint8 byte planes (lossless; compresses ~35 % better)."""
    flat = np.ascontiguousarray(a, dtype="<f4").reshape(-1)
    return np.ascontiguousarray(flat.view(np.uint8).reshape(-1, 4).T)


def _unshuffle(planes: np.ndarray, shape) -> np.ndarray:
    return np.ascontiguousarray(planes.T).view("<f4").reshape(shape)


def stored_ages(ages_yr: np.ndarray, cell_edges_yr: np.ndarray) -> np.ndarray:
    """Indices of the raw ages whose spectra the file keeps (module docstring): cells that
    overlap [T_BC, last bin edge], and the ages bracketing every burst age in the prior."""
    lo, hi = T_BC_GYR * 1e9, BIN_EDGES_GYR[-1] * 1e9
    overlap = (cell_edges_yr[1:] > lo) & (cell_edges_yr[:-1] < hi)
    # the burst interpolates in log age between the raw ages (age 0 excluded) around t_burst
    log_age = np.log10(ages_yr[1:])
    keep = overlap.copy()
    for t in (TBURST_RANGE[0] * 1e9, TBURST_RANGE[1] * 1e9):
        i = int(np.clip(np.searchsorted(log_age, np.log10(t), side="right") - 1, 0,
                        len(log_age) - 2))  # fmt: skip
        keep[1 + i] = keep[2 + i] = True
    first, last = np.flatnonzero(keep)[[0, -1]]
    return np.arange(first, last + 1)  # contiguous: every age the burst can reach


@dataclass(frozen=True)
class SPSTables:
    """The contents of an exported table file (see the module docstring)."""

    path: Path
    meta: dict
    arrays: dict

    @property
    def wave_range(self) -> tuple[float, float]:
        return tuple(self.meta["wave_range"])

    def _cut(self, wave_min: float, wave_max: float) -> np.ndarray:
        lo, hi = self.wave_range
        if wave_min < lo or wave_max > hi:
            raise ValueError(
                f"{self.path} holds {lo:g}-{hi:g} A; asked for {wave_min:g}-{wave_max:g} A: "
                "export the tables with a wider range (python -m sedvae.sps export-tables)"
            )
        air = self.arrays["ssp/wave_air"]
        return (air >= wave_min) & (air <= wave_max)  # the grid's own selection (air)

    def ssp_grid(self, wave_min: float, wave_max: float) -> SSPGrid:
        """An ``SSPGrid`` whose spectra are zero at the raw ages the file leaves out (below
        10 Myr: ``SEDModel`` takes those segments from :meth:`young_segments` instead)."""
        keep = self._cut(wave_min, wave_max)
        a = self.arrays
        ages = a["ssp/ages_yr"]
        lum = np.zeros((len(a["ssp/zmet"]), len(ages), int(keep.sum())))
        lum[:, a["ssp/age_index"]] = a["ssp/lum"][..., keep]
        return SSPGrid(
            wave=a["ssp/wave"][keep],
            wave_air=a["ssp/wave_air"][keep],
            ages_yr=ages,
            zmet=a["ssp/zmet"],
            lum=lum,
            live_frac=a["ssp/live_frac"],
        )

    def young_segments(self, wave_min: float, wave_max: float) -> tuple[np.ndarray, np.ndarray]:
        """Edges (yr) and time-averaged spectra (S_young, Z, L) of the young segments."""
        keep = self._cut(wave_min, wave_max)
        return self.arrays["ssp/young_edges_yr"], self.arrays["ssp/young_lum"][..., keep]

    def nebular_grid(self, wave_min: float, wave_max: float) -> NebularGrid:
        """The nebular tables of the young ages (``SEDModel`` uses no others)."""
        if "nebular/cont" not in self.arrays:
            raise ValueError(f"{self.path} was exported without nebular tables")
        keep = self._cut(wave_min, wave_max)
        a = self.arrays
        return NebularGrid(
            line_wave=a["nebular/line_wave"],
            line_names=a["nebular/line_names"],
            ages_yr=a["nebular/ages_yr"],
            logu=a["nebular/logu"],
            line_lum=a["nebular/line_lum"].astype(np.float64),
            cont=a["nebular/cont"][..., keep].astype(np.float64),
        )

    def cosmology(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(z, d_L in Mpc, age in Gyr): ``sedvae.physics.cosmology``'s table."""
        a = self.arrays
        return a["cosmology/z"], a["cosmology/d_l_mpc"], a["cosmology/age_gyr"]

    def desi_example(self) -> dict:
        """Arm wavelengths, resolution diagonals (per arm) and the ivar shape and arm index
        per pixel of the bundled DESI coadd's galaxy 0."""
        a = self.arrays
        names = list(self.meta["desi_arms"])
        return {
            "arm_names": names,
            "waves": [a[f"obs/desi_wave_{n}"] for n in names],
            "resolution": [a[f"obs/desi_resolution_{n}"] for n in names],
            "ivar": a["obs/desi_ivar"],
            "arm": a["obs/desi_arm"],
        }

    def filter_curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Filter name -> (wavelength in A, response), as speclite tabulates them."""
        return {
            name: (self.arrays[f"obs/filter_wave/{name}"], self.arrays[f"obs/filter_resp/{name}"])
            for name in self.meta["filters"]
        }


def load_tables(path: str | os.PathLike) -> SPSTables:
    """Read an exported table file; ValueError if it is not one or has another version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SPS table file not found: {path}")
    with np.load(path, allow_pickle=False) as f:
        if "meta" not in f.files:
            raise ValueError(f"{path} is not a sedvae SPS table file (no meta)")
        meta = json.loads(str(f["meta"]))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a sedvae SPS table file")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has table format {meta.get('format_version')}; this sedvae reads "
                f"{FORMAT_VERSION}: export it again"
            )
        shuffled = meta["shuffled"]
        arrays = {}
        for key in f.files:
            if key == "meta":
                continue
            value = f[key]
            arrays[key] = _unshuffle(value, shuffled[key]) if key in shuffled else value
    return SPSTables(path=path, meta=meta, arrays=arrays)


def find_tables(tables=None) -> SPSTables | None:
    """``tables`` (a path or SPSTables) if given, else the file named by ``$SEDVAE_SPS_TABLES``
    when bagpipes is not installed; None when the grid should be read from bagpipes."""
    if isinstance(tables, SPSTables):
        return tables
    if tables is not None:
        return load_tables(tables)
    import importlib.util

    if importlib.util.find_spec("bagpipes") is not None:
        return None
    env = os.environ.get(ENV_VAR)
    if not env:
        raise ModuleNotFoundError(
            "bagpipes (which ships the BC03+MILES grids) is not installed: install it, or give "
            f"an exported table file (SEDModel(tables=...) or ${ENV_VAR}; make one with "
            "`python -m sedvae.sps export-tables out.npz` where bagpipes is installed)"
        )
    return load_tables(env)


def export_tables(
    path: str | os.PathLike,
    wave_min: float = DEFAULT_RANGE[0],
    wave_max: float = DEFAULT_RANGE[1],
    nebular: bool = True,
    observation: tuple[dict, dict] | None = None,
) -> Path:
    """Write the table file (module docstring) from the installed bagpipes grids and astropy's
    Planck18, plus ``observation`` (arrays and metadata of the instrument and filters the
    simulator observes through: ``sedvae.simulation.onthefly.observation_arrays()``); returns
    its path."""
    from ..fileio import atomic_path
    from ..physics.cosmology import cosmology_tables
    from .model import SEDModel
    from .nebular import load_nebular_grid
    from .ssp import load_ssp_grid

    grid = load_ssp_grid(wave_min, wave_max)
    idx = stored_ages(grid.ages_yr, grid.cell_edges_yr)
    seg_edges = SEDModel.segment_edges_gyr() * 1e9
    young_edges = seg_edges[: SEDModel.n_young_segments() + 1]
    young_lum, _ = grid.time_average(young_edges)
    z, d_l, age = cosmology_tables()
    arrays = {
        "ssp/wave": grid.wave,
        "ssp/wave_air": grid.wave_air,
        "ssp/ages_yr": grid.ages_yr,
        "ssp/zmet": grid.zmet,
        "ssp/live_frac": grid.live_frac,
        "ssp/age_index": idx,
        "ssp/lum": grid.lum[:, idx].astype(np.float32),
        "ssp/young_edges_yr": young_edges,
        "ssp/young_lum": young_lum.astype(np.float32),
        "cosmology/z": z,
        "cosmology/d_l_mpc": d_l,
        "cosmology/age_gyr": age,
    }
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "wave_range": [float(wave_min), float(wave_max)],
        "source": "bagpipes BC03+MILES and Cloudy grids; astropy Planck18",
    }
    if nebular:
        neb = load_nebular_grid(wave_min, wave_max)
        n_young = len(young_edges) - 1
        if neb.cont.shape[-1] != len(grid.wave):
            raise ValueError("nebular continuum and SSP grids have different wavelengths")
        arrays.update({
            "nebular/line_wave": neb.line_wave,
            "nebular/line_names": np.asarray(neb.line_names, dtype=str),
            "nebular/ages_yr": neb.ages_yr[:n_young],
            "nebular/logu": neb.logu,
            "nebular/line_lum": neb.line_lum[:, :, :n_young].astype(np.float32),
            "nebular/cont": neb.cont[:, :, :n_young].astype(np.float32),
        })  # fmt: skip
    if observation is not None:
        obs, obs_meta = observation
        arrays.update(obs)
        meta.update(obs_meta)
    shuffled = {}
    payload = {}
    for key, value in arrays.items():
        if isinstance(value, np.ndarray) and value.dtype == np.float32 and value.size > 4096:
            shuffled[key] = list(value.shape)
            payload[key] = _shuffle(value)
        else:
            payload[key] = np.asarray(value)
    meta["shuffled"] = shuffled
    payload["meta"] = np.asarray(json.dumps(meta))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **payload)
    return path


__all__ = [
    "ENV_VAR",
    "FORMAT_VERSION",
    "SIZE_BUDGET_MIB",
    "SPSTables",
    "export_tables",
    "find_tables",
    "load_tables",
    "stored_ages",
]
