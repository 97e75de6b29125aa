"""What the posterior head should condition on (issue 26, item 2): a controlled proxy study.

    python -m studies.posterior_conditioning [--n-train 10000] [--n-in 500] [--n-off 400]
                                             [--off-seed 3] [--cache cache] [--features a,b,c]
                                             [--seeds 3]

The shipped head's full training takes hours here, so the choice of inputs is measured with
one small conditional density estimator fed each candidate feature set in turn, everything
else fixed (the same training galaxies, the same validation split, seed, optimiser and early
stopping):

- training set: ``--n-train`` simulations of the generative model (the on-the-fly simulator
  with :class:`~sedvae.simulation.onthefly.GenerativeParts` at the settings of
  ``experiment=posterior_generative``: free line ratios per ion, calibration warps, sky
  residuals, outlier pixels), written once to ``<cache>/conditioning/``;
- test sets: ``--n-in`` held-out simulations of the same model (another seed) and the
  ``--n-off`` galaxies of the off-model set (``python -m sedvae.offmodel``, bagpipes' own SFHs,
  dust laws and nebular model; the file ``bench/off_model.py`` reads, noise seed 0);
- targets: log surviving mass, log sSFR over 100 Myr (floored at 1e-13 / yr) and t_MW (Gyr),
  with the mass relative to the shipped embedding's luminosity anchor (as the head predicts
  logM* relative to it; the anchor is an input too);
- the estimator: a zuko neural spline flow (3 transforms, 2 x 128 hidden) over the three
  targets, conditioned on the standardised features; Adam 1e-3, batch 256, at most
  ``--epochs`` epochs, stopped after 8 without a better validation NLL (15 % of the training
  set), the best epoch kept; ``--seeds`` estimator seeds per feature set (the metrics are their
  mean, ``_sd`` their standard deviation: the estimator's training noise).

Feature sets (``--features``):

- ``a`` today's summary: the shipped head's 64-d summary vector and its mass anchor
  (``embedding.embed_and_anchor``) of the cleaned spectrum;
- ``b`` continuum + measured line fluxes: the same summary of the spectrum with the exactly
  solved emission lines subtracted, plus the catalog lines' fluxes as inputs
  (log10(F + sigma_F) and F / sigma_F). The lines are solved by :class:`sedvae.linear.
  LinearModel` (lines and calibration, non-negative) against a smooth continuum guess (a
  running median of the spectrum, 301 pixels), with fixed narrow-line kinematics (v = 0,
  sigma = 100 km/s) to keep the solve cheap;
- ``c`` the autoencoder encoder's features (``AutoencoderEmbedding`` of
  ``data/autoencoder/autoencoder_laptop.pt``: its latent u, nuisances, calibration, scale and
  log luminosity), the method's option, plus the same mass anchor.

Reference: the shipped head itself (``data/posterior/posterior.pt``, trained on the SPS mocks
on 150,000+ galaxies; 500 samples per galaxy) on the same test galaxies.

Per estimator and test set: bias (median error of the posterior median), NMAD and 68 %
coverage of log surviving mass; the same for log SFR(100 Myr) of star-forming galaxies (true
sSFR > 1e-11 / yr). Galaxies with a FATAL flag are left out of every row. Last line: JSON.

This is a proxy: a small estimator on a few thousand simulations ranks the inputs by what they
let a cheap model learn; it does not reproduce what a full head trained on each would reach.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import zuko

from sedvae.fileio import atomic_path
from sedvae.io.batch import FATAL
from sedvae.posterior import load_posterior
from sedvae.posterior.model import BATCH_KEYS

REPO = Path(__file__).resolve().parents[1]
SSFR_FLOOR = 1e-13  # /yr
SSFR_SF = 1e-11  # /yr: star-forming above it
GENERATIVE = {  # conf/experiment/posterior_generative.yaml
    "line_sigma_dex": 0.3, "balmer_sigma_dex": 0.15, "line_bound_dex": 1.0,
    "calib_sigma": 0.05, "scale_sigma": 0.05, "warp_frac": 1.0, "sky_frac": 0.3,
    "sky_line_prob": 0.3, "sky_amp": 4.0,
}  # fmt: skip
KEEP = ("flux", "ivar", "mask", "photometry", "photometry_ivar", "theta", "z")
SFH_TRUTHS = ("logmstar_surv", "sfr_100myr", "t_mw_gyr", "sfh_continuity", "sfr_log_ratio")


# ---- the sets ----------------------------------------------------------------------------------
def simulate(path: Path, n: int, seed: int, batch_size: int = 256, sfh=None) -> dict:
    """``n`` generative-model simulations (stream ``seed``), cached in ``path``. ``sfh``: an
    SFH prior (``sedvae.sps.continuity.ContinuitySFH``) instead of theta's histories; the
    history's truths (``SFH_TRUTHS``) are kept then."""
    if path.is_file():
        return torch.load(path)
    from sedvae.simulation.onthefly import GenerativeParts, build_generator, simulate_batch

    gen = build_generator(noise={"outlier_rate": 1e-3})
    parts = GenerativeParts(gen.sps.line_names, gen.instrument, **GENERATIVE)
    keep = KEEP if sfh is None else KEEP + SFH_TRUTHS
    out: dict[str, list] = {k: [] for k in keep}
    for step in range((n + batch_size - 1) // batch_size):
        size = min(batch_size, n - step * batch_size)
        b = simulate_batch(gen, size, seed, step, parts=parts, sfh=sfh)
        for k in keep:
            out[k].append(b[k].cpu())
    data = {k: torch.cat(v) for k, v in out.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return data


def sim_truth(posterior, data: dict) -> dict:
    """Truths of simulations: the history's own where the set carries them (an SFH prior other
    than theta's), else derived from theta."""
    d = data
    if "logmstar_surv" not in data:
        d = {k: v[0] for k, v in posterior.derived(data["theta"].double()[None],
                                                   data["z"].double()).items()}  # fmt: skip
    return {"logmsurv": d["logmstar_surv"].double().numpy(),
            "sfr_100myr": d["sfr_100myr"].double().numpy(),
            "tmw": d["t_mw_gyr"].double().numpy()}  # fmt: skip


def offmodel(path: Path, n: int, seed: int) -> tuple[dict, dict]:
    """The off-model batch (noise seed 0, as ``bench/off_model.py``) and its truths."""
    from sedvae.catalog.sources import MockSource
    from sedvae.offmodel import write_offmodel

    if not path.is_file():
        write_offmodel(path, n=n, seed=seed)
    batch = MockSource(path, n=n, seed=seed, noise_seed=0)(0, n)
    with h5py.File(path, "r") as f:
        t = {k: f["offmodel"][k][()] for k in ("logmstar_surv", "sfr_100myr", "t_mw_gyr")}
    return batch, {"logmsurv": t["logmstar_surv"], "sfr_100myr": t["sfr_100myr"],
                   "tmw": t["t_mw_gyr"]}  # fmt: skip


def targets(truth: dict, anchor: np.ndarray) -> np.ndarray:
    """(B, 3): log M_surv - anchor, log10 sSFR(100 Myr) (floored), t_MW."""
    ssfr = np.maximum(truth["sfr_100myr"] / 10 ** truth["logmsurv"], SSFR_FLOOR)
    return np.stack([truth["logmsurv"] - anchor, np.log10(ssfr), truth["tmw"]], -1)


# ---- the feature sets --------------------------------------------------------------------------
def running_median(flux: torch.Tensor, good: torch.Tensor, width: int = 301, every: int = 25):
    """(B, M) running median of the good pixels (window ``width``), evaluated every ``every``
    pixels and interpolated linearly: a smooth continuum guess with the lines cut out."""
    m = flux.shape[-1]
    centres = torch.arange(0, m, every)
    half = width // 2
    x = torch.where(good, flux, torch.nan)
    pad = torch.nn.functional.pad(x, (half, half), value=float("nan"))
    windows = pad.unfold(-1, width, 1)[:, centres]  # (B, C, width)
    med = torch.nan_to_num(windows.nanmedian(-1).values, nan=0.0)
    idx = torch.arange(m, dtype=torch.float64) / every
    lo = idx.floor().long().clamp(max=len(centres) - 1)
    hi = (lo + 1).clamp(max=len(centres) - 1)
    w = (idx - lo).to(flux.dtype)
    return med[:, lo] * (1 - w) + med[:, hi] * w


class Features:
    """Feature sets a/b/c of one posterior file (module docstring)."""

    def __init__(self, posterior, names: list[str]) -> None:
        self.posterior = posterior
        self.names = names
        self.linear = None
        self.encoder = None
        if "b" in names:
            from sedvae.linear import LinearModel
            from sedvae.simulation.onthefly import desi_instrument

            self.linear = LinearModel(desi_instrument())
        if "c" in names:
            from sedvae.posterior.embedding import AutoencoderEmbedding

            self.encoder = AutoencoderEmbedding(
                autoencoder=str(REPO / "data/autoencoder/autoencoder_laptop.pt"), freeze=True
            ).eval()

    @torch.no_grad()
    def __call__(self, batch, chunk: int = 128) -> tuple[dict, np.ndarray, np.ndarray]:
        """Features per set (each (B, D) float32), the mass anchor (B,) and the FATAL mask."""
        clean, flags = self.posterior.check(batch)
        inputs = [clean.get(k) for k in BATCH_KEYS]
        b = inputs[0].shape[0]
        out: dict[str, list] = {k: [] for k in self.names}
        anchors = []
        emb = self.posterior.net.embedding
        for i in range(0, b, chunk):
            part = [None if v is None else v[i : i + chunk] for v in inputs]
            ctx, anchor = emb.embed_and_anchor(*part)
            anchors.append(anchor)
            if "a" in self.names:
                out["a"].append(torch.cat([ctx, anchor[:, None]], -1))
            if "b" in self.names:
                out["b"].append(self._continuum_lines(part, anchor))
            if "c" in self.names:
                out["c"].append(torch.cat([self.encoder(*part), anchor[:, None]], -1))
        feats = {k: torch.cat(v).float().numpy() for k, v in out.items()}
        fatal = (flags.numpy() & int(FATAL)) > 0
        return feats, torch.cat(anchors).double().numpy(), fatal

    def _continuum_lines(self, part: list, anchor: torch.Tensor) -> torch.Tensor:
        from sedvae.linear import CATALOG_LINES

        stripped, line_flux, line_err = strip_lines(self.linear, part[0], part[1], part[2])
        part = [stripped.to(part[0].dtype), *part[1:]]
        ctx, _ = self.posterior.net.embedding.embed_and_anchor(*part)
        idx = [self.linear.lines.index(name) for name in CATALOG_LINES]
        f = torch.nan_to_num(line_flux[:, idx], nan=0.0).clamp_min(0)
        err = torch.nan_to_num(line_err[:, idx], nan=1e3).clamp_min(1e-3)
        lines = torch.cat([torch.log10(f + err), (f / err).clamp(max=1e3)], -1)
        return torch.cat([ctx.double(), anchor[:, None].double(), lines], -1)


def strip_lines(linear, flux, ivar, z, sigma_kms: float = 100.0):
    """The spectrum with its emission lines exactly solved and subtracted: the lines (and the
    calibration) solved by ``linear`` (:class:`sedvae.linear.LinearModel`) against the running
    median continuum, fixed kinematics (v = 0, ``sigma_kms``). Returns (stripped flux (B, M),
    line fluxes (B, L), their errors (B, L)); masked pixels stay 0."""
    flux, ivar, z = flux.double(), ivar.double(), z.double()
    good = ivar > 0
    cont = running_median(flux, good)
    n = flux.shape[0]
    fit = linear(cont, flux, ivar, z, torch.zeros(n, dtype=flux.dtype),
                 torch.full((n,), float(sigma_kms), dtype=flux.dtype), mask=~good)  # fmt: skip
    stripped = torch.where(good, flux - fit.lines_model, torch.zeros_like(flux))
    return stripped, fit.line_flux, fit.line_flux_err


# ---- the estimator -----------------------------------------------------------------------------
def fit_estimator(x: np.ndarray, y: np.ndarray, seed: int = 0, epochs: int = 150,
                  patience: int = 8, val_frac: float = 0.15):  # fmt: skip
    """A zuko NSF of y (3) given standardised x; early stopping on a validation split.
    Returns (flow, standardisers, record)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    perm = torch.randperm(n, generator=gen)
    n_val = max(int(val_frac * n), 1)
    xm, xs = x.mean(0), x.std(0) + 1e-6
    ym, ys = y.mean(0), y.std(0) + 1e-6
    xt = torch.as_tensor((x - xm) / xs, dtype=torch.float32)
    yt = torch.as_tensor((y - ym) / ys, dtype=torch.float32)
    val, tr = perm[:n_val], perm[n_val:]
    flow = zuko.flows.NSF(y.shape[1], x.shape[1], transforms=3, hidden_features=(128, 128))
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3, weight_decay=1e-5)
    best, best_state, since, history = float("inf"), None, 0, []
    for _ in range(epochs):
        flow.train()
        order = tr[torch.randperm(len(tr), generator=gen)]
        for i in range(0, len(order), 256):
            rows = order[i : i + 256]
            loss = -flow(xt[rows]).log_prob(yt[rows]).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), 5.0)
            opt.step()
        flow.eval()
        with torch.no_grad():
            v = float(-flow(xt[val]).log_prob(yt[val]).mean())
        history.append(v)
        if v < best - 1e-4:
            best, since = v, 0
            best_state = {k: t.clone() for k, t in flow.state_dict().items()}
        else:
            since += 1
            if since >= patience:
                break
    flow.load_state_dict(best_state)
    flow.eval()
    # val NLL in physical units (nats): add log of the target standardisation
    record = {"epochs": len(history), "val_nll": best + float(np.log(ys).sum())}
    return flow, (xm, xs, ym, ys), record


@torch.no_grad()
def predict(flow, std, x: np.ndarray, n_samples: int = 500, seed: int = 0) -> np.ndarray:
    """(n_samples, B, 3) samples of the targets in physical units."""
    xm, xs, ym, ys = std
    torch.manual_seed(seed)
    xt = torch.as_tensor((x - xm) / xs, dtype=torch.float32)
    s = flow(xt).sample((n_samples,)).double().numpy()
    return s * ys + ym


def quantiles_from_targets(samples: np.ndarray, anchor: np.ndarray) -> dict:
    """16/50/84 % of log M_surv, log SFR(100 Myr) and t_MW from target samples."""
    logm = samples[..., 0] + anchor[None]
    logsfr = samples[..., 1] + logm
    q = [16, 50, 84]
    return {"logmsurv": np.percentile(logm, q, axis=0),
            "logsfr": np.percentile(logsfr, q, axis=0),
            "tmw": np.percentile(samples[..., 2], q, axis=0)}  # fmt: skip


@torch.no_grad()
def shipped_quantiles(posterior, batch, n_samples: int = 500) -> dict:
    gen = torch.Generator().manual_seed(0)
    samples = posterior.sample(batch, n_samples, gen)
    d = posterior.derived(samples, torch.as_tensor(batch["z"]))
    q = torch.tensor([0.16, 0.5, 0.84], dtype=torch.float64)
    logsfr = torch.log10(d["sfr_100myr"].double().clamp_min(1e-30))
    return {"logmsurv": torch.nanquantile(d["logmstar_surv"].double(), q, dim=0).numpy(),
            "logsfr": torch.nanquantile(logsfr, q, dim=0).numpy()}  # fmt: skip


def stats(q: np.ndarray, truth: np.ndarray) -> dict:
    p16, p50, p84 = q
    ok = np.isfinite(p50) & np.isfinite(truth)
    if not ok.any():
        return {"n": 0}
    err = p50[ok] - truth[ok]
    return {
        "n": int(ok.sum()),
        "bias": round(float(np.median(err)), 4),
        "nmad": round(float(1.4826 * np.median(np.abs(err - np.median(err)))), 4),
        "cov68": round(float(np.mean((truth[ok] >= p16[ok]) & (truth[ok] <= p84[ok]))), 3),
    }


def mean_rows(rows: list[dict], keys=("in", "off")) -> dict:
    """Mean over the estimator seeds of every metric of the test sets ``keys``, with the seeds'
    standard deviation (``<stat>_sd``) when there are several."""
    out = {"dim": rows[0]["dim"], "epochs": rows[0]["epochs"],
           "val_nll": float(np.mean([r["val_nll"] for r in rows]))}  # fmt: skip
    for key in keys:
        out[key] = {}
        for q in rows[0][key]:
            stat = {"n": rows[0][key][q]["n"]}
            for s in ("bias", "nmad", "cov68"):
                v = [r[key][q][s] for r in rows if s in r[key][q]]
                if v:
                    stat[s] = round(float(np.mean(v)), 4)
                    if len(v) > 1:
                        stat[f"{s}_sd"] = round(float(np.std(v, ddof=1)), 4)
            out[key][q] = stat
    return out


def evaluate(q: dict, truth: dict, keep: np.ndarray) -> dict:
    sf = truth["sfr_100myr"] / 10 ** truth["logmsurv"] > SSFR_SF
    logsfr = np.log10(np.maximum(truth["sfr_100myr"], 1e-30))
    out = {"logmsurv": stats(q["logmsurv"][:, keep], truth["logmsurv"][keep]),
           "logsfr": stats(q["logsfr"][:, keep & sf], logsfr[keep & sf])}  # fmt: skip
    if "tmw" in q:
        out["tmw"] = stats(q["tmw"][:, keep], truth["tmw"][keep])
    return out


# ---- the study ---------------------------------------------------------------------------------
def run(n_train: int, n_in: int, n_off: int, off_seed: int, cache: Path, names: list[str],
        checkpoint: str | None = None, epochs: int = 150, n_samples: int = 500,
        train_seed: int = 201, test_seed: int = 202, n_seeds: int = 1) -> dict:  # fmt: skip
    """The whole study; returns the summary dict (the JSON line)."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    posterior = load_posterior(checkpoint or str(REPO / "data/posterior/posterior.pt"))
    d = cache / "conditioning"
    train = simulate(d / f"generative_n{n_train}_seed{train_seed}.pt", n_train, train_seed)
    test_in = simulate(d / f"generative_n{n_in}_seed{test_seed}.pt", n_in, test_seed)
    off_batch, off_truth = offmodel(cache / f"offmodel/offmodel_n{n_off}_seed{off_seed}.h5",
                                    n_off, off_seed)  # fmt: skip
    t_sim = time.perf_counter() - t0
    feat = Features(posterior, names)
    obs = {k: v for k, v in train.items() if k not in ("theta",)}
    sets = {}
    t1 = time.perf_counter()
    f_tr, a_tr, fatal_tr = feat(obs)
    sets["in"] = (*feat({k: v for k, v in test_in.items() if k != "theta"}),
                  sim_truth(posterior, test_in))  # fmt: skip
    sets["off"] = (*feat(off_batch), off_truth)
    t_feat = time.perf_counter() - t1
    truth_tr = sim_truth(posterior, train)
    y_tr = targets(truth_tr, a_tr)
    use = ~fatal_tr & np.isfinite(y_tr).all(1)

    result: dict = {"n_train": int(use.sum()), "n_in": n_in, "n_off": n_off, "seeds": n_seeds,
                    "simulate_s": round(t_sim, 1), "features_s": round(t_feat, 1)}  # fmt: skip
    rows = {}
    for name in names:
        x = f_tr[name]
        ok = use & np.isfinite(x).all(1)
        per_seed = []
        for seed in range(n_seeds):  # the estimator's own seed: its training noise
            flow, std, rec = fit_estimator(x[ok], y_tr[ok], seed=seed, epochs=epochs)
            row = {"dim": int(x.shape[1]), **rec}
            for key, (f, anchor, fatal, truth) in sets.items():
                xs = np.nan_to_num(f[name])
                q = quantiles_from_targets(predict(flow, std, xs, n_samples, seed), anchor)
                row[key] = evaluate(q, truth, ~fatal)
            per_seed.append(row)
            print(name, seed, json.dumps(row), flush=True)
        rows[name] = mean_rows(per_seed)
    ref = {"dim": 64}
    for key, batch in (("in", {k: v for k, v in test_in.items() if k != "theta"}),
                       ("off", off_batch)):  # fmt: skip
        _, _, fatal, truth = sets[key]
        ref[key] = evaluate(shipped_quantiles(posterior, batch, n_samples), truth, ~fatal)
    rows["shipped"] = ref
    print("shipped", json.dumps(ref), flush=True)
    for name, row in rows.items():
        for key in ("in", "off"):
            pre = f"{name}_{key}model"
            for q in ("logmsurv", "logsfr"):
                for s in ("bias", "nmad", "cov68", "bias_sd", "nmad_sd", "cov68_sd"):
                    if s in row[key][q]:
                        result[f"{pre}_{q}_{s}"] = row[key][q][s]
        if "val_nll" in row:
            result[f"{name}_val_nll"] = round(row["val_nll"], 3)
            result[f"{name}_epochs"] = row["epochs"]
    result["total_s"] = round(time.perf_counter() - t0, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=10000)
    parser.add_argument("--n-in", type=int, default=500)
    parser.add_argument("--n-off", type=int, default=400)
    parser.add_argument("--off-seed", type=int, default=3)
    parser.add_argument("--features", default="a,b,c", help="comma-separated: a, b, c")
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--n-samples", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=3, help="estimator seeds per feature set")
    parser.add_argument("--checkpoint", default=None, help="default: the shipped head")
    parser.add_argument("--cache", default=str(REPO / "cache"))
    args = parser.parse_args()
    result = run(args.n_train, args.n_in, args.n_off, args.off_seed, Path(args.cache),
                 args.features.split(","), args.checkpoint, args.epochs,
                 args.n_samples, n_seeds=args.seeds)  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
