"""Export a trained emulator: ``python -m sedvae.emulator export CHECKPOINT OUT``.

Reads a Lightning checkpoint of ``train.py experiment=emulator`` (e.g. the best one,
``outputs/emulator/<run>/checkpoints/epochNNN.ckpt``), checks it like ``load_emulator`` and
writes the compact file that ships in ``data/emulator/`` (float32 weights, PCA bases and
normalisations, metadata; no optimizer state).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .io import META_KEY, load_emulator, save_emulator


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sedvae.emulator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write a compact, shippable emulator file")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("out", type=Path)
    args = parser.parse_args(argv)

    net = load_emulator(args.checkpoint)
    meta = torch.load(args.checkpoint, map_location="cpu", weights_only=True)[META_KEY]
    keep = ("training_set", "training_seed", "n_train")
    extra = {k: meta[k] for k in keep if k in meta}
    extra["exported_from"] = args.checkpoint.name
    path = save_emulator(net, args.out, **extra)
    print(f"{path}: {path.stat().st_size / 1e6:.1f} MB, {net.n_wave} pixels, z <= "
          f"{float(net.z_max):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
