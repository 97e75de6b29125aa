"""Thin LightningModules: optimisation and logging around the nets' own ``loss``."""

from .autoencoder import AutoencoderModule

__all__ = ["AutoencoderModule"]
