"""The exact fit: the autoencoder's stellar continuum refined with the emission lines and the
flux calibration solved exactly at every step.

The model of a spectrum is

    model = C(theta) (1 + sum_j c_j P_j) + sum_k a_k D_k(v, sigma)

with the SPS continuum C of the physical latents (theta, sigma_star, aperture), a per-arm
Legendre calibration c (Gaussian prior) and non-negative line amplitudes a
(:mod:`sedvae.linear`). For fixed latents the best (c, a) is one exact solve (chi^2 plus the
calibration's Gaussian prior, a >= 0); the latents then follow the gradient of

    L(theta) = chi^2(theta, c*(theta), a*(theta)) / 2 + w_phot chi^2_phot / 2
               - w_prior log p(theta, s, calib)

the data chi^2 at the solved (c*, a*), plus the photometry's chi^2 (which ties the total mass)
and the autoencoder's prior on its latents: the autoencoder's own objective with the lines and
the calibration solved instead of predicted. The gradient goes through the solve
(:func:`sedvae.linear.solve_linear` is differentiable wherever its active set is locally
constant). This is variable projection (Golub & Pereyra 1973), as pPXF does for its template
weights, with the continuum a physical model rather than a free template mix.

It starts from the encoder's output (the amortised fit) and takes ``steps`` Adam steps in the
encoder's unconstrained output space, so every iterate stays inside the prior's support; the
line kinematics are re-scanned every ``kinematics_every`` steps
(:meth:`LinearModel.fit_kinematics`) and the line design is reused between scans. Galaxies are
independent: a batch is one optimisation of the sum of their objectives, and each galaxy keeps
its best iterate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linear import LinearModel
from ..linear.solve import LinearFit, solve_linear


@dataclass
class ExactFit:
    """The result of :func:`fit_exact` for a batch of B galaxies on M pixels.

    Attributes
    ----------
    batch : the checked batch (:meth:`SpectrumAutoencoder.check_batch`)
    latents : the autoencoder's latents at each galaxy's best iterate
    continuum : (B, M) SPS continuum through the instrument, before the solved calibration
    weight : (B, M) inverse variance on the pixels the model covers (ivar x coverage)
    fit : lines and calibration solved at ``continuum``, ``velocity`` and ``sigma``
    velocity, sigma : (B,) narrow-line velocity offset and intrinsic dispersion, km/s
    rchi2_encoder : (B,) reduced chi^2 of the encoder's own continuum with lines and
        calibration solved (the amortised exact fit, ``steps=0``)
    linear : the :class:`LinearModel` of the batch's grid
    linear_kwargs : its per-galaxy LSF arguments (``resolution`` or ``lsf_sigma``)
    decoded : the decoder's output at ``latents`` (``components=True``)
    """

    batch: dict
    latents: dict
    continuum: torch.Tensor
    weight: torch.Tensor
    fit: LinearFit
    velocity: torch.Tensor
    sigma: torch.Tensor
    rchi2_encoder: torch.Tensor
    linear: LinearModel
    linear_kwargs: dict
    decoded: dict

    @property
    def rchi2(self) -> torch.Tensor:
        """(B,) reduced chi^2 of the exact fit."""
        return self.fit.rchi2

    @property
    def model(self) -> torch.Tensor:
        """(B, M) the full model: calibrated continuum plus the solved lines."""
        return self.fit.model

    @property
    def chi2_per_pixel(self) -> torch.Tensor:
        """(B,) chi^2 / N_pix, as the autoencoder's :meth:`chi2` counts it (the catalog's
        ``rchi2``; :attr:`rchi2` divides by the degrees of freedom instead)."""
        return self.fit.chi2 / (self.weight > 0).sum(-1).clamp_min(1)

    def as_output(self) -> dict:
        """The fit as :meth:`SpectrumAutoencoder.forward` returns one (``batch``, ``latents``,
        ``model``), for :func:`sedvae.plotting.plot_reconstruction`: ``model["flux"]`` is the
        exact fit's model, ``model["flux_continuum"]`` its calibrated continuum (so the
        figure's "residual component" is the solved lines)."""
        model = dict(self.decoded)
        model["flux"] = self.fit.model
        model["flux_continuum"] = self.fit.model - self.fit.lines_model
        return {"batch": self.batch, "latents": self.latents, "model": model}


def linear_model_for(net, batch: dict) -> tuple[LinearModel, dict]:
    """The :class:`LinearModel` that solves lines and calibration on a checked batch's own
    pixels, with the LSF arguments its ``forward`` needs: the instrument the decoder observes
    the batch with (its own, or :meth:`SpectrumAutoencoder.pixels` on another grid) and that
    grid's Gaussian LSF, else the batch's resolution matrices."""
    pixels = net.pixels(batch)
    instrument = net.decoder.instrument if pixels is None else pixels.instrument
    if pixels is not None and pixels.sigma is not None:
        kw = {"lsf_sigma": pixels.sigma}
    elif batch.get("resolution") is not None:
        kw = {"resolution": batch["resolution"]}
    else:
        kw = {}
    return LinearModel(instrument), kw


def fit_exact(net, batch: dict, steps: int = 200, lr: float = 0.1, kinematics_every: int = 50,
              linear: tuple[LinearModel, dict] | None = None) -> ExactFit:  # fmt: skip
    """Exact fit of a batch (see the module docstring).

    Parameters
    ----------
    net : SpectrumAutoencoder (its weights are not changed)
    batch : dict or SpectrumBatch, on the decoder's grid or any other (``wave``, ``arm``)
    steps : Adam steps on the latents (0: the encoder's continuum, lines and calibration solved)
    lr : Adam step size in the encoder's unconstrained output space
    kinematics_every : steps between re-scans of the narrow-line velocity and width
    linear : ``(LinearModel, kwargs)`` to use instead of :func:`linear_model_for`

    Returns
    -------
    ExactFit
    """
    if steps < 0 or kinematics_every < 1:
        raise ValueError(f"steps must be >= 0 and kinematics_every >= 1; got {steps}, "
                         f"{kinematics_every}")  # fmt: skip
    batch = net.check_batch(batch)
    lm, kw = linear if linear is not None else linear_model_for(net, batch)
    flux, z, mask = batch["flux"], batch["z"], batch.get("mask")
    raw, log_lum = net.raw_outputs(batch)
    with torch.no_grad():
        _, model = net.decode(batch, net.encoder.latent_map(raw, log_lum), components=True)
        weight = batch["ivar"] * model["coverage"]
        velocity, sigma, fit0 = lm.fit_kinematics(model["flux_continuum"], flux, weight, z,
                                                  mask=mask, **kw)  # fmt: skip
    n = (weight > 0).sum(-1).clamp_min(1)
    if batch.get("photometry") is not None:
        n = n + (batch["photometry_ivar"] > 0).sum(-1)
    best_raw = raw
    if steps > 0:
        state = {"velocity": velocity, "sigma": sigma, "design": None}

        def loss(it, latents, model):
            cont = model["flux_continuum"]
            if it > 0 and it % kinematics_every == 0:
                with torch.no_grad():
                    state["velocity"], state["sigma"], _ = lm.fit_kinematics(
                        cont.detach(), flux, weight, z, velocity=state["velocity"],
                        sigma=state["sigma"], mask=mask, return_fit=False, **kw,
                    )
                state["design"] = None
            if state["design"] is None:  # the line profiles depend on the kinematics only
                state["design"] = lm.design(z, state["velocity"], state["sigma"],
                                            dtype=cont.dtype, **kw)  # fmt: skip
            fit = solve_linear(cont, flux, weight, state["design"], lm.tie, lm.calib_basis,
                               lm.calib_sigma, mask=mask, pixel_width=lm.pixel_width,
                               z=z)  # fmt: skip
            nll = 0.5 * (fit.chi2 + net.w_phot * _chi2_phot(batch, model))
            return (nll - net.w_prior * _log_prior(net, latents)) / n

        best_raw, _ = net.descend(batch, raw, log_lum, steps, lr, loss, components=True)
        velocity, sigma = state["velocity"], state["sigma"]
    with torch.no_grad():
        latents = net.encoder.latent_map(best_raw, log_lum)
        latents["log_lum"] = log_lum
        latents, model = net.decode(batch, latents, components=True)
        cont = model["flux_continuum"]
        if steps > 0:
            velocity, sigma, fit = lm.fit_kinematics(cont, flux, weight, z, velocity=velocity,
                                                     sigma=sigma, mask=mask, **kw)  # fmt: skip
        else:
            fit = fit0
    return ExactFit(batch, latents, cont, weight, fit, velocity, sigma, fit0.rchi2, lm, kw, model)


def _chi2_phot(batch: dict, model: dict) -> torch.Tensor:
    """(B,) chi^2 of the photometry (0 without): total-galaxy fluxes tie the mass."""
    if batch.get("photometry") is None or "photometry" not in model:
        return torch.zeros_like(batch["z"], dtype=model["flux"].dtype)
    return (batch["photometry_ivar"] * (batch["photometry"] - model["photometry"]) ** 2).sum(-1)


def _log_prior(net, latents: dict) -> torch.Tensor:
    """The autoencoder's prior on the latents (as in its objective): the physical prior, a
    unit Gaussian on the nuisance latents ``s`` and the calibration nuisance's own prior."""
    from .model import safe_log_prior

    lp = safe_log_prior(net.prior, latents["theta"]) - 0.5 * latents["s"].pow(2).sum(-1)
    return lp - 0.5 * (latents["calib"] / net.calib_sigma).pow(2).sum(-1)
