"""Speculator emulator of the SPS simulator (Alsing et al. 2020), its training and loading.

``load_emulator(path)`` returns a module with ``SEDModel``'s call contract:
``forward(theta (B, 12), z (B,)) -> L_lambda (B, L) L_sun/A`` on a subset of the simulator's
wavelengths (``wave``). The shipped one: ``data/emulator/speculator_bc03_provabgs.ckpt``.
"""

from __future__ import annotations

from .data import SimulationDataModule, SimulationDataset
from .lightning import EmulatorModule
from .speculator import Speculator, SpeculatorActivation


def load_emulator(path, map_location="cpu", trainable: bool = False, check_grid: bool = True):
    """The emulator of a checkpoint (``sedvae.checkpoint``), frozen unless ``trainable``; the
    Hydra target of ``model/sps=emulator``. See :func:`sedvae.checkpoint.load_checkpoint`."""
    from ..checkpoint import load_checkpoint

    net, _ = load_checkpoint(path, "emulator", map_location, trainable=trainable,
                             check_grid=check_grid)  # fmt: skip
    return net


__all__ = [
    "EmulatorModule",
    "SimulationDataModule",
    "SimulationDataset",
    "Speculator",
    "SpeculatorActivation",
    "load_emulator",
]
