"""sedvae's amortised posterior against bagpipes' own nested sampling, on the same mock spectra.

    python bench/vs_bagpipes.py [--n-galaxies 3] [--checkpoint data/posterior/posterior.pt]
                                [--out outputs/vs_bagpipes] [--phase all|bagpipes|sedvae]

Slow by nature (bagpipes: hours per spectrum on one core here), so not a test. Each
bagpipes fit is saved to ``<out>/bagpipes_<i>.json`` as soon as it finishes and skipped when
rerun, so the script resumes; ``--phase bagpipes`` only fits, ``--phase sedvae`` only compares
the fits already done. Last line: JSON.

Mocks: ``MockGenerator`` draws (PROVABGS prior, BGS n(z) with z >= 0.05, nebular emission,
sigma_v, the bundled coadd's DESI resolution and ivar shape, BGS-like S/N) with the fibre
aperture set to 1, so that spectrum and photometry measure the same light (bagpipes has no
aperture term). Both methods see the same noisy spectrum and the same 5-band photometry.

bagpipes configuration, matched to sedvae's prior as closely as the two models allow:

- sampler: ``fit.fit()`` with its defaults (``sampler="multinest"``, which falls back to
  nautilus when libmultinest is absent, as here; n_live = 400);
- SFH: bagpipes has no PROVABGS NMF bases; its closest non-parametric option is
  ``continuity`` (Leja et al. 2019: Student-t, scale 0.3, df 2, priors on log SFR ratios of
  adjacent bins), with bins 0-10-100-300-1000-3000-6000 Myr-t_U(z); ``massformed`` U(7, 12.5)
  as sedvae's logM*; no separate burst (the 10 Myr bins absorb it);
- metallicity: one constant Z, log-uniform over 0.005-4 Z_sun (bagpipes Z_sun = 0.02), the
  span of sedvae's Z(t) ~ 4 gamma with gamma ~ LogU(2e-5, 2e-2);
- dust: ``Salim`` (Calzetti times a power law of slope delta plus a bump, the family of sedvae's
  Kriek & Conroy law) with A_V U(0, 3.26) (tau_ISM in [0, 3]), delta U(-2, 0.5) (bagpipes'
  R_V normalisation diverges at delta ~ 1), B fixed at 0.85 (sedvae ties the bump to n_dust;
  at the rest wavelengths DESI sees it hardly matters) and birth-cloud ``eta`` U(1, 4)
  (bagpipes scales A_V for young stars; sedvae adds tau_BC (lambda/5500)^-1);
- nebular ``logU`` U(-4, -1), ``veldisp`` U(30, 300) km/s, the redshift fixed at the truth;
- resolution: by default none beyond ``veldisp`` (the coadd's LSF is sigma ~ 36 km/s, which
  veldisp absorbs in quadrature); ``--r-curve`` passes bagpipes an ``R_curve`` from the second
  moment of the coadd's resolution matrix, which makes each likelihood call ~3x slower here
  (its python resampling loop), i.e. a fit of many hours;
- cosmology: bagpipes' distances and ages are replaced by Planck18 (sedvae's), otherwise
  masses would differ by 0.03 dex from H0 alone; vacuum wavelengths are converted to air,
  the convention of bagpipes' grids.

Compared, per galaxy: wall time (bagpipes: its whole fit; sedvae: ``Posterior.sample`` with
1000 samples plus derived properties, one galaxy per call; the sampling alone is reported
too), and for logM* (formed mass), metallicity (log10 Z_MW) and dust (A_V of the ISM) the
difference of posterior medians (sedvae - bagpipes) in units of bagpipes' posterior sigma
(half the 16-84 % range). The truths are printed next to both.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CONTINUITY_EDGES_MYR = (0.0, 10.0, 100.0, 300.0, 1000.0, 3000.0, 6000.0)
BANDS = ("BASS-g", "BASS-r", "MzLS-z", "wise2010-W1", "wise2010-W2")
MUJY_PER_NANOMAGGY = 3.631


def vacuum_to_air(wave_vac: np.ndarray) -> np.ndarray:
    """Vacuum -> air wavelengths (A), inverting ``sedvae.sps.ssp.air_to_vacuum`` by iteration."""
    from sedvae.sps.ssp import air_to_vacuum

    air = np.asarray(wave_vac, dtype=np.float64).copy()
    for _ in range(4):
        air = air - (air_to_vacuum(air) - wave_vac)
    return air


def make_mocks(n: int, seed: int) -> dict[str, np.ndarray]:
    """n noisy DESI mocks with aperture 1 (see the module docstring), as numpy arrays."""
    from sedvae.simulation import MockGenerator

    gen = MockGenerator()
    rng = torch.Generator().manual_seed(seed)
    params = gen.draw(n, rng)
    params["aperture"] = torch.ones(n, dtype=torch.float64)
    params["z"] = params["z"].clamp_min(0.05)  # bagpipes' age bins end at its own t_U(0)
    clean = gen.noiseless(params)
    obs = gen.noisy(clean["flux_true"], clean["photometry_true"], rng)
    out = {k: v.numpy() for k, v in params.items()}
    out.update({k: v.numpy() for k, v in obs.items()})
    out["wave"] = gen.instrument.wave.numpy()
    out["arm"] = gen.instrument.arm.numpy()
    res = gen.instrument.resolution.double()  # (ndiag, M)
    h = res.shape[0] // 2
    k = torch.arange(res.shape[0], dtype=torch.float64)[:, None] - h
    sigma_pix = ((res * k**2).sum(0) / res.sum(0)).sqrt()
    out["lsf_sigma_a"] = (sigma_pix * torch.gradient(gen.instrument.wave.double())[0]).numpy()
    return out


def monotonic_pixels(wave: np.ndarray, arm: np.ndarray) -> np.ndarray:
    """Indices of a strictly increasing pixel list: overlapping arms are cut at the middle of
    their overlap (bagpipes resamples onto one monotonic grid)."""
    keep = []
    n_arms = int(arm.max()) + 1
    for a in range(n_arms):
        idx = np.flatnonzero(arm == a)
        lo, hi = wave[idx[0]], wave[idx[-1]]
        if a > 0:
            prev = wave[arm == a - 1][-1]
            lo = 0.5 * (lo + prev)
        if a < n_arms - 1:
            nxt = wave[arm == a + 1][0]
            hi = 0.5 * (hi + nxt)
        keep.append(idx[(wave[idx] >= lo) & (wave[idx] < hi)])
    return np.concatenate(keep)


def patch_bagpipes_cosmology(pipes) -> None:
    """Use Planck18 distances and ages inside bagpipes (sedvae's cosmology)."""
    from astropy.cosmology import Planck18

    pipes.utils.age_at_z = Planck18.age(pipes.utils.z_array).value
    pipes.utils.ldist_at_z = Planck18.luminosity_distance(pipes.utils.z_array).value


def write_filters(folder: Path) -> list[str]:
    """speclite's Legacy Surveys curves as the two-column files bagpipes reads."""
    import speclite.filters

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for band in BANDS:
        f = speclite.filters.load_filter(band)
        path = folder / f"{band}.txt"
        np.savetxt(path, np.c_[f.wavelength, f.response])
        paths.append(str(path))
    return paths


def fit_instructions(z: float, r_curve: np.ndarray | None) -> dict:
    from astropy.cosmology import Planck18

    t_univ_myr = float(Planck18.age(z).value) * 1e3
    edges = [e for e in CONTINUITY_EDGES_MYR if e < 0.95 * t_univ_myr] + [t_univ_myr]
    continuity = {
        "massformed": (7.0, 12.5),
        "metallicity": (0.005, 4.0),
        "metallicity_prior": "log_10",
        "bin_edges": edges,
    }
    for i in range(1, len(edges) - 1):
        continuity[f"dsfr{i}"] = (-10.0, 10.0)
        continuity[f"dsfr{i}_prior"] = "student_t"
        continuity[f"dsfr{i}_prior_scale"] = 0.3
        continuity[f"dsfr{i}_prior_df"] = 2
    instructions = {
        "redshift": z,
        "t_bc": 0.01,
        "veldisp": (30.0, 300.0),
        "continuity": continuity,
        "dust": {
            "type": "Salim",
            "Av": (0.0, 3.26),
            "delta": (-2.0, 0.5),
            "B": 0.85,
            "eta": (1.0, 4.0),
        },  # fmt: skip
        "nebular": {"logU": (-4.0, -1.0)},
    }
    if r_curve is not None:
        instructions["R_curve"] = r_curve
    return instructions


def set_aside_broken_checkpoint(path: Path) -> bool:
    """nautilus resumes from its checkpoint file; a run killed while writing it leaves a file
    it cannot read ('bad local heap signature'). Move such a file aside and start afresh.
    Returns whether a readable checkpoint is there to resume from."""
    import h5py

    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            f["sampler"].attrs.keys()
    except (OSError, KeyError) as err:
        broken = path.with_suffix(".h5.broken")
        os.replace(path, broken)
        print(f"{path}: unreadable checkpoint ({err}); moved to {broken.name}, starting afresh")
        return False
    print(f"resuming nautilus from {path}", flush=True)
    return True


def previous_progress(progress: Path) -> tuple[int, float]:
    """(likelihood calls, seconds) on the last line of a fit's progress file, else (0, 0)."""
    if not progress.exists():
        return 0, 0.0
    lines = progress.read_text().split("\n")
    last = [ln for ln in lines if ln.strip()][-1:] or ["0 calls 0 s"]
    parts = last[0].split()
    return int(parts[0]), float(parts[2])


def run_bagpipes(mocks: dict, i: int, out: Path, filters: list[str], r_curve: bool) -> dict:
    """Fit mock i with bagpipes' nested sampling; returns medians, sigmas and wall time."""
    from sedvae.sps.reference import import_bagpipes

    pipes = import_bagpipes()
    patch_bagpipes_cosmology(pipes)
    keep = monotonic_pixels(mocks["wave"], mocks["arm"])
    wave_air = vacuum_to_air(mocks["wave"][keep])
    flux = mocks["flux"][i, keep].astype(np.float64) * 1e-17  # erg/s/cm^2/A
    ivar = mocks["ivar"][i, keep].astype(np.float64) / 1e-34
    good = ivar > 0
    err = np.where(good, 1.0 / np.sqrt(np.where(good, ivar, 1.0)), 1e10 * flux[good].std())
    flux = np.where(good, flux, 0.0)
    spectrum = np.c_[wave_air, flux, err]
    phot = mocks["photometry"][i].astype(np.float64) * MUJY_PER_NANOMAGGY
    phot_err = MUJY_PER_NANOMAGGY / np.sqrt(mocks["photometry_ivar"][i].astype(np.float64))
    photometry = np.c_[phot, phot_err]

    # R = lambda / FWHM of the coadd's LSF, smoothed over 100-pixel blocks
    lsf = mocks["lsf_sigma_a"][keep] * 2.3548
    blocks = np.arange(0, len(keep), 100)
    curve = np.c_[
        [wave_air[b : b + 100].mean() for b in blocks],
        [np.median(wave_air[b : b + 100] / lsf[b : b + 100]) for b in blocks],
    ]
    z = float(mocks["z"][i])
    instructions = fit_instructions(z, curve if r_curve else None)
    progress = out / f"bagpipes_{i}.progress"
    resumed = set_aside_broken_checkpoint(
        out / "pipes" / "posterior" / "vs_sedvae" / f"mock{i}_.h5"
    )
    # a resumed fit counts the calls and seconds of its earlier runs (last progress line)
    calls0, secs0 = previous_progress(progress) if resumed else (0, 0.0)
    cwd = Path.cwd()
    os.chdir(out)  # bagpipes writes pipes/ into the working directory it saw at import
    pipes.utils.working_dir = str(out)
    try:
        with redirect_stdout(io.StringIO()):
            galaxy = pipes.galaxy(
                f"mock{i}",
                lambda _id: (spectrum, photometry),
                filt_list=filters,
                spec_units="ergscma",
                phot_units="mujy",
            )
            fit = pipes.fit(galaxy, instructions, run="vs_sedvae", n_posterior=1000)
            lnlike, calls = fit.fitted_model.lnlike, [calls0]

            def counted(*a, **k):
                calls[0] += 1
                if calls[0] % 2000 == 0:  # a record of the rate if the fit never finishes
                    with open(progress, "a") as fh:
                        fh.write(f"{calls[0]} calls {secs0 + time.perf_counter() - t0:.0f} s\n")
                return lnlike(*a, **k)

            fit.fitted_model.lnlike = counted  # fit() hands the sampler this attribute
            t0 = time.perf_counter()
            fit.fit()  # the defaults: multinest, else nautilus
            wall = secs0 + time.perf_counter() - t0
    finally:
        os.chdir(cwd)
    samples = fit.posterior.samples
    logm = np.asarray(samples["continuity:massformed"])
    logz = np.log10(0.02 * np.asarray(samples["continuity:metallicity"]))
    av = np.asarray(samples["dust:Av"])
    return {
        "index": i,
        "z": z,
        "wall_s": wall,
        "n_like": calls[0],
        "logmstar": summary(logm),
        "logmstar_surv": summary(np.asarray(samples["stellar_mass"])),
        "log_zmw": summary(logz),
        "av_ism": summary(av),
        "n_samples": len(logm),
    }


def summary(x: np.ndarray) -> dict:
    p16, p50, p84 = np.percentile(x, [16, 50, 84])
    return {"median": float(p50), "sigma": float(0.5 * (p84 - p16))}


def run_sedvae(mocks: dict, indices: list[int], checkpoint: Path, n_samples: int) -> list[dict]:
    """sedvae posteriors of the same mocks: one ``Posterior.sample`` call per galaxy (timed
    one galaxy at a time, as bagpipes is), 1000 samples each."""
    from sedvae.posterior import load_posterior
    from sedvae.sps import THETA
    from sedvae.sps.reference import av_from_tau_ism

    post = load_posterior(checkpoint)
    keys = ("flux", "ivar", "mask", "z", "photometry", "photometry_ivar")
    rows = []
    av_per_tau = av_from_tau_ism(1.0)  # linear in tau_ISM (at n_dust = 0, bagpipes' Salim)
    for i in indices:
        batch = {k: torch.as_tensor(mocks[k][i : i + 1]).float() for k in keys}
        batch["mask"] = batch["mask"].bool()
        gen = torch.Generator().manual_seed(i)
        post.sample(batch, 10, generator=gen)  # warm-up (first-call allocations)
        t0 = time.perf_counter()
        result = post.sample(batch, n_samples, generator=gen, return_flags=True)
        t_sample = time.perf_counter() - t0
        derived = post.derived(result.samples, batch["z"])  # Z_MW needs the histories
        wall = time.perf_counter() - t0
        theta = result.samples[:, 0].double().numpy()
        truth = torch.as_tensor(mocks["theta"][i : i + 1]).float()
        z_true = post.derived(truth[None], batch["z"])["z_mw"][0, 0]
        rows.append({
            "index": i,
            "wall_s": wall,
            "wall_sample_s": t_sample,
            "flag": int(result.flags[0]),
            "logmstar": summary(theta[:, THETA.LOGMSTAR]),
            "logmstar_surv": summary(derived["logmstar_surv"][:, 0].double().numpy()),
            "log_zmw": summary(np.log10(derived["z_mw"][:, 0].double().numpy())),
            "av_ism": summary(av_per_tau * theta[:, THETA.TAU_ISM]),
            "truth": {"logmstar": float(truth[0, 0]), "log_zmw": float(np.log10(z_true)),
                      "av_ism": float(av_per_tau * truth[0, 10])},
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-galaxies", type=int, default=3)
    parser.add_argument("--seed", type=int, default=424242)
    parser.add_argument("--checkpoint", default=str(REPO / "data/posterior/posterior.pt"))
    parser.add_argument("--out", default=str(REPO / "outputs/vs_bagpipes"))
    parser.add_argument("--phase", choices=("all", "bagpipes", "sedvae"), default="all")
    parser.add_argument("--n-samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="torch/BLAS threads")
    parser.add_argument("--r-curve", action="store_true", help="pass bagpipes the DESI LSF")
    parser.add_argument(
        "--only", type=int, nargs="*", default=None,
        help="fit only these galaxies (e.g. one process per core: --only 0, --only 1, ...)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    mock_file = out / f"mocks_n{args.n_galaxies}_seed{args.seed}.npz"
    if mock_file.exists():
        mocks = dict(np.load(mock_file))
    else:
        mocks = make_mocks(args.n_galaxies, args.seed)
        np.savez(mock_file, **mocks)

    if args.phase in ("all", "bagpipes"):
        filters = write_filters(out / "filters")
        for i in range(args.n_galaxies):
            path = out / f"bagpipes_{i}.json"
            if path.exists() or (args.only is not None and i not in args.only):
                continue
            t0 = time.perf_counter()
            row = run_bagpipes(mocks, i, out, filters, args.r_curve)
            row["wall_total_s"] = time.perf_counter() - t0
            path.write_text(json.dumps(row, indent=1))
            print(f"bagpipes galaxy {i}: {row['wall_s']:.0f} s", flush=True)

    done = sorted(
        int(p.stem.split("_")[1]) for p in out.glob("bagpipes_*.json")
        if int(p.stem.split("_")[1]) < args.n_galaxies
    )  # fmt: skip
    result: dict = {"n_bagpipes_done": len(done), "n_galaxies": args.n_galaxies}
    bag = {i: json.loads((out / f"bagpipes_{i}.json").read_text()) for i in done}
    if bag:
        result["bagpipes_s_per_galaxy"] = float(np.mean([b["wall_s"] for b in bag.values()]))
    # fits still running or interrupted: calls and seconds so far (a lower bound on their cost)
    unfinished = {
        i: previous_progress(out / f"bagpipes_{i}.progress")
        for i in range(args.n_galaxies)
        if i not in bag and (out / f"bagpipes_{i}.progress").exists()
    }
    if unfinished:
        result["bagpipes_unfinished"] = {str(i): {"calls": c, "s": s} for i, (c, s) in
                                         unfinished.items()}  # fmt: skip
    if args.phase in ("all", "sedvae") and Path(args.checkpoint).exists():
        indices = done or list(range(args.n_galaxies))
        ours = run_sedvae(mocks, indices, Path(args.checkpoint), args.n_samples)
        result["sedvae_s_per_galaxy"] = float(np.mean([r["wall_s"] for r in ours]))
        result["sedvae_sample_s_per_galaxy"] = float(np.mean([r["wall_sample_s"] for r in ours]))
        if bag:
            result["speedup"] = result["bagpipes_s_per_galaxy"] / result["sedvae_s_per_galaxy"]
            for key in ("logmstar", "log_zmw", "av_ism"):
                d = [
                    (r[key]["median"] - bag[r["index"]][key]["median"])
                    / bag[r["index"]][key]["sigma"]
                    for r in ours if r["index"] in bag
                ]  # fmt: skip
                result[f"{key}_dmed_over_sigma_bagpipes"] = [round(x, 3) for x in d]
                result[f"{key}_max_abs_dmed_over_sigma"] = float(np.max(np.abs(d)))
                # each method's error against the truth, in dex / mag, and its own sigma
                result[f"{key}_per_galaxy"] = [
                    {
                        "truth": round(r["truth"][key], 3),
                        "bagpipes": [round(bag[r["index"]][key]["median"], 3),
                                     round(bag[r["index"]][key]["sigma"], 4)],
                        "sedvae": [round(r[key]["median"], 3), round(r[key]["sigma"], 4)],
                    }
                    for r in ours if r["index"] in bag
                ]  # fmt: skip
                # (median - truth) / own sigma: how far each posterior puts the truth
                for name in ("bagpipes", "sedvae"):
                    fits = [(bag[r["index"]] if name == "bagpipes" else r)[key] for r in ours
                            if r["index"] in bag]  # fmt: skip
                    truths = [r["truth"][key] for r in ours if r["index"] in bag]
                    result[f"{key}_truth_pull_{name}"] = [
                        round((f["median"] - t) / f["sigma"], 2)
                        for f, t in zip(fits, truths, strict=True)
                    ]
            truth = mocks["theta"]
            for i in done:
                b = bag[i]["logmstar"]
                print(
                    f"galaxy {i}: z={mocks['z'][i]:.3f} true logM*={truth[i, 0]:.2f} "
                    f"bagpipes {b['median']:.2f}+-{b['sigma']:.2f}"
                    f" ({bag[i]['wall_s']:.0f} s, {bag[i]['n_like']} calls)"
                )
            for r in ours:
                print(
                    f"galaxy {r['index']}: sedvae logM*={r['logmstar']['median']:.2f}"
                    f"+-{r['logmstar']['sigma']:.2f} ({1e3 * r['wall_s']:.1f} ms)"
                )
        (out / "sedvae.json").write_text(json.dumps(ours, indent=1))
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}))


if __name__ == "__main__":
    main()
