"""Conditional normalizing flow q(u | context) over the unconstrained PROVABGS parameters.

u = ``PROVABGSPrior.to_unconstrained(theta)`` lives in R^11 (stick-breaking for the simplex,
logits for the boxes), so every sample maps back into the prior support without rejection.
The flow is a stack of zuko coupling transforms (rational-quadratic splines, Durkan et al.
2019) on standardised u: coupling flows invert in one pass per layer, so sampling costs the
same as density evaluation (an autoregressive flow would need 11 passes).

Speed: zuko's coupling conditioner concatenates the context to every sample, so with n samples
per galaxy it multiplies the context part of its first layer n times. :class:`ContextCoupling`
is the same transform with that product computed once per galaxy and broadcast over samples
(identical parameters and outputs; ~3x faster sampling at 1000 samples per galaxy here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Transform
from zuko.distributions import DiagNormal
from zuko.flows.coupling import GeneralCouplingTransform
from zuko.lazy import Flow, UnconditionalDistribution
from zuko.transforms import (
    CouplingTransform,
    DependentTransform,
    MonotonicAffineTransform,
    MonotonicRQSTransform,
)
from zuko.utils import unpack

from ..sps.provabgs import N_FREE, PROVABGSPrior
from .embedding import mlp

AFFINE_LOG_SCALE_MAX = 6.0  # the affine head's scales lie in (e^-6, e^6)


class FastRQSTransform(MonotonicRQSTransform):
    """zuko's monotonic rational-quadratic spline with the bin softmax written out.

    ``F.softmax`` over a last dimension of 8 is ~6x slower on CPU than exp/sum here, and it was
    half of the sampling time. zuko soft-clips the unconstrained widths and heights to
    |w| < |ln slope| / 2 (3.5 for slope 1e-3) first, so exp needs no max subtraction.
    """

    def __init__(self, widths, heights, derivatives, bound: float = 5.0, slope: float = 1e-3):
        Transform.__init__(self)
        widths = widths / (1 + abs(2 * widths / math.log(slope)))
        heights = heights / (1 + abs(2 * heights / math.log(slope)))
        derivatives = derivatives / (1 + abs(derivatives / math.log(slope)))
        widths = torch.exp(widths)
        heights = torch.exp(heights)
        widths = F.pad(widths / widths.sum(-1, keepdim=True), (1, 0), value=0)
        heights = F.pad(heights / heights.sum(-1, keepdim=True), (1, 0), value=0)
        derivatives = F.pad(derivatives, (1, 1), value=0)
        self.horizontal = bound * (2 * torch.cumsum(widths, dim=-1) - 1)
        self.vertical = bound * (2 * torch.cumsum(heights, dim=-1) - 1)
        self.derivatives = torch.exp(derivatives)


class ContextCoupling(GeneralCouplingTransform):
    """zuko's :class:`~zuko.flows.coupling.GeneralCouplingTransform` whose first hidden layer
    splits into a per-sample part (x_a W_a) and a per-galaxy part (c W_c + b), the latter
    computed once per context rather than once per sample."""

    def forward(self, c: torch.Tensor | None = None) -> CouplingTransform:
        first = self.hyper[0]
        n_a = int(self.mask.sum())
        # (..., H): the context's share of the first layer, once per galaxy
        bias = first.bias if c is None else F.linear(c, first.weight[:, n_a:], first.bias)
        return CouplingTransform(partial(self._meta_split, bias, n_a), self.mask)

    def _meta_split(self, bias: torch.Tensor, n_a: int, x_a: torch.Tensor):
        h = F.linear(x_a, self.hyper[0].weight[:, :n_a]) + bias  # (n, B, H) + (B, H)
        for layer in list(self.hyper)[1:]:
            h = layer(h)
        phi = h
        phi = phi.unflatten(-1, (-1, self.total))
        phi = unpack(phi, self.shapes)
        return DependentTransform(self.univariate(*phi), 1)


def rqs_inverse(y: torch.Tensor, phi: torch.Tensor, bins: int, bound: float = 5.0,
                slope: float = 1e-3) -> torch.Tensor:  # fmt: skip
    """Inverse of zuko's ``MonotonicRQSTransform`` (same parametrisation) in few tensor ops.

    y : (...,) values; phi : (..., 3 bins - 1) unconstrained widths, heights, derivatives (the
    conditioner's output layout). Identity outside [-bound, bound], as zuko.

    Sampling is bound by passes over phi-sized tensors, not by arithmetic, so this makes as
    few as it can: one soft clip and exp for all 3K - 1 parameters, the knots normalised by
    their cumulative sums' last entries (no separate sums), only the K - 1 inner y knots
    compared, and one gather per knot array for both ends of the bin (30-37 % faster than
    the three-way version it replaced, for 4 and 8 bins; same results to float32 round-off).
    """
    log_slope = math.log(slope)
    # zuko's soft clip: widths and heights to |.| < |ln slope| / 2, derivatives to |ln slope|
    clip = phi.new_full((3 * bins - 1,), 1 / log_slope)
    clip[: 2 * bins] = 2 / log_slope
    e = torch.exp(phi / (1 + (phi * clip).abs()))
    cum_w = e[..., :bins].cumsum(-1)
    cum_h = e[..., bins : 2 * bins].cumsum(-1)
    yv = y[..., None]
    yk = (2 * bound) * (cum_h / cum_h[..., -1:]) - bound  # y knots 1..K (knot 0 is -bound)
    k = (yk[..., :-1] < yv).sum(-1, keepdim=True)  # (..., 1): the bin, for y inside
    inside = (yv > -bound) & (yv <= bound)
    xk = F.pad((2 * bound) * (cum_w / cum_w[..., -1:]) - bound, (1, 0), value=-bound)
    yk = F.pad(yk, (1, 0), value=-bound)  # (..., K + 1)
    dk = F.pad(e[..., 2 * bins :], (1, 1), value=1.0)  # unit slopes at both ends
    ends = torch.cat([k, k + 1], -1)  # (..., 2)
    x01, y01, d01 = xk.gather(-1, ends), yk.gather(-1, ends), dk.gather(-1, ends)
    x0, x1 = x01[..., :1], x01[..., 1:]
    y0, y1 = y01[..., :1], y01[..., 1:]
    d0, d1 = d01[..., :1], d01[..., 1:]
    dy = y1 - y0
    s = dy / (x1 - x0)
    y_ = (yv - y0) * inside
    t = d0 + d1 - 2 * s
    a = dy * (s - d0) + y_ * t
    b = dy * d0 - y_ * t
    c = -s * y_
    z = 2 * c / (-b - (b * b - 4 * a * c).sqrt())
    return torch.where(inside, x0 + z * (x1 - x0), yv)[..., 0]


def prior_standardisation(n: int = 200_000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of u = to_unconstrained(theta) under the prior (11,), from a
    fixed set of prior draws (deterministic, so saved checkpoints reproduce it)."""
    prior = PROVABGSPrior()
    theta = prior.sample(n, torch.Generator().manual_seed(seed), dtype=torch.float64)
    u = prior.to_unconstrained(theta)
    return u.mean(0).float(), u.std(0).float()


class PosteriorFlow(nn.Module):
    """q(u | context): a conditional coupling spline flow over standardised u in R^11.

    Parameters
    ----------
    context : int
        Size of the summary (embedding) vector x.
    transforms : int
        Number of coupling layers (each transforms about half of the 11 coordinates).
    hidden : sequence of int
        Hidden widths of each layer's conditioner MLP.
    bins : int or None
        Rational-quadratic spline bins per coordinate (zuko NSF's default is 8); None for
        affine couplings (RealNVP), which sample ~2x faster at equal depth.
    features : int
        Dimension of u (11 for PROVABGS).
    mask_seed : int
        Seed of the random coupling masks (stored as buffers, so checkpoints keep them).
    affine_head : sequence of int, optional
        Hidden widths of an MLP of the context giving a location and log scale per coordinate
        (log scale soft-clipped to +-``AFFINE_LOG_SCALE_MAX``), applied after the couplings:
        v = loc(c) + exp(log_scale(c)) x couplings^-1(eps). The splines then model the shape
        of a posterior standardised by the head, not its position and width: without it a
        posterior 0.01 wide in the Gaussianised prior coordinates (logM* to 0.02 dex) must be
        placed and narrowed by the spline conditioners alone. Its last layer starts at zero,
        so the head starts as the identity (a trained file can take one on:
        ``model.init_widen``). None (default): no head, as files saved before it existed.
    """

    def __init__(
        self,
        context: int,
        transforms: int = 8,
        hidden: Sequence[int] = (128, 128),
        bins: int | None = 8,
        features: int = N_FREE,
        mask_seed: int = 0,
        affine_head: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.features = int(features)
        self.context = int(context)
        self.affine = None
        if affine_head is not None:
            self.affine = mlp(self.context, affine_head, 2 * self.features, activation=nn.SiLU)
            nn.init.zeros_(self.affine[-1].weight)  # the identity at the start
            nn.init.zeros_(self.affine[-1].bias)
        gen = torch.Generator().manual_seed(mask_seed)
        if bins is None:
            univariate, shapes = MonotonicAffineTransform, [(), ()]
        else:
            univariate = partial(FastRQSTransform, slope=1e-3)
            shapes = [(bins,), (bins,), (bins - 1,)]
        layers = []
        for i in range(transforms):
            # pairs of complementary masks over a fresh random permutation: every coordinate
            # is transformed once per pair (transforms / 2 times in all) and conditions on a
            # different half each time. Masks are buffers, so saved files keep theirs.
            if i % 2 == 0:
                perm = torch.randperm(self.features, generator=gen)
                first = torch.zeros(self.features, dtype=torch.bool)
                first[perm[: self.features // 2]] = True
            mask = first.clone() if i % 2 == 0 else ~first
            layers.append(
                ContextCoupling(
                    features=self.features,
                    context=self.context,
                    mask=mask,
                    univariate=univariate,
                    shapes=shapes,
                    hidden_features=tuple(hidden),
                    activation=nn.SiLU,
                )
            )
        base = UnconditionalDistribution(
            DiagNormal,
            loc=torch.zeros(self.features),
            scale=torch.ones(self.features),
            buffer=True,
        )
        self.flow = Flow(layers, base)
        self.bins = None if bins is None else int(bins)
        self._sampler = self._inverse_lean
        if self.features == N_FREE:
            loc, scale = prior_standardisation()
        else:  # a toy problem: standardise outside
            loc, scale = torch.zeros(self.features), torch.ones(self.features)
        self.register_buffer("u_loc", loc)  # (11,)
        self.register_buffer("u_scale", scale)  # (11,)

    def affine_params(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The affine head's location and log scale (B, d)."""
        loc, raw = self.affine(context).chunk(2, -1)
        return loc, AFFINE_LOG_SCALE_MAX * torch.tanh(raw / AFFINE_LOG_SCALE_MAX)

    def _apply_affine(self, v: torch.Tensor, context: torch.Tensor):
        """The head applied to coupling outputs v (..., B, d), and its log-Jacobian (B,)
        (v and zero without a head)."""
        if self.affine is None:
            return v, 0.0
        loc, log_scale = self.affine_params(context)
        return loc + torch.exp(log_scale) * v, log_scale.sum(-1)

    def _check_context(self, context: torch.Tensor) -> None:
        if context.ndim != 2 or context.shape[-1] != self.context:
            raise ValueError(
                f"context must have shape (B, {self.context}); got {tuple(context.shape)}"
            )

    def log_prob(self, u: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """log q(u | context), w.r.t. Lebesgue measure on u.

        u : (..., B, 11) ; context : (B, C) -> (..., B)
        """
        self._check_context(context)
        if u.shape[-1] != self.features:
            raise ValueError(f"u must end in {self.features}; got {tuple(u.shape)}")
        v = (u - self.u_loc) / self.u_scale
        log_q = -torch.log(self.u_scale).sum()
        if self.affine is not None:
            loc, log_scale = self.affine_params(context)
            v = (v - loc) * torch.exp(-log_scale)
            log_q = log_q - log_scale.sum(-1)
        return self.flow(context).log_prob(v) + log_q

    def sample(
        self, context: torch.Tensor, n: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """n samples of u per context: (n, B, 11). The base noise comes from ``generator``
        (zuko's own sampling does not take one), so results are reproducible."""
        self._check_context(context)
        eps = torch.randn(
            n, context.shape[0], self.features, generator=generator, dtype=context.dtype
        ).to(context.device)
        v = self.inverse(eps, context)
        return v * self.u_scale + self.u_loc

    def inverse(self, eps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Base noise (n, B, d) -> standardised u (n, B, d): the flow's inverse pass.

        Spline flows use :meth:`_inverse_lean` (the same function as zuko's transforms, in a
        third of the tensor operations, and free of graph breaks so ``compile_sampler`` can
        fuse it); affine flows use zuko's transforms. The affine head, if any, comes last.
        """
        if self.bins is None:
            v = self.flow(context).transform.inv(eps)
        else:
            v = self._sampler(eps, context)
        return self._apply_affine(v, context)[0]

    def _inverse_lean(self, eps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        y = eps
        for layer in reversed(self.flow.transform.transforms):
            # from the mask buffers as loaded (a file's masks replace the initial ones)
            idx_a, idx_b = layer.mask.nonzero().squeeze(-1), (~layer.mask).nonzero().squeeze(-1)
            first = layer.hyper[0]
            n_a = idx_a.shape[0]
            h = F.linear(context, first.weight[:, n_a:], first.bias)  # (B, H) per galaxy
            h = F.linear(y[..., idx_a], first.weight[:, :n_a]) + h
            for module in list(layer.hyper)[1:]:
                h = module(h)
            phi = h.unflatten(-1, (idx_b.shape[0], -1))  # (n, B, d_b, 3K - 1)
            x_b = rqs_inverse(y[..., idx_b], phi, self.bins)
            y = y.index_copy(-1, idx_b, x_b)
        return y

    def compile_sampler(self) -> None:
        """Fuse the inverse pass with ``torch.compile`` (spline flows; a C compiler is needed;
        ~1 min at the first call per input shape, then ~30 % faster sampling here)."""
        if self.bins is not None:
            self._sampler = torch.compile(self._inverse_lean, dynamic=False)

    def sample_and_log_prob(
        self, context: torch.Tensor, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples (n, B, 11) and their log q(u | context) (n, B) in one pass."""
        self._check_context(context)
        eps = torch.randn(
            n, context.shape[0], self.features, generator=generator, dtype=context.dtype
        ).to(context.device)
        dist = self.flow(context)
        v, ladj = dist.transform.inv.call_and_ladj(eps)  # ladj of the inverse map eps -> v
        v, ladj_affine = self._apply_affine(v, context)
        log_q = dist.base.log_prob(eps) - ladj - ladj_affine - torch.log(self.u_scale).sum()
        return v * self.u_scale + self.u_loc, log_q


__all__ = ["ContextCoupling", "PosteriorFlow", "prior_standardisation"]
