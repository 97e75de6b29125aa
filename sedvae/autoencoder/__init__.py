"""The physics-embedded autoencoder: plain ``nn.Module`` nets, their data module and a thin
LightningModule.

``SpectrumEncoder`` (spender-like, rest-frame binned input) -> latents (theta in the prior
support, dispersions, nuisances, free s) -> ``PhysicsDecoder`` (SPS + ``ResidualNet`` on a
``LogGrid``, then the observation model); ``SpectrumAutoencoder`` (``model.py``) owns the loss;
``AutoencoderModule`` (``lightning.py``) only calls it and logs.
"""

from .decoder import PhysicsDecoder
from .encoder import LatentMap, SpectrumEncoder
from .exact import ExactFit, fit_exact
from .grid import LogGrid
from .lightning import AutoencoderModule
from .model import SpectrumAutoencoder
from .residual import ResidualNet

__all__ = [
    "AutoencoderModule",
    "ExactFit",
    "LatentMap",
    "LogGrid",
    "PhysicsDecoder",
    "ResidualNet",
    "SpectrumAutoencoder",
    "SpectrumEncoder",
    "fit_exact",
]
