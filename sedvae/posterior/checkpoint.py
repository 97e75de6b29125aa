"""Self-contained posterior files: the resolved ``model.net`` config plus the learned weights
(the layout of ``sedvae.nets.checkpoint``, with a ``kind`` marker), and their loader.

``load_posterior`` refuses, with a message that says what to do, a file of another kind or
format version, and weights that do not fit the network its config builds (e.g. a config
edited after training, or another instrument's pixel grid).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
import torch

FORMAT_VERSION = 1
KIND = "sedvae-posterior"


class PosteriorCheckpointError(ValueError):
    """A posterior file cannot be used with this version of sedvae or with its own config."""


def save_posterior(path: str | os.PathLike, net, config, meta: dict | None = None) -> Path:
    """Write ``{"kind", "format_version", "config", "state_dict", "meta"}`` atomically;
    ``config`` (dict or DictConfig) builds ``net`` with ``hydra.utils.instantiate``."""
    from omegaconf import OmegaConf

    import sedvae

    if not isinstance(config, dict):
        config = OmegaConf.to_container(config, resolve=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "sedvae_version": sedvae.__version__,
        "config": config,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "meta": dict(meta or {}),
    }
    if hasattr(net.embedding, "input_fingerprint"):
        payload["input_fingerprint"] = net.embedding.input_fingerprint()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_posterior_net(path: str | os.PathLike, map_location="cpu"):
    """Build the :class:`~sedvae.posterior.NeuralPosterior` of a :func:`save_posterior` file and
    load its weights (eval mode); ``net.meta`` holds the file's metadata."""
    import hydra
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"posterior file not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for non-checkpoint files
        raise PosteriorCheckpointError(f"{path} is not a readable torch file: {err}") from err
    if not isinstance(payload, dict) or payload.get("kind") != KIND:
        hint = ""
        if isinstance(payload, dict) and "pytorch-lightning_version" in payload:
            hint = (
                " (a Lightning checkpoint: convert it with sedvae.posterior.export_posterior"
                "(ckpt, run_dir / 'config.yaml', out))"
            )
        raise PosteriorCheckpointError(f"{path} is not a sedvae posterior file{hint}")
    if payload.get("format_version") != FORMAT_VERSION:
        raise PosteriorCheckpointError(
            f"{path} has posterior format version {payload.get('format_version')}; this sedvae "
            f"reads version {FORMAT_VERSION}: retrain, or use sedvae "
            f"{payload.get('sedvae_version', '?')} which wrote it"
        )
    cfg = OmegaConf.create(payload["config"])
    try:
        net = hydra.utils.instantiate(cfg)
    except Exception as err:
        raise PosteriorCheckpointError(
            f"{path}: its config no longer builds a network with this sedvae: {err}"
        ) from err
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise PosteriorCheckpointError(
            f"{path}: the stored weights do not match the network its config builds "
            f"(config/version mismatch):\n{err}"
        ) from err
    stored = payload.get("input_fingerprint")
    if stored is not None:
        now = net.embedding.input_fingerprint()
        if not all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(now, stored, strict=True)):
            raise PosteriorCheckpointError(
                f"{path}: this sedvae prepares spectra (rest-frame binning, normalisation) "
                "differently from the version that trained the posterior, so its inputs would "
                f"be out of distribution; fingerprint {now} vs stored {stored}. Retrain, or "
                f"use sedvae {payload.get('sedvae_version', '?')}"
            )
    net.meta = payload.get("meta", {})
    return net.eval()


def export_posterior(
    checkpoint: str | os.PathLike, run_config: str | os.PathLike, out: str | os.PathLike, **meta
) -> Path:
    """Lightning checkpoint (+ the run's ``config.yaml``) -> a :func:`save_posterior` file."""
    from ..hydra_utils import net_from_lightning_checkpoint

    net, net_cfg = net_from_lightning_checkpoint(checkpoint, run_config)
    # the file name only: a shipped file must not carry the path of the machine it was made on
    meta.setdefault("lightning_checkpoint", Path(checkpoint).name)
    return save_posterior(out, net, net_cfg, meta)


class ExportPosterior(pl.Callback):
    """At the end of ``fit``, write the best (else the last) weights as a posterior file.

    Parameters
    ----------
    out : str
        Destination, e.g. ``${paths.output_dir}/posterior.pt``.
    run_config : str
        The run's resolved ``config.yaml`` (``train.py`` writes it first thing).
    """

    def __init__(self, out: str, run_config: str) -> None:
        self.out = out
        self.run_config = run_config

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run or not trainer.is_global_zero:
            return
        ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
        # after fit, current_epoch counts the completed epochs (a 60-epoch run ends at 60)
        meta = {"epochs": trainer.current_epoch, "global_step": trainer.global_step}
        if ckpt and Path(ckpt).exists():
            export_posterior(ckpt, self.run_config, self.out, **meta)
        else:
            from omegaconf import OmegaConf

            cfg = OmegaConf.load(self.run_config)
            save_posterior(self.out, pl_module.net, cfg.model.net, meta)


__all__ = [
    "ExportPosterior",
    "PosteriorCheckpointError",
    "export_posterior",
    "load_posterior_net",
    "save_posterior",
]
