"""What a catalog run is made of, written beside its shards so a resume cannot mix two runs.

``shards/manifest.json`` records, before the first shard is written: the input files (path,
size, modification time, rows), the source's settings, the checkpoints' SHA-256, the fitter's
settings (samples, seed), the shard size and the sedvae version. A rerun into the same folder
compares its own manifest with the stored one and refuses at once, naming every difference,
instead of merging the old run's galaxies into the new catalog.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..fileio import write_json_atomic
from .shards import CatalogError

MANIFEST = "manifest.json"


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """An input file as the manifest keeps it: absolute path, bytes and mtime (ns)."""
    path = Path(path).resolve()
    st = path.stat()
    return {"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_state(module: Any) -> str:
    """SHA-256 of a network's weights (state_dict in key order), for objects given in memory."""
    if not isinstance(module, torch.nn.Module):
        module = getattr(module, "net", None)
    if not isinstance(module, torch.nn.Module):
        return "unknown"
    digest = hashlib.sha256()
    for key, value in module.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def describe_value(value: Any) -> Any:
    """A reader or fitter argument as JSON: files by :func:`file_record`, arrays and tables by
    their SHA-256, everything else as is (or its repr)."""
    if value is None or isinstance(value, bool | int | float | str):
        if isinstance(value, str) and value != "auto" and Path(value).is_file():
            return file_record(value)
        return value
    if isinstance(value, os.PathLike):
        return file_record(value) if Path(value).is_file() else str(value)
    if isinstance(value, dict):
        return {str(k): describe_value(v) for k, v in value.items()}
    try:  # numbers, arrays, lists and astropy Tables
        data = np.asarray(value)
        if data.dtype.kind in "biufU" and data.size <= 16:
            return data.tolist()
        return {"sha256": hashlib.sha256(repr(data.tolist()).encode()).hexdigest()}
    except Exception:
        return repr(value)


def run_manifest(source, fitter, shard_size: int) -> dict[str, Any]:
    """The manifest of a run of ``fitter`` over ``source``; sources and fitters that know their
    inputs describe them with a ``manifest()`` method."""
    describe_source = getattr(source, "manifest", None)
    describe_fitter = getattr(fitter, "manifest", None)
    return {
        "sedvae_version": __version__,
        "n_galaxies": len(source),
        "shard_size": int(shard_size),
        "source": describe_source() if describe_source else {"type": type(source).__qualname__},
        "fitter": describe_fitter() if describe_fitter else {"type": type(fitter).__qualname__},
    }


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        out[f"{prefix} (count)"] = len(value)
        return out
    return {prefix: value}


def manifest_differences(stored: dict, current: dict) -> list[str]:
    """``key: was X, now Y`` for every entry that differs (dotted keys, lists by index)."""
    a, b = _flatten(stored), _flatten(current)
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, missing), b.get(key, missing)
        was = "absent" if old is missing else json.dumps(old)
        now = "absent" if new is missing else json.dumps(new)
        if was != now:  # as JSON text: NaN equals NaN, as stored
            lines.append(f"{key}: was {was}, now {now}")
    return lines


def check_manifest(shard_dir: str | os.PathLike, manifest: dict, has_shards: bool) -> None:
    """Refuse to resume into ``shard_dir`` unless its stored manifest equals ``manifest``;
    write ``manifest`` when no shard exists yet (the run starts afresh)."""
    path = Path(shard_dir) / MANIFEST
    # through JSON, so that tuples and lists (and ints and floats) compare as stored
    manifest = json.loads(json.dumps(manifest, default=float))
    if has_shards:
        if not path.is_file():
            raise CatalogError(
                f"{Path(shard_dir)} holds shards but no {MANIFEST}: they cannot be checked against "
                "this run's inputs; use another output folder or delete the shards"
            )
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CatalogError(f"{path}: unreadable manifest ({err})") from err
        diff = manifest_differences(stored, manifest)
        if diff:
            raise CatalogError(
                f"{Path(shard_dir)} holds shards of another run; refusing to mix them into this "
                "catalog. What differs:\n  " + "\n  ".join(diff[:20])
                + ("\n  ..." if len(diff) > 20 else "")
                + "\nUse another output folder, or delete the shards to start afresh."
            )
    try:
        if has_shards:  # a read-only folder fails now, not after the first shard's inference
            tempfile.TemporaryFile(dir=shard_dir).close()
        else:
            write_json_atomic(path, manifest)
    except OSError as err:
        raise CatalogError(f"{Path(shard_dir)}: cannot write the run's files ({err})") from err
