"""Neural posterior estimation (NPE): summary network + conditional flow, with its own loss.

Loss per galaxy (amortised NPE, Papamakarios & Murray 2016; Greenberg et al. 2019)::

    -log q(u_true | s(x)),    u_true = PROVABGSPrior.to_unconstrained(theta_true)

over simulator draws (theta from the prior, nebular emission, the DESI instrument and a fresh
noise draw each epoch). Minimising it over the prior predictive makes q(u | x) the posterior of
u; the posterior of theta follows by the change of variables theta = to_constrained(u), so every
sample is in the prior support and the theta-space density is
``log q(u | x) - log|d theta_free / d u|``.

Gaussianised prior (``gaussianize_prior``): the flow models w = Phi^-1(F_prior(u)) per coordinate,
in which the prior is exactly N(0, I) (probit of the box fractions; for the stick-breaking
fractions z_k ~ Beta(1, K - k), p = 1 - (1 - z_k)^(K - k)). The flow's base distribution is then
the prior itself: a coordinate the data say nothing about needs no transformation at all. In
the logit coordinates u the prior is logistic and, for the simplex, skewed; a 6-layer flow fitted
those marginals poorly (posteriors wider than the prior and shifted: SBC p ~ 1e-20 on beta_1,
f_burst, gamma_2, even on training data).

Mass anchor: u_0 (the logit of logM* in its box) enters the flow relative to the logit of a
luminosity-based guess from the summary network (``embed_and_anchor``; W1 luminosity times a
fixed mass-to-light ratio), as the autoencoder's encoder does. For a given x this is a shift,
with unit Jacobian, so the density is unchanged; the flow no longer has to learn an absolute
scale spanning 5.5 dex from normalised inputs (measured: 0.41 dex logM* scatter without it,
worse than a linear fit to the photometry, 0.36).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..sps.provabgs import LOGM_RANGE, N_FREE, PROVABGSPrior
from ..timing import stage
from .embedding import SpectrumEmbedding
from .flow import PosteriorFlow

BATCH_KEYS = ("flux", "ivar", "z", "photometry", "photometry_ivar")
GRID_KEYS = ("wave", "arm")  # the batch's pixel grid, when not the training one
BOX_DIMS = (0, 4, 5, 6, 7, 8, 9, 10)  # u coordinates that are logits of uniform fractions
SIMPLEX_DIMS = ((1, 3), (2, 2), (3, 1))  # (u coordinate, K - k): z_k ~ Beta(1, K - k)
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
# modules a widened net may have that the weights it starts from lack: a flow affine head
# starts as the identity (zero last layer); a gappy-PCA basis is fitted before training (the
# head reads its features through zero weights at first)
ADDED_BY_WIDENING = ("flow.affine.", "embedding.pca.")


def widened_state(old: dict, new: dict) -> dict:
    """``old`` state dict fitted into ``new``'s shapes: a tensor whose last dimension grew
    (a layer given extra inputs, appended after the old ones) keeps its old entries and gets
    zeros for the new ones, so the widened network computes exactly what the old one did
    until training moves the new weights. Any other difference is left for
    ``load_state_dict`` to report."""
    out = dict(old)
    for key, target in new.items():
        src = old.get(key)
        grew = src is not None and src.shape[-1] < target.shape[-1]
        if grew and src.shape[:-1] == target.shape[:-1]:
            grown = torch.zeros_like(target)
            grown[..., : src.shape[-1]] = src
            out[key] = grown
    return out


def _probit_from_logs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Phi^-1(p) from log p and log(1 - p), accurate in both tails."""
    p, q = torch.exp(log_p), torch.exp(log_q)
    return torch.where(p < 0.5, torch.special.ndtri(p), -torch.special.ndtri(q))


def u_to_w(u: torch.Tensor) -> torch.Tensor:
    """Logit coordinates u (..., 11) -> Gaussianised prior coordinates w (float64)."""
    u = u.double()
    w = torch.empty_like(u)
    box = list(BOX_DIMS)
    w[..., box] = _probit_from_logs(F.logsigmoid(u[..., box]), F.logsigmoid(-u[..., box]))
    for k, m in SIMPLEX_DIMS:
        v = u[..., k] - math.log(m)  # logit of the stick-breaking fraction z_k
        log_q = m * F.logsigmoid(-v)  # log(1 - p) = m log(1 - z)
        w[..., k] = _probit_from_logs(torch.log(-torch.expm1(log_q)), log_q)
    return w


def w_to_u(w: torch.Tensor, jacobian: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inverse of :func:`u_to_w`, and log|du/dw| summed over coordinates (float64; None
    with ``jacobian=False``, which sampling uses: the log-Jacobian of a million samples
    costs a sixth of their sampling time)."""
    w = w.double()
    log_p, log_q = torch.special.log_ndtr(w), torch.special.log_ndtr(-w)
    u = torch.empty_like(w)
    box = list(BOX_DIMS)
    u[..., box] = log_p[..., box] - log_q[..., box]
    ladj = None
    if jacobian:
        log_phi = -0.5 * w * w - _LOG_SQRT_2PI
        ladj = (log_phi[..., box] - log_p[..., box] - log_q[..., box]).sum(-1)
    for k, m in SIMPLEX_DIMS:
        log_1mz = log_q[..., k] / m
        log_z = torch.log(-torch.expm1(log_1mz))
        u[..., k] = log_z - log_1mz + math.log(m)
        if jacobian:  # du/dw = 1/(z (1 - z)) * (1/m) (1 - p)^(1/m - 1) * phi(w)
            ladj = (ladj - log_z - log_1mz - math.log(m) + (1 / m - 1) * log_q[..., k]
                    + log_phi[..., k])  # fmt: skip
    return u, ladj


def cut_coverage(batch: dict, blue: torch.Tensor, red: torch.Tensor, wave: torch.Tensor) -> dict:
    """``batch`` with each galaxy's pixels bluer than ``blue`` (B,) or redder than ``red`` (B,)
    (observed frame, Angstrom, on the pixels ``wave`` (M,)) given ivar = 0, flux = 0 and
    masked, as an instrument that stops there delivers them (ivar = 0 where it has no pixel).
    ``-inf`` / ``inf`` leave that end of a galaxy as it is."""
    wave = torch.as_tensor(wave, dtype=torch.float64, device=batch["flux"].device)
    blue = blue.to(device=wave.device, dtype=torch.float64)[:, None]
    red = red.to(device=wave.device, dtype=torch.float64)[:, None]
    gone = (wave[None, :] < blue) | (wave[None, :] > red)  # (B, M)
    out = dict(batch)
    out["ivar"] = batch["ivar"].masked_fill(gone, 0.0)
    out["flux"] = batch["flux"].masked_fill(gone, 0.0)
    if batch.get("mask") is not None:
        out["mask"] = batch["mask"] | gone
    return out


class NeuralPosterior(nn.Module):
    """Parameters
    ----------
    embedding : SpectrumEmbedding
        Summary network; ``embedding.n_out`` must equal ``flow.context``.
    flow : PosteriorFlow
    p_drop_photometry : float
        Training augmentation: fraction of galaxies whose photometry is hidden (ivar = 0), so
        that spectra without photometry get an honest (wider) posterior instead of an
        out-of-distribution one.
    mass_anchor : bool
        Shift u_0 by the logit of the embedding's luminosity guess of logM* (module docstring).
        Off by default so that files saved before it existed load as they were trained;
        ``conf/model/posterior.yaml`` turns it on.
    gaussianize_prior : bool
        Let the flow model w (prior N(0, I)) instead of standardised u (module docstring);
        off by default for the same reason.
    p_cut_coverage : float
        Training augmentation: fraction of galaxies whose spectrum is cut short in the
        observed frame, as an instrument with less coverage than DESI's (SDSS legacy: 3800-9200
        A) delivers it: pixels bluer than a blue edge drawn uniformly in ``cut_blue`` and
        redder than a red edge drawn uniformly in ``cut_red`` (Angstrom) get ivar = 0 and are
        masked. Without it the network never sees those rest-frame bins empty and reads such
        spectra biased (docs/results.md, "Other instruments' grids"). 0 (the default) for
        files trained before it existed.
    cut_blue, cut_red : (float, float)
        Ranges of the cut's blue and red edges, Angstrom.
    """

    def __init__(
        self,
        embedding: SpectrumEmbedding,
        flow: PosteriorFlow,
        p_drop_photometry: float = 0.05,
        mass_anchor: bool = False,
        gaussianize_prior: bool = False,
        p_cut_coverage: float = 0.0,
        cut_blue: tuple[float, float] = (3600.0, 4000.0),
        cut_red: tuple[float, float] = (8500.0, 9824.0),
    ) -> None:
        super().__init__()
        if embedding.n_out != flow.context:
            raise ValueError(
                f"embedding.n_out ({embedding.n_out}) must equal flow.context ({flow.context})"
            )
        if flow.features != N_FREE:
            raise ValueError(f"the flow must model {N_FREE} unconstrained parameters")
        self.embedding = embedding
        self.flow = flow
        self.prior = PROVABGSPrior()
        self.mass_anchor = bool(mass_anchor)
        self.gaussianize_prior = bool(gaussianize_prior)
        self.p_drop_photometry, self.p_cut_coverage = 0.0, 0.0
        self.cut_blue, self.cut_red = (0.0, 0.0), (0.0, 0.0)
        self.set_augment(p_drop_photometry=p_drop_photometry, p_cut_coverage=p_cut_coverage,
                         cut_blue=cut_blue, cut_red=cut_red)  # fmt: skip
        if self.gaussianize_prior:
            # w is already standard normal under the prior: no further standardisation
            self.flow.u_loc.zero_()
            self.flow.u_scale.fill_(1.0)

    def embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summary vectors (B, C) of a clean batch and the shift (B, 11) of the flow's
        coordinates (zero but for the first one with the mass anchor)."""
        # the batch's pixels, when it carries them: the embedding bins any grid (its own or
        # another instrument's) onto the same rest-frame bins
        grid = {k: batch.get(k) for k in GRID_KEYS if batch.get(k) is not None}
        context, anchor = self.embedding.embed_and_anchor(
            *(batch.get(k) for k in BATCH_KEYS), **grid
        )
        shift = torch.zeros(context.shape[0], N_FREE, dtype=context.dtype, device=context.device)
        if self.mass_anchor and anchor is not None:
            lo, hi = LOGM_RANGE
            p = ((anchor - lo) / (hi - lo)).clamp(0.01, 0.99)
            if self.gaussianize_prior:
                shift[:, 0] = torch.special.ndtri(p)
            else:
                shift[:, 0] = torch.log(p) - torch.log1p(-p)
        return context, shift

    def flow_coordinates(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The coordinates the flow models (w or u) of u (..., 11), and log|d(them)/du|."""
        if not self.gaussianize_prior:
            return u, torch.zeros(u.shape[:-1], dtype=u.dtype, device=u.device)
        w = u_to_w(u)
        return w.to(u.dtype), -w_to_u(w)[1].to(u.dtype)

    def log_prob_u(self, u: torch.Tensor, batch: dict) -> torch.Tensor:
        """log q(u | x) (..., B) for u (..., B, 11) and a clean batch."""
        context, shift = self.embed(batch)
        y, log_dy_du = self.flow_coordinates(u)
        return self.flow.log_prob(y - shift, context) + log_dy_du

    def sample_u(
        self,
        batch: dict,
        n: int,
        generator: torch.Generator | None = None,
        chunk: int = 0,
        embedded: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """n samples of u per galaxy (n, B, 11) for a clean batch; the flow runs ``chunk``
        galaxies at a time (0: all), the last chunk padded so every call has one shape.
        ``embedded``: the batch's :meth:`embed` when already computed."""
        if embedded is not None:
            context, shift = embedded
        else:
            with stage("summary"):
                context, shift = self.embed(batch)
        with stage("flow_sampling"):
            b = context.shape[0]
            chunk = min(chunk or b, b)  # a batch smaller than a chunk is not padded
            y = torch.empty(n, b, N_FREE, dtype=context.dtype, device=context.device)
            for i in range(0, b, chunk):
                ctx = context[i : i + chunk]
                m = ctx.shape[0]
                if m < chunk:
                    ctx = torch.cat([ctx, ctx[-1:].expand(chunk - m, -1)])
                y[:, i : i + m] = self.flow.sample(ctx, n, generator)[:, :m]
            y = y + shift
            if self.gaussianize_prior:
                return w_to_u(y, jacobian=False)[0].to(context.dtype)
            return y

    def set_augment(
        self,
        p_drop_photometry: float | None = None,
        p_cut_coverage: float | None = None,
        cut_blue: tuple[float, float] | None = None,
        cut_red: tuple[float, float] | None = None,
    ) -> None:
        """Set (and check) the training augmentation's settings (class docstring); None keeps a
        setting. The embedding's coverage check follows: with cuts, its reference is the window
        every training spectrum kept (``SpectrumEmbedding.always_covered``)."""
        p_drop = self.p_drop_photometry if p_drop_photometry is None else float(p_drop_photometry)
        p_cut = self.p_cut_coverage if p_cut_coverage is None else float(p_cut_coverage)
        blue = tuple(float(v) for v in (self.cut_blue if cut_blue is None else cut_blue))
        red = tuple(float(v) for v in (self.cut_red if cut_red is None else cut_red))
        for name, p in (("p_drop_photometry", p_drop), ("p_cut_coverage", p_cut)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        for name, (lo, hi) in (("cut_blue", blue), ("cut_red", red)):
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be (lo, hi) with 0 < lo <= hi, got {(lo, hi)}")
        if blue[1] >= red[0]:
            raise ValueError(f"cut_blue {blue} must lie below cut_red {red}")
        self.p_drop_photometry, self.p_cut_coverage = p_drop, p_cut
        self.cut_blue, self.cut_red = blue, red
        self.embedding.always_covered = (blue[1], red[0]) if p_cut > 0 else None

    def augment(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """The training augmentation: hide the photometry of a random ``p_drop_photometry``
        of the galaxies, then cut the spectra of a random ``p_cut_coverage`` of them short
        (``cut_coverage``). The photometry draw comes first, so a net without cuts draws
        exactly what it drew before they existed."""
        out = dict(batch)
        b = batch["z"].shape[0]
        if self.p_drop_photometry and batch.get("photometry_ivar") is not None:
            drop = torch.rand(b, generator=generator) < self.p_drop_photometry
            drop = drop.to(batch["z"].device)[:, None]
            out["photometry_ivar"] = torch.where(
                drop, torch.zeros_like(batch["photometry_ivar"]), batch["photometry_ivar"]
            )
        if self.p_cut_coverage:
            u = torch.rand(b, 3, generator=generator, dtype=torch.float64)
            cut = u[:, 0] < self.p_cut_coverage
            blue = self.cut_blue[0] + u[:, 1] * (self.cut_blue[1] - self.cut_blue[0])
            red = self.cut_red[0] + u[:, 2] * (self.cut_red[1] - self.cut_red[0])
            inf = torch.full_like(blue, math.inf)
            out = cut_coverage(out, torch.where(cut, blue, -inf), torch.where(cut, red, inf),
                               batch.get("wave", self.embedding.wave_obs))  # fmt: skip
        return out

    def load_weights(self, state: dict[str, torch.Tensor], widen: bool = False) -> None:
        """Start from another posterior's weights ``state`` (same architecture). With
        ``widen``, layers of this net that read more inputs take the old weights plus zeros
        (:func:`widened_state`), and a flow affine head or gappy-PCA basis that ``state`` lacks
        keeps its fresh values: the net then has exactly the old density. Raises
        ``RuntimeError`` (``load_state_dict``'s, naming the tensors) when they do not fit."""
        if widen:
            state = widened_state(state, self.state_dict())
            for key, value in self.state_dict().items():
                if key not in state and key.startswith(ADDED_BY_WIDENING):
                    state[key] = value
        self.load_state_dict(state)

    def freeze_embedding(self) -> None:
        """Train the flow alone: every weight outside ``flow`` (summary network, mass anchor,
        gappy-PCA basis) stops taking gradients."""
        for name, param in self.named_parameters():
            param.requires_grad_(name.startswith("flow."))

    def summary_state(self) -> dict[str, torch.Tensor]:
        """Every tensor outside the flow (summary network, gappy-PCA basis, mass anchor): what
        makes the summaries, so two nets with equal ones summarise alike."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("flow.")}

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean -log q(u_true | x) over the batch, and per-batch metrics.

        ``batch`` needs ``theta`` (B, 12) besides the observation keys, or is a frozen summary
        (``context``, ``y``, ``log_dy_du``, ``theta``: ``sedvae.posterior.summaries``), whose
        loss is the same without running the embedding.
        """
        summary = "context" in batch
        theta = batch["theta"].to(torch.float64)
        u = self.prior.to_unconstrained(theta).to(batch["context" if summary else "flux"].dtype)
        if summary:
            nll = -(self.flow.log_prob(batch["y"], batch["context"]) + batch["log_dy_du"])
        else:
            nll = -self.log_prob_u(u, batch)  # (B,)
        # the same in theta space (per unit theta_free), for comparison with other models
        ladj = self.prior.log_abs_det_jacobian(u.to(torch.float64)).to(nll.dtype)
        loss = nll.mean()
        return loss, {"nll_u": loss.detach(), "nll_theta": (nll + ladj).mean().detach()}


__all__ = ["BATCH_KEYS", "NeuralPosterior", "u_to_w", "w_to_u", "widened_state"]
