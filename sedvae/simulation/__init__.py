"""Simulated sets: the generative model of mock observations (``mocks.py``) and the one writer
of simulated sets to HDF5 (``writer.py``: rest-frame sets and observed mock sets). The data
modules of each feature read what this package writes; ``onthefly.py`` draws the same
simulations inside the training loop instead, on the training device, with no files.

Command line: ``python -m sedvae.simulation n=... seed=... [nebular=true] [out=...]``.
"""

from .mocks import (
    MockGenerator,
    desi_instrument,
    desi_noise_model,
    load_desi_example,
    sample_bgs_redshift,
)
from .writer import simulate_to_hdf5, write_mocks

__all__ = [
    "MockGenerator",
    "desi_instrument",
    "desi_noise_model",
    "load_desi_example",
    "sample_bgs_redshift",
    "simulate_to_hdf5",
    "write_mocks",
]
