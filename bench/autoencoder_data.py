"""Fine-tuning the shipped autoencoder on "real" spectra: reduced chi^2 before and after, on
spectra it was not trained on.

    python bench/autoencoder_data.py [--real warped|desi] [--n-train 256] [--n-held 128]
                                     [--epochs 15] [--warp 0.03] [--refine-steps 50]

sedvae ships one real DESI spectrum, so held-out real spectra cannot be had. Stand-in
(``--real warped``, the default): DESI coadd files of mocks (the training simulator, other
seeds) at ``--snr-scale`` times the training mocks' S/N (bright galaxies, where calibration
matters), with the calibration errors real coadds have and the mocks lack, per galaxy a smooth
warp 1 + sum_{k=1..3} c_k P_k(x) over the observed range and a throughput offset per arm, all
coefficients ~ N(0, ``--warp``^2) (flux times the warp, ivar divided by its square). The
autoencoder's own calibration latents cover P_1 and P_2 only. ``--n-train`` such galaxies are
written as one coadd (+ redrock) file and fine-tuned on with ``python train.py
experiment=autoencoder_data data.path=<that file>`` (mocks per epoch = ``--n-train``, so an
epoch is n_train / 16 steps); ``--n-held`` others, written the same way, are only evaluated.
``--real desi`` fine-tunes on the bundled DESI galaxy itself (trained on = evaluated on).

Reported for the shipped and the fine-tuned network, encoder alone and after
``--refine-steps`` test-time refinement steps: the median reduced chi^2 (chi^2 / N over
unmasked, modelled pixels) of the held-out warped coadds, of 256 clean held-out mocks (the
``MockDataModule`` test file: does the network still fit what it was trained on?) with their
logM* error (NMAD), and of the bundled DESI galaxy. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import REPO, test_batch

N_MOCK_TEST = 256  # clean held-out mocks (the first of the bench test file)


def warp(spectra, seed: int, sigma: float):
    """Multiply each spectrum by a smooth Legendre warp (P1..P3 over the observed range) and a
    per-arm throughput offset, all coefficients ~ N(0, sigma^2); ivar scales with it."""
    from numpy.polynomial import legendre

    rng = np.random.default_rng([seed, 25])
    n = len(spectra.z)
    x = 2 * (spectra.wave - spectra.wave.min()) / np.ptp(spectra.wave) - 1
    basis = np.stack([legendre.legval(x, np.eye(4)[k]) for k in (1, 2, 3)])  # (3, M)
    coef = rng.normal(0, sigma, (n, 3))
    offset = rng.normal(0, sigma, (n, len(spectra.arm_names)))
    factor = (1 + coef @ basis) * (1 + offset[:, spectra.arm])
    spectra.flux = (spectra.flux * factor).astype(np.float32)
    spectra.ivar = (spectra.ivar / factor**2).astype(np.float32)
    return spectra


def write_warped(path: Path, generator, n: int, seed: int, sigma: float, first_id: int) -> Path:
    from sedvae.io.desi_write import mock_coadd_spectra, write_desi_coadd
    from sedvae.simulation.mocks import load_desi_example

    spectra, _ = mock_coadd_spectra(generator, n, seed, load_desi_example(),
                                    first_targetid=first_id)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    write_desi_coadd(path, warp(spectra, seed, sigma))
    return path


def chi2_red(net, batch: dict, refine_steps: int, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Reduced chi^2 (B,) and logM* (B,) of the encoder (refined when refine_steps > 0)."""
    out_chi, out_m = [], []
    n = batch["z"].shape[0]
    for i in range(0, n, chunk):
        b = {k: v[i : i + chunk] for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if refine_steps:
            out = net.refine(b, steps=refine_steps, lr=0.1)
        else:
            with torch.no_grad():
                out = net(b)
        c = net.chi2(out["batch"], out["model"])
        out_chi.append((c["chi2"] / c["n_pix"].clamp_min(1)).detach().numpy())
        out_m.append(out["latents"]["theta"][:, 0].detach().numpy())
    return np.concatenate(out_chi), np.concatenate(out_m)


def nmad(x: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def scores(net, sets: dict, refine_steps: int) -> dict:
    out = {}
    for name, batch in sets.items():
        for label, steps in (("encoder", 0), ("refined", refine_steps)):
            if label == "refined" and not steps:
                continue
            chi, logm = chi2_red(net, batch, steps)
            out[f"{name}_{label}_median_rchi2"] = float(np.median(chi))
            if "theta" in batch:
                out[f"{name}_{label}_logmstar_nmad"] = nmad(logm - batch["theta"][:, 0].numpy())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--real", choices=("warped", "desi"), default="warped")
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-held", type=int, default=128)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--warp", type=float, default=0.03)
    p.add_argument("--snr-scale", type=float, default=3.0,
                   help="S/N of the stand-in spectra over the training mocks' (BGS-like)")
    p.add_argument("--refine-steps", type=int, default=50)
    p.add_argument("--mock-weight", type=float, default=1.0)
    p.add_argument("--out", default=str(REPO / "outputs" / "bench_autoencoder_data"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sedvae.catalog.sources import SpectraSource
    from sedvae.checkpoint import load_checkpoint
    from sedvae.evaluation.autoencoder import desi_example_batch
    from sedvae.paths import config_dir
    from sedvae.physics.noise import DESI_BGS_SNR
    from sedvae.simulation import MockGenerator, desi_noise_model
    from sedvae.train import train

    out = Path(args.out) / args.real
    shipped_path = REPO / "data" / "autoencoder" / "autoencoder_laptop.pt"
    shipped, _ = load_checkpoint(shipped_path, "autoencoder")
    snr = [args.snr_scale * x for x in DESI_BGS_SNR]
    noise = desi_noise_model(snr=snr)
    generator = MockGenerator(instrument=shipped.decoder.instrument, noise=noise)
    held = write_warped(out / "held" / "coadd-held.fits", generator, args.n_held, 7002,
                        args.warp, first_id=2_000_000)  # fmt: skip
    overrides = ["experiment=autoencoder_data", f"paths.output_dir={out / 'run'}",
                 f"trainer.max_epochs={args.epochs}", f"model.mock_weight={args.mock_weight}",
                 "trainer.enable_progress_bar=false"]  # fmt: skip
    if args.real == "warped":
        train_file = write_warped(out / "train" / "coadd-train.fits", generator, args.n_train,
                                  7001, args.warp, first_id=1_000_000)  # fmt: skip
        overrides += [f"data.path={train_file}", f"data.mocks.n_train={args.n_train}"]
    t0 = time.perf_counter()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            metrics = train(compose("train", overrides=overrides))
    finally:
        GlobalHydra.instance().clear()
    t_train = time.perf_counter() - t0
    tuned, meta = load_checkpoint(out / "run" / "autoencoder.pt", "autoencoder")

    source = SpectraSource("desi", held, redrock="auto")
    held_batch = source(0, len(source))
    sets = {
        "held_warped": {k: v for k, v in held_batch.items() if isinstance(v, torch.Tensor)},
        "mocks": {k: v[:N_MOCK_TEST] for k, v in
                  test_batch(REPO / "cache" / "mocks", 1024, 1).items()},  # fmt: skip
        "desi_example": desi_example_batch(),
    }
    sets["held_warped"].pop("flags", None)
    result = {"real": args.real, "n_train": args.n_train if args.real == "warped" else 1,
              "n_held_warped": args.n_held, "epochs": args.epochs, "warp_sigma": args.warp,
              "snr_scale": args.snr_scale,
              "mock_weight": args.mock_weight, "refine_steps": args.refine_steps,
              "train_s": round(t_train, 1), "global_step": meta["training"].get("global_step"),
              "val_loss": metrics.get("val/loss")}  # fmt: skip
    torch.manual_seed(0)
    before = scores(shipped, sets, args.refine_steps)
    torch.manual_seed(0)
    after = scores(tuned, sets, args.refine_steps)
    for key in before:
        print(f"{key:45s} shipped {before[key]:8.3f}   fine-tuned {after[key]:8.3f}")
        result[f"shipped_{key}"] = round(before[key], 4)
        result[f"tuned_{key}"] = round(after[key], 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
