"""The ground-truth SPS simulator: BC03+MILES SSPs, PROVABGS histories, Charlot & Fall dust."""

from .model import SEDModel
from .provabgs import N_FREE, N_THETA, PARAM_NAMES, THETA, PROVABGSPrior
from .ssp import SSPGrid, load_ssp_grid

__all__ = [
    "SEDModel",
    "PROVABGSPrior",
    "PARAM_NAMES",
    "THETA",
    "N_THETA",
    "N_FREE",
    "SSPGrid",
    "load_ssp_grid",
]
