"""Saving and loading Speculator emulators, with the checks that keep them honest.

A checkpoint is either a compact file written by :func:`save_emulator` (what ships in
``data/emulator/``) or a Lightning checkpoint of ``EmulatorModule`` (``train.py
experiment=emulator``). Both hold the weights, the PCA bases and every normalisation in a
``state_dict``, and a ``sedvae_emulator`` entry describing what the emulator was trained on:
format version, constructor arguments and a fingerprint of the physics (parameter names and
prior ranges, SFH/metallicity bases and lookback bins, SSP grid). :func:`load_emulator` refuses
a checkpoint whose fingerprint differs from this installation's simulator.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from .speculator import INPUT_NAMES, Speculator

log = logging.getLogger(__name__)

FORMAT = "sedvae-speculator"
FORMAT_VERSION = 1
META_KEY = "sedvae_emulator"


class EmulatorCheckpointError(ValueError):
    """A checkpoint that is not a sedvae emulator or does not match this sedvae's simulator."""


def physics_fingerprint() -> dict[str, Any]:
    """What an emulator must agree on with the simulator it stands in for.

    ``param_names``/``prior``: theta's meaning and support; ``histories``: a hash of the NMF
    SFH and metallicity bases, the lookback bins and the birth-cloud age; ``ssp_grid``: the
    SSP file; ``inputs``: the emulator's input features.
    """
    from ..sps.provabgs import BIN_EDGES_GYR, PARAM_NAMES, T_BC_GYR, PROVABGSPrior, load_nmf_bases
    from ..sps.ssp import GRID_FILE

    nmf = load_nmf_bases()
    h = hashlib.sha256()
    for a in (nmf.t_gyr, nmf.sfh, nmf.zh, BIN_EDGES_GYR, [T_BC_GYR]):
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    boxes = [
        [PARAM_NAMES[i], float(lo), float(hi), bool(lg)] for i, lo, hi, lg in PROVABGSPrior._boxes
    ]
    return {
        "param_names": list(PARAM_NAMES),
        "prior": boxes,
        "histories": h.hexdigest()[:16],
        "ssp_grid": GRID_FILE,
        "inputs": list(INPUT_NAMES),
    }


def simulator_wave() -> np.ndarray:
    """The simulator's full rest-frame wavelength grid (Angstrom, vacuum), read cheaply.

    Reads only the wavelength table of the SSP file and applies the simulator's own
    air-to-vacuum conversion: the same values as ``SEDModel().wave`` without loading the
    164 MB grid.
    """
    from ..sps.ssp import grid_wavelengths

    return grid_wavelengths()


def metadata(net: Speculator, **extra: Any) -> dict[str, Any]:
    """The ``sedvae_emulator`` entry of a checkpoint (``extra``: e.g. training-set provenance)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sedvae_version": __version__,
        "config": dict(net.config),
        "physics": physics_fingerprint(),
        **extra,
    }


def save_emulator(net: Speculator, path: str | os.PathLike, **extra: Any) -> Path:
    """Write a compact checkpoint (float32 weights, float64 wavelengths; no optimizer state)."""
    if not bool(net.fitted):
        raise ValueError("refusing to save an emulator without a PCA basis (fit_pca first)")
    state = {
        k: (v.float() if v.is_floating_point() and k != "wave" else v).detach().cpu().clone()
        for k, v in net.state_dict().items()
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save({META_KEY: metadata(net, **extra), "state_dict": state}, tmp)
    os.replace(tmp, path)
    return path


def _check(meta: dict, path: Path) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise EmulatorCheckpointError(f"{path} is not a sedvae Speculator checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise EmulatorCheckpointError(
            f"{path} has emulator format version {meta.get('format_version')}, this sedvae "
            f"reads version {FORMAT_VERSION}: retrain it (python train.py experiment=emulator)"
        )
    ours = physics_fingerprint()
    theirs = meta.get("physics", {})
    for key, value in ours.items():
        if theirs.get(key) != value:
            raise EmulatorCheckpointError(
                f"{path} was trained for another simulator: its {key!r} is {theirs.get(key)!r}, "
                f"this sedvae has {value!r}. Retrain it (python train.py experiment=emulator) "
                "or use the direct simulator (model/sps=direct)."
            )


def load_emulator(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    trainable: bool = False,
    check_grid: bool = True,
) -> Speculator:
    """Load a Speculator emulator, ready to stand in for ``SEDModel``.

    Parameters
    ----------
    path : a :func:`save_emulator` file or a Lightning checkpoint of ``EmulatorModule``
    map_location : device to load onto (``.to(device)`` moves it later as well)
    trainable : keep the weights trainable; by default they are frozen (``requires_grad``
        False, eval mode) so that a decoder's optimizer leaves them alone; gradients with
        respect to theta still flow.
    check_grid : verify that ``wave`` is a subset of this installation's simulator grid.

    Raises
    ------
    EmulatorCheckpointError (a ValueError)
        The file is not an emulator checkpoint, has another format version, or was trained
        for other physics (parameters, prior, histories, SSP grid or wavelengths).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no emulator checkpoint at {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or META_KEY not in ckpt:
        raise EmulatorCheckpointError(f"{path} is not a sedvae Speculator checkpoint")
    meta = ckpt[META_KEY]
    _check(meta, path)
    state = ckpt["state_dict"]
    if any(k.startswith("net.") for k in state):  # a Lightning checkpoint of EmulatorModule
        state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    wave = state["wave"].to(torch.float64)
    if check_grid:
        grid = simulator_wave()
        idx = np.clip(np.searchsorted(grid, wave.cpu().numpy()), 0, len(grid) - 1)
        if len(grid) == 0 or np.abs(grid[idx] - wave.cpu().numpy()).max() > 1e-6:
            raise EmulatorCheckpointError(
                f"{path}: its wavelengths are not pixels of this simulator's SSP grid (the grid "
                "or its air-to-vacuum conversion changed); retrain the emulator"
            )
    net = Speculator(wave=wave, **meta["config"])
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise EmulatorCheckpointError(f"{path}: weights do not match its config: {err}") from err
    net.to(map_location)
    if not trainable:
        net.requires_grad_(False).eval()
    return net


__all__ = [
    "EmulatorCheckpointError",
    "FORMAT_VERSION",
    "load_emulator",
    "metadata",
    "physics_fingerprint",
    "save_emulator",
    "simulator_wave",
]
