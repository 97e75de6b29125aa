"""Benchmark the physics-embedded autoencoder on held-out mocks and a real DESI spectrum.

    python bench/autoencoder.py [--model data/autoencoder/autoencoder_laptop.pt] [--n 1024]
                                [--refine-steps 100] [--threads 1]

Held-out mocks: the MockDataModule test file (``cache/mocks/mocks_test_n{n}_seed3.h5``,
written on first use, never trained on) with its fixed noise. Reported, for the encoder alone
("amortised", one forward pass) and, with ``--refine-steps``, after test-time refinement of the
latents (Adam on each galaxy's own loss, networks unchanged):

- ``median_reduced_chi2``: median over galaxies of chi^2 / N over unmasked, modelled pixels;
  ``truth_median_reduced_chi2`` is the same for the noiseless truth (the noise floor);
- ``frac_pix_gt3sigma``: fraction of all valid pixels with |data - model| > 3 sigma (0.0027 for
  pure Gaussian noise);
- ``line_flux_rel_err_median``: median |L_fit / L_true - 1| of H-alpha, H-beta, [O III] 5007
  and [O II] 3726+3729 (pooled) over lines whose true flux is detectable at S/N >= 5 given
  the noise (per-line numbers too);
- ``logmstar_point_scatter``: NMAD of the encoder's logM* minus the truth (bias and std too);
- ``residual_flux_fraction``: mean fraction of |flux| (rest frame, observed range) carried by
  the residual network (lines + smooth part); ``residual_continuum_fraction`` its non-line part;
- ``solved_median_reduced_chi2``: the encoder's continuum (SPS + the residual network's
  non-line part, no refinement) with the emission lines and the per-arm calibration solved
  exactly (:class:`sedvae.linear.LinearModel`, the catalog's line list; narrow-line kinematics
  fitted from the encoder's gas width), chi^2 / N as above, and
  ``solved_vs_encoder_reduced_chi2_ratio`` its ratio to the encoder-only figure;
  ``solved_residual_flux_fraction``: the residual network's share of the flux in that model
  (its non-line part, observed frame: sum |smooth + free| / sum |model|), the rest being the
  SPS continuum and the solved lines;
- ``desi_example_reduced_chi2``: the bundled DESI BGS spectrum (its own resolution matrices,
  Galactic E(B-V) applied to the model), fitted with its photometry, and ``..._spectrum_only``
  without it.

The last line of the output is JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sedvae.evaluation.autoencoder import desi_example_batch, galaxy_metrics, summarise

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def solved_lines_metrics(net, out: dict, linear) -> dict[str, np.ndarray]:
    """chi^2 / N (B,) of the encoder's continuum with lines and calibration solved exactly,
    and the residual network's flux share in that model (module docstring)."""
    b, model, latents = out["batch"], out["model"], out["latents"]
    dec = net.decoder
    z = b["z"]
    kw = dict(resolution=b.get("resolution"), mw_ebv=b.get("mw_ebv"))
    # the residual net's lines through the observation model (profiled latents, as model["flux"])
    lines_obs = dec.observe(model["rest"]["lines"], z, latents, **kw)
    smooth_obs = dec.observe(model["rest"]["smooth"] + model["rest"]["free"], z, latents, **kw)
    continuum = (model["flux"] - lines_obs).float()
    bad = b["mask"].bool() | ~model["coverage"]
    flux, ivar = b["flux"].float(), b["ivar"].float()
    res = None if b.get("resolution") is None else b["resolution"]
    sigma0 = latents["sigma_gas"].float().clamp(10.0, 500.0)
    v, s, fit = linear.fit_kinematics(continuum, flux, ivar, z.float(), sigma=sigma0,
                                      mask=bad, resolution=res)  # fmt: skip
    w = torch.where(bad, 0.0, ivar)
    n = (w > 0).sum(-1).clamp_min(1)
    chi2 = (w * (flux - fit.model) ** 2).sum(-1)
    good = (w > 0).float()
    share = (smooth_obs.abs() * good).sum(-1) / (fit.model.abs() * good).sum(-1).clamp_min(1e-30)
    return {"chi2_red": (chi2 / n).numpy(), "residual_fraction": share.numpy()}


def run(net, loader, refine_steps: int, lr: float) -> tuple[dict, dict, float, float, float]:
    from sedvae.catalog.ppc import ppc_line_list
    from sedvae.linear import LinearModel

    linear = LinearModel(net.decoder.instrument, ppc_line_list())
    per_enc, per_ref, t_enc, t_ref, t_solve = {}, {}, 0.0, 0.0, 0.0
    for batch in loader:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = net(batch)
        t_enc += time.perf_counter() - t0
        for k, v in galaxy_metrics(net, out).items():
            per_enc.setdefault(k, []).append(v)
        t0 = time.perf_counter()
        for k, v in solved_lines_metrics(net, out, linear).items():
            per_enc.setdefault(f"solved_{k}", []).append(v)
        t_solve += time.perf_counter() - t0
        if refine_steps > 0:
            t0 = time.perf_counter()
            out = net.refine(batch, steps=refine_steps, lr=lr)
            t_ref += time.perf_counter() - t0
            for k, v in galaxy_metrics(net, out).items():
                per_ref.setdefault(k, []).append(v)
    cat = {k: np.concatenate(v) for k, v in per_enc.items()}
    cat_ref = {k: np.concatenate(v) for k, v in per_ref.items()}
    return cat, cat_ref, t_enc, t_ref, t_solve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "data/autoencoder/autoencoder_laptop.pt"))
    p.add_argument("--n", type=int, default=1024, help="held-out mocks (>= 1000 for the goal)")
    p.add_argument("--cache-dir", default=str(ROOT / "cache/mocks"))
    p.add_argument("--refine-steps", type=int, default=0)
    p.add_argument("--refine-lr", type=float, default=0.1, help="Adam step on the raw latents")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from sedvae.autoencoder.data import MockDataModule
    from sedvae.checkpoint import load_checkpoint

    net, _ = load_checkpoint(args.model, "autoencoder")
    dm = MockDataModule(cache_dir=args.cache_dir, n_test=args.n, seed=1, on_the_fly=True,
                        batch_size=args.batch_size)  # fmt: skip
    test = dm.path("test")
    if not test.exists():
        dm.n["val"] = 0  # only the test file is needed
        from sedvae.simulation import write_mocks

        write_mocks(test, args.n, dm.seed + 2, dm.generator)
    dm.setup("test")
    per, per_ref, t_enc, t_ref, t_solve = run(net, dm.test_dataloader(), args.refine_steps,
                                              args.refine_lr)  # fmt: skip
    result = {"model": str(Path(args.model).name), "n_mocks": args.n}
    result.update(summarise(per))
    result["encoder_seconds_per_galaxy"] = t_enc / args.n
    result["solved_median_reduced_chi2"] = float(np.median(per["solved_chi2_red"]))
    result["solved_vs_encoder_reduced_chi2_ratio"] = (
        result["solved_median_reduced_chi2"] / result["median_reduced_chi2"]
    )
    result["solved_residual_flux_fraction"] = float(np.mean(per["solved_residual_fraction"]))
    result["solve_seconds_per_galaxy"] = t_solve / args.n
    if args.refine_steps > 0:
        result["refine_steps"] = args.refine_steps
        result.update({f"refined_{k}": v for k, v in summarise(per_ref).items()})
        result["refine_seconds_per_galaxy"] = t_ref / args.n

    batch = desi_example_batch()
    with torch.no_grad():
        out = net(batch)
    result["desi_example_reduced_chi2"] = float(galaxy_metrics(net, out)["chi2_red"][0])
    result["desi_example_logmstar"] = float(out["latents"]["theta"][0, 0])
    # the fibre spectrum alone (photometry measures the whole galaxy, whose colours differ)
    spec_only = {k: v for k, v in batch.items() if not k.startswith("photometry")}
    with torch.no_grad():
        out = net(spec_only)
    result["desi_example_reduced_chi2_spectrum_only"] = float(
        galaxy_metrics(net, out)["chi2_red"][0]
    )
    if args.refine_steps > 0:
        for label, b in (("", batch), ("_spectrum_only", spec_only)):
            out = net.refine(b, steps=args.refine_steps, lr=args.refine_lr)
            result[f"refined_desi_example_reduced_chi2{label}"] = float(
                galaxy_metrics(net, out)["chi2_red"][0]
            )
    for key, value in result.items():
        print(f"{key:45s} {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
