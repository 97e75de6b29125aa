"""Out-of-distribution score of the SBI head: is a galaxy like those the head was trained on?

The score of a galaxy is the log density of its summary vector s(x) (the head's embedding, what
the flow conditions on) under a Gaussian mixture fitted to the summaries of simulations from the
head's training distribution (DESIGN section 6; issue 26)::

    score(x) = log p_GMM(W (s(x) - mu)),   W, mu: the fit set's per-dimension standardisation

A galaxy whose score is below ``threshold`` gets the ``Flag.OOD`` warning bit: its summary lies
where the head saw (almost) no training data, so its posterior is an extrapolation. The
threshold is the ``quantile`` (default 1 %) of the scores of a held-out set of simulations
(other seeds than the fit set), so about that fraction of in-model galaxies is flagged; the
goal is <= 2 %.

The model is stored in a small companion file beside the posterior checkpoint
(``<checkpoint stem>_ood.pt``: tensors and plain values only, read with
``torch.load(weights_only=True)``), with the SHA-256 of the checkpoint it was fitted for;
:func:`sedvae.posterior.load_posterior` attaches it when present and refuses a stale one.

    python -m sedvae.posterior.ood fit [--checkpoint data/posterior/posterior.pt] [--n-fit 4000]
        [--n-held 2000] [--seed 7] [--components 4] [--quantile 0.01] [--generative]
        [--outlier-rate 0.001]

simulates the fit and held-out sets with the on-the-fly simulator (``--generative``: with the
generative model's data-driven parts, for a head trained on them), fits, sets the threshold and
writes the companion file (atomically).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KIND = "posterior_ood"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ood_path(checkpoint: str | Path) -> Path:
    """The companion file of a posterior checkpoint: ``<stem>_ood.pt`` in its folder."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}_ood.pt")


# ---- the density model -------------------------------------------------------------------------
def _log_gauss(x: torch.Tensor, means: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """(N, K) log N(x | mean_k, L_k L_k^T) for x (N, D), means (K, D), chol (K, D, D)."""
    d = x.shape[-1]
    diff = (x[None] - means[:, None]).transpose(1, 2)  # (K, D, N)
    sol = torch.linalg.solve_triangular(chol, diff, upper=False)  # (K, D, N)
    maha = (sol**2).sum(1)  # (K, N)
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (K,)
    return (-0.5 * (maha + logdet[:, None] + d * math.log(2 * math.pi))).T


def fit_gmm(
    x: torch.Tensor,
    components: int = 4,
    iterations: int = 200,
    reg: float = 1e-3,
    generator: torch.Generator | None = None,
    tol: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """Full-covariance Gaussian mixture by EM (float64), k-means++ start.

    x : (N, D) standardised points; ``reg`` is added to every covariance's diagonal.
    Returns ``weights`` (K,), ``means`` (K, D), ``chol`` (K, D, D) Cholesky factors.
    """
    x = x.double()
    n, d = x.shape
    if n < 2 * components:
        raise ValueError(f"need at least {2 * components} points for {components} components")
    # k-means++ seeding
    idx = [int(torch.randint(n, (1,), generator=generator))]
    for _ in range(1, components):
        d2 = torch.cdist(x, x[idx]).min(1).values ** 2
        idx.append(int(torch.multinomial(d2 / d2.sum(), 1, generator=generator)))
    means = x[idx].clone()
    resp = torch.nn.functional.one_hot(torch.cdist(x, means).argmin(1), components).double()
    eye = torch.eye(d, dtype=torch.float64)
    last = -math.inf
    for _ in range(iterations):
        nk = resp.sum(0) + 1e-10
        weights = nk / n
        means = (resp.T @ x) / nk[:, None]
        diff = x[None] - means[:, None]  # (K, N, D)
        cov = torch.einsum("kn,kni,knj->kij", resp.T, diff, diff) / nk[:, None, None]
        chol = torch.linalg.cholesky(cov + reg * eye)
        logp = _log_gauss(x, means, chol) + torch.log(weights)[None]
        total = torch.logsumexp(logp, 1)
        resp = torch.exp(logp - total[:, None])
        mean_ll = float(total.mean())
        if mean_ll - last < tol:
            break
        last = mean_ll
    return {"weights": weights, "means": means, "chol": chol}


class OODScore:
    """A fitted OOD model: standardisation, Gaussian mixture and threshold (module docstring).

    Parameters
    ----------
    loc, scale : (D,) tensors
        Standardisation of the summaries.
    weights, means, chol : the mixture (:func:`fit_gmm`).
    threshold : float
        Scores below it are out of distribution.
    meta : dict
        Plain values: how it was fitted (sets, seeds, quantile, flagged fractions, checkpoint
        SHA-256).
    """

    def __init__(self, loc, scale, weights, means, chol, threshold: float, meta=None) -> None:
        self.loc, self.scale = loc.double(), scale.double()
        self.weights, self.means, self.chol = weights.double(), means.double(), chol.double()
        self.threshold = float(threshold)
        self.meta = dict(meta or {})

    @property
    def dim(self) -> int:
        return int(self.loc.shape[0])

    def score(self, context: torch.Tensor) -> torch.Tensor:
        """(B,) log density of summaries ``context`` (B, D) (float64; NaN rows stay NaN)."""
        if context.ndim != 2 or context.shape[1] != self.dim:
            raise ValueError(f"summaries must have shape (B, {self.dim}); got {context.shape}")
        x = (context.double().cpu() - self.loc) / self.scale
        logp = _log_gauss(x, self.means, self.chol) + torch.log(self.weights)[None]
        return torch.logsumexp(logp, 1)

    def flagged(self, context: torch.Tensor) -> torch.Tensor:
        """(B,) bool: score below the threshold (NaN scores are flagged too)."""
        s = self.score(context)
        return ~(s >= self.threshold)

    # ---- file -----------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "loc": self.loc, "scale": self.scale, "weights": self.weights,
            "means": self.means, "chol": self.chol,
            "threshold": self.threshold,
            "meta": json.dumps(self.meta),
        }  # fmt: skip

    def save(self, path: str | Path) -> Path:
        from ..fileio import atomic_path

        with atomic_path(path) as tmp:
            torch.save(self.state(), tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, checkpoint: str | Path | None = None) -> OODScore:
        """Read a companion file (``torch.load(weights_only=True)``). With ``checkpoint``, its
        SHA-256 must be the one the model was fitted for (CheckpointError otherwise)."""
        from ..checkpoint import CheckpointError, read_torch_file

        payload = read_torch_file(path)
        if payload.get("kind") != KIND or payload.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path} is not a posterior OOD file of format {FORMAT_VERSION} "
                f"(kind {payload.get('kind')!r}, format {payload.get('format_version')!r})"
            )
        meta = json.loads(payload["meta"])
        if checkpoint is not None:
            digest = sha256_file(checkpoint)
            if meta.get("checkpoint_sha256") != digest:
                raise CheckpointError(
                    f"{path} was fitted for another posterior file than {checkpoint} (SHA-256 "
                    f"{meta.get('checkpoint_sha256')} vs {digest}): refit it with "
                    f"`python -m sedvae.posterior.ood fit --checkpoint {checkpoint}` or remove it"
                )
        return cls(payload["loc"], payload["scale"], payload["weights"], payload["means"],
                   payload["chol"], float(payload["threshold"]), meta)  # fmt: skip


def fit_ood(
    fit_context: torch.Tensor,
    held_context: torch.Tensor,
    components: int = 4,
    quantile: float = 0.01,
    seed: int = 0,
    reg: float = 1e-3,
) -> OODScore:
    """Fit the mixture on ``fit_context`` (N, D) summaries and set the threshold at the
    ``quantile`` of the scores of ``held_context`` (held-out summaries of the same model)."""
    if not 0 < quantile < 0.5:
        raise ValueError(f"quantile must lie in (0, 0.5); got {quantile}")
    fit_context = fit_context.double()
    ok = torch.isfinite(fit_context).all(1)
    fit_context = fit_context[ok]
    loc = fit_context.mean(0)
    scale = fit_context.std(0).clamp_min(1e-6)
    gmm = fit_gmm((fit_context - loc) / scale, components, reg=reg,
                  generator=torch.Generator().manual_seed(seed))  # fmt: skip
    model = OODScore(loc, scale, gmm["weights"], gmm["means"], gmm["chol"], -math.inf)
    held = model.score(held_context[torch.isfinite(held_context).all(1)])
    model.threshold = float(torch.quantile(held, quantile))
    model.meta = {
        "n_fit": int(fit_context.shape[0]),
        "n_held": int(held.shape[0]),
        "components": int(components),
        "reg": float(reg),
        "quantile": float(quantile),
        "fit_flagged_frac": float((model.score(fit_context) < model.threshold).double().mean()),
        "held_flagged_frac": float((held < model.threshold).double().mean()),
    }
    return model


# ---- summaries of simulated galaxies -------------------------------------------------------------
@torch.no_grad()
def summaries(posterior, batch: dict, drop_seed: int | None = None) -> torch.Tensor:
    """(B, D) summaries of a batch as the head sees it at inference (cleaned and clipped by
    :meth:`Posterior.check`); with ``drop_seed``, the training augmentation (``net.augment``:
    photometry hidden on the training fraction, spectra cut short on another when the head was
    trained with coverage cuts), as in training. Fatal galaxies are NaN."""
    from ..io.batch import FATAL

    clean, flags = posterior.check(batch)
    if drop_seed is not None:
        gen = torch.Generator().manual_seed(int(drop_seed))
        keys = ("z", "flux", "ivar", "mask", "photometry_ivar")
        aug = posterior.net.augment({k: getattr(clean, k) for k in keys}, gen)
        for key in ("flux", "ivar", "mask", "photometry_ivar"):
            setattr(clean, key, aug[key])
    context, _ = posterior.net.embed(clean)
    context = context.double()
    context[(flags & int(FATAL)) > 0] = torch.nan
    return context


def simulated_summaries(posterior, n: int, seed: int, generative=None, batch: int = 256,
                        generator=None):  # fmt: skip
    """Summaries of ``n`` simulations (``sedvae.simulation.onthefly``, steps of ``seed``;
    ``generator``: a ``MockGenerator``, default ``build_generator()``)."""
    from ..simulation.onthefly import SimulatorDataModule

    dm = SimulatorDataModule(generator, batch_size=batch, n_val=0, seed=seed,
                             generative=generative)  # fmt: skip
    out = []
    for step, start in enumerate(range(0, n, batch)):
        b = dm.make_batch(min(batch, n - start), seed, step)
        out.append(summaries(posterior, b, drop_seed=seed * 100_003 + step))
        log.info("summaries: %d / %d", start + b["z"].shape[0], n)
    return torch.cat(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sedvae.posterior.ood",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit the OOD model of a posterior file and write it beside")
    fit.add_argument("--checkpoint", default="data/posterior/posterior.pt")
    fit.add_argument("--out", default=None, help="default: <checkpoint stem>_ood.pt beside it")
    fit.add_argument("--n-fit", type=int, default=4000)
    fit.add_argument("--n-held", type=int, default=2000)
    fit.add_argument("--seed", type=int, default=7, help="fit set seed; held-out: seed + 1")
    fit.add_argument("--components", type=int, default=4)
    fit.add_argument("--quantile", type=float, default=0.01)
    fit.add_argument("--generative", action="store_true",
                     help="simulate with GenerativeParts' defaults (a head trained on them)")
    fit.add_argument("--generative-config", default=None,
                     help="a JSON object of GenerativeParts keyword arguments")
    fit.add_argument("--outlier-rate", type=float, default=0.0,
                     help="unflagged outlier pixels of the noise model (0.001 with --generative"
                          " as experiment=posterior_generative trains)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..simulation.onthefly import build_generator
    from . import load_posterior

    posterior = load_posterior(args.checkpoint, ood=False)
    generative = None
    if args.generative_config:
        generative = json.loads(args.generative_config)
    elif args.generative:
        generative = True
    gen = build_generator(noise={"outlier_rate": args.outlier_rate} if args.outlier_rate else None)
    fit_ctx = simulated_summaries(posterior, args.n_fit, args.seed, generative, generator=gen)
    held_ctx = simulated_summaries(posterior, args.n_held, args.seed + 1, generative,
                                   generator=gen)  # fmt: skip
    model = fit_ood(fit_ctx, held_ctx, args.components, args.quantile, seed=args.seed)
    model.meta.update({
        "checkpoint": Path(args.checkpoint).name,
        "checkpoint_sha256": sha256_file(args.checkpoint),
        "fit_seed": args.seed, "held_seed": args.seed + 1,
        "simulator": "generative" if generative else "sps_mocks",
        "outlier_rate": args.outlier_rate,
        "generative": generative if isinstance(generative, dict) else bool(generative),
        "command": " ".join(["python -m sedvae.posterior.ood", *(sys.argv[1:] if argv is None
                                                                  else argv)]),
    })  # fmt: skip
    out = model.save(args.out or ood_path(args.checkpoint))
    print(json.dumps({"out": str(out), "threshold": model.threshold, **model.meta}))


if __name__ == "__main__":
    main()
