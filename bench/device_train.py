"""One prepared accelerator run: the posterior head and the emulator trained on simulations drawn
inside the training loop, each for a fixed wall-clock budget, then saved in the project's
checkpoint formats.

    python bench/device_train.py --out DIR [--posterior-s 270] [--emulator-s 150] [--batch 1024]

(``bench/device_train.sh`` installs the carried wheels and calls this; ``bench/device_prepare.sh``
makes the wheels and the table file first, where bagpipes is installed.)

Steps: (1) simulated spectra per second of the on-the-fly simulator alone (after a warm-up,
device synchronised); (2) ``experiment=posterior_simulator`` for ``--posterior-s`` seconds
(cosine learning rate over that time, TF32 matrix products: the noise is ~1e3 times larger
than TF32's round-off), saved with ``sedvae.checkpoint.save_checkpoint``; (3)
``experiment=emulator_simulator`` for ``--emulator-s`` seconds in full float32 (its targets
need 1e-4 precision), saved with ``sedvae.checkpoint.save_checkpoint``. Written to ``--out``:
``posterior.pt``, ``emulator.pt``, both runs' ``*_metrics.csv`` and ``throughput.json``; the
last line printed is that JSON. Every table comes from ``$SEDVAE_SPS_TABLES`` where bagpipes
is absent.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch

MAX_CHECKPOINT_MIB = 16.0  # what may come back from the device per file


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sedvae.paths import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


def simulator_throughput(dm, device: torch.device, batches: int) -> dict:
    """Simulated (noisy) spectra per second of the posterior data module on ``device``."""
    dm.to(device)
    for step in range(2):  # warm-up: kernels, FFT plans, allocator
        dm.train_batch(10_000_000 + step)
    _sync(device)
    t0 = time.perf_counter()
    for step in range(batches):
        dm.train_batch(20_000_000 + step)
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"spectra_per_s": batches * dm.batch_size / seconds, "batch": dm.batch_size,
            "batches": batches, "seconds": seconds}  # fmt: skip


def fit(cfg, budget_s: float, work: Path, name: str, accelerator: str):
    """Instantiate ``cfg``'s data and model, train for ``budget_s`` seconds; returns
    (module, datamodule, schedule stats, last validation metrics)."""
    import hydra
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from sedvae.simulation.onthefly import WallClockSchedule

    pl.seed_everything(cfg.seed, workers=True)
    dm = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.model)
    clock = WallClockSchedule(budget_s, warmup_steps=cfg.get("warmup", 100))
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, max_epochs=100_000, logger=CSVLogger(work, name=name),
        callbacks=[clock], enable_checkpointing=False, enable_progress_bar=False,
        gradient_clip_val=cfg.trainer.get("gradient_clip_val"), log_every_n_steps=20,
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    # the final weights on the fixed validation set (the fit may stop inside an epoch)
    final = trainer.validate(module, datamodule=dm, verbose=False)[0]
    metrics = {k: float(v) for k, v in final.items()}
    return module, dm, clock.stats, metrics, Path(trainer.logger.log_dir) / "metrics.csv"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for checkpoints, logs, JSON")
    parser.add_argument("--work", default=None, help="scratch folder (default: OUT/../work)")
    parser.add_argument("--posterior-s", type=float, default=270.0)
    parser.add_argument("--emulator-s", type=float, default=150.0)
    parser.add_argument("--batch", type=int, default=1024, help="posterior galaxies per step")
    parser.add_argument("--emulator-batch", type=int, default=1024)
    parser.add_argument("--steps-per-epoch", type=int, default=200, help="steps per validation")
    parser.add_argument("--n-val", type=int, default=4096)
    parser.add_argument("--pca-spectra", type=int, default=20000)
    parser.add_argument("--emulator-layers", type=int, default=8, help="PROVABGS: 8 x 256")
    parser.add_argument("--throughput-batches", type=int, default=20)
    parser.add_argument("--cpu-reference", default=None, help="JSON of this bench on a CPU")
    parser.add_argument("--toy", action="store_true", help="tiny networks (tests on a CPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out.parent / f"{out.name}_work"
    work.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    accelerator = "gpu" if cuda else "cpu"
    t_start = time.perf_counter()
    report: dict = {
        "bench": "device_train",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
    }
    toy_post = ["model.net.embedding.n_bins=64", "model.net.embedding.head=[32]",
                "model.net.embedding.n_out=16", "+model.net.embedding.trunk.hidden=[32]",
                "+model.net.embedding.trunk.n_out=32", "model.net.flow.transforms=2",
                "model.net.flow.hidden=[16]"] if args.toy else []  # fmt: skip

    # ---- posterior: simulator throughput, then a fixed-time fit --------------------------
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    cfg = compose([
        "experiment=posterior_simulator", f"paths.output_dir={work / 'posterior'}",
        f"data.batch_size={args.batch}", f"data.steps_per_epoch={args.steps_per_epoch}",
        f"data.n_val={args.n_val}", "model.scheduler=null", *toy_post,
    ])  # fmt: skip
    module, dm, stats, metrics, log_csv = fit(
        cfg, args.posterior_s, work, "posterior", accelerator
    )
    report["simulator"] = simulator_throughput(dm, device, args.throughput_batches)
    report["posterior"] = {**stats, "batch": args.batch,
                           "spectra_per_s": stats["steps_per_s"] * args.batch,
                           **metrics}  # fmt: skip
    from sedvae.checkpoint import save_checkpoint

    meta = {"trained": "on-the-fly simulations (bench/device_train.py)", "device": report["device"],
            "steps": int(stats["steps"]), "seconds": round(stats["seconds"], 1)}  # fmt: skip
    save_checkpoint(out / "posterior.pt", "posterior", module.net.cpu(), cfg.model.net, meta)
    if log_csv.is_file():
        shutil.copyfile(log_csv, out / "posterior_metrics.csv")
    del module, dm

    # ---- emulator: full float32 (its targets need 1e-4), fixed-time fit -------------------
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    toy_emu = ["model.net.n_components=[8,8,8,6]", "model.net.hidden=32"] if args.toy else []
    layers = 2 if args.toy else args.emulator_layers
    cfg = compose([
        "experiment=emulator_simulator", f"paths.output_dir={work / 'emulator'}",
        f"data.batch_size={args.emulator_batch}", f"data.steps_per_epoch={args.steps_per_epoch}",
        f"data.n_val={args.n_val}", "model.scheduler=null", f"model.net.n_layers={layers}",
        f"model.pca_spectra={args.pca_spectra}", *toy_emu,
    ])  # fmt: skip
    module, dm, stats, metrics, log_csv = fit(cfg, args.emulator_s, work, "emulator", accelerator)
    report["emulator"] = {**stats, "batch": args.emulator_batch,
                          "spectra_per_s": stats["steps_per_s"] * args.emulator_batch,
                          **metrics}  # fmt: skip
    save_checkpoint(out / "emulator.pt", "emulator", module.net.cpu(),
                    training={**meta, "data": "on-the-fly simulator",
                              "seed": int(cfg.data.seed)})  # fmt: skip
    if log_csv.is_file():
        shutil.copyfile(log_csv, out / "emulator_metrics.csv")

    sizes = {p.name: p.stat().st_size / 2**20 for p in (out / "posterior.pt", out / "emulator.pt")}
    report["checkpoint_mib"] = {k: round(v, 2) for k, v in sizes.items()}
    too_big = [k for k, v in sizes.items() if v > MAX_CHECKPOINT_MIB]
    if too_big:
        raise RuntimeError(f"checkpoints over {MAX_CHECKPOINT_MIB} MiB: {too_big}")
    if args.cpu_reference and Path(args.cpu_reference).is_file():
        report["cpu_reference"] = json.loads(Path(args.cpu_reference).read_text())
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    from sedvae.fileio import write_json_atomic

    write_json_atomic(out / "throughput.json", report)
    print(json.dumps(report, sort_keys=True))
    return report


if __name__ == "__main__":
    main()
