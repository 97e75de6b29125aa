"""Encoder: observed spectrum (+ ivar, mask, z, photometry) -> theta in the prior support,
velocity dispersions, calibration/aperture nuisances and free latents s.

Architecture (spender, Melchior et al. 2022, scaled by ``channels``): the observed pixels are
first binned onto a fixed rest-frame ln(lambda) grid (ivar-weighted, per arm, so that features
line up across redshifts; from any instrument's pixels, :meth:`SpectrumEncoder.binner_for`),
then Conv1d blocks (InstanceNorm, PReLU, dropout, max-pooling), an attention pooling (softmax
over wavelength) and an MLP that also reads z and photometry.

Bijections (:class:`LatentMap`): the 11 unconstrained coordinates u go through
``PROVABGSPrior.to_constrained`` (stick-breaking for the simplex, scaled sigmoids for boxes), so
theta always lies inside the prior support. u_0 (logM*) is anchored on the observed luminosity:
``u_0 = logit(p_anchor) + net_0`` with ``p_anchor`` the position of
``log10(L_obs / light_to_mass)`` in the logM* box, so the network only learns a mass-to-light
correction (an absolute scale spanning 5.5 dex is hard to regress from normalised spectra).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..physics.cosmology import luminosity_distance_mpc
from ..physics.redshift import LSUN_PER_MPC2_IN_FLUX_UNIT
from ..physics.restframe import GridCache, RestFrameBinner, grid_key, same_grid
from ..sps.provabgs import LOGM_RANGE, N_FREE, PROVABGSPrior

NMGY_TO_FLAM = 3631e-32 * 2.99792458e18 * 1e17  # nanomaggies * this / lambda^2 -> 1e-17 f_lambda
SIGMA_RANGE = (10.0, 600.0)  # km/s, velocity dispersions of stars and gas
APERTURE_RANGE = (0.05, 1.5)  # spectroscopic / total flux (fibre losses; >1 allows miscalibration)
CALIB_MAX = 0.2  # |c_k| of the smooth calibration (exp(0.2) = 22 % at the spectrum's ends)


class LatentMap(nn.Module):
    """Raw network outputs -> physical latents inside their supports (bijections).

    Layout of ``raw`` (B, n_raw): 11 theta coordinates, sigma_star, sigma_gas, aperture,
    ``n_calib`` calibration coefficients, then ``n_s`` free latents s.
    """

    def __init__(self, n_calib: int = 2, n_s: int = 16, light_to_mass: float = -4.35) -> None:
        super().__init__()
        self.prior = PROVABGSPrior()
        self.n_calib = int(n_calib)
        self.n_s = int(n_s)
        self.light_to_mass = float(light_to_mass)  # log10 L_sun/A per M_sun formed, ~5000 A

    @property
    def n_raw(self) -> int:
        return N_FREE + 3 + self.n_calib + self.n_s

    @staticmethod
    def _box(x: torch.Tensor, lo: float, hi: float, log: bool = False) -> torch.Tensor:
        if log:
            return torch.exp(math.log(lo) + torch.sigmoid(x) * math.log(hi / lo))
        return lo + torch.sigmoid(x) * (hi - lo)

    def anchor_u(self, log_lum: torch.Tensor) -> torch.Tensor:
        """u_0 of the luminosity-based logM* guess, log_lum = log10(L_sun/A)."""
        lo, hi = LOGM_RANGE
        p = ((log_lum - self.light_to_mass - lo) / (hi - lo)).clamp(1e-3, 1 - 1e-3)
        return torch.log(p) - torch.log1p(-p)

    def forward(self, raw: torch.Tensor, log_lum: torch.Tensor) -> dict[str, torch.Tensor]:
        u = torch.cat([raw[:, :1] + self.anchor_u(log_lum)[:, None], raw[:, 1:N_FREE]], -1)
        k = N_FREE
        return {
            "u": u,  # (B, 11) unconstrained theta
            "theta": self.prior.to_constrained(u),  # (B, 12) inside the prior support
            "sigma_star": self._box(raw[:, k], *SIGMA_RANGE, log=True),  # (B,) km/s
            "sigma_gas": self._box(raw[:, k + 1], *SIGMA_RANGE, log=True),  # (B,) km/s
            "aperture": self._box(raw[:, k + 2], *APERTURE_RANGE, log=True),  # (B,)
            "calib": CALIB_MAX * torch.tanh(raw[:, k + 3 : k + 3 + self.n_calib]),  # (B, K)
            "s": raw[:, k + 3 + self.n_calib :],  # (B, n_s) free
        }


def _conv_block(c_in, c_out, kernel, dropout) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2),
        nn.InstanceNorm1d(c_out),
        nn.PReLU(c_out),
        nn.Dropout(dropout),
    )


class SpectrumEncoder(nn.Module):
    """Spender-like encoder on rest-frame bins (see the module docstring).

    Parameters
    ----------
    latent_map : LatentMap
        Bijections of the outputs.
    n_bins : int
        Rest-frame ln-uniform bins of the input (2048 over 2200-9900 A: 220 km/s).
    rest_range : (float, float), Angstrom
        Rest-frame range of the bins (DESI at 0 < z < 0.6).
    channels, kernels : sequences of int
        Conv1d filters and kernel sizes per block (spender: 128, 256, 512 and 5, 11, 21).
        The last block has ``2 channels[-1]`` filters: values and attention logits.
    pools : sequence of int
        Max-pool size after each block but the last.
    mlp : sequence of int
        Hidden widths of the MLP head.
    n_bands : int
        Photometric bands read by the head (0 for none).
    anchor_band : int
        Band whose flux anchors logM* (default 1: r), with its pivot wavelength
        ``anchor_wave`` (Angstrom) to convert nanomaggies to f_lambda.
    dropout : float
    """

    def __init__(
        self,
        latent_map: LatentMap,
        n_bins: int = 2048,
        rest_range: tuple[float, float] = (2200.0, 9900.0),
        channels: Sequence[int] = (32, 64, 128),
        kernels: Sequence[int] = (5, 11, 21),
        pools: Sequence[int] = (4, 4),
        mlp: Sequence[int] = (256, 128),
        n_bands: int = 5,
        anchor_band: int = 1,
        anchor_wave: float = 6400.0,
        dropout: float = 0.0,
        z_max: float = 0.6,
    ) -> None:
        super().__init__()
        self.anchor_band = int(anchor_band)
        self.anchor_wave = float(anchor_wave)
        if not len(channels) == len(kernels) == len(pools) + 1:
            raise ValueError("need len(channels) == len(kernels) == len(pools) + 1")
        self.latent_map = latent_map
        self.n_bins = int(n_bins)
        self.rest_range = (float(rest_range[0]), float(rest_range[1]))
        self.binner: RestFrameBinner | None = None
        self._grids = GridCache()  # binners of other instruments' grids
        self.n_bands = int(n_bands)
        self.z_max = float(z_max)
        blocks, c_in = [], 3
        for i, (c, k) in enumerate(zip(channels, kernels, strict=True)):
            last = i == len(channels) - 1
            blocks.append(_conv_block(c_in, 2 * c if last else c, k, dropout))
            if not last:
                blocks.append(nn.MaxPool1d(pools[i], pools[i]))
            c_in = c
        self.conv = nn.Sequential(*blocks)
        self.n_features = int(channels[-1])
        layers, n_in = [], self.n_features + 2 + (2 * self.n_bands + 2 if self.n_bands else 0)
        for h in mlp:
            layers += [nn.Linear(n_in, h), nn.PReLU(h)]
            n_in = h
        layers.append(nn.Linear(n_in, latent_map.n_raw))
        self.mlp = nn.Sequential(*layers)
        nn.init.zeros_(self.mlp[-1].weight)  # start at the prior centre and the L/M anchor
        nn.init.zeros_(self.mlp[-1].bias)

    def bind(self, instrument: nn.Module) -> None:
        """Build the rest-frame binner for an instrument's pixels (``wave``, optional ``arm``);
        called by :class:`~sedvae.autoencoder.SpectrumAutoencoder`."""
        self._bound = (instrument.wave.detach(), getattr(instrument, "arm", None))
        self.binner = RestFrameBinner(
            instrument.wave, getattr(instrument, "arm", None), *self.rest_range, self.n_bins
        ).to(instrument.wave.device)

    def binner_for(self, wave=None, arm=None) -> RestFrameBinner:
        """The rest-frame binner of spectra on pixels ``wave`` (M,), ``arm`` (M,): the bound
        instrument's for ``wave=None`` or its grid (unchanged results), else one built for
        those pixels (the same bins, flux-conserving and ivar-weighted), cached by grid. The
        bins (220 km/s for 2048 over 2200-9900 A) are wider than the LSF sigma of DESI, SDSS
        or MaNGA (50-80 km/s), so the resolution is not an input."""
        if self.binner is None:
            raise RuntimeError("SpectrumEncoder.bind(instrument) must be called before use")
        if wave is None or same_grid(wave, arm, *self._bound):
            return self.binner
        wave = torch.as_tensor(wave, dtype=torch.float64)
        dev = self._bound[0].device

        def build():
            a = None if arm is None else torch.as_tensor(arm).cpu()
            return RestFrameBinner(wave.cpu(), a, *self.rest_range, self.n_bins).to(dev)

        return self._grids.get(grid_key(wave, arm), build)

    def features(self, flux, ivar, z, photometry=None, photometry_ivar=None, wave=None,
                 arm=None):  # fmt: skip
        """Network inputs: conv input (B, 3, N), head extras (B, n_extra) and log10 of the
        anchor flux density (B,), 1e-17 erg/s/cm^2/A: the anchor band's photometry (total
        light) where it is measured at S/N > 3, else the spectrum's median level. ``wave``,
        ``arm``: the pixels of ``flux`` when they are not the bound instrument's."""
        f_rest, w_rest = self.binner_for(wave, arm)(flux, ivar, z)
        good = w_rest > 0
        if not bool(good.any(-1).all()):
            bad = torch.nonzero(~good.any(-1)).flatten().tolist()
            raise ValueError(
                f"galaxies {bad[:10]} have no usable pixel in the encoder's rest-frame range "
                "(all masked, ivar <= 0, or z outside the instrument's coverage)"
            )
        norm = torch.nanmedian(torch.where(good, f_rest, torch.nan), -1).values
        # a galaxy whose median is <= 0 (very low S/N): fall back to the mean |flux|
        alt = (f_rest.abs() * good).sum(-1) / good.sum(-1)
        norm = torch.where(norm > 0, norm, alt).clamp_min(1e-6)
        x = torch.stack(
            [
                torch.asinh(f_rest / norm[:, None]) * good,
                torch.log1p(w_rest.sqrt() * norm[:, None]),  # S/N per bin of the norm level
                good.to(flux.dtype),
            ],
            1,
        )
        snr = torch.log1p((w_rest.sqrt() * f_rest.abs()).sum(-1) / good.sum(-1))
        extras = [(z / self.z_max)[:, None], snr[:, None]]
        anchor = norm
        if self.n_bands:
            if photometry is None:
                photometry = flux.new_zeros(flux.shape[0], self.n_bands)
                photometry_ivar = torch.zeros_like(photometry)
            ok = (photometry_ivar > 0).to(flux.dtype)
            ref = photometry[:, self.anchor_band]
            use = (ref * photometry_ivar[:, self.anchor_band].sqrt() > 3.0) & (ref > 0)
            ref_flam = ref * NMGY_TO_FLAM / self.anchor_wave**2
            anchor = torch.where(use, ref_flam, norm)
            # colours (ratios to the anchor band) and the spectrum/photometry ratio (aperture)
            colours = torch.asinh(photometry / torch.where(use, ref, 1.0)[:, None]) * ok
            aperture = torch.log10(norm / anchor).clamp(-3, 3)
            extras += [colours, ok, aperture[:, None], use.to(flux.dtype)[:, None]]
        return x, torch.cat(extras, -1), torch.log10(anchor)

    def raw(self, flux, ivar, z, photometry=None, photometry_ivar=None, wave=None, arm=None):
        """Unconstrained network outputs (B, n_raw) and the anchor luminosity log10 L_sun/A
        (B,): ``latent_map(raw, log_lum)`` gives the latents (used by test-time refinement)."""
        x, extras, log_anchor = self.features(flux, ivar, z, photometry, photometry_ivar, wave,
                                              arm)  # fmt: skip
        h = self.conv(x)  # (B, 2C, N')
        values, logits = h[:, : self.n_features], h[:, self.n_features :]
        pooled = (values * F.softmax(logits, dim=-1)).sum(-1)  # attention over wavelength
        raw = self.mlp(torch.cat([pooled, extras], -1))
        # L_rest (L_sun/A) of the anchor flux: f = L K / (d_L^2 (1 + z))
        d_l = luminosity_distance_mpc(z.clamp_min(1e-4))
        log_lum = log_anchor + torch.log10(d_l**2 * (1 + z) / LSUN_PER_MPC2_IN_FLUX_UNIT)
        return raw, log_lum

    def forward(self, flux, ivar, z, photometry=None, photometry_ivar=None, wave=None, arm=None):
        """Latents of a batch.

        Parameters
        ----------
        flux, ivar : (B, M) tensors, 1e-17 erg/s/cm^2/A and its inverse square (0 = masked)
        z : (B,) tensor
        photometry, photometry_ivar : (B, nb) tensors, nanomaggies, optional
        wave, arm : (M,) tensors, optional: the pixels, when not the bound instrument's

        Returns
        -------
        dict: ``u`` (B, 11), ``theta`` (B, 12), ``sigma_star``, ``sigma_gas`` (B,) km/s,
        ``aperture`` (B,), ``calib`` (B, K), ``s`` (B, n_s), ``log_lum`` (B,) (the anchor's
        rest-frame luminosity density, log10 L_sun/A).
        """
        raw, log_lum = self.raw(flux, ivar, z, photometry, photometry_ivar, wave, arm)
        out = self.latent_map(raw, log_lum)
        out["log_lum"] = log_lum
        return out
