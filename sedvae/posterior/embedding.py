"""Summary network x = s(flux, ivar, mask, z, photometry) that the posterior flow conditions on.

Inputs are made comparable across redshifts and brightnesses before any learning:

- the observed pixels are binned onto a fixed rest-frame ln(lambda) grid, ivar-weighted
  (``sedvae.physics.restframe.RestFrameBinner``), so a spectral feature always lands in the
  same bin; a batch on another instrument's pixels (``wave``, ``arm`` given) is binned from
  its own pixels by a binner built for them (:meth:`SpectrumEmbedding.pixels`), so the same
  weights read any grid: what differs is only which bins are covered and their noise;
- the binned spectrum is divided by its median (shape only) and given as three channels:
  asinh(flux / norm), log(1 + S/N per bin at the norm level), and the coverage mask;
- the absolute scale enters as luminosities: log10 of the spectrum's norm and of each band's
  photometric flux, times 4 pi d_L^2 (1 + z) (Planck18), which is what the stellar mass scales
  with (the spectrum alone misses the light outside the fibre; the photometry does not);
- colours, per-band S/N, z and the spectrum's mean S/N complete the head inputs;
- optionally (``indices=True``) spectral indices measured on the observed pixels: D4000n,
  Lick absorption and emission-line equivalent widths with their errors
  (:class:`sedvae.posterior.indices.SpectralIndices`), the classical age diagnostics;
- optionally (``pca=K``) the gappy-PCA coefficients of the binned spectrum with their errors
  (:class:`sedvae.posterior.pca.GappyPCA`): its ivar-weighted least-squares projection on K
  eigenspectra of the training set, fitted once before training (:meth:`fit_pca`).

A trunk (:class:`MLPTrunk` or :class:`ConvTrunk`) reads the spectrum channels; an MLP head
reads the trunk features and the extras and returns the summary vector.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..physics.cosmology import luminosity_distance_mpc
from ..physics.restframe import GridCache, RestFrameBinner, grid_key, same_grid
from .indices import SpectralIndices
from .pca import GappyPCA

log = logging.getLogger(__name__)

LOG_LUM_CENTRE = 6.5  # log10 (flux unit x Mpc^2): the middle of BGS galaxies' luminosities
LOG_LUM_SCALE = 1.5  # their spread (dex)
# logM* ~ log10(flux x d_L^2 (1 + z)) + offset (nanomaggies or 1e-17 erg/s/cm^2/A, Mpc): the
# median offsets over prior draws (validation mocks; scatter 0.40 dex for W1, 0.48 for z, 0.62
# for the spectrum, whose fibre misses part of the light)
MASS_ANCHORS = ((3, 2.77), (2, 2.92))  # (band index, offset): W1, then z (Legacy Surveys order)
MASS_ANCHOR_SPECTRUM = 4.12


def mlp(
    n_in: int, hidden: Sequence[int], n_out: int, dropout: float = 0.0, activation=nn.GELU
) -> nn.Sequential:
    """(Linear, activation[, dropout]) per hidden width, then a Linear to ``n_out``; shared by
    the summary networks and the flow's affine head."""
    layers: list[nn.Module] = []
    for h in hidden:
        h = int(h)
        layers += [nn.Linear(n_in, h), activation()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        n_in = h
    layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


class MLPTrunk(nn.Module):
    """Fully connected trunk on the flattened rest-frame channels (B, 3, N) -> (B, n_out).

    Parameters
    ----------
    n_bins : int
        Rest-frame bins N (must match the embedding's).
    hidden : sequence of int
    n_out : int
    dropout : float
    """

    def __init__(self, n_bins: int, hidden: Sequence[int] = (512,), n_out: int = 256,
                 dropout: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        self.n_bins = int(n_bins)
        self.n_out = int(n_out)
        self.net = mlp(3 * self.n_bins, hidden, n_out, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.net(x.flatten(1)))


class ConvTrunk(nn.Module):
    """spender-like convolutional trunk with attention pooling: (B, 3, N) -> (B, channels[-1]).

    Parameters
    ----------
    n_bins : int
        Rest-frame bins N (only checked).
    channels, kernels : sequences of int
        Filters and kernel sizes per block; the last block has twice the filters (values and
        attention logits, softmax over wavelength).
    pools : sequence of int
        Max-pool size after each block but the last.
    """

    def __init__(
        self,
        n_bins: int,
        channels: Sequence[int] = (16, 32, 64),
        kernels: Sequence[int] = (5, 11, 21),
        pools: Sequence[int] = (2, 2),
    ) -> None:
        super().__init__()
        if not len(channels) == len(kernels) == len(pools) + 1:
            raise ValueError("need len(channels) == len(kernels) == len(pools) + 1")
        self.n_bins = int(n_bins)
        self.n_out = int(channels[-1])
        blocks: list[nn.Module] = []
        c_in = 3
        for i, (c, k) in enumerate(zip(channels, kernels, strict=True)):
            last = i == len(channels) - 1
            c_out = 2 * c if last else c
            blocks += [nn.Conv1d(c_in, c_out, k, padding=k // 2), nn.PReLU(c_out)]
            if not last:
                blocks.append(nn.MaxPool1d(pools[i], pools[i]))
            c_in = c
        self.conv = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        values, logits = h[:, : self.n_out], h[:, self.n_out :]
        return (values * F.softmax(logits, dim=-1)).sum(-1)


class SpectrumEmbedding(nn.Module):
    """Summary vector of one observation (see the module docstring).

    Parameters
    ----------
    instrument : nn.Module
        Anything with ``wave`` (M,) Angstrom and optional ``arm`` (M,) int: the pixels the
        spectra come on (e.g. ``sedvae.simulation.desi_instrument()``). Only the grid is kept, as
        buffers, so a saved embedding knows the pixels it was trained on.
    trunk : MLPTrunk or ConvTrunk
    n_bins : int
        Rest-frame ln-uniform bins over ``rest_range``.
    rest_range : (float, float), Angstrom
        DESI at 0.01 < z < 0.6 sees 2250-9730 A rest frame.
    n_bands : int
        Photometric bands (0: none).
    head : sequence of int
        Hidden widths of the head MLP.
    n_out : int
        Size of the summary vector x.
    z_max : float
        Redshift scale of the z input.
    indices : bool
        Append spectral-index features (D4000n, Lick indices, emission-line equivalent widths,
        their errors and coverage flags) to the head inputs, after the others (so a file
        trained without them can start a run with them: ``model.init_widen``).
    pca : int
        Append K = ``pca`` gappy-PCA coefficients of the binned spectrum, their log errors
        and the fit's log reduced chi^2 (2K + 1 numbers) to the head inputs, after the
        indices (0: none). The basis is fitted to training spectra by :meth:`fit_pca`
        (``PosteriorModule`` does it before the first epoch) and saved with the weights.
    pca_ridge : float
        Ridge of the gappy-PCA fit (:class:`~sedvae.posterior.pca.GappyPCA`).
    """

    def __init__(
        self,
        instrument: nn.Module,
        trunk: nn.Module,
        n_bins: int = 512,
        rest_range: tuple[float, float] = (2200.0, 9900.0),
        n_bands: int = 5,
        head: Sequence[int] = (256, 256),
        n_out: int = 64,
        z_max: float = 0.6,
        indices: bool = False,
        pca: int = 0,
        pca_ridge: float = 1.0,
    ) -> None:
        super().__init__()
        if getattr(trunk, "n_bins", n_bins) != n_bins:
            raise ValueError(f"trunk expects {trunk.n_bins} bins, the embedding makes {n_bins}")
        wave = torch.as_tensor(instrument.wave, dtype=torch.float64)
        arm = getattr(instrument, "arm", None)
        arm = torch.zeros(wave.shape, dtype=torch.long) if arm is None else torch.as_tensor(arm)
        # persistent: the checkpoint records the pixel grid it was trained on
        self.register_buffer("wave_obs", wave.clone())
        self.register_buffer("arm", arm.long().clone())
        self.n_bins = int(n_bins)
        self.rest_range = (float(rest_range[0]), float(rest_range[1]))
        self.binner = RestFrameBinner(wave, arm, *self.rest_range, self.n_bins)
        self.n_bands = int(n_bands)
        self.z_max = float(z_max)
        self.trunk = trunk
        self.n_extras = 3 + 3 * self.n_bands
        self.indices = SpectralIndices(pixels=self.binner) if indices else None
        if self.indices is not None:
            self.n_extras += self.indices.n_features
        self.pca = GappyPCA(self.n_bins, int(pca), pca_ridge) if pca else None
        if self.pca is not None:
            self.n_extras += self.pca.n_features
        self.n_out = int(n_out)
        self.head = mlp(trunk.n_out + self.n_extras, head, self.n_out)
        self._grids = GridCache()  # binners (and index windows) of other instruments' grids
        self._warned: set = set()  # grids whose coverage deficit was logged
        # the observed-frame window (Angstrom) every training spectrum covered; None: the whole
        # training grid (a head trained with coverage cuts sets it: NeuralPosterior)
        self.always_covered: tuple[float, float] | None = None

    @property
    def npix(self) -> int:
        return self.wave_obs.shape[0]

    def pixels(self, wave=None, arm=None) -> tuple[RestFrameBinner, SpectralIndices | None]:
        """The rest-frame binner (and spectral indices) for spectra on pixels ``wave`` (M,),
        Angstrom, with arms ``arm`` (M,) (None: one arm).

        ``wave=None`` or the training grid (:func:`~sedvae.physics.restframe.same_grid`): the
        embedding's own, so such batches give exactly what they gave before. Any other grid:
        a binner of the same rest-frame bins built from those pixels (flux-conserving,
        ivar-weighted, as for the training grid), cached by the grid. The resolution is not
        an input: the bins (~880 km/s for 512 over 2200-9900 A) and the index windows
        (15-100 A) are several times wider than any survey's LSF (DESI, SDSS, MaNGA: 50-80
        km/s sigma).
        """
        if wave is None or same_grid(wave, arm, self.wave_obs, self.arm):
            return self.binner, self.indices
        wave = torch.as_tensor(wave, dtype=torch.float64)

        def build():
            a = None if arm is None else torch.as_tensor(arm).cpu()
            binner = RestFrameBinner(wave.cpu(), a, *self.rest_range, self.n_bins)
            binner = binner.to(self.wave_obs.device)
            indices = SpectralIndices(pixels=binner) if self.indices is not None else None
            return binner, None if indices is None else indices.to(self.wave_obs.device)

        return self._grids.get(grid_key(wave, arm), build)

    @torch.no_grad()
    def coverage_deficit(self, wave, arm, z: torch.Tensor) -> torch.Tensor:
        """(B,) fraction of the rest-frame bins that every training spectrum covered at z but
        the grid ``wave``, ``arm`` does not. Bins the network always saw filled and now finds
        empty cost accuracy (``bench/grids.py``: a head trained on DESI's 3600-9824 A alone
        reads the SDSS legacy 3800-9200 A, ~10 % of the bins fewer, 0.19 dex low), while
        grids that cover as much (BOSS, MaNGA) read as well as DESI. A head trained with
        coverage cuts (``always_covered``) saw the bins outside that window empty too."""
        binner, _ = self.pixels(wave, arm)
        z = torch.as_tensor(z, dtype=torch.float64, device=self.wave_obs.device).reshape(-1)
        ones_ref = torch.ones(z.shape[0], self.npix, dtype=torch.float64, device=z.device)
        if self.always_covered is not None:
            lo, hi = self.always_covered
            inside = (self.wave_obs >= lo) & (self.wave_obs <= hi)
            ones_ref = ones_ref * inside.to(ones_ref.dtype)
        m = int(torch.as_tensor(wave).shape[0])
        ones = torch.ones(z.shape[0], m, dtype=torch.float64, device=z.device)
        ref = self.binner(ones_ref, ones_ref, z)[1] > 0
        seen = binner(ones, ones, z)[1] > 0
        return (ref & ~seen).sum(-1) / ref.sum(-1).clamp_min(1)

    def _warn_coverage(self, wave, arm, z) -> None:
        """Log (once per grid) when a grid leaves > 2 % of the training bins uncovered."""
        key = grid_key(wave, arm)
        if key in self._warned:
            return
        deficit = self.coverage_deficit(wave, arm, z)
        if bool((deficit > 0.02).any()):
            self._warned.add(key)
            w = torch.as_tensor(wave)
            lo, hi = self.always_covered or (float(self.wave_obs.min()), float(self.wave_obs.max()))
            hint = "" if self.always_covered is not None else (
                "; data/posterior/posterior_cuts.pt, trained with coverage cuts, reads grids "
                "covering 4000-8500 A as well as DESI")
            log.warning(
                "pixels %.0f-%.0f A leave up to %.0f %% of the rest-frame bins that every "
                "training spectrum of the posterior covered (%.0f-%.0f A) uncovered: expect less "
                "accurate posteriors (see bench/grids.py)%s", float(w.min()), float(w.max()),
                100 * float(deficit.max()), lo, hi, hint,
            )  # fmt: skip

    @torch.no_grad()
    def inputs(
        self,
        flux: torch.Tensor,
        ivar: torch.Tensor,
        z: torch.Tensor,
        photometry: torch.Tensor | None = None,
        photometry_ivar: torch.Tensor | None = None,
        wave: torch.Tensor | None = None,
        arm: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised network inputs: spectrum channels (B, 3, N), extras (B, n_extras) and a
        luminosity-based guess of logM* (B,) (W1, else z band at S/N > 3, else the spectrum;
        the flow learns the posterior of logM* around it).

        Expects clean inputs (masked pixels with ivar = 0, finite values, z in range), as
        :meth:`sedvae.posterior.Posterior.check` makes them. A galaxy without any usable bin
        gets all-zero channels rather than an error (the API flags it beforehand). ``wave``,
        ``arm``: the pixels of ``flux`` when they are not the training grid (:meth:`pixels`).
        """
        binner, indices = self.pixels(wave, arm)
        f_rest, w_rest = binner(flux, ivar, z)  # (B, N) each
        if binner is not self.binner:
            self._warn_coverage(wave, arm, z)
        good = w_rest > 0
        n_good = good.sum(-1).clamp_min(1)
        norm = self.spectrum_norm(f_rest, good)
        x = torch.stack(
            [
                torch.asinh(f_rest / norm[:, None]) * good,
                torch.log1p(w_rest.sqrt() * norm[:, None]),
                good.to(flux.dtype),
            ],
            1,
        )
        # luminosity factor 4 pi d_L^2 (1 + z) in Mpc^2 (constants are absorbed by the centre)
        d_l = luminosity_distance_mpc(z.clamp_min(1e-3)).to(flux.dtype)
        log_dist = torch.log10(d_l**2 * (1 + z))
        snr = torch.log1p((w_rest.sqrt() * f_rest.abs()).sum(-1) / n_good)
        log_lum = (torch.log10(norm) + log_dist - LOG_LUM_CENTRE) / LOG_LUM_SCALE
        extras = [(z / self.z_max)[:, None], snr[:, None], log_lum[:, None]]
        anchor = torch.log10(norm) + log_dist + MASS_ANCHOR_SPECTRUM
        if self.n_bands:
            if photometry is None:
                photometry = flux.new_zeros(flux.shape[0], self.n_bands)
                photometry_ivar = torch.zeros_like(photometry)
            ok = photometry_ivar > 0
            sigma = photometry_ivar.clamp_min(1e-30).rsqrt()
            sigma = torch.where(ok, sigma, torch.ones_like(photometry))
            # asinh magnitudes (Lupton et al. 1999) in dex: log10 of the flux at high S/N, finite
            # for noise-dominated bands (W2 may be negative)
            lup = torch.asinh(photometry / (2 * sigma)) / math.log(10) + torch.log10(sigma)
            lup = (lup + log_dist[:, None] - LOG_LUM_CENTRE) / LOG_LUM_SCALE
            phot_snr = torch.log1p((photometry / sigma).abs())
            okf = ok.to(flux.dtype)
            extras += [lup * okf, phot_snr * okf, okf]
            for band, offset in reversed(MASS_ANCHORS):  # the first listed wins
                if band < self.n_bands:
                    f_b = photometry[:, band]
                    use = ok[:, band] & (f_b > 3 * sigma[:, band])
                    guess = torch.log10(f_b.clamp_min(1e-30)) + log_dist + offset
                    anchor = torch.where(use, guess, anchor)
        if indices is not None:
            extras.append(indices(flux, ivar, z))
        if self.pca is not None:
            # float64: w x norm^2 overflows float32 for fluxes given in the wrong unit
            w_norm = w_rest.double() * norm.double()[:, None] ** 2
            extras.append(self.pca(f_rest / norm[:, None], w_norm))
        return x, torch.cat(extras, -1), anchor

    @staticmethod
    def spectrum_norm(f_rest: torch.Tensor, good: torch.Tensor) -> torch.Tensor:
        """(B,) the median of the usable bins; at very low S/N the median may be <= 0 (or
        NaN without data), then the mean |flux|."""
        norm = torch.nanmedian(torch.where(good, f_rest, torch.nan), -1).values
        alt = (f_rest.abs() * good).sum(-1) / good.sum(-1).clamp_min(1)
        return torch.where(torch.isfinite(norm) & (norm > 0), norm, alt).clamp_min(1e-6)

    @torch.no_grad()
    def fit_pca(self, flux: torch.Tensor, ivar: torch.Tensor, z: torch.Tensor,
                iterations: int = 8) -> torch.Tensor:  # fmt: skip
        """Fit the gappy-PCA basis to noiseless training spectra ``flux`` (S, M) observed
        with coverage ``ivar`` (S, M) (only where it is > 0 matters) at redshifts ``z`` (S,),
        binned and normalised as :meth:`inputs` does. Returns the fit's RMS residual per
        iteration (:meth:`GappyPCA.fit`)."""
        if self.pca is None:
            raise ValueError("this embedding has no gappy-PCA inputs (pca=0)")
        f_rest, w_rest = self.binner(flux, ivar, z)
        good = w_rest > 0
        norm = self.spectrum_norm(f_rest, good)
        return self.pca.fit(f_rest / norm[:, None], good, iterations)

    @torch.no_grad()
    def input_fingerprint(self) -> list[float]:
        """Moments of :meth:`inputs` for a fixed synthetic observation (8 floats).

        Stored with a trained posterior and checked when it is loaded: the network is only
        valid for the preprocessing (rest-frame binning, normalisation) it was trained with,
        and this catches a change of it in sedvae (e.g. of ``RestFrameBinner``)."""
        wave = self.wave_obs
        flux = (1.0 + 0.5 * torch.sin(wave / 50.0))[None].float().repeat(2, 1)
        ivar = (1.0 + torch.cos(wave / 70.0) ** 2)[None].float().repeat(2, 1)
        z = torch.tensor([0.05, 0.3])
        phot = torch.arange(1.0, self.n_bands + 1)[None].repeat(2, 1)
        x, extras, anchor = self.inputs(flux, ivar, z, phot, 100 * torch.ones_like(phot))
        extras = torch.cat([extras, anchor[:, None]], -1)
        x, extras = x.double(), extras.double()
        ramp = torch.arange(x.shape[-1], dtype=x.dtype)
        moments = (
            x[:, 0].sum(), (x[:, 0] ** 2).sum(), x[:, 1].sum(), x[:, 2].sum(),
            extras.sum(), (extras**2).sum(), (x[:, 0] * ramp).sum(), x[1, 0, 7],
        )  # fmt: skip
        return [float(v) for v in moments]

    def forward(
        self,
        flux: torch.Tensor,
        ivar: torch.Tensor,
        z: torch.Tensor,
        photometry: torch.Tensor | None = None,
        photometry_ivar: torch.Tensor | None = None,
        wave: torch.Tensor | None = None,
        arm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Summary vectors (B, n_out).

        Parameters
        ----------
        flux, ivar : (B, M) tensors, 1e-17 erg/s/cm^2/A and its inverse square (0 = masked)
        z : (B,) tensor
        photometry, photometry_ivar : (B, n_bands) tensors, nanomaggies and its inverse square
        wave, arm : (M,) tensors, optional: the pixels, when not the training grid
        """
        return self.embed_and_anchor(flux, ivar, z, photometry, photometry_ivar, wave, arm)[0]

    def embed_and_anchor(
        self, flux, ivar, z, photometry=None, photometry_ivar=None, wave=None, arm=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summary vectors (B, n_out) and the luminosity guess of logM* (B,) in one pass."""
        x, extras, anchor = self.inputs(flux, ivar, z, photometry, photometry_ivar, wave, arm)
        return self.head(torch.cat([self.trunk(x), extras], -1)), anchor


class AutoencoderEmbedding(nn.Module):
    """Summary from the physics-embedded autoencoder's encoder (an adapter: the encoder is
    ``sedvae.autoencoder.SpectrumEncoder``, used through its public ``forward``).

    x = head(u, ln sigma_star, ln sigma_gas, ln aperture, calib, s, log_lum): the encoder's
    point estimates and nuisances, which the flow turns into a posterior. With ``freeze`` the
    encoder's weights are fixed (and it runs in eval mode); otherwise it is fine-tuned with
    the flow.

    Parameters
    ----------
    encoder : nn.Module, optional
        A ``SpectrumEncoder``.
    autoencoder : str, optional
        Path of an autoencoder checkpoint (``sedvae.checkpoint``, e.g.
        ``data/autoencoder/autoencoder_laptop.pt``) whose encoder is used; one of the two is needed.
    instrument : nn.Module, optional
        Pixels of the spectra (``wave``, ``arm``); default: the autoencoder's decoder's.
    freeze : bool
    head : sequence of int
    n_out : int
    """

    def __init__(
        self,
        encoder: nn.Module | None = None,
        autoencoder: str | None = None,
        instrument: nn.Module | None = None,
        freeze: bool = True,
        head: Sequence[int] = (256, 256),
        n_out: int = 64,
    ) -> None:
        super().__init__()
        if (encoder is None) == (autoencoder is None):
            raise ValueError("give exactly one of encoder= or autoencoder=")
        if autoencoder is not None:
            from ..checkpoint import load_checkpoint

            ae, _ = load_checkpoint(autoencoder, "autoencoder")
            encoder, instrument = ae.encoder, instrument or ae.decoder.instrument
        if instrument is None:
            raise ValueError("give the instrument the encoder is bound to (its pixel grid)")
        encoder.bind(instrument)
        self.encoder = encoder
        self.freeze = bool(freeze)
        if self.freeze:
            for p in self.encoder.parameters():
                p.requires_grad_(False)
        lm = encoder.latent_map
        self.n_latent = lm.n_raw + 1  # u (11) + 3 dispersions/aperture + calib + s, + log_lum
        self.n_bands = int(encoder.n_bands)
        self.n_out = int(n_out)
        self.head = mlp(self.n_latent, head, self.n_out)
        self.register_buffer("wave_obs", torch.as_tensor(instrument.wave, dtype=torch.float64))

    @property
    def npix(self) -> int:
        return self.wave_obs.shape[0]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:
            self.encoder.eval()  # frozen: no dropout, fixed normalisation statistics
        return self

    def embed_and_anchor(self, flux, ivar, z, photometry=None, photometry_ivar=None, wave=None,
                         arm=None):  # fmt: skip
        """Summary vectors (B, n_out) and no logM* guess (None): the encoder's own estimate
        of u is part of the summary already."""
        return self(flux, ivar, z, photometry, photometry_ivar, wave, arm), None

    def forward(self, flux, ivar, z, photometry=None, photometry_ivar=None, wave=None,
                arm=None) -> torch.Tensor:  # fmt: skip
        """Summary vectors (B, n_out); inputs as for :class:`SpectrumEmbedding`."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            lat = self.encoder(flux, ivar, z, photometry, photometry_ivar, wave=wave, arm=arm)
        feats = torch.cat(
            [
                lat["u"],
                torch.log(lat["sigma_star"])[:, None],
                torch.log(lat["sigma_gas"])[:, None],
                torch.log(lat["aperture"])[:, None],
                lat["calib"],
                lat["s"],
                ((lat["log_lum"] - LOG_LUM_CENTRE) / LOG_LUM_SCALE)[:, None],
            ],
            -1,
        )
        return self.head(feats)


__all__ = ["AutoencoderEmbedding", "ConvTrunk", "MLPTrunk", "SpectrumEmbedding"]
