"""Shared fixtures: every test is seeded; the SPS model is built once per test run."""

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


DISTRIBUTED_TIMEOUT_S = 300  # a two-process CPU run takes ~20 s; a lost rendezvous never ends


def loopback_unavailable() -> str | None:
    """Why a process group cannot rendezvous on 127.0.0.1 here, or None when it can: bind a
    port and connect to it (a loopback interface that is down binds but never connects)."""
    import socket

    try:
        with socket.socket() as server, socket.socket() as client:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            client.settimeout(5)
            client.connect(server.getsockname())
    except OSError as err:
        return f"no connection to a port on 127.0.0.1 ({err}): the process group cannot start"
    return None


def pytest_collection_modifyitems(config, items):
    """``distributed`` tests get a tight timeout, and are skipped without loopback networking."""
    marked = [item for item in items if item.get_closest_marker("distributed")]
    reason = loopback_unavailable() if marked else None
    for item in marked:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DISTRIBUTED_TIMEOUT_S))
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
@pytest.fixture(scope="module")
def one_thread():
    """One thread: the test machine's cores are shared (and tiny ops gain nothing)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
