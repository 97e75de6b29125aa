"""Per-galaxy catalog columns from the posterior head (and the autoencoder for chi^2).

``PosteriorFitter(batch)`` returns, for each galaxy of a shard: its id and z; the 16/50/84th
percentiles of every theta parameter and derived property from ``n_samples`` posterior samples;
``coverage_deficit``, the share of the posterior's training rest-frame bins its grid leaves empty;
the reduced chi^2 of the autoencoder's reconstruction (when one is given); and the OR of the
readers' and the posterior's ``sedvae.io.Flag`` bits (PRIOR_EDGE included). Galaxies with a
fatal flag get NaN values, never an exception.

When the batch carries the truth (``theta``, as mock sources do), every quantity also gets
``<name>_true`` and ``<name>_rank``: the fraction of posterior samples below the truth (its
posterior quantile), uniform on [0, 1] for a calibrated posterior. The catalog's coverage and
recovery plots and metrics are made from these columns.

With ``line_fluxes`` or ``ppc`` (both on in ``evaluation=catalog``), K = ``ppc_draws`` posterior
draws go through the generative model with emission lines and calibration solved exactly
(:mod:`sedvae.catalog.ppc`): line fluxes, errors and equivalent widths (``flux_<line>``,
``flux_err_<line>``, ``ew_<line>``, 1e-17 erg/s/cm^2 and rest-frame Angstrom), the narrow-line
``line_velocity`` and ``line_sigma`` (km/s), ``rchi2_ppc`` and ``rchi2_ppc_spread``, and the
``Flag.MISFIT`` warning bit.

With an OOD model beside the posterior file (:mod:`sedvae.posterior.ood`), ``ood_score``: the
log density of the galaxy's summary under the head's training summaries (lower = stranger;
``Flag.OOD`` below the stored threshold).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io.batch import FATAL, Flag
from ..posterior.api import DERIVED_NAMES, Posterior, load_posterior
from ..sps import PARAM_NAMES
from ..timing import stage

log = logging.getLogger(__name__)

QUANTILES = (16, 50, 84)


def default_posterior_path() -> Path:
    from ..paths import data_dir

    return data_dir() / "posterior" / "posterior.pt"


def catalog_quantities(derived: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Derived properties as catalogued: SFRs and Z_MW as log10 (they span decades)."""
    out = {}
    for name in DERIVED_NAMES:
        values = derived[name].double()
        if name.startswith("sfr"):
            out[f"log_{name}"] = torch.log10(values.clamp_min(1e-30))
        elif name == "z_mw":
            out["log_z_mw"] = torch.log10(values)
        else:
            out[name] = values
    return out


class PosteriorFitter(torch.nn.Module):
    """Catalog columns for a batch (see the module docstring).

    Parameters
    ----------
    posterior : a ``Posterior`` or a checkpoint path (default: the shipped one).
    n_samples : posterior samples per galaxy.
    autoencoder : optional ``SpectrumAutoencoder`` (or checkpoint path) for the reduced chi^2.
    refine_steps : test-time refinement steps of the autoencoder before its chi^2 (0: the
        encoder's amortised fit; 100 brings the bundled DESI spectrum from 28 to 6.2).
    refine : the fit the ``rchi2`` column comes from: ``"autoencoder"`` (the autoencoder's
        own reconstruction, lines from its residual network, ``SpectrumAutoencoder.refine``)
        or ``"exact"`` (its SPS continuum with the lines and the calibration solved exactly,
        the continuum's latents refined ``refine_steps`` steps with them solved at every step:
        ``SpectrumAutoencoder.fit_exact``; the bundled DESI galaxy 1.53 -> 1.49, the SDSS
        spectrum of NGC 3073 3.36 -> 1.06 in 200 steps).
    keep_samples : also return the samples (for the optional HDF5 of samples).
    seed : fixes the posterior draws (per shard: seed + shard).
    compile : fuse the flow's sampler with ``torch.compile`` (``Posterior(compile=True)``):
        ~22 % faster sampling here after a ~40 s compilation, so it pays from a few thousand
        galaxies on; draws equal the eager ones to float32 round-off.
    line_fluxes : catalog emission-line fluxes, errors and EWs from ``ppc_draws`` draws.
    ppc : catalog the posterior-predictive check (``rchi2_ppc``, its spread, ``Flag.MISFIT``).
    ppc_draws : K posterior draws pushed through the model with lines and calibration solved.
    misfit_quantile : 1 - the MISFIT false-alarm probability, split between the check's three
        tests (global chi^2, coherent residuals, windowed chi^2; :mod:`sedvae.catalog.ppc`).
    """

    def __init__(
        self,
        posterior: Posterior | str | Path | None = None,
        n_samples: int = 1000,
        autoencoder: Any = None,
        keep_samples: bool = False,
        seed: int = 0,
        refine_steps: int = 0,
        refine: str = "autoencoder",
        compile: bool = False,
        line_fluxes: bool = False,
        ppc: bool = False,
        ppc_draws: int = 16,
        misfit_quantile: float = 0.999,
    ):
        super().__init__()
        # the files the networks come from, for the run's manifest (their checksums)
        files = {"posterior": default_posterior_path() if posterior is None else posterior,
                 "autoencoder": autoencoder}  # fmt: skip
        self._files = {k: Path(v) if isinstance(v, str | Path) else None for k, v in files.items()}
        if posterior is None or isinstance(posterior, str | Path):
            posterior = load_posterior(posterior or default_posterior_path())
        if compile:
            posterior.net.flow.compile_sampler()
        self.posterior = posterior
        self.n_samples = int(n_samples)
        self.keep_samples = keep_samples
        self.seed = int(seed)
        self.refine_steps = int(refine_steps)
        if refine not in ("autoencoder", "exact"):
            raise ValueError(f"refine must be 'autoencoder' or 'exact'; got {refine!r}")
        if self.refine_steps < 0:
            raise ValueError(f"refine_steps must be >= 0; got {refine_steps}")
        self.refine = refine
        if isinstance(autoencoder, str | Path):
            from ..checkpoint import load_checkpoint

            autoencoder, _ = load_checkpoint(autoencoder, "autoencoder")
        self.autoencoder = autoencoder
        self.line_fluxes, self.ppc = bool(line_fluxes), bool(ppc)
        self.predictive = None
        if self.line_fluxes or self.ppc:
            from .ppc import PosteriorPredictive

            self.predictive = PosteriorPredictive(ppc_draws, misfit_quantile)

    def manifest(self) -> dict[str, Any]:
        """What fixes this fitter's columns: the networks' SHA-256 (of the checkpoint file, or
        of the weights of a network given in memory) and the sampling settings."""
        from .manifest import sha256_file, sha256_state

        nets = {}
        for name, net in (("posterior", self.posterior), ("autoencoder", self.autoencoder)):
            path = self._files[name]
            if net is None:
                nets[name] = None
            else:
                nets[name] = {"sha256": sha256_file(path) if path else sha256_state(net)}
        return {
            **nets,
            "n_samples": self.n_samples,
            "seed": self.seed,
            "refine_steps": self.refine_steps if self.autoencoder is not None else None,
            "refine": self.refine if self.autoencoder is not None else None,
            "keep_samples": bool(self.keep_samples),
            "line_fluxes": self.line_fluxes,
            "ppc": self.ppc,
            "ppc_draws": self.predictive.n_draws if self.predictive is not None else None,
            "misfit_quantile": (
                self.predictive.misfit_quantile if self.predictive is not None else None
            ),
            # the check's statistic: a run resumed across a change of either would mix them
            "ppc_model_floor": self.predictive.model_floor if self.predictive is not None else None,
            "ppc_calib_sigma": self.predictive.calib_sigma if self.predictive is not None else None,
        }

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        shard = int(batch.get("shard", 0))
        gen = torch.Generator().manual_seed(self.seed + shard)
        if "parts" in batch:  # files on grids that cannot share one batch (sources.py)
            outs = [self._fit(part, gen) for part in batch["parts"]]
            return {k: _concat_column([o[k] for o in outs]) for k in outs[0]}
        return self._fit(batch, gen)

    def _fit(self, batch: dict[str, Any], gen: torch.Generator) -> dict[str, Any]:
        samples, post_flags = self.posterior.sample(batch, self.n_samples, gen, return_flags=True)
        flags = post_flags.long() | torch.as_tensor(batch.get("flags", 0), dtype=torch.long)
        with stage("derived"):
            derived = self.posterior.derived(samples, batch["z"])
        flags |= self.posterior.prior_edge(samples, derived).long() * int(Flag.PRIOR_EDGE)
        out: dict[str, Any] = {
            "ids": np.asarray(batch.get("ids", np.arange(samples.shape[1]))),
            "z": torch.as_tensor(batch["z"]).float(),
            "flags": flags,
        }
        if self.posterior.ood is not None:
            out["ood_score"] = self.posterior.ood_score(batch).float()
        truth = batch.get("theta")
        truth = None if truth is None else torch.as_tensor(truth, dtype=samples.dtype)
        quantities = {name: samples[..., j] for j, name in enumerate(PARAM_NAMES)}
        quantities.update(catalog_quantities(derived))
        true_values = {}
        if truth is not None:
            true_values = {name: truth[:, j] for j, name in enumerate(PARAM_NAMES)}
            derived_truth = self.posterior.derived(truth[None], batch["z"])
            true_values.update({k: v[0] for k, v in catalog_quantities(derived_truth).items()})
        with stage("quantiles"):
            self._quantiles(out, quantities, true_values)
        out["coverage_deficit"] = self._coverage_deficit(batch)
        with stage("reconstruction"):
            # the posterior's cleaned batch, made once for the reconstruction and the check
            clean = None
            if self.autoencoder is not None or self.predictive is not None:
                clean, _ = self.posterior.check(batch)
            out["rchi2"] = self._reduced_chi2(batch, clean, flags)
        if self.predictive is not None:
            out.update(self._predictive(clean, samples, flags))
            out["flags"] = out["flags"] | out.pop("misfit").long() * int(Flag.MISFIT)
        if self.keep_samples:
            out["samples"] = samples.permute(1, 0, 2).contiguous()  # (B, n, 12)
        return out

    def _predictive(self, clean, samples: torch.Tensor, flags: torch.Tensor) -> dict[str, Any]:
        """Line and PPC columns of the unflagged galaxies (:mod:`sedvae.catalog.ppc`); the
        columns of the options that are off are left out."""
        ok = (flags & int(FATAL)) == 0
        cols = self.predictive(samples, clean, ok)
        cols.pop("fit", None)
        if not self.ppc:
            cols = {k: v for k, v in cols.items() if not k.startswith("rchi2_ppc")}
            cols["misfit"] = torch.zeros_like(cols["misfit"])
        if not self.line_fluxes:
            drop = ("flux_", "ew_", "line_")
            cols = {k: v for k, v in cols.items() if not k.startswith(drop)}
        return cols

    @staticmethod
    def _quantiles(out: dict, quantities: dict, true_values: dict) -> None:
        """Percentiles of every quantity (and, with the truth, its value and rank) into out."""
        q = torch.tensor([p / 100 for p in QUANTILES], dtype=torch.float64)
        for name, values in quantities.items():
            values = values.double()
            quant = torch.nanquantile(values, q, dim=0)  # (3, B)
            for k, p in enumerate(QUANTILES):
                out[f"{name}_p{p}"] = quant[k].float()
            if name in true_values:
                t = true_values[name].double()
                rank = (values < t).double().mean(0)
                ok = torch.isfinite(values).all(0) & torch.isfinite(t)
                out[f"{name}_true"] = t.float()
                out[f"{name}_rank"] = torch.where(ok, rank, torch.nan).float()

    def _coverage_deficit(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B,) share of the rest-frame bins the posterior was trained with (covered at z by
        its training grid) that the batch's grid leaves empty
        (``SpectrumEmbedding.coverage_deficit``): 0 on the training grid; legacy SDSS files
        ~0.12, whose posteriors are less accurate (``bench/grids.py``). NaN without a finite z."""
        z = torch.as_tensor(batch["z"], dtype=torch.float64)
        out = torch.where(torch.isfinite(z), 0.0, torch.nan).float()
        emb = self.posterior.net.embedding
        wave = batch.get("wave")
        if wave is None or not hasattr(emb, "coverage_deficit"):
            return out
        if emb.pixels(wave, batch.get("arm"))[0] is emb.binner:  # the training grid itself
            return out
        ok = torch.isfinite(z)
        if bool(ok.any()):
            out[ok] = emb.coverage_deficit(wave, batch.get("arm"), z[ok]).float()
        return out

    def reconstruct(self, clean, components: bool = False) -> dict:
        """The autoencoder's fit of a cleaned batch that the ``rchi2`` column and the
        reconstruction figure come from (``refine``, ``refine_steps``), as ``forward``
        returns one (``batch``, ``latents``, ``model``)."""
        ae = self.autoencoder
        if self.refine == "exact":
            return ae.fit_exact(clean, steps=self.refine_steps).as_output()
        if self.refine_steps:
            with torch.enable_grad():
                return ae.refine(clean, steps=self.refine_steps, components=components)
        with torch.no_grad():
            return ae(clean, components=components)

    def _reduced_chi2(self, batch: dict[str, Any], clean, flags: torch.Tensor) -> torch.Tensor:
        """chi^2 / N_pix of the autoencoder's reconstruction of the posterior's cleaned batch
        (bad and outlier pixels masked, broken resolution matrices replaced); NaN for fatal
        flags, outside the autoencoder's redshift range, and for galaxies the autoencoder
        cannot fit (logged with their ids)."""
        b = flags.shape[0]
        out = torch.full((b,), float("nan"))
        ok = (flags & int(FATAL)) == 0
        if self.autoencoder is None or not bool(ok.any()):
            return out
        lo, hi = getattr(self.autoencoder, "z_range", (-math.inf, math.inf))
        z = torch.as_tensor(batch["z"], dtype=torch.float64)
        outside = ok & ((z < lo) | (z > hi))
        if bool(outside.any()):
            ids = np.asarray(batch.get("ids", np.arange(b)))[outside.numpy()]
            log.warning("no autoencoder chi^2 outside its z range %s: %s", (lo, hi), ids[:10])
            ok = ok & ~outside
            if not bool(ok.any()):
                return out
        sub = clean.select(ok)
        try:
            res = self.reconstruct(sub)
            with torch.no_grad():
                c = self.autoencoder.chi2(res["batch"], res["model"])
        except ValueError as err:  # one odd galaxy must not stop a catalog run
            ids = np.asarray(batch.get("ids", np.arange(b)))[ok.numpy()]
            log.warning("no autoencoder chi^2 for galaxies %s: %s", ids.tolist()[:10], err)
            return out
        rchi2 = (c["chi2"] / c["n_pix"].clamp_min(1)).float()
        out[ok] = torch.where(torch.isfinite(rchi2), rchi2, torch.nan)
        return out


def _concat_column(values: list):
    if isinstance(values[0], torch.Tensor):
        return torch.cat(values)
    return np.concatenate(values)
