"""Shared fixtures: every test is seeded; the SPS model is built once per session."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

# helper modules whose asserts should report like a test's
pytest.register_assert_rewrite("posterior_helpers")

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def sed_model():
    from sedvae.sps import SEDModel

    return SEDModel()


@pytest.fixture(scope="session")
def sed_model64():
    from sedvae.sps import SEDModel

    return SEDModel(dtype=torch.float64)


@pytest.fixture(scope="module")
def one_thread():
    """One thread: the test machine's cores are shared (and tiny ops gain nothing)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
