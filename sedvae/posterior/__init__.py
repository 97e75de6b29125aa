"""SBI head: amortised neural posterior estimation of the PROVABGS parameters.

``SpectrumEmbedding`` (summary of spectrum, ivar, mask, z, photometry) -> ``PosteriorFlow``
(zuko coupling flow over the unconstrained R^11) = ``NeuralPosterior`` (owns the NPE loss);
``Posterior`` is the user API (samples in physical units, flags, derived properties, history
bands); ``diagnostics`` has TARP, SBC and recovery statistics; ``exact`` samples the exact
posterior of a mock under the simulator itself (MCMC), to measure how far the flow is from it;
``summaries`` fits flows and estimators to the frozen summary, to tell the summary's limits
from the flow's.
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
