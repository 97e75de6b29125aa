"""Simulations drawn inside the training loop: a fresh batch of mock galaxies every step, made
on the device the model trains on; no files, no fixed training set.

The per-galaxy steps are the mock pipeline's own (:class:`sedvae.simulation.mocks.MockGenerator`):
prior draws (``draw``), the SPS with nebular emission and broadening (``sps.simulate``), the
DESI instrument and Legacy Surveys photometry (``observe``), the fibre aperture, and the noise
model's statistics (:func:`noisy_batch`: the same model as ``SpectralNoiseModel.forward``,
written without per-galaxy Python loops so that it runs on the batch's device).

Reproducible: the galaxies of training step ``i`` come from ``rng_for(seed, i)`` alone (prior
draws on the CPU, float64, then moved; noise from a device generator seeded from the same
stream), so two runs with one seed see the same batches on one device.

Where bagpipes, astropy or speclite are missing (an accelerator lent without network), every
table comes from the exported file (``python -m sedvae.sps export-tables``; ``tables=`` or
``$SEDVAE_SPS_TABLES``).

- :class:`SimulatorDataModule`: batches for the posterior head (``data=simulator``), in the form
  ``sedvae.posterior.data.PosteriorMockDataModule`` serves (``flux``, ``ivar``, ``mask``,
  ``photometry``, ``photometry_ivar`` and the truths ``theta``, ``z``, ``logU``, ``sigma_v``,
  ``aperture``);
- :class:`EmulatorSimulatorDataModule`: (``theta``, ``z``, ``lum``) batches for the emulator,
  as ``sedvae.emulator.SimulationDataModule`` serves them from a file;
- :class:`WallClockSchedule`: a cosine learning-rate decay over a fixed wall-clock budget,
  ending the fit when it is spent (device runs).
"""

from __future__ import annotations

import logging
import math
import os
import time

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ..io.batch import TRAINING_Z_RANGE
from ..physics.noise import rng_for

log = logging.getLogger(__name__)

OBS_KEYS = ("flux", "ivar", "mask", "photometry", "photometry_ivar")
TRUTH_KEYS = ("theta", "z", "logU", "sigma_v", "aperture")


# ---- building blocks --------------------------------------------------------------------------
def resolve_tables(tables=None):
    """The exported tables to build from: ``tables`` (a path or ``SPSTables``), else the file
    ``$SEDVAE_SPS_TABLES`` names, else None (read bagpipes, the DESI coadd and speclite)."""
    from ..sps.tables import ENV_VAR, SPSTables, load_tables

    if isinstance(tables, SPSTables):
        return tables
    path = tables or os.environ.get(ENV_VAR)
    return load_tables(path) if path else None


def desi_instrument(coadd=None, index: int = 0, tables=None):
    """``sedvae.simulation.desi_instrument`` (the bundled coadd's pixels and resolution) built from
    the exported tables where they are given (``tables`` or ``$SEDVAE_SPS_TABLES``): the same
    instrument without astropy. A ``coadd`` file is always read from disk."""
    from ..physics import DESIInstrument

    found = resolve_tables(tables) if coadd is None and index == 0 else None
    if found is None:
        from ..simulation.mocks import desi_instrument as from_coadd

        return from_coadd(coadd, index)
    desi = found.desi_example()
    return DESIInstrument.from_coadd_arrays(desi["waves"], desi["resolution"])


def build_generator(
    tables=None,
    z_dist: str = "bgs",
    z_range=TRAINING_Z_RANGE,
    logu_range=(-4.0, -1.0),
    sigma_v_range=(30.0, 300.0),
    aperture_range=(0.3, 1.0),
    bands=None,
    noise: dict | None = None,
):
    """A :class:`~sedvae.simulation.mocks.MockGenerator` (the mock files' settings by default),
    from the exported tables when they are given (``resolve_tables``), else from bagpipes, the
    bundled coadd and speclite. ``noise``: ``SpectralNoiseModel`` keyword arguments."""
    from ..physics import LS_NORTH, Photometry, SpectralNoiseModel
    from ..simulation.mocks import MockGenerator, desi_noise_model
    from ..sps import SEDModel

    found = resolve_tables(tables)
    bands = tuple(bands or LS_NORTH)
    noise = dict(noise or {})
    sps = SEDModel(2000.0, 60000.0, z_max=max(0.8, z_range[1]), nebular=True, tables=found)
    if found is None:
        instrument, photometry = desi_instrument(), Photometry(bands)
        noise_model = desi_noise_model(**noise)
    else:
        desi = found.desi_example()
        instrument = desi_instrument(tables=found)
        photometry = Photometry(bands, curves=found.filter_curves())
        noise_model = SpectralNoiseModel(desi["ivar"], arm=desi["arm"], **noise)
    return MockGenerator(
        sps, instrument, photometry, noise_model, z_dist=z_dist, z_range=tuple(z_range),
        logu_range=tuple(logu_range), sigma_v_range=tuple(sigma_v_range),
        aperture_range=tuple(aperture_range),
    )  # fmt: skip


def device_generator(cpu: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from the CPU stream ``cpu`` (reproducible per step)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=cpu))
    return torch.Generator(device=device).manual_seed(seed)


def noisy_batch(noise, flux_true, photometry_true=None, generator=None) -> dict:
    """Noise, ivar and masks of :class:`~sedvae.physics.noise.SpectralNoiseModel` for a whole
    batch on its device: per-arm S/N levels from the median of |flux| sqrt(shape), Poisson
    numbers of masked runs of uniform length and start, Gaussian noise of the drawn ivar,
    optional unflagged outliers, photometric errors sharing the galaxy's S/N offset. Same
    distribution as ``noise.forward``, vectorised (one pass, no per-galaxy loop)."""
    dev = flux_true.device
    flux_true = flux_true.float()
    b, m = flux_true.shape
    if m != noise.shape.shape[0]:
        raise ValueError(f"flux_true must have {noise.shape.shape[0]} pixels; got {(b, m)}")

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=dev)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=dev)

    shape, arm = noise.shape.to(dev), noise.arm.to(dev)
    e_gal = noise.snr_scatter * randn(b, 1)
    snr = torch.exp(noise.log_snr.to(dev) + e_gal + noise.arm_scatter * randn(b, noise.n_arms))
    log_phot = noise.log_phot_snr.to(dev)
    phot_snr = torch.exp(log_phot + e_gal + noise.phot_scatter * randn(b, log_phot.shape[0]))
    ivar = torch.zeros_like(flux_true)
    for a in range(noise.n_arms):
        idx = torch.nonzero(arm == a).flatten()
        level = (flux_true[:, idx].abs() * shape[idx].sqrt()).median(-1).values
        sigma = level.clamp_min(1e-6) / snr[:, a]
        ivar[:, idx] = shape[idx] / sigma[:, None] ** 2
    mask = ivar <= 0
    counts = torch.poisson(torch.full((b,), noise.mask_segments, device=dev), generator=generator)
    k = int(counts.max()) if b else 0
    if k > 0:
        lo, hi = noise.mask_length
        length = lo + torch.floor(rand(b, k) * (hi - lo + 1)).long()
        start = torch.floor(rand(b, k) * (m - length).clamp_min(1)).long()
        valid = (torch.arange(k, device=dev)[None] < counts[:, None]).float()
        edges = torch.zeros(b, m + 1, device=dev)
        edges.scatter_add_(1, start, valid)
        edges.scatter_add_(1, (start + length).clamp_max(m), -valid)
        mask = mask | (torch.cumsum(edges, -1)[:, :m] > 0.5)
    sd = ivar.clamp_min(1e-30).rsqrt()
    flux = flux_true + torch.where(ivar > 0, randn(b, m) * sd, torch.zeros_like(sd))
    if noise.outlier_rate > 0:
        hit = rand(b, m) < noise.outlier_rate
        flux = torch.where(hit & ~mask, flux + 10.0 * randn(b, m).abs() * sd, flux)
    out = {
        "flux": torch.where(mask, torch.zeros_like(flux), flux),
        "ivar": torch.where(mask, torch.zeros_like(ivar), ivar),
        "mask": mask,
        "snr": snr,
    }
    if photometry_true is not None:
        phot = photometry_true.float()
        sigma = phot.abs().clamp_min(1e-6) / phot_snr
        out["photometry"] = phot + sigma * randn(*phot.shape)
        out["photometry_ivar"] = 1.0 / sigma**2
    return out


# ---- the data-driven parts of the generative model --------------------------------------------
# Bright night-sky lines (air, Angstrom): [O I] 5577, Na D, [O I] 6300/6364 and the strongest OH
# Meinel lines of the DESI range (Osterbrock et al. 1996, PASP 108, 277; Rousselot et al. 2000,
# A&A 354, 1134), where sky subtraction leaves residuals (converted to vacuum when used).
BRIGHT_SKY_LINES_AIR = (
    5577.34, 5889.95, 5895.92, 6300.30, 6363.78, 6863.96, 7316.28, 7340.89, 7369.25,
    7401.69, 7750.64, 7794.11, 7821.50, 7913.71, 7993.33, 8344.60, 8399.17, 8430.17,
    8465.36, 8827.10, 8885.85, 8919.61, 8943.39, 9375.98, 9439.67,
)  # fmt: skip


def line_families(line_names) -> tuple[tuple[str, ...], torch.Tensor]:
    """Families of Cloudy's lines for the generative line model: one per ion (bagpipes' first
    four characters, e.g. ``"O  3"`` for [O III] 4959, 5007 and 4363), so the ratios atomic
    physics fixes (doublets, the Balmer series without dust) stay Cloudy's, while the ratios
    between ions (excitation, abundances, density) are free. Blends (``"Blnd"``) form one
    family. Returns (family names, (N_lines,) long index)."""
    keys = [str(n)[:4].strip() for n in line_names]
    names = tuple(dict.fromkeys(keys))
    return names, torch.as_tensor([names.index(k) for k in keys], dtype=torch.long)


class GenerativeParts(torch.nn.Module):
    """What the SPS mocks lack and real spectra carry (DESIGN section 6; issue 26), drawn per
    galaxy and applied inside :func:`simulate_batch`:

    - **free line ratios**: every Cloudy line times a log-normal factor per family
      (:func:`line_families`), 10^N(0, ``line_sigma_dex``^2) for metal lines and
      10^N(0, ``balmer_sigma_dex``^2) for hydrogen, clipped to +-``line_bound_dex`` around
      Cloudy's prediction (the physical bounds: a factor 10 either way spans the BPT plane
      from metal-poor H II regions to LINERs at fixed Balmer flux);
    - **calibration warps** from the exact solve's calibration prior
      (:class:`sedvae.linear.LinearModel`): the flux times 1 + sum_{a,k} c_{a,k} P_k(x_a) per
      spectrograph arm, c_{a,k} ~ N(0, ``calib_sigma``^2) for k = 1 .. degree (2 for DESI) and
      each arm's constant c_{a,0} ~ N(0, ``scale_sigma``^2), on a fraction ``warp_frac``;
    - **sky residuals**: on a fraction ``sky_frac`` of galaxies, each bright sky line
      (:data:`BRIGHT_SKY_LINES_AIR`) in the spectrum leaves, with probability ``sky_line_prob``,
      a Gaussian spike (sigma ``sky_width_a``) of amplitude N(0, ``sky_amp``^2) times the
      pixel's noise sigma, not reflected in the ivar (a sky-subtraction residual).

    Outlier pixels come from the noise model (``noise.outlier_rate`` of :func:`build_generator`).
    The draws use the batch's CPU stream, so a step's galaxies stay reproducible.
    """

    def __init__(
        self,
        line_names,
        instrument,
        line_sigma_dex: float = 0.3,
        balmer_sigma_dex: float = 0.15,
        line_bound_dex: float = 1.0,
        calib_sigma: float = 0.05,
        scale_sigma: float = 0.05,
        calib_degree: int | None = None,
        warp_frac: float = 1.0,
        sky_frac: float = 0.3,
        sky_line_prob: float = 0.3,
        sky_amp: float = 4.0,
        sky_width_a: float = 0.9,
    ) -> None:
        super().__init__()
        from ..linear import arm_index, calibration_basis, default_calibration_degree
        from ..sps.ssp import air_to_vacuum

        for name, v in (("line_sigma_dex", line_sigma_dex), ("balmer_sigma_dex", balmer_sigma_dex),
                        ("line_bound_dex", line_bound_dex), ("calib_sigma", calib_sigma),
                        ("scale_sigma", scale_sigma), ("sky_amp", sky_amp)):  # fmt: skip
            if not v >= 0:
                raise ValueError(f"{name} must be >= 0; got {v}")
        for name, v in (("warp_frac", warp_frac), ("sky_frac", sky_frac),
                        ("sky_line_prob", sky_line_prob)):  # fmt: skip
            if not 0 <= v <= 1:
                raise ValueError(f"{name} must lie in [0, 1]; got {v}")
        self.family_names, family = line_families(line_names)
        self.register_buffer("family", family, persistent=False)
        sigma = torch.full((len(self.family_names),), float(line_sigma_dex), dtype=torch.float64)
        if "H  1" in self.family_names:
            sigma[self.family_names.index("H  1")] = float(balmer_sigma_dex)
        self.register_buffer("family_sigma", sigma, persistent=False)
        self.line_bound_dex = float(line_bound_dex)
        wave = instrument.wave.double()
        degree = default_calibration_degree(instrument) if calib_degree is None else calib_degree
        basis = calibration_basis(wave, arm_index(instrument), int(degree))
        self.register_buffer("calib_basis", basis.float(), persistent=False)  # (J, M)
        order = torch.arange(basis.shape[0]) % (int(degree) + 1)
        csig = torch.where(order == 0, float(scale_sigma), float(calib_sigma)).double()
        self.register_buffer("calib_sigma", csig, persistent=False)
        self.warp_frac, self.sky_frac = float(warp_frac), float(sky_frac)
        self.sky_line_prob, self.sky_amp = float(sky_line_prob), float(sky_amp)
        sky = torch.as_tensor(air_to_vacuum(np.asarray(BRIGHT_SKY_LINES_AIR)), dtype=torch.float64)
        inside = (sky > wave.min() + 5) & (sky < wave.max() - 5)
        self.register_buffer("sky_wave", sky[inside], persistent=False)
        # (S, M) unit-height Gaussian spikes; zero beyond 5 sigma
        d = (wave[None] - self.sky_wave[:, None]) / float(sky_width_a)
        self.register_buffer(
            "sky_profile", torch.where(d.abs() < 5, torch.exp(-0.5 * d * d), 0.0).float(),
            persistent=False,
        )  # fmt: skip

    def draw(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-galaxy draws on the CPU (float64): ``log_line_factor`` (n, F) dex per family,
        ``calib`` (n, J) warp coefficients (zero without a warp), ``sky_amp`` (n, S) spike
        amplitudes in noise sigmas (zero where none)."""
        f = self.family_sigma.shape[0]
        dex = torch.randn(n, f, generator=generator, dtype=torch.float64) * self.family_sigma.cpu()
        dex = dex.clamp(-self.line_bound_dex, self.line_bound_dex)
        j = self.calib_sigma.shape[0]
        calib = torch.randn(n, j, generator=generator, dtype=torch.float64) * self.calib_sigma.cpu()
        warped = torch.rand(n, generator=generator, dtype=torch.float64) < self.warp_frac
        calib = calib * warped[:, None]
        s = self.sky_wave.shape[0]
        sky = torch.randn(n, s, generator=generator, dtype=torch.float64) * self.sky_amp
        on = torch.rand(n, generator=generator, dtype=torch.float64) < self.sky_frac
        hit = torch.rand(n, s, generator=generator, dtype=torch.float64) < self.sky_line_prob
        sky = sky * (on[:, None] & hit)
        return {"log_line_factor": dex, "calib": calib, "sky_amp": sky}

    def line_factors(self, log_line_factor: torch.Tensor) -> torch.Tensor:
        """(n, N_lines) multipliers of Cloudy's lines from the family draws (n, F)."""
        return 10 ** log_line_factor[:, self.family.to(log_line_factor.device)]

    def warp(self, calib: torch.Tensor) -> torch.Tensor:
        """(n, M) multiplicative calibration 1 + c @ P."""
        return 1.0 + calib.to(self.calib_basis) @ self.calib_basis

    def sky_residuals(self, sky_amp: torch.Tensor, ivar: torch.Tensor) -> torch.Tensor:
        """(n, M) additive spikes: amplitude (in sigmas at each line's pixel) x profile."""
        sd = torch.where(ivar > 0, ivar.clamp_min(1e-30).rsqrt(), torch.zeros_like(ivar))
        return (sky_amp.to(ivar) @ self.sky_profile) * sd


@torch.no_grad()
def simulate_batch(
    gen, n: int, seed: int, step: int, device=None, parts: GenerativeParts | None = None,
    sfh=None,
) -> dict[str, torch.Tensor]:
    """Batch ``step`` of ``n`` noisy mocks (float32, on ``device``; default the generator's):
    prior draws from ``rng_for(seed, step)``, then the mock pipeline's steps on the device.
    With ``parts`` (:class:`GenerativeParts`), the generative model's free line ratios,
    calibration warp and sky residuals too; ``flux_true`` then includes the warp (not the sky
    residuals, which are noise), and the draws are returned as ``log_line_factor``, ``calib``
    and ``sky_amp``.

    ``sfh`` (:class:`sedvae.sps.continuity.ContinuitySFH`): star-formation histories from that
    prior instead of theta's (drawn after everything else, so the other draws are unchanged).
    theta then no longer describes every history, so the batch carries the history's truths
    (``SEDModel.derived_from_history``: ``logmstar_surv``, ``sfr_100myr``, ``sfr_1gyr``,
    ``t_mw_gyr``, ``z_mw``) and the draws (``sfh_continuity``, ``sfr_log_ratio``)."""
    device = torch.device(device) if device is not None else gen.sps.wave.device
    cpu = rng_for(seed, step)
    params = {k: v.to(device) for k, v in gen.draw(n, cpu).items()}
    extra = parts.draw(n, cpu) if parts is not None else None
    sfh_draws = sfh.draw(n, cpu) if sfh is not None else None
    dt = gen.sps.dtype
    theta, z = params["theta"].to(dt), params["z"].to(dt)
    history = None
    if sfh is not None:
        history = sfh.history(gen.sps, *gen.sps.check_inputs(theta, z), sfh_draws)
    factors = None if extra is None else parts.line_factors(extra["log_line_factor"].to(device))
    lum = gen.sps.simulate(theta, z, params["logU"].to(dt), params["sigma_v"].to(dt), factors,
                           history=history)  # fmt: skip
    flux, phot = gen.observe(lum, z)
    flux = flux * params["aperture"].to(dt)[:, None]  # the fibre sees a fraction of the galaxy
    if extra is not None:
        flux = flux * parts.warp(extra["calib"].to(device)).to(flux.dtype)
    obs = noisy_batch(gen.noise, flux, phot, device_generator(cpu, device))
    if extra is not None:
        sky = parts.sky_residuals(extra["sky_amp"].to(device), obs["ivar"])
        obs["flux"] = torch.where(obs["mask"], obs["flux"], obs["flux"] + sky)
    batch = {k: obs[k] for k in OBS_KEYS}
    batch.update({k: params[k].float() for k in TRUTH_KEYS})
    batch["flux_true"] = flux.float()
    if extra is not None:
        batch.update({k: v.float().to(device) for k, v in extra.items()})
    if history is not None:
        from ..sps import THETA

        truths = gen.sps.derived_from_history(history, 10 ** theta[:, THETA.LOGMSTAR])
        batch.update({k: v.float() for k, v in truths.items()})
        batch["sfh_continuity"] = sfh_draws["sfh_continuity"].to(device)
        batch["sfr_log_ratio"] = sfh_draws["sfr_log_ratio"].float().to(device)
    return batch


@torch.no_grad()
def simulate_emulator_batch(sps, n: int, seed: int, step: int, z_max: float, cols: slice):
    """Batch ``step`` of (theta, z, lum): prior draws, z ~ U(0, z_max), and the attenuated
    stellar spectrum per unit formed mass on ``sps.wave[cols]`` (the writer's ``lum``)."""
    device = sps.wave.device
    cpu = rng_for(seed, step)
    theta = sps.prior.sample(n, cpu, dtype=torch.float64).to(device)
    z = (z_max * torch.rand(n, generator=cpu, dtype=torch.float64)).to(device)
    th, zz = sps.check_inputs(theta, z)
    lum = sps.spectrum_from_history(sps.history(th, zz), th[:, 9:12])[:, cols]
    return {"theta": theta.float(), "z": z.float(), "lum": lum.float()}


# ---- data modules ----------------------------------------------------------------------------
class _StepTokens(Dataset):
    """Step numbers 0 .. steps - 1 of one epoch: the loader carries only these to the device,
    where :meth:`on_after_batch_transfer` turns each into a simulated batch."""

    def __init__(self, steps: int) -> None:
        self.steps = int(steps)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i, dtype=torch.long)


class _Batches(Dataset):
    """Pre-simulated batches (validation and test sets), served whole."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.batches[i]


class _OnTheFly(pl.LightningDataModule):
    """Shared plumbing: step tokens for training, fixed simulated sets for validation/test."""

    VAL_SEED_OFFSET = 1_000_003  # validation and test streams never meet the training one
    TEST_SEED_OFFSET = 2_000_003

    def __init__(self, batch_size: int, steps_per_epoch: int, n_val: int, n_test: int,
                 seed: int) -> None:  # fmt: skip
        super().__init__()
        if batch_size < 1 or steps_per_epoch < 1:
            raise ValueError("batch_size and steps_per_epoch must be >= 1")
        self.batch_size = int(batch_size)
        self.steps_per_epoch = int(steps_per_epoch)
        self.n_val, self.n_test = int(n_val), int(n_test)
        self.seed = int(seed)
        self.datasets: dict = {}
        self._device = torch.device("cpu")

    # subclasses: the module the simulations run in, and one batch
    def _module(self) -> torch.nn.Module:
        raise NotImplementedError

    def make_batch(self, n: int, seed: int, step: int) -> dict:
        raise NotImplementedError

    def to(self, device) -> _OnTheFly:
        """Move the simulator to ``device`` (done by the training loop itself)."""
        device = torch.device(device)
        if device != self._device:
            self._module().to(device)
            self._device = device
        return self

    def _trainer_device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else self._device

    def train_batch(self, step: int) -> dict:
        """Training batch number ``step`` (counted over epochs) on the simulator's device."""
        return self.make_batch(self.batch_size, self.seed, int(step))

    def _fixed(self, n: int, offset: int) -> list[dict]:
        out = []
        for i, start in enumerate(range(0, n, self.batch_size)):
            batch = self.make_batch(min(self.batch_size, n - start), self.seed + offset, i)
            out.append({k: v.cpu() for k, v in batch.items()})
        return out

    def setup(self, stage: str | None = None) -> None:
        self.to(self._trainer_device())
        if "val" not in self.datasets and self.n_val > 0:
            self.datasets["val"] = _Batches(self._fixed(self.n_val, self.VAL_SEED_OFFSET))
        if stage in (None, "test") and "test" not in self.datasets and self.n_test > 0:
            self.datasets["test"] = _Batches(self._fixed(self.n_test, self.TEST_SEED_OFFSET))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, torch.Tensor) and batch.ndim == 0:  # a training step token
            self.to(batch.device)
            epoch = self.trainer.current_epoch if getattr(self, "trainer", None) else 0
            return self.train_batch(epoch * self.steps_per_epoch + int(batch))
        return batch

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_StepTokens(self.steps_per_epoch), batch_size=None, shuffle=False)

    def _fixed_loader(self, split: str) -> DataLoader:
        return DataLoader(self.datasets[split], batch_size=None, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self._fixed_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._fixed_loader("test")


class _SimulatedTrainSet:
    """What ``PosteriorModule.setup`` asks of a training set: its size per epoch and noiseless
    spectra for a gappy-PCA basis (``clean_spectra``), here simulated."""

    def __init__(self, dm: SimulatorDataModule) -> None:
        self.dm = dm

    def __len__(self) -> int:
        return self.dm.batch_size * self.dm.steps_per_epoch

    def clean_spectra(self, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        flux, ivar, z = [], [], []
        for i, start in enumerate(range(0, int(n), self.dm.batch_size)):
            size = min(self.dm.batch_size, int(n) - start)
            batch = self.dm.make_batch(size, self.dm.seed + 3_000_017 + int(seed), i)
            flux.append(batch["flux_true"].cpu())
            ivar.append(batch["ivar"].cpu())
            z.append(batch["z"].cpu())
        return torch.cat(flux), torch.cat(ivar), torch.cat(z)


class SimulatorDataModule(_OnTheFly):
    """Posterior training on simulations drawn every step (module docstring).

    Parameters
    ----------
    generator : MockGenerator, optional
        Default: :func:`build_generator` (the mock files' settings; exported tables where
        ``$SEDVAE_SPS_TABLES`` is set).
    batch_size : int
        Galaxies per training step.
    steps_per_epoch : int
        Steps between validations (an "epoch" of fresh galaxies; the LR schedule counts these).
    n_val, n_test : int
        Galaxies in the fixed validation and test sets (simulated once, at setup).
    seed : int
        Training batch ``i`` is made from ``rng_for(seed, i)``.
    generative : dict or bool, optional
        The generative model's data-driven parts (:class:`GenerativeParts`; its keyword
        arguments, or True for its defaults): free line ratios, calibration warps, sky
        residuals. None/False: the SPS mocks alone.
    """

    def __init__(self, generator=None, batch_size: int = 256, steps_per_epoch: int = 400,
                 n_val: int = 2048, n_test: int = 0, seed: int = 11,
                 generative: dict | bool | None = None) -> None:  # fmt: skip
        super().__init__(batch_size, steps_per_epoch, n_val, n_test, seed)
        self.generator = generator if generator is not None else build_generator()
        self.parts = None
        if generative:
            kwargs = {} if generative is True else dict(generative)
            self.parts = GenerativeParts(
                self.generator.sps.line_names, self.generator.instrument, **kwargs
            )
        self.datasets["train"] = _SimulatedTrainSet(self)

    def _module(self) -> torch.nn.Module:
        if self.parts is None:
            return self.generator
        return torch.nn.ModuleList([self.generator, self.parts])

    def make_batch(self, n: int, seed: int, step: int) -> dict:
        batch = simulate_batch(self.generator, n, seed, step, self._device, self.parts)
        return batch


class EmulatorSimulatorDataModule(_OnTheFly):
    """Emulator training on spectra simulated every step: the attributes
    ``sedvae.emulator.EmulatorModule`` reads from ``SimulationDataModule`` (``wave``,
    ``z_range``, ``path``, ``attrs``, ``train_set``, ``train_chunks``).

    Parameters
    ----------
    sps : SEDModel, optional
        Default: ``SEDModel(2000, 60000)`` (exported tables where ``$SEDVAE_SPS_TABLES`` is set).
    z_max : float
        z ~ U(0, z_max) (the emulator's nominal range).
    wave_min, wave_max : float
        Rest-frame pixels served (vacuum, Angstrom): the emulator's segments' ends.
    batch_size, steps_per_epoch, n_val, seed : as :class:`SimulatorDataModule`.
    """

    def __init__(self, sps=None, z_max: float = 0.8, wave_min: float = 2000.0,
                 wave_max: float = 60000.0, batch_size: int = 256, steps_per_epoch: int = 400,
                 n_val: int = 2048, seed: int = 1, tables=None) -> None:  # fmt: skip
        super().__init__(batch_size, steps_per_epoch, n_val, 0, seed)
        if sps is None:
            from ..sps import SEDModel

            sps = SEDModel(2000.0, 60000.0, z_max=max(0.8, z_max), tables=resolve_tables(tables))
        self.sps = sps
        self.z_max = float(z_max)
        wave = sps.wave.cpu()
        keep = torch.nonzero((wave >= wave_min) & (wave <= wave_max)).flatten()
        if len(keep) == 0:
            raise ValueError(f"the simulator has no pixels in [{wave_min}, {wave_max}] A")
        self.cols = slice(int(keep[0]), int(keep[-1]) + 1)
        self.wave = wave[self.cols].clone()
        self.z_range = (0.0, self.z_max)
        self.path = "on-the-fly simulator"
        self.attrs = {"seed": self.seed}
        self.train_set = range(self.batch_size * self.steps_per_epoch)  # size per epoch

    def _module(self) -> torch.nn.Module:
        return self.sps

    def make_batch(self, n: int, seed: int, step: int) -> dict:
        return simulate_emulator_batch(self.sps, n, seed, step, self.z_max, self.cols)

    def train_chunks(self, max_rows: int | None = None):
        """Fixed simulated (theta, z, lum) blocks for the PCA (their own seed)."""
        n = int(max_rows or 20000)
        for i, start in enumerate(range(0, n, 1024)):
            b = self.make_batch(min(1024, n - start), self.seed + 4_000_037, i)
            yield b["theta"].cpu(), b["z"].cpu(), b["lum"].cpu()


# ---- a schedule for a fixed wall-clock budget ------------------------------------------------
class WallClockSchedule(pl.Callback):
    """Cosine learning-rate decay over ``budget_s`` seconds of training (after ``warmup_steps``
    linear steps), then stop: a run sized by time, not epochs (the accelerator is lent for
    minutes). Records ``steps``, ``seconds`` and ``steps_per_s`` of the fit in ``stats``."""

    def __init__(self, budget_s: float, warmup_steps: int = 100, min_factor: float = 0.01):
        if budget_s <= 0:
            raise ValueError(f"budget_s must be > 0, got {budget_s}")
        self.budget_s = float(budget_s)
        self.warmup_steps = int(warmup_steps)
        self.min_factor = float(min_factor)
        self.stats: dict[str, float] = {}
        self._start: float | None = None
        self._base: list[list[float]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()
        self._base = [[g["lr"] for g in opt.param_groups] for opt in trainer.optimizers]
        self._step0 = trainer.global_step

    def factor(self, elapsed: float, step: int) -> float:
        frac = min(1.0, elapsed / self.budget_s)
        cosine = self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * frac))
        return cosine * min(1.0, (step + 1) / max(1, self.warmup_steps))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self._start
        if elapsed >= self.budget_s:
            trainer.should_stop = True
        f = self.factor(elapsed, trainer.global_step - self._step0)
        for opt, base in zip(trainer.optimizers, self._base, strict=True):
            for group, lr in zip(opt.param_groups, base, strict=True):
                group["lr"] = lr * f

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if time.perf_counter() - self._start >= self.budget_s:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        seconds = time.perf_counter() - self._start
        steps = trainer.global_step - self._step0
        self.stats = {"steps": float(steps), "seconds": seconds,
                      "steps_per_s": steps / max(seconds, 1e-9)}  # fmt: skip


def observation_arrays() -> tuple[dict, dict]:
    """What the portable SPS tables carry for observing without the bundled files, speclite or
    astropy: the bundled DESI coadd's galaxy 0 (pixels, resolution, ivar) and the Legacy
    Surveys filter curves (``sedvae.sps.tables.export_tables(..., observation=...)``)."""
    import speclite.filters

    from ..physics.photometry import LS_NORTH, LS_SOUTH
    from .mocks import load_desi_example

    spectra = load_desi_example()
    names = list(spectra.arm_names)
    out = {
        "obs/desi_ivar": np.asarray(spectra.ivar[0], dtype=np.float32),
        "obs/desi_arm": np.asarray(spectra.arm, dtype=np.int64),
    }
    for a, name in enumerate(names):
        out[f"obs/desi_wave_{name}"] = np.asarray(spectra.wave[spectra.arm == a], np.float64)
        out[f"obs/desi_resolution_{name}"] = np.asarray(spectra.resolution[a][0], np.float32)
    bands = list(dict.fromkeys((*LS_NORTH, *LS_SOUTH)))
    for filt, name in zip(speclite.filters.load_filters(*bands), bands, strict=True):
        out[f"obs/filter_wave/{name}"] = np.asarray(filt.wavelength, dtype=np.float64)
        out[f"obs/filter_resp/{name}"] = np.asarray(filt.response, dtype=np.float64)
    return out, {"desi_arms": names, "filters": bands}


__all__ = [
    "BRIGHT_SKY_LINES_AIR",
    "GenerativeParts",
    "line_families",
    "observation_arrays",
    "EmulatorSimulatorDataModule",
    "SimulatorDataModule",
    "WallClockSchedule",
    "build_generator",
    "desi_instrument",
    "noisy_batch",
    "resolve_tables",
    "simulate_batch",
    "simulate_emulator_batch",
]
