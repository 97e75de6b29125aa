"""Observation model: cosmology, redshifting, resampling, line-spread functions, photometry.

rest-frame L_lambda --redshift_spectrum--> f_lambda --instrument (resample, LSF)--> pixels
                                                    \\--Photometry--> nanomaggies
pixels --SmoothCalibration (optional nuisance)--> model; mocks: --SpectralNoiseModel--> data
"""

from sedvae.physics.calibration import SmoothCalibration, milky_way_transmission
from sedvae.physics.instruments import DESIInstrument, GenericInstrument, SDSSInstrument
from sedvae.physics.lsf import (
    GaussianLSF,
    ResolutionMatrix,
    apply_resolution,
    gaussian_resolution_diagonals,
)
from sedvae.physics.noise import SpectralNoiseModel
from sedvae.physics.photometry import LS_NORTH, LS_SOUTH, Photometry
from sedvae.physics.redshift import redshift_spectrum, redshift_wavelength
from sedvae.physics.resample import integrate_bins, pixel_edges, resample

__all__ = [
    "DESIInstrument",
    "GaussianLSF",
    "GenericInstrument",
    "LS_NORTH",
    "LS_SOUTH",
    "Photometry",
    "ResolutionMatrix",
    "SDSSInstrument",
    "SmoothCalibration",
    "SpectralNoiseModel",
    "apply_resolution",
    "gaussian_resolution_diagonals",
    "integrate_bins",
    "milky_way_transmission",
    "pixel_edges",
    "redshift_spectrum",
    "redshift_wavelength",
    "resample",
]
