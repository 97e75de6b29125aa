"""Wall-clock seconds per stage of a catalog run: off by default, and free when off.

The catalog code wraps its stages in ``with stage("read"): ...``; while :data:`TIMER` is
disabled (the default) ``stage`` returns one shared no-op context manager, so an ordinary run
pays a function call per shard and stage. A benchmark turns it on, runs, and reads the totals::

    from sedvae.timing import TIMER
    TIMER.enable(); TIMER.reset()
    run_catalog(...)
    TIMER.seconds  # {"read": 1.2, "summary": 0.8, ...}

Stages are counted in the process (and thread) that runs them and summed over threads; a
stage inside another is counted in both. Under DDP each process has its own totals.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

STAGES = (
    "read",  # files -> model-ready batches (FITS access, validation, tensors)
    "clean",  # the posterior's input checks and masking
    "summary",  # the summary network (embedding) of the spectra and photometry
    "flow_sampling",  # the flow's inverse pass and the map to physical parameters
    "derived",  # derived properties of every posterior sample
    "quantiles",  # percentiles (and ranks) of every catalogued quantity
    "reconstruction",  # the autoencoder's reconstruction and reduced chi^2
    "write",  # shard files, their merge and catalog.fits
)


class StageTimer:
    """Sums of wall-clock seconds and call counts per stage name (thread-safe)."""

    def __init__(self) -> None:
        self.enabled = False
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def enable(self, on: bool = True) -> None:
        self.enabled = bool(on)

    def reset(self) -> None:
        with self._lock:
            self.seconds.clear()
            self.calls.clear()

    def add(self, name: str, seconds: float, calls: int = 1) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + float(seconds)
            self.calls[name] = self.calls.get(name, 0) + int(calls)

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def stage(self, name: str) -> contextlib.AbstractContextManager:
        """A context manager timing its block as ``name`` (a shared no-op when disabled)."""
        return self._timed(name) if self.enabled else _NULL


_NULL = contextlib.nullcontext()
TIMER = StageTimer()


def stage(name: str) -> contextlib.AbstractContextManager:
    """``with stage("read"): ...`` times the block in :data:`TIMER` when it is enabled."""
    return TIMER._timed(name) if TIMER.enabled else _NULL
