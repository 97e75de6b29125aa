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
keys: ``flux``, ``ivar`` (B, M) 1e-17 erg/s/cm^2/A on the pixels ``wave`` (M,) Angstrom
(optional ``arm`` (M,); without ``wave``, the pixels the posterior was trained on,
``post.npix`` of them), optional ``mask`` (B, M) bool (True = bad), ``z`` (B,), optional
``photometry``, ``photometry_ivar`` (B, 5) nanomaggies (Legacy Surveys g, r, z, W1, W2). Any
instrument's grid works: the summary network bins it onto its rest-frame bins
(``SpectrumEmbedding.pixels``).
Shapes are checked (ValueError, expected vs got); problems of single galaxies are
:class:`sedvae.io.Flag` bits, never exceptions, so one bad spectrum does not spoil a batch.

A spectrum that holds a known fraction of the galaxy's light (``batch["declared_aperture"]``,
1 for a spectrum of the whole galaxy) fixes the scale the photometry would otherwise give: for
galaxies without photometry, :meth:`Posterior.sample` conditions logM* on it
(:func:`aperture_shift`). A ``batch["luminosity_distance"]`` (Mpc) replaces the Hubble flow's
d_L(z) for the mass scale (:func:`distance_shift`).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..io.batch import FATAL, Z_RANGE, Flag, SpectrumBatch
from ..physics.restframe import check_grid
from ..sps.provabgs import BOXES, LOGM_RANGE, N_THETA, PARAM_NAMES, THETA
from ..timing import stage
from .model import NeuralPosterior

if TYPE_CHECKING:
    from .ood import OODScore

# PRIOR_EDGE: a 16-84 % interval within this fraction of the parameter's range from its end
# (0.055 dex for logM*: a posterior of a real galaxy near 10^7 M_sun is wider than that).
EDGE_FRACTION = 0.01
DERIVED_NAMES = ("logmstar_surv", "sfr_100myr", "sfr_1gyr", "z_mw", "t_mw_gyr")
# The fibre fraction of the training mocks (spectrum / total flux), log-uniform: the prior the
# posterior marginalises over when a galaxy has no photometry (conf/data aperture_range).
APERTURE_PRIOR = (0.3, 1.0)


def aperture_shift(declared, prior: tuple[float, float] = APERTURE_PRIOR) -> torch.Tensor:
    """The logM* shift (dex) that conditions a spectrum-only posterior on a known aperture.

    In the generative model the spectrum is the galaxy's light times its aperture a (the
    fraction of the light in the spectrum), and a is independent of theta: without photometry,
    the spectrum measures s = logM* + log10(a) (with the shape parameters), and the posterior
    gives logM* = s - log10(a) with a from its prior, log-uniform on ``prior``. Knowing a = a0
    instead moves logM* by the difference of the means, 0.5 log10(lo hi) - log10(a0): -0.261
    dex for a0 = 1 with the (0.3, 1) prior. The width is left as it is: it still holds the
    prior's sd of log10(a) (0.151 dex) in quadrature, so the intervals are conservative
    (measured in docs/results.md, "The range users have"). NaN where ``declared`` is NaN.
    """
    a0 = torch.as_tensor(declared, dtype=torch.float64)
    lo, hi = prior
    return 0.5 * (math.log10(lo) + math.log10(hi)) - torch.log10(a0)


# The posterior's flags are the one enum of sedvae.io.batch (kept under its old name).
PosteriorFlag = Flag


def distance_shift(distance_mpc, z) -> torch.Tensor:
    """The logM* shift (dex) for a galaxy at luminosity distance ``distance_mpc`` rather than
    the Hubble flow's d_L(z): every flux the head reads scales as M* / d_L^2 (the rest frame and
    the age of the universe follow z alone), so logM* moves by 2 log10(D / d_L(z)) exactly.
    NaN where ``distance_mpc`` is NaN."""
    from ..physics.cosmology import luminosity_distance_mpc

    d = torch.as_tensor(distance_mpc, dtype=torch.float64)
    z = torch.as_tensor(z, dtype=torch.float64).clamp_min(Z_RANGE[0])
    return 2.0 * torch.log10(d / luminosity_distance_mpc(z))


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
    partial_photometry : ``"drop"`` or ``"use"``
        What to do with a galaxy that has some bands but not all (``PARTIAL_PHOTOMETRY``).
        ``"drop"`` (default) hides all its bands and flags it ``NO_PHOTOMETRY`` as well: the
        shipped head was trained with the photometry complete or entirely absent, and on 300
        mocks any missing band made logM* far worse (scatter 0.40-0.59 dex, 68 % coverage
        0.22-0.57) than no photometry at all (0.23 dex, 0.68; docs/results.md). ``"use"``
        is for a head trained with bands dropped one by one.
    """

    names = PARAM_NAMES

    def __init__(
        self,
        net: NeuralPosterior,
        z_range=Z_RANGE,
        chunk: int = 10,
        compile: bool = False,
        partial_photometry: str = "drop",
        ood: OODScore | None = None,
    ) -> None:
        if partial_photometry not in ("drop", "use"):
            raise ValueError(
                f"partial_photometry must be 'drop' or 'use'; got {partial_photometry!r}"
            )
        self.partial_photometry = partial_photometry
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
        flagged (the batch's own ``flags`` are kept). With ``partial_photometry="drop"`` a
        galaxy with some bands missing loses the others too (``NO_PHOTOMETRY`` is added).
        Fatal galaxies get placeholder inputs (a copy of a usable one, or ones) so the batch
        still runs; their samples become NaN.
        """
        batch = SpectrumBatch.coerce(batch)
        if batch.wave is not None:  # any grid: flux and wave (and arm) must agree
            check_grid(batch.wave, batch.arm, batch.flux.shape[-1])
        npix = self.npix if batch.wave is None else None  # no grid given: the training one
        clean = batch.clean(
            z_range=self.z_range, npix=npix, n_bands=self.net.embedding.n_bands, clip=True
        )
        flags = clean.flags
        partial = (flags & int(Flag.PARTIAL_PHOTOMETRY)) != 0
        if self.partial_photometry == "drop" and bool(partial.any()):
            for key in ("photometry", "photometry_ivar"):
                v = getattr(clean, key)
                setattr(clean, key, torch.where(partial[:, None], torch.zeros_like(v), v))
            flags = flags | partial.long() * int(Flag.NO_PHOTOMETRY)
            clean.flags = flags
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
        prior support; galaxies with a fatal flag are NaN. Galaxies without photometry whose
        batch gives a ``declared_aperture`` have logM* conditioned on it
        (:func:`aperture_shift`), and a ``luminosity_distance`` sets the mass scale
        (:func:`distance_shift`); :meth:`sample_u` and :meth:`log_prob` are the flow's own.
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
        theta = self._condition_on_aperture(theta, flags, batch)
        theta = self._condition_on_distance(theta, flags, batch)
        if not return_flags:
            return theta
        flags = flags | self.prior_edge(theta).long() * int(Flag.PRIOR_EDGE)
        return PosteriorSamples(theta, flags)

    @staticmethod
    def _per_galaxy(batch, name: str, flags: torch.Tensor) -> torch.Tensor | None:
        """The batch's optional per-galaxy ``name`` (B,) as float64 (None when absent); a
        shape other than the flags' is a ValueError."""
        values = getattr(SpectrumBatch.coerce(batch), name)
        if values is None:
            return None
        values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        if values.shape != flags.shape:
            raise ValueError(
                f"{name} must have shape {tuple(flags.shape)}; got {tuple(values.shape)}"
            )
        return values

    @staticmethod
    def _shift_logmstar(theta: torch.Tensor, use: torch.Tensor, shift: torch.Tensor):
        """theta with logM* of the galaxies ``use`` moved by ``shift`` (B,) dex, kept inside
        the prior's logM* range."""
        theta = theta.clone()
        moved = theta[..., THETA.LOGMSTAR].double() + torch.where(use, shift, 0.0)
        theta[..., THETA.LOGMSTAR] = moved.clamp(*LOGM_RANGE).to(theta.dtype)
        return theta

    def _condition_on_aperture(self, theta: torch.Tensor, flags: torch.Tensor, batch):
        """logM* of galaxies without photometry and with a ``declared_aperture`` moved by
        :func:`aperture_shift` (kept inside the prior's logM* range); the rest unchanged."""
        declared = self._per_galaxy(batch, "declared_aperture", flags)
        if declared is None:
            return theta
        known = torch.isfinite(declared)
        if bool((known & ((declared <= 0) | (declared > 1))).any()):
            raise ValueError("declared_aperture must lie in (0, 1] (or be NaN: unknown)")
        use = known & ((flags & int(Flag.NO_PHOTOMETRY)) != 0) & ((flags & int(FATAL)) == 0)
        if not bool(use.any()):
            return theta
        return self._shift_logmstar(theta, use, aperture_shift(declared.clamp(1e-6, 1.0)))

    def _condition_on_distance(self, theta: torch.Tensor, flags: torch.Tensor, batch):
        """logM* of galaxies with a ``luminosity_distance`` moved by :func:`distance_shift`
        (kept inside the prior's logM* range); the rest unchanged."""
        distance = self._per_galaxy(batch, "luminosity_distance", flags)
        if distance is None:
            return theta
        known = torch.isfinite(distance)
        if bool((known & (distance <= 0)).any()):
            raise ValueError("luminosity_distance must be > 0 Mpc (or NaN: from z)")
        use = known & ((flags & int(FATAL)) == 0)
        if not bool(use.any()):
            return theta
        z = torch.where(use, torch.as_tensor(SpectrumBatch.coerce(batch).z).double(), 0.1)
        return self._shift_logmstar(theta, use, distance_shift(torch.where(use, distance, 1.0), z))

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
    "APERTURE_PRIOR",
    "DERIVED_NAMES",
    "FATAL",
    "Posterior",
    "PosteriorFlag",
    "PosteriorSamples",
    "Z_RANGE",
    "aperture_shift",
    "distance_shift",
    "load_posterior",
]
