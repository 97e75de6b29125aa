"""The physics-embedded autoencoder: encoder -> latents -> physics decoder, with its own loss.

Amplitudes are profiled (``profile_amplitude``): the model is linear in M* (photometry and
spectrum) and in the fibre aperture (spectrum only), so given the encoder's other latents both
take their closed-form chi^2-optimal values; the encoder's own logM* output is kept as the
starting point and trained by the supervised term.

Loss per galaxy (a negative log posterior per data point, so that 0.5 is a perfect fit)::

    [ 0.5 chi2_spec + 0.5 w_phot chi2_phot
      - w_prior (log p(theta) + log N(s; 0, 1) + log N(calib; 0, calib_sigma))
      + w_residual penalty(residual) ] / (N_pix + N_bands)
    + w_supervised * Huber(u - u_true, nuisances - truth)        (mocks only)

with, for training, ``0.5 chi2/N`` replaced by ``0.5 log(1 + chi2/N)`` (``chi2_transform``).
``chi2 = sum ivar (flux - model)^2`` over unmasked pixels the model covers. The residual
penalty (:meth:`ResidualNet.penalty`) keeps lines sparse and smooth residuals small so that the
stellar continuum carries the continuum; ``residual_fraction`` measures how much flux the
residual carries anyway. The supervised term (on the unconstrained theta, ln sigma and
ln aperture) is what lets a small CPU budget train the encoder; set ``w_supervised=0`` for real
data. :meth:`SpectrumAutoencoder.refine` optionally polishes the encoder's latents per galaxy.

Batches are :class:`sedvae.io.SpectrumBatch` (or dicts with its keys): ``flux``, ``ivar``
(B, M), ``mask`` (B, M) bool (True = bad), ``z`` (B,), optionally ``photometry``,
``photometry_ivar`` (B, nb), ``resolution`` (instrument override), ``mw_ebv`` (B,), and for
mocks ``theta`` (B, 12), ``sigma_v`` (B,), ``aperture`` (B,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..io.batch import Z_RANGE, Flag, SpectrumBatch
from ..physics.cosmology import luminosity_distance_mpc
from ..physics.resample import integrate_bins, pixel_edges
from ..physics.restframe import GridCache, check_grid, grid_key, same_grid
from ..sps.provabgs import LOGM_RANGE, THETA
from .decoder import PhysicsDecoder
from .encoder import APERTURE_RANGE, SpectrumEncoder

# Entries only a simulated galaxy has (the supervised term reads theta, sigma_v, aperture);
# :meth:`SpectrumAutoencoder.mixed_loss` drops them from real batches.
TRUTH_KEYS = ("theta", "logU", "sigma_v", "aperture", "flux_true", "photometry_true", "line_lum")


class SpectrumAutoencoder(nn.Module):
    """Encoder + physics decoder + loss + augmentation.

    Parameters
    ----------
    encoder : SpectrumEncoder
    decoder : PhysicsDecoder
    z_range : (float, float)
        Supported redshifts (default the one :data:`sedvae.io.batch.Z_RANGE`); batches
        outside raise ``ValueError``.
    w_phot, w_prior, w_residual, w_supervised : float
        Loss weights (see module docstring).
    calib_sigma : float
        Prior width of the calibration coefficients.
    augment_z : float
        Re-redshifting: z' = z + U(-augment_z, augment_z) (photometry is dropped for shifted
        galaxies: a broad band cannot be re-redshifted without the model).
    p_redshift : float
        Fraction of galaxies re-redshifted.
    mask_chunks : float
        Mean number (Poisson) of extra masked runs per spectrum, each up to ``mask_length``.
    mask_length : int
        Longest masked run, pixels.
    extra_noise : float
        Extra Gaussian noise of k sigma with k ~ U(0, extra_noise) (ivar rescaled to match).
    profile_amplitude : bool
        Replace logM* and the aperture by their closed-form chi^2-optimal values given the
        other latents (:meth:`_profile`); the encoder's own values are then only trained by
        the supervised term.
    chi2_transform : {"log", "linear"}
        Training loss per galaxy: ``0.5 log(1 + chi2/N)`` ("log") or ``0.5 chi2/N``. Both have
        the same optimum for each galaxy; "log" stops the few high-S/N (chi2/N >> 1) galaxies
        of a batch from dominating the shared networks' gradient. Metrics are unaffected.
    """

    def __init__(
        self,
        encoder: SpectrumEncoder,
        decoder: PhysicsDecoder,
        z_range: tuple[float, float] = Z_RANGE,
        w_phot: float = 1.0,
        w_prior: float = 1.0,
        w_residual: float = 1.0,
        w_supervised: float = 0.0,
        calib_sigma: float = 0.05,
        augment_z: float = 0.02,
        p_redshift: float = 0.0,
        mask_chunks: float = 0.5,
        mask_length: int = 200,
        extra_noise: float = 0.3,
        profile_amplitude: bool = True,
        chi2_transform: str = "log",
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        encoder.bind(decoder.instrument)
        self.z_range = (float(z_range[0]), float(z_range[1]))
        self.w_phot = float(w_phot)
        self.w_prior = float(w_prior)
        self.w_residual = float(w_residual)
        self.w_supervised = float(w_supervised)
        self.calib_sigma = float(calib_sigma)
        self.augment_z = float(augment_z)
        self.p_redshift = float(p_redshift)
        self.mask_chunks = float(mask_chunks)
        self.mask_length = int(mask_length)
        self.extra_noise = float(extra_noise)
        if chi2_transform not in ("linear", "log"):
            raise ValueError(f"chi2_transform must be 'linear' or 'log'; got {chi2_transform!r}")
        self.profile_amplitude = bool(profile_amplitude)
        self.chi2_transform = chi2_transform
        self._grids = GridCache()  # how the decoder observes on other grids (``pixels``)

    @property
    def prior(self):
        return self.encoder.latent_map.prior

    # ---- inputs -----------------------------------------------------------------------------
    def check_batch(self, batch: SpectrumBatch | dict) -> SpectrumBatch:
        """Validate a batch with :meth:`SpectrumBatch.clean`: bad pixels become masked (ivar =
        0, flux = 0), unusable photometry gets ivar 0; wrong shapes, z outside ``z_range`` (or
        NaN) and galaxies with no usable pixel raise ValueError (training and fitting need
        every galaxy of a batch; the readers and the posterior flag them instead)."""
        batch = SpectrumBatch.coerce(batch)
        if batch.wave is not None:  # any grid: flux and wave (and arm) must agree
            check_grid(batch.wave, batch.arm, batch.flux.shape[-1])
        m = self.decoder.instrument.npix if batch.wave is None else None
        clean = batch.clean(z_range=self.z_range, npix=m)
        lo, hi = self.z_range
        bad_z = (clean.flags & int(Flag.BAD_Z)) != 0
        if bool(bad_z.any()):
            idx = torch.nonzero(bad_z).flatten().tolist()[:10]
            raise ValueError(
                f"z must lie in [{lo}, {hi}]; galaxies {idx} have z = {clean.z[idx].tolist()}"
            )
        dead = (clean.flags & int(Flag.ALL_MASKED)) != 0
        if bool(dead.any()):
            idx = torch.nonzero(dead).flatten().tolist()[:10]
            raise ValueError(
                f"galaxies {idx} have no usable pixel (all masked, NaN, or ivar <= 0); "
                "drop them (sedvae.io flags them ALL_MASKED)"
            )
        return clean

    # ---- model ------------------------------------------------------------------------------
    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        """Latents of a checked batch (see :class:`SpectrumEncoder`)."""
        return self.encoder(
            batch["flux"],
            batch["ivar"],
            batch["z"],
            batch.get("photometry"),
            batch.get("photometry_ivar"),
            wave=batch.get("wave"),
            arm=batch.get("arm"),
        )

    def pixels(self, batch: dict):
        """None for a batch on the decoder's own grid (or without ``wave``); else how the
        decoder observes on the batch's pixels (:meth:`PhysicsDecoder.pixels_for`, with the
        batch's ``lsf_sigma``), cached by grid and LSF."""
        wave, arm = batch.get("wave"), batch.get("arm")
        inst = self.decoder.instrument
        if wave is None or same_grid(wave, arm, inst.wave, getattr(inst, "arm", None)):
            return None
        lsf = batch.get("lsf_sigma")
        lsf_key = None if lsf is None else hash(lsf.detach().cpu().numpy().tobytes())
        key = (grid_key(wave, arm), lsf_key)
        return self._grids.get(key, lambda: self.decoder.pixels_for(wave, arm, lsf))

    def decode(self, batch: dict, latents: dict, components: bool = False) -> tuple[dict, dict]:
        """Decoder output for latents (with amplitude profiling when enabled); returns the
        (possibly updated) latents and the model dict. A batch on another grid than the
        decoder's instrument is observed on its own pixels (:meth:`pixels`)."""
        model = self.decoder(
            latents,
            batch["z"],
            resolution=batch.get("resolution"),
            mw_ebv=batch.get("mw_ebv"),
            components=components,
            pixels=self.pixels(batch),
        )
        if self.profile_amplitude:
            latents, model = self._profile(batch, latents, model)
        return latents, model

    def forward(self, batch: dict, components: bool = False) -> dict:
        """Check, encode and decode a batch: ``{"batch", "latents", "model"}``."""
        batch = self.check_batch(batch)
        latents, model = self.decode(batch, self.encode(batch), components)
        return {"batch": batch, "latents": latents, "model": model}

    @staticmethod
    def _best_scale(w, data, model) -> tuple[torch.Tensor, torch.Tensor]:
        """Least-squares scale of ``model`` to ``data`` (B,) and whether it is defined."""
        den = (w * model * model).sum(-1)
        ok = den > 0
        scale = (w * data * model).sum(-1) / den.clamp_min(1e-30)
        return torch.where(ok, scale, torch.ones_like(scale)), ok

    def _profile(self, batch: dict, latents: dict, model: dict) -> tuple[dict, dict]:
        """Replace the encoder's logM* and aperture by their chi^2-optimal values given the
        rest of the latents: the model is linear in both (photometry ~ M*, spectrum ~
        M* x aperture), so each has a closed-form least-squares value. The scales are
        detached: at the optimum d chi^2 / d scale = 0, so the gradients of everything else
        are unchanged (envelope theorem). logM* is clipped to its prior box."""
        lo, hi = LOGM_RANGE
        with torch.no_grad():
            w = batch["ivar"] * model["coverage"]
            a_spec, ok_s = self._best_scale(w, batch["flux"], model["flux"])
            a_spec = a_spec.clamp(1e-4, 1e4)
            a_mass = torch.ones_like(a_spec)
            if batch.get("photometry") is not None and "photometry" in model:
                a_mass, ok_p = self._best_scale(
                    batch["photometry_ivar"], batch["photometry"], model["photometry"]
                )
                # without photometry the spectrum sets the mass (at the encoder's aperture)
                a_mass = torch.where(ok_p & (a_mass > 0), a_mass, a_spec)
            else:
                a_mass = a_spec
            a_mass = a_mass.clamp(1e-4, 1e4)
            logm0 = latents["theta"][:, THETA.LOGMSTAR]
            logm = (logm0 + torch.log10(a_mass)).clamp(lo, hi)
            a_mass = 10 ** (logm - logm0)
            aper = (latents["aperture"] * a_spec / a_mass).clamp(*APERTURE_RANGE)
            a_spec = a_mass * aper / latents["aperture"]
        latents = dict(latents)
        theta = latents["theta"].clone()
        theta[:, THETA.LOGMSTAR] = logm
        latents["theta"], latents["aperture"] = theta, aper
        model = dict(model)
        model["flux"] = model["flux"] * a_spec[:, None]
        if "flux_continuum" in model:
            model["flux_continuum"] = model["flux_continuum"] * a_spec[:, None]
        if "photometry" in model:
            model["photometry"] = model["photometry"] * a_mass[:, None]
        rest = dict(model["rest"])
        for key in ("lines", "smooth", "free", "residual", "continuum", "total", "line_lum"):
            rest[key] = rest[key] * a_mass[:, None]
        rest["norm"] = rest["norm"] * a_mass
        model["rest"] = rest
        return latents, model

    def chi2(self, batch: dict, model: dict) -> dict[str, torch.Tensor]:
        """Per-galaxy chi^2 and counts: ``chi2``, ``n_pix``, ``chi2_phot``, ``n_phot`` (B,)."""
        w = batch["ivar"] * model["coverage"]
        out = {
            "chi2": (w * (batch["flux"] - model["flux"]) ** 2).sum(-1),
            "n_pix": (w > 0).sum(-1).to(w.dtype),
            "chi2_phot": torch.zeros_like(w[:, 0]),
            "n_phot": torch.zeros_like(w[:, 0]),
        }
        if batch.get("photometry") is not None and "photometry" in model:
            pw = batch["photometry_ivar"]
            out["chi2_phot"] = (pw * (batch["photometry"] - model["photometry"]) ** 2).sum(-1)
            out["n_phot"] = (pw > 0).sum(-1).to(w.dtype)
        return out

    def residual_fraction(self, z: torch.Tensor, rest: dict, obs=None) -> dict[str, torch.Tensor]:
        """Fraction of the rest-frame flux (absolute values, over the wavelengths the
        instrument sees, or the pixels ``obs`` (M,) Angstrom) in the residual and in its
        non-line (smooth + free) part, (B,)."""
        wave = self.decoder.grid.wave[None, :]
        obs = self.decoder.instrument.wave if obs is None else obs
        onepz = (1 + z.to(torch.float64))[:, None]
        seen = ((wave * onepz >= float(obs.min())) & (wave * onepz <= float(obs.max()))).to(
            rest["continuum"].dtype
        )
        res = rest["residual"].abs()
        total = ((rest["continuum"].abs() + res) * seen).sum(-1).clamp_min(1e-30)
        return {
            "residual_fraction": (res * seen).sum(-1) / total,
            "residual_continuum_fraction": ((rest["smooth"] + rest["free"]).abs() * seen).sum(-1)
            / total,
        }

    def objective(self, batch: dict, latents: dict, model: dict) -> dict[str, torch.Tensor]:
        """Per-galaxy negative log posterior per data point ``nll`` (B,) and its parts."""
        c = self.chi2(batch, model)
        n = (c["n_pix"] + c["n_phot"]).clamp_min(1.0)
        log_prior = safe_log_prior(self.prior, latents["theta"])
        log_prior = log_prior - 0.5 * latents["s"].pow(2).sum(-1)
        log_prior = log_prior - 0.5 * (latents["calib"] / self.calib_sigma).pow(2).sum(-1)
        penalty = self.decoder.residual.penalty(model["rest"])
        nll = 0.5 * c["chi2"] + 0.5 * self.w_phot * c["chi2_phot"]
        nll = nll - self.w_prior * log_prior + self.w_residual * penalty
        return {**c, "nll": nll / n}

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss and detached metrics (means over the batch, unless named median)."""
        out = self.forward(batch)
        batch, latents, model = out["batch"], out["latents"], out["model"]
        c = self.objective(batch, latents, model)
        if self.chi2_transform == "log":
            n = (c["n_pix"] + c["n_phot"]).clamp_min(1.0)
            fit = (c["chi2"] + self.w_phot * c["chi2_phot"]) / n
            loss = (c["nll"] - 0.5 * fit + 0.5 * torch.log1p(fit)).mean()
        else:
            loss = c["nll"].mean()
        red = c["chi2"] / c["n_pix"].clamp_min(1.0)
        frac = self.residual_fraction(batch["z"], model["rest"], batch.get("wave"))
        metrics = {
            "chi2_red": red.mean(),
            "chi2_red_median": red.median(),
            "chi2_phot_red": (c["chi2_phot"] / c["n_phot"].clamp_min(1.0)).mean(),
            "residual_fraction": frac["residual_fraction"].mean(),
            "residual_continuum_fraction": frac["residual_continuum_fraction"].mean(),
            "nll": c["nll"].mean(),
        }
        if "theta" in batch:
            sup = self.supervised(batch, latents)
            metrics["supervised"] = sup.mean()
            err = latents["theta"][:, THETA.LOGMSTAR] - batch["theta"][:, THETA.LOGMSTAR]
            metrics["logmstar_err"] = err.abs().mean()
            if self.w_supervised > 0:
                loss = loss + self.w_supervised * sup.mean()
        return loss, {k: v.detach() for k, v in metrics.items()}

    def mixed_loss(
        self, real: dict, mock: dict | None = None, mock_weight: float = 1.0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training on data: the unsupervised loss of real spectra plus ``mock_weight`` times
        the loss of a mock batch (supervised when ``w_supervised > 0``)::

            loss = L(real) + mock_weight * L(mock)

        Each L is :meth:`loss` (a per-galaxy mean, so the weight is per batch, not per
        galaxy). L(real) is the chi^2 of the spectrum (and photometry), the prior and the
        residual penalty only: truth is never read from a real batch. The mock term keeps the
        physical latents (theta, sigma_v, aperture) tied to their meaning while the networks
        adapt to what real spectra hold and mocks lack. Metrics are prefixed ``real/`` and
        ``mock/``.
        """
        if mock_weight < 0:
            raise ValueError(f"mock_weight must be >= 0; got {mock_weight}")
        real = {k: v for k, v in real.items() if k not in TRUTH_KEYS}
        loss, m_real = self.loss(real)
        metrics = {f"real/{k}": v for k, v in m_real.items()}
        if mock is not None and mock_weight > 0:
            loss_mock, m_mock = self.loss(mock)
            loss = loss + mock_weight * loss_mock
            metrics.update({f"mock/{k}": v for k, v in m_mock.items()})
        return loss, metrics

    def raw_outputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's unconstrained outputs of a checked batch and its luminosity scale,
        ``(raw, log_lum)`` (``encoder.latent_map(raw, log_lum)`` gives the latents), without
        gradients: where test-time refinement starts."""
        args = (batch["flux"], batch["ivar"], batch["z"], batch.get("photometry"),
                batch.get("photometry_ivar"), batch.get("wave"), batch.get("arm"))  # fmt: skip
        with torch.no_grad():
            return self.encoder.raw(*args)

    def descend(self, batch: dict, raw: torch.Tensor, log_lum: torch.Tensor, steps: int,
                lr: float, loss, components: bool = False) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """``steps`` Adam steps on the encoder's unconstrained outputs ``raw`` (B, D), so that
        every iterate stays inside the prior support; ``loss(step, latents, model)`` is each
        galaxy's loss (B,) at the decoded iterate. Galaxies are independent (the sum of their
        losses separates) and each keeps its best iterate. Only the latents move: the networks'
        weights get no gradient.

        Returns the best ``raw`` (B, D) and the loss at the start (B,)."""
        raw = raw.detach().clone().requires_grad_(True)
        best_raw = raw.detach().clone()
        best = torch.full(raw.shape[:1], float("inf"), dtype=raw.dtype, device=raw.device)
        opt = torch.optim.Adam([raw], lr=lr)
        loss0 = None
        with torch.enable_grad():
            for it in range(steps + 1):
                latents, model = self.decode(batch, self.encoder.latent_map(raw, log_lum),
                                             components)  # fmt: skip
                value = loss(it, latents, model)
                with torch.no_grad():
                    loss0 = value.detach().clone() if loss0 is None else loss0
                    better = value < best
                    best = torch.where(better, value, best)
                    best_raw[better] = raw.detach()[better]
                if it == steps:
                    break
                (raw.grad,) = torch.autograd.grad(value.sum(), raw)
                opt.step()
        return best_raw, loss0

    def refine(self, batch: dict, steps: int = 100, lr: float = 0.1,
               components: bool = False) -> dict:  # fmt: skip
        """Test-time refinement: start from the encoder's output and take ``steps`` Adam steps
        on each galaxy's own loss (``objective``) in the encoder's unconstrained output space
        (:meth:`descend`). The networks are not changed.

        Returns the :meth:`forward` dict at the best iterate of each galaxy, plus
        ``nll_encoder`` (B,), the loss at the encoder's own output.
        """
        batch = self.check_batch(batch)
        raw, log_lum = self.raw_outputs(batch)
        best_raw, nll0 = self.descend(
            batch, raw, log_lum, steps, lr,
            lambda it, latents, model: self.objective(batch, latents, model)["nll"],
        )
        with torch.no_grad():
            latents = self.encoder.latent_map(best_raw, log_lum)
            latents["log_lum"] = log_lum
            latents, model = self.decode(batch, latents, components)
        return {"batch": batch, "latents": latents, "model": model, "nll_encoder": nll0}

    def fit_exact(self, batch: dict, steps: int = 200, lr: float = 0.1, **kwargs):
        """The exact fit: the continuum's latents refined with the emission lines and the
        calibration solved exactly at every step (:func:`sedvae.autoencoder.exact.fit_exact`,
        which documents the arguments); returns an :class:`~sedvae.autoencoder.exact.ExactFit`.
        ``steps=0`` is the encoder's continuum with lines and calibration solved."""
        from .exact import fit_exact

        return fit_exact(self, batch, steps=steps, lr=lr, **kwargs)

    def supervised(self, batch: dict, latents: dict) -> torch.Tensor:
        """Huber distance (B,) between encoder outputs and mock truth, in unconstrained
        coordinates (u of theta, ln sigma_v, ln aperture), averaged over what is known."""
        with torch.no_grad():
            u_true = self.prior.to_unconstrained(batch["theta"].to(latents["u"].dtype))
        terms = [F.smooth_l1_loss(latents["u"], u_true, reduction="none")]
        if "sigma_v" in batch:
            ln_true = torch.log(batch["sigma_v"].to(latents["u"].dtype))[:, None]
            ln_fit = torch.log(torch.stack([latents["sigma_star"], latents["sigma_gas"]], -1))
            terms.append(F.smooth_l1_loss(ln_fit, ln_true.expand_as(ln_fit), reduction="none"))
        if "aperture" in batch:
            ln_true = torch.log(batch["aperture"].to(latents["u"].dtype))[:, None]
            ln_fit = torch.log(latents["aperture"])[:, None]
            terms.append(F.smooth_l1_loss(ln_fit, ln_true, reduction="none"))
        return torch.cat(terms, -1).mean(-1)

    # ---- augmentation -------------------------------------------------------------------------
    @torch.no_grad()
    def augment(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """Spender-style augmentation of a (checked) training batch: re-redshifting, extra
        masked runs, extra noise. Returns a new dict; the input is not modified."""
        batch = self.check_batch(batch)
        flux, ivar, mask, z = batch["flux"], batch["ivar"], batch["mask"], batch["z"]
        b, m = flux.shape
        dev = flux.device

        def rand(*shape):
            return torch.rand(*shape, generator=generator).to(dev)

        if self.p_redshift > 0 and self.augment_z > 0:
            shift = rand(b) < self.p_redshift
            z_new = (z + (2 * rand(b) - 1) * self.augment_z).clamp(*self.z_range)
            z_new = torch.where(shift, z_new, z)
            flux, ivar, mask = self._reredshift(flux, ivar, mask, z, z_new, batch.get("wave"),
                                                batch.get("arm"))  # fmt: skip
            z = z_new
            if batch.get("photometry_ivar") is not None:
                batch["photometry_ivar"] = batch["photometry_ivar"] * (~shift)[:, None]
        if self.mask_chunks > 0:
            counts = torch.poisson(torch.full((b,), self.mask_chunks), generator=generator)
            for i, k in enumerate(counts.long().tolist()):
                for _ in range(k):
                    length = 1 + int(rand(1).item() * self.mask_length)
                    start = int(rand(1).item() * max(1, m - length))
                    mask[i, start : start + length] = True
        if self.extra_noise > 0:
            k = self.extra_noise * rand(b, 1)
            sigma = 1.0 / ivar.clamp_min(1e-30).sqrt()
            noise = torch.randn(b, m, generator=generator).to(dev)
            flux = torch.where(ivar > 0, flux + k * sigma * noise, flux)
            ivar = ivar / (1 + k**2)
        # never mask every pixel: a galaxy left without data keeps its original pixels
        dead = mask.all(-1)
        mask = torch.where(dead[:, None], batch["mask"], mask)
        out = dict(batch)
        out.update(
            flux=torch.where(mask, torch.zeros_like(flux), flux),
            ivar=torch.where(mask, torch.zeros_like(ivar), ivar),
            mask=mask,
            z=z,
        )
        return out

    def _reredshift(self, flux, ivar, mask, z, z_new, wave=None, arm=None):
        """Move observed spectra from z to z_new (flux-conserving, per arm), scaling by the
        luminosity-distance ratio; pixels that fall outside the old coverage are masked.
        ``wave``, ``arm``: the batch's pixels (default the decoder's instrument's)."""
        if wave is None:
            inst = self.decoder.instrument
            wave, arm = inst.wave, getattr(inst, "arm", None)
        wave = torch.as_tensor(wave).to(torch.float64)
        arm = torch.zeros_like(wave, dtype=torch.long) if arm is None else arm
        ratio = ((1 + z) / (1 + z_new)).to(torch.float64)[:, None]  # old lambda = new * ratio
        d_old, d_new = luminosity_distance_mpc(z), luminosity_distance_mpc(z_new)
        scale = (d_old**2 * (1 + z) / (d_new**2 * (1 + z_new)))[:, None]
        good = (~mask).to(torch.float64)
        new_f, new_i, new_g = torch.zeros_like(flux), torch.zeros_like(ivar), torch.zeros_like(flux)
        for a in range(int(arm.max()) + 1):
            sel = torch.nonzero(arm == a).flatten()
            sl = slice(int(sel[0]), int(sel[-1]) + 1)
            edges = pixel_edges(wave[sl])
            lo, hi = edges[None, :-1] * ratio, edges[None, 1:] * ratio
            stack = torch.cat([flux[:, sl] * good[:, sl], ivar[:, sl], good[:, sl]], 0)
            integ, covered = integrate_bins(wave[sl], stack, lo.repeat(3, 1), hi.repeat(3, 1))
            integ = integ / (hi - lo).repeat(3, 1)
            nb = flux.shape[0]
            g = integ[2 * nb :] * covered[2 * nb :]
            new_g[:, sl] = g.to(flux.dtype)
            new_f[:, sl] = (integ[:nb] / g.clamp_min(1e-12)).to(flux.dtype)
            new_i[:, sl] = integ[nb : 2 * nb].to(ivar.dtype)
        # only fully good pixels survive; flux and ivar scale with the distance ratio
        new_mask = new_g < 1 - 1e-6
        return new_f * scale.to(flux.dtype), new_i / scale.to(ivar.dtype) ** 2, new_mask


def safe_log_prior(prior, theta: torch.Tensor) -> torch.Tensor:
    """``prior.log_prob`` of encoder outputs (B,), finite on the box edges.

    Box bounds are Python floats (0.01, 2e-5, ...); a float32 theta that a sigmoid put exactly
    on such an edge rounds to just outside it (float32(0.01) < 0.01) and ``log_prob`` would
    return -inf. Clamping in float64 onto the box (gradients pass inside) avoids that.
    """
    th = theta.to(torch.float64)
    cols = [th[:, i] for i in range(th.shape[1])]
    for i, lo, hi, _ in prior._boxes:
        cols[i] = cols[i].clamp(lo, hi)
    return prior.log_prob(torch.stack(cols, -1)).to(theta.dtype)


__all__ = ["SpectrumAutoencoder", "safe_log_prior"]
