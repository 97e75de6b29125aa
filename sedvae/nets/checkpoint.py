"""Self-contained autoencoder files: the resolved ``model.net`` config plus the learned weights.

The SPS, instrument and photometry are rebuilt from the config (their buffers are not stored,
see :class:`~sedvae.nets.PhysicsDecoder`), so a file is a few MB. ``export_autoencoder`` turns
a Lightning checkpoint of ``python train.py experiment=autoencoder`` into such a file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

FORMAT_VERSION = 1


def save_autoencoder(path: str | os.PathLike, net, config, meta: dict | None = None) -> Path:
    """Write ``{"config", "state_dict", "meta"}``; ``config`` builds ``net`` with Hydra."""
    from omegaconf import OmegaConf

    if not isinstance(config, dict):
        config = OmegaConf.to_container(config, resolve=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "config": config,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "meta": dict(meta or {}),
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_autoencoder(path: str | os.PathLike, map_location="cpu", config_overrides=None):
    """Build the autoencoder of a :func:`save_autoencoder` file and load its weights.

    ``config_overrides`` (dict) replaces top-level entries of the stored config, e.g.
    ``{"decoder": {...}}`` to swap the SPS; the weights must still fit.
    """
    import hydra
    from omegaconf import OmegaConf

    payload = torch.load(path, map_location=map_location, weights_only=True)
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported autoencoder file format")
    cfg = OmegaConf.create(payload["config"])
    if config_overrides:
        cfg = OmegaConf.merge(cfg, config_overrides)
    net = hydra.utils.instantiate(cfg)
    net.load_state_dict(payload["state_dict"])
    net.meta = payload.get("meta", {})
    return net.eval()


def export_autoencoder(
    checkpoint: str | os.PathLike, run_config: str | os.PathLike, out: str | os.PathLike, **meta
) -> Path:
    """Lightning checkpoint (+ the run's ``config.yaml``) -> a :func:`save_autoencoder` file."""
    from ..hydra_utils import net_from_lightning_checkpoint

    net, net_cfg = net_from_lightning_checkpoint(checkpoint, run_config)
    return save_autoencoder(out, net, net_cfg, meta)


def main() -> None:
    """``python -m sedvae.nets.checkpoint RUN_DIR OUT``: export a training run's last
    checkpoint (``RUN_DIR/checkpoints/last.ckpt`` with ``RUN_DIR/config.yaml``)."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("run_dir", help="a python train.py experiment=autoencoder run directory")
    p.add_argument("out", help="output file, e.g. data/autoencoder/autoencoder_laptop.pt")
    p.add_argument("--checkpoint", default="checkpoints/last.ckpt", help="relative to run_dir")
    args = p.parse_args()
    run = Path(args.run_dir)
    path = export_autoencoder(run / args.checkpoint, run / "config.yaml", args.out,
                              run_dir=str(run))  # fmt: skip
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
