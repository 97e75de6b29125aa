"""Plain ``nn.Module``s of the physics-embedded autoencoder (no Lightning inside).

``SpectrumEncoder`` (spender-like, rest-frame binned input) -> latents (theta in the prior
support, dispersions, nuisances, free s) -> ``PhysicsDecoder`` (SPS + ``ResidualNet`` on a
``LogGrid``, then the observation model); ``SpectrumAutoencoder`` owns the loss.
"""

from .autoencoder import SpectrumAutoencoder, count_parameters
from .decoder import PhysicsDecoder
from .encoder import LatentMap, RestFrameBinner, SpectrumEncoder
from .grid import LogGrid
from .lines import BENCH_LINES, EMISSION_LINES
from .residual import ResidualNet

__all__ = [
    "BENCH_LINES",
    "EMISSION_LINES",
    "LatentMap",
    "LogGrid",
    "PhysicsDecoder",
    "ResidualNet",
    "RestFrameBinner",
    "SpectrumAutoencoder",
    "SpectrumEncoder",
    "count_parameters",
]
