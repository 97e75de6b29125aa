"""SBI head: amortised neural posterior estimation of the PROVABGS parameters.

``SpectrumEmbedding`` (summary of spectrum, ivar, mask, z, photometry) -> ``PosteriorFlow``
(zuko coupling flow over the unconstrained R^11) = ``NeuralPosterior`` (owns the NPE loss);
``Posterior`` is the user API (samples in physical units, flags, derived properties, history
bands); ``diagnostics`` has TARP, SBC and recovery statistics; ``summaries`` computes the
frozen summary once, to train the flow alone; ``ood`` scores a galaxy's summary against the
training summaries (``sedvae.posterior.ood.OODScore``, ``Flag.OOD``). Studies of the head
(exact posteriors, Fisher information, fits to the frozen summary) live in the top-level
``studies/`` folder.
"""

from .api import FATAL, Posterior, PosteriorFlag, PosteriorSamples, load_posterior
from .embedding import AutoencoderEmbedding, ConvTrunk, MLPTrunk, SpectrumEmbedding
from .flow import PosteriorFlow
from .model import NeuralPosterior

__all__ = [
    "FATAL",
    "AutoencoderEmbedding",
    "ConvTrunk",
    "MLPTrunk",
    "NeuralPosterior",
    "Posterior",
    "PosteriorFlag",
    "PosteriorFlow",
    "PosteriorSamples",
    "SpectrumEmbedding",
    "load_posterior",
]
