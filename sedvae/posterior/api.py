"""User-facing posterior: samples in physical units, flags for bad inputs, derived properties,
star-formation and metallicity history bands.

```python
from sedvae.posterior import load_posterior
post = load_posterior("data/posterior/posterior.pt")
theta = post.sample(batch, 1000)             # (1000, B, 12) physical units, NaN where flagged
flags = post.flags(batch)                    # (B,) sedvae.io.Flag bits, 0 = fine
props = post.derived(theta, batch["z"])      # dict of (1000, B): logmstar_surv, sfr_100myr, ...
bands = post.sfh_bands(theta, batch["z"])    # SFR(t) and Z(t) percentiles per galaxy
```

``batch`` is a :class:`sedvae.io.SpectrumBatch` (``Spectra.to_batch()``) or a dict with its
keys: ``flux``, ``ivar`` (B, M) 1e-17 erg/s/cm^2/A on the pixels the posterior was trained on
(``post.npix``), optional ``mask`` (B, M) bool (True = bad), ``z`` (B,), optional
``photometry``, ``photometry_ivar`` (B, 5) nanomaggies (Legacy Surveys g, r, z, W1, W2).
Shapes are checked (ValueError, expected vs got); problems of single galaxies are
:class:`sedvae.io.Flag` bits, never exceptions, so one bad spectrum does not spoil a batch.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..io.batch import FATAL, Z_RANGE, Flag, SpectrumBatch
from ..sps.provabgs import BOXES, N_THETA, PARAM_NAMES, THETA
from ..timing import stage
from .model import NeuralPosterior

if TYPE_CHECKING:
    from .ood import OODScore

# PRIOR_EDGE: a 16-84 % interval within this fraction of the parameter's range from its end
# (0.055 dex for logM*: a posterior of a real galaxy near 10^7 M_sun is wider than that).
EDGE_FRACTION = 0.01
DERIVED_NAMES = ("logmstar_surv", "sfr_100myr", "sfr_1gyr", "z_mw", "t_mw_gyr")


# The posterior's flags are the one enum of sedvae.io.batch (kept under its old name).
PosteriorFlag = Flag


class PosteriorSamples(NamedTuple):
    """``samples`` (n, B, 12) physical theta (NaN for fatal flags), ``flags`` (B,) int."""

    samples: torch.Tensor
    flags: torch.Tensor


class Posterior:
    """Amortised posterior p(theta | spectrum, photometry, z) of a trained NeuralPosterior.

    Parameters
    ----------
    net : NeuralPosterior
    z_range : (float, float)
        Redshifts accepted (others are flagged ``BAD_Z``).
    chunk : int
        Galaxies per flow call when sampling: ~10 keeps the (chunk x n) working set of the
        coupling layers in cache (1.5x faster than one call for 1000 galaxies here; with
        1,000 samples each, 10 galaxies took 6.0-6.3 ms per galaxy, 20 took 6.8-7.1 and 40
        7.9-8.1, one thread).
    ood : OODScore, optional
        Out-of-distribution model of this head's summaries (:mod:`sedvae.posterior.ood`):
        galaxies scoring below its threshold get ``Flag.OOD`` (a warning; they are sampled).
        :func:`load_posterior` attaches the checkpoint's companion file when there is one.
    compile : bool
        Fuse the flow's inverse pass with ``torch.compile`` (~1 min once per number of
        samples n; then ~30 % faster sampling here: 5.1-5.7 against 7.4-7.9 ms per galaxy
        for 1,000 samples, one thread).
    """

    names = PARAM_NAMES

    def __init__(
        self,
        net: NeuralPosterior,
        z_range=Z_RANGE,
        chunk: int = 10,
        compile: bool = False,
        ood: OODScore | None = None,
    ) -> None:
        self.net = net.eval()
        self.ood = ood
        self.prior = net.prior
        self.z_range = (float(z_range[0]), float(z_range[1]))
        self.chunk = int(chunk)
        if compile:
            self.net.flow.compile_sampler()

    @property
    def npix(self) -> int:
        return self.net.embedding.npix

    @property
    def meta(self) -> dict:
        return getattr(self.net, "meta", {})

    # ---- inputs -------------------------------------------------------------------------
    def check(self, batch: SpectrumBatch | dict) -> tuple[SpectrumBatch, torch.Tensor]:
        """Validate shapes (ValueError) and clean values; returns (clean batch, flags (B,)).

        :meth:`SpectrumBatch.clean` with outlier clipping: bad pixels and isolated outliers
        are masked (ivar = 0, flux = 0), unusable photometry gets ivar 0, and problems are
        flagged (the batch's own ``flags`` are kept). Fatal galaxies get placeholder inputs (a
        copy of a usable one, or ones) so the batch still runs; their samples become NaN.
        """
        clean = SpectrumBatch.coerce(batch).clean(
            z_range=self.z_range, npix=self.npix, n_bands=self.net.embedding.n_bands, clip=True
        )
        flags = clean.flags
        fatal = (flags & int(FATAL)) > 0
        lo, hi = self.z_range
        clean.z = torch.where(fatal, torch.full_like(clean.z, 0.5 * (lo + hi)), clean.z)
        if bool(fatal.any()):
            good = torch.nonzero(~fatal).flatten()
            src = int(good[0]) if len(good) else None
            for key in ("flux", "ivar", "photometry", "photometry_ivar", "z"):
                v = getattr(clean, key)
                if v is not None:
                    v = v.clone()
                    v[fatal] = v[src].clone() if src is not None else torch.ones_like(v[0])
                    setattr(clean, key, v)
            clean.mask = clean.mask.clone()
            clean.mask[fatal] = False
        return clean, flags

    @torch.no_grad()
    def flags(self, batch: dict) -> torch.Tensor:
        """(B,) :class:`sedvae.io.Flag` bits of a batch (before sampling: no PRIOR_EDGE; OOD
        when an OOD model is attached)."""
        clean, flags = self.check(batch)
        if self.ood is None:
            return flags
        return self._ood_flags(self.net.embed(clean)[0], flags)

    def _ood_flags(self, context: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """``flags`` with ``Flag.OOD`` set where the summary scores below the threshold."""
        if self.ood is None:
            return flags
        ok = (flags & int(FATAL)) == 0
        out = self.ood.flagged(context).to(flags.device) & ok
        return flags | out.to(flags.dtype) * int(Flag.OOD)

    @torch.no_grad()
    def ood_score(self, batch: dict) -> torch.Tensor:
        """(B,) float64 OOD score of each galaxy (log density of its summary under the
        training summaries' mixture; lower = stranger; NaN for fatal flags). ValueError
        without an OOD model."""
        if self.ood is None:
            raise ValueError("this posterior has no OOD model (python -m sedvae.posterior.ood fit)")
        clean, flags = self.check(batch)
        score = self.ood.score(self.net.embed(clean)[0])
        score[((flags & int(FATAL)) > 0).cpu()] = torch.nan
        return score

    # ---- sampling -----------------------------------------------------------------------
    @torch.no_grad()
    def sample_u(
        self, batch: dict, n: int, generator: torch.Generator | None = None
    ) -> PosteriorSamples:
        """Unconstrained samples u (n, B, 11) (NaN where fatal) and flags (B,)."""
        with stage("clean"):
            clean, flags = self.check(batch)
        with stage("summary"):
            embedded = self.net.embed(clean)
        flags = self._ood_flags(embedded[0], flags)
        u = self.net.sample_u(clean, n, generator, chunk=self.chunk, embedded=embedded)
        u[:, (flags & int(FATAL)) > 0] = torch.nan
        return PosteriorSamples(u, flags)

    @torch.no_grad()
    def sample(
        self,
        batch: dict,
        n: int,
        generator: torch.Generator | None = None,
        return_flags: bool = False,
    ) -> torch.Tensor | PosteriorSamples:
        """Posterior samples of theta in physical units.

        Parameters
        ----------
        batch : SpectrumBatch or dict (module docstring)
        n : int
            Samples per galaxy.
        generator : torch.Generator, optional
            Fixes the draw.
        return_flags : bool
            Return ``PosteriorSamples(samples, flags)`` instead of the samples alone.

        Returns
        -------
        (n, B, 12) tensor: logM* (log10 M_sun formed), beta_1..4, f_burst, t_burst (Gyr),
        gamma_1, gamma_2, tau_BC, tau_ISM, n_dust (``PARAM_NAMES``); every sample lies in the
        prior support; galaxies with a fatal flag are NaN.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1; got {n}")
        u, flags = self.sample_u(batch, n, generator)
        theta = torch.full((*u.shape[:2], N_THETA), torch.nan)
        ok = (flags & int(FATAL)) == 0
        if bool(ok.any()):
            with stage("flow_sampling"):
                flat = u[:, ok].reshape(-1, u.shape[-1]).double()
                theta[:, ok] = self.prior.to_constrained(flat).float().reshape(n, -1, N_THETA)
        if not return_flags:
            return theta
        flags = flags | self.prior_edge(theta).long() * int(Flag.PRIOR_EDGE)
        return PosteriorSamples(theta, flags)

    @torch.no_grad()
    def prior_edge(
        self, samples: torch.Tensor, derived: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """(B,) bool: the posterior sits at a prior boundary, so the prior, not the data, sets
        its value (``Flag.PRIOR_EDGE``). True when the 16-84 % interval of logM* lies within
        EDGE_FRACTION of its range from either end, or has zero width; when that of n_dust
        lies within EDGE_FRACTION of +1 (the steepest-curve end, which absorbs misfits); and,
        given ``derived`` (:meth:`derived`), when the median Z_MW is at the top of the SSP
        metallicity grid (Z(t) clipped there). Galaxies without samples (NaN) are False."""
        q = torch.tensor([0.16, 0.84], dtype=torch.float64)
        out = torch.zeros(samples.shape[1], dtype=torch.bool)
        for i, lo, hi, _ in BOXES:
            if i not in (THETA.LOGMSTAR, THETA.N_DUST):
                continue
            p16, p84 = torch.nanquantile(samples[..., i].double(), q, dim=0)
            tol = EDGE_FRACTION * (hi - lo)
            at_hi = p16 >= hi - tol
            if i == THETA.LOGMSTAR:
                at_hi = at_hi | (p84 <= lo + tol) | (p84 - p16 <= 0)
            out |= at_hi & torch.isfinite(p16)
        if derived is not None and "z_mw" in derived:
            z_top = 10 ** float(self.sps.log_zgrid[-1])
            med = torch.nanmedian(derived["z_mw"].double(), 0).values
            out |= med >= z_top * (1 - 1e-3)
        return out

    @torch.no_grad()
    def log_prob(self, theta: torch.Tensor, batch: dict) -> torch.Tensor:
        """log q(theta | x) (..., B) w.r.t. Lebesgue measure on theta_free = (logM*,
        beta_1..3, the 8 other parameters), for theta (..., B, 12) in the support."""
        clean, _ = self.check(batch)
        shape = theta.shape[:-1]
        flat = theta.reshape(-1, N_THETA).double()
        u = self.prior.to_unconstrained(flat)
        ladj = self.prior.log_abs_det_jacobian(u)
        log_q = self.net.log_prob_u(u.float().reshape(*shape, -1), clean)
        return log_q - ladj.float().reshape(shape)

    # ---- derived quantities -------------------------------------------------------------
    @functools.cached_property
    def sps(self):
        """An SEDModel for histories and derived properties; 10 A of wavelength is enough (the
        live-mass tables do not depend on it), which keeps it small and quick to build."""
        from ..sps import SEDModel

        return SEDModel(5000.0, 5010.0, z_max=1.0)

    def _flat(self, samples: torch.Tensor, z: torch.Tensor):
        if samples.ndim != 3 or samples.shape[-1] != N_THETA:
            raise ValueError(f"samples must have shape (n, B, {N_THETA}); got {samples.shape}")
        n, b, _ = samples.shape
        z = torch.as_tensor(z, dtype=samples.dtype)
        if z.shape != (b,):
            raise ValueError(f"z must have shape ({b},); got {tuple(z.shape)}")
        ok = torch.isfinite(samples).all(-1).all(0) & torch.isfinite(z)
        ok &= (z >= 0) & (z <= self.sps.z_max)
        return ok, samples[:, ok].reshape(-1, N_THETA), z[ok].repeat(n)

    @torch.no_grad()
    def derived(
        self, samples: torch.Tensor, z: torch.Tensor, chunk: int = 65536
    ) -> dict[str, torch.Tensor]:
        """Derived properties of posterior samples, each (n, B) (NaN for flagged galaxies):

        ``logmstar_surv`` log10 surviving stellar mass (M_sun); ``sfr_100myr``, ``sfr_1gyr``
        mean SFR over the last 100 Myr and 1 Gyr (M_sun/yr); ``z_mw`` formed-mass-weighted
        metallicity (absolute Z); ``t_mw_gyr`` formed-mass-weighted lookback age (Gyr).
        """
        n, b = samples.shape[:2]
        ok, flat, zz = self._flat(samples, z)
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in DERIVED_NAMES}
        for i in range(0, flat.shape[0], chunk):
            d = self.sps.derived(flat[i : i + chunk], zz[i : i + chunk])
            for k in DERIVED_NAMES:
                parts[k].append(d[k])
        out = {}
        for k in DERIVED_NAMES:
            full = torch.full((n, b), torch.nan, dtype=samples.dtype)
            if parts[k]:
                full[:, ok] = torch.cat(parts[k]).reshape(n, -1).to(samples.dtype)
            out[k] = full
        return out

    @torch.no_grad()
    def sfh_bands(
        self,
        samples: torch.Tensor,
        z: torch.Tensor,
        quantiles: tuple[float, ...] = (0.16, 0.5, 0.84),
        chunk: int = 65536,
    ) -> dict[str, torch.Tensor]:
        """Posterior bands of the star-formation and metallicity histories.

        Returns
        -------
        dict with ``lookback_lo_gyr``, ``lookback_hi_gyr`` (42,) the PROVABGS bin edges;
        ``t_univ_gyr`` (B,) (bins older than this are empty); ``quantiles`` (Q,);
        ``sfr`` (Q, B, 42) M_sun/yr, the burst spread over its bin; ``zmet`` (Q, B, 42)
        absolute metallicity. NaN for flagged galaxies.
        """
        n, b = samples.shape[:2]
        ok, flat, zz = self._flat(samples, z)
        nb = self.sps.n_bins
        sfr_parts, z_parts = [], []
        edges = self.sps.bin_edges
        for i in range(0, flat.shape[0], chunk):
            h = self.sps.sfh(flat[i : i + chunk], zz[i : i + chunk])
            width = ((h["bin_hi_gyr"] - h["bin_lo_gyr"]) * 1e9).clamp_min(1.0)
            k = (torch.searchsorted(edges, h["burst_age_gyr"].contiguous(), right=True) - 1).clamp(
                0, nb - 1
            )
            burst = torch.zeros_like(h["sfr"]).scatter_(1, k[:, None], h["burst_mass"][:, None])
            sfr_parts.append(h["sfr"] + torch.where(width > 1.0, burst / width, 0.0))
            z_parts.append(h["zmet"])
        q = torch.as_tensor(quantiles, dtype=torch.float32)
        out_sfr = torch.full((len(q), b, nb), torch.nan)
        out_z = torch.full((len(q), b, nb), torch.nan)
        if sfr_parts:
            sfr = torch.cat(sfr_parts).reshape(n, -1, nb).float()
            zmet = torch.cat(z_parts).reshape(n, -1, nb).float()
            out_sfr[:, ok] = torch.quantile(sfr, q, dim=0)
            out_z[:, ok] = torch.quantile(zmet, q, dim=0)
        from ..physics.cosmology import age_of_universe_gyr

        zt = torch.as_tensor(z, dtype=torch.float64)
        return {
            "lookback_lo_gyr": edges[:-1].float(),
            "lookback_hi_gyr": edges[1:].float(),
            "t_univ_gyr": age_of_universe_gyr(zt.clamp(0, self.sps.z_max)).float(),
            "quantiles": q,
            "sfr": out_sfr,
            "zmet": out_z,
        }


def load_posterior(path, map_location="cpu", ood: bool | str = "auto", **kwargs) -> Posterior:
    """A :class:`Posterior` from a posterior checkpoint (:mod:`sedvae.checkpoint`).

    ``ood``: "auto" attaches the checkpoint's OOD companion file (``<stem>_ood.pt``,
    :mod:`sedvae.posterior.ood`) when it exists; True requires it; False leaves it out. A
    companion fitted for another file is refused (CheckpointError).

    Raises ``FileNotFoundError`` for a missing file and
    :class:`~sedvae.checkpoint.CheckpointError` (a ValueError naming the file) when the file is
    not a posterior checkpoint, is unsafe or corrupt, has another format version, was trained
    for other physics, or its weights do not fit the network its config builds. ``kwargs`` go
    to :class:`Posterior`.
    """
    from ..checkpoint import load_checkpoint
    from .ood import OODScore, ood_path

    net = load_checkpoint(path, "posterior", map_location)[0]
    model = None
    companion = ood_path(path)
    if ood is True and not companion.is_file():
        raise FileNotFoundError(f"no OOD model beside {path} ({companion.name})")
    if ood and companion.is_file():
        model = OODScore.load(companion, checkpoint=path)
    return Posterior(net, ood=model, **kwargs)


__all__ = [
    "DERIVED_NAMES",
    "FATAL",
    "Posterior",
    "PosteriorFlag",
    "PosteriorSamples",
    "Z_RANGE",
    "load_posterior",
]
