"""Helpers shared by the study scripts (a module, not a script): the observation keys of a
batch, the quantities and sSFR bins the studies report, and their per-galaxy results files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

OBS_KEYS = ("flux", "ivar", "mask", "z", "photometry", "photometry_ivar")  # what a fit sees
QUANTITIES = ("logmstar", "logmstar_surv", "log_zmw")
SSFR_BINS = (("lt-11", -99, -11), ("-11_-9", -11, -9), ("gt-9", -9, 99))  # log sSFR [/yr]


def rms(a: np.ndarray, axis=None):
    """Root mean square (over ``axis``; all elements by default)."""
    return np.sqrt((a**2).mean(axis))


def read_records(path: Path) -> list[dict]:
    """Galaxies already in a results file (a torn last line, from a killed run, is
    ignored: that galaxy is redone)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "index" in record:
            out.append(record)
    return out
