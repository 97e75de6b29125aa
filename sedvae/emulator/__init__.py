"""Speculator emulator of the SPS simulator (Alsing et al. 2020), its training and loading.

``load_emulator(path)`` returns a module with ``SEDModel``'s call contract:
``forward(theta (B, 12), z (B,)) -> L_lambda (B, L) L_sun/A`` on a subset of the simulator's
wavelengths (``wave``). The shipped one: ``data/emulator/speculator_bc03_provabgs.ckpt``.
"""

from .data import SimulationDataModule, SimulationDataset
from .io import EmulatorCheckpointError, load_emulator, save_emulator
from .lightning import EmulatorModule
from .speculator import Speculator, SpeculatorActivation

__all__ = [
    "EmulatorCheckpointError",
    "EmulatorModule",
    "SimulationDataModule",
    "SimulationDataset",
    "Speculator",
    "SpeculatorActivation",
    "load_emulator",
    "save_emulator",
]
