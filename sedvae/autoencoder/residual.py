"""ResidualNet(s, theta): what the stellar SPS does not model, on the rest-frame grid.

Three additive parts, each in units of the galaxy's continuum level ``norm`` (L_sun/A, the
mean stellar continuum over 4000-7000 A, detached) so that the network works with O(1) numbers:

- **lines**: luminosities of a fixed list of emission lines (:mod:`sedvae.physics.lines`),
  ``L_k = norm * EW_k``, ``EW_k = ew_scale * softplus(.) >= 0`` (Angstrom), deposited on the
  fine grid and broadened by the gas dispersion. This is the "line-region prior": narrow
  residual features can only sit at known line wavelengths.
- **smooth**: a linear spline with ``n_knots`` knots uniform in ln(lambda) (template mismatch,
  nebular continuum); amplitude ``smooth_scale`` per unit output.
- **free** (optional, ``free=True``): an unconstrained fine-grid output (spender's decoder), for
  features outside the line list; off in the laptop config (its output layer dominates the
  parameter count and the training time).

The decoder adds an amplitude penalty on smooth and free parts and an L1 (sparsity) penalty on
EWs (:meth:`penalty`), so the stellar continuum must do the continuum's work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..physics.lines import EMISSION_LINES
from .grid import LogGrid


class ResidualNet(nn.Module):
    """Residual emission and systematics from free latents s and theta.

    Parameters
    ----------
    n_s : int
        Dimension of s.
    n_theta : int
        Dimension of the theta input (the 11 unconstrained coordinates u).
    hidden : sequence of int
        MLP widths.
    lines : mapping name -> vacuum wavelength (A), optional
        Default :data:`EMISSION_LINES`.
    n_knots : int
        Knots of the smooth component (0 disables it).
    free : bool
        Add the unconstrained fine-grid output.
    ew_scale : float, Angstrom
        EW per unit softplus output.
    smooth_scale, free_scale : float
        Fraction of ``norm`` per unit output.
    """

    def __init__(
        self,
        n_s: int = 16,
        n_theta: int = 11,
        hidden: Sequence[int] = (256, 256),
        lines: dict[str, float] | None = None,
        n_knots: int = 40,
        free: bool = False,
        ew_scale: float = 10.0,
        smooth_scale: float = 0.05,
        free_scale: float = 0.05,
    ) -> None:
        super().__init__()
        lines = dict(EMISSION_LINES if lines is None else lines)
        self.line_names = tuple(lines)
        self.register_buffer(
            "line_wave", torch.tensor(list(lines.values()), dtype=torch.float64), persistent=False
        )
        self.n_lines = len(lines)
        self.n_knots = int(n_knots)
        self.free = bool(free)
        self.ew_scale = float(ew_scale)
        self.smooth_scale = float(smooth_scale)
        self.free_scale = float(free_scale)
        self.n_s, self.n_theta = int(n_s), int(n_theta)
        layers, n_in = [], self.n_s + self.n_theta
        for h in hidden:
            layers += [nn.Linear(n_in, h), nn.SiLU()]
            n_in = h
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(n_in, self.n_lines + self.n_knots)
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():  # start with weak lines (EW ~ 0.2 A) and no smooth residual
            self.head.bias.zero_()
            self.head.bias[: self.n_lines] = -4.0
        self.free_head = None
        self.grid: LogGrid | None = None

    def bind(self, grid: LogGrid) -> None:
        """Build the grid-dependent bases (called once by the decoder that owns ``grid``)."""
        self.grid = grid
        self.register_buffer(
            "deposit", grid.deposit_matrix(self.line_wave).float(), persistent=False
        )  # (n_lines, n_fine)
        x = torch.linspace(0.0, 1.0, grid.n_fine, dtype=torch.float64)
        if self.n_knots > 1:
            knots = torch.linspace(0.0, 1.0, self.n_knots, dtype=torch.float64)
            spacing = 1.0 / (self.n_knots - 1)
            hat = (1 - (x[None, :] - knots[:, None]).abs() / spacing).clamp_min(0.0)
        else:
            hat = torch.zeros(self.n_knots, grid.n_fine, dtype=torch.float64)
        self.register_buffer("knots", hat.float(), persistent=False)  # (n_knots, n_fine)
        if self.free and self.free_head is None:
            self.free_head = nn.Linear(self.head.in_features, grid.n_fine)
            nn.init.zeros_(self.free_head.weight)
            nn.init.zeros_(self.free_head.bias)

    def forward(
        self, s: torch.Tensor, u: torch.Tensor, norm: torch.Tensor, sigma_gas: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Rest-frame residual components on the grid's fine part.

        Parameters
        ----------
        s : (B, n_s) free latents
        u : (B, 11) unconstrained theta
        norm : (B,) L_sun/A, continuum level
        sigma_gas : (B,) km/s

        Returns
        -------
        dict: ``lines``, ``smooth``, ``free`` (B, n_fine) L_sun/A (``free`` zeros when off),
        ``line_lum`` (B, n_lines) L_sun, ``ew`` (B, n_lines) A, ``smooth_coef`` (B, n_knots),
        ``free_coef`` (B, n_fine) or None.
        """
        if self.grid is None:
            raise RuntimeError("ResidualNet.bind(grid) must be called before use")
        h = self.mlp(torch.cat([s, u], -1))
        out = self.head(h)
        ew = self.ew_scale * F.softplus(out[:, : self.n_lines])
        smooth_coef = out[:, self.n_lines :]
        line_lum = ew * norm[:, None]
        lines = self.grid.broaden(line_lum @ self.deposit, sigma_gas)
        smooth = (self.smooth_scale * norm[:, None]) * (smooth_coef @ self.knots)
        result = {
            "lines": lines,
            "smooth": smooth,
            "line_lum": line_lum,
            "ew": ew,
            "smooth_coef": smooth_coef,
            "free_coef": None,
            "free": torch.zeros_like(smooth),
        }
        if self.free_head is not None:
            free_coef = self.free_head(h)
            result["free_coef"] = free_coef
            result["free"] = (self.free_scale * norm[:, None]) * free_coef
        return result

    def penalty(
        self,
        out: dict[str, torch.Tensor],
        smooth_sigma: float = 0.4,
        ew_tau: float = 100.0,
        free_sigma: float = 0.2,
    ) -> torch.Tensor:
        """Negative log prior of the residual (B,): Gaussian on smooth/free coefficients (in
        units of ``*_scale``), Laplace (sparsity) on EWs (A)."""
        pen = 0.5 * (out["smooth_coef"] / smooth_sigma).pow(2).sum(-1)
        pen = pen + (out["ew"] / ew_tau).sum(-1)
        if out["free_coef"] is not None:
            pen = pen + 0.5 * (out["free_coef"] / free_sigma).pow(2).sum(-1)
        return pen
