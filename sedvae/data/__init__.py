"""Data modules: mock DESI BGS observations for training and benchmarking."""

from .mocks import (
    MockDataModule,
    MockDataset,
    MockGenerator,
    OnTheFlyMocks,
    desi_instrument,
    desi_noise_model,
    load_desi_example,
    sample_bgs_redshift,
    write_mocks,
)

__all__ = [
    "MockDataModule",
    "MockDataset",
    "MockGenerator",
    "OnTheFlyMocks",
    "desi_instrument",
    "desi_noise_model",
    "load_desi_example",
    "sample_bgs_redshift",
    "write_mocks",
]
