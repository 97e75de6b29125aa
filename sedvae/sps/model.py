"""The PROVABGS SED model on the BC03+MILES grid, batched and differentiable in torch.

theta (B, 12) and z (B,) -> rest-frame L_lambda (B, L) in L_sun/A on the raw grid wavelengths.

How a spectrum is made (one matrix product per population):

1. The SFH is sum_i beta_i B_i(t), the 4 piecewise-linear NMF bases, integrated exactly over the
   PROVABGS lookback bins, cut at the age of the universe t_U(z) and normalised to unit mass;
   a fraction f_burst of the mass goes into a burst at t_burst (dropped, with its mass returned
   to the NMF part, when t_burst >= t_U(z)).
2. Within a bin the SFR is constant; the bin spectrum is the time-averaged SSP (exact under
   bagpipes' convention of piecewise-constant raw SSP cells). The bin straddling 10 Myr is split
   there (birth clouds). The bin cut by t_U(z) uses a table of partial integrals
   P_b(t) = int_{lo_b}^{t} SSP dt, which is linear between raw cell edges, so the cut is exact
   too and costs a sparse look-up (4 rows) rather than a dense column per raw cell.
3. Z(t) = gamma_1 ZB_1(t) + gamma_2 ZB_2(t) at bin centres, clipped to the grid, with linear
   interpolation in log Z between the 7 grid metallicities.
4. L = [L_young T_BC + L_old + L_burst] T_ISM, times 10^logM*; young = younger than 10 Myr.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.fft import next_fast_len

from ..physics.cosmology import age_of_universe_gyr, set_cosmology_tables
from .dust import CharlotFallKriekConroy
from .nebular import line_deposit_matrix, load_nebular_grid
from .provabgs import (
    BIN_EDGES_GYR,
    T_BC_GYR,
    THETA,
    PROVABGSPrior,
    check_theta_z,
    load_nmf_bases,
)
from .ssp import load_ssp_grid
from .tables import find_tables

Z_MIN_SUPPORTED = 0.0
DEFAULT_Z_MAX = 1.0  # t_U(1) = 5.9 Gyr; partial-bin tables are built from there to 13.8 Gyr


@dataclass
class History:
    """Star-formation and metallicity history of one batch, per unit formed mass."""

    bin_mass: torch.Tensor  # (B, nbins) NMF mass per PROVABGS bin (burst excluded)
    bin_z: torch.Tensor  # (B, nbins) metallicity per bin, clipped to the grid
    bin_hi_gyr: torch.Tensor  # (B, nbins) upper bin edge after the cut at t_U(z)
    cut_bin: torch.Tensor  # (B,) index of the bin containing t_U(z)
    burst_mass: torch.Tensor  # (B,) mass fraction in the burst (0 when dropped)
    burst_age_gyr: torch.Tensor  # (B,)
    burst_z: torch.Tensor  # (B,) burst metallicity, clipped to the grid
    t_univ_gyr: torch.Tensor  # (B,)


def _interp_weights(grid: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and weight for linear interpolation of x (clamped) on an increasing grid."""
    x = x.clamp(grid[0], grid[-1])
    idx = torch.searchsorted(grid, x.detach().contiguous(), right=True) - 1
    idx = idx.clamp(0, len(grid) - 2)
    w = (x - grid[idx]) / (grid[idx + 1] - grid[idx])
    return idx, w


class SEDModel(torch.nn.Module):
    """PROVABGS SED model on BC03+MILES (see the module docstring).

    Parameters
    ----------
    wave_min, wave_max : rest-frame wavelength range kept from the grid, Angstrom.
    z_max : largest supported redshift (z in [0, z_max]).
    nebular : load bagpipes' Cloudy grids for ``nebular_spectrum``/``simulate`` (mocks).
    compile : fuse the dust attenuation with ``torch.compile`` (11x faster on that step, the
        costliest one; ~10 s of compilation at the first call, cached on disk afterwards).
    dtype : float32 (default) or float64; ``.to(torch.float64)`` also works.
    tables : an exported table file (``python -m sedvae.sps export-tables``, a path or
        ``sedvae.sps.tables.SPSTables``) to build from instead of the bagpipes grids; by
        default the grids are read from bagpipes, or, where bagpipes is not installed, from
        the file ``$SEDVAE_SPS_TABLES`` names. Equal to the grid-built model to float32
        round-off (the file's spectra are float32).
    """

    broaden_max_wave = 10000.0  # A; redder pixels (>= 10 A) are far wider than any sigma_v
    broaden_dlnlam = 5e-5  # 15 km/s: a fine uniform ln(lambda) grid for the FFT convolution

    def __init__(
        self,
        wave_min: float = 1000.0,
        wave_max: float = 60000.0,
        z_max: float = DEFAULT_Z_MAX,
        nebular: bool = False,
        compile: bool = False,
        dtype: torch.dtype = torch.float32,
        tables=None,
    ):
        super().__init__()
        if not 0 < z_max <= 10:
            raise ValueError(f"z_max must lie in (0, 10]; got {z_max}")
        self.z_max = float(z_max)
        self.prior = PROVABGSPrior()
        self.tables = find_tables(tables)  # dropped at the end of __init__ (large arrays)
        self.tables_path = None if self.tables is None else str(self.tables.path)
        if self.tables is None:
            grid = load_ssp_grid(wave_min, wave_max)
        else:
            grid = self.tables.ssp_grid(wave_min, wave_max)
            set_cosmology_tables(*self.tables.cosmology())  # used where astropy is absent
        n_wave, n_z = len(grid.wave), len(grid.zmet)
        self.n_ages = len(grid.ages_yr)
        edges = BIN_EDGES_GYR
        self.n_bins = len(edges) - 1

        # dense segments: the bins, with the one straddling 10 Myr split there
        seg_edges = self.segment_edges_gyr()
        seg_lum, seg_live = grid.time_average(seg_edges * 1e9)  # (S, Z, L), (S, Z)
        seg_bin = np.searchsorted(edges, 0.5 * (seg_edges[1:] + seg_edges[:-1])) - 1
        self.n_young = self.n_young_segments()
        if self.tables is not None:  # the file keeps the young segments, not their raw ages
            young_edges, young_lum = self.tables.young_segments(wave_min, wave_max)
            if not np.allclose(young_edges, seg_edges[: self.n_young + 1] * 1e9, rtol=1e-12):
                raise ValueError(f"{self.tables.path}: its young segments are not this model's")
            seg_lum[: self.n_young] = young_lum

        # partial integrals P_b(t) (Gyr * L_sun/A / M_sun) at the raw cell edges of every bin
        # that t_U(z) can cut, plus the bin's own edges; linear in t between consecutive nodes
        t_min = float(age_of_universe_gyr(torch.tensor(self.z_max, dtype=torch.float64)))
        cells = grid.cell_edges_yr / 1e9
        first_cut = int(np.searchsorted(edges, t_min, side="right") - 1)
        node_t, node_bin = [], []
        for b in range(first_cut, self.n_bins):
            inner = cells[(cells > edges[b]) & (cells < edges[b + 1])]
            t_nodes = np.concatenate([[edges[b]], inner, [edges[b + 1]]])
            node_t.append(t_nodes)
            node_bin.append(np.full(len(t_nodes), b))
        node_t, node_bin = np.concatenate(node_t), np.concatenate(node_bin)
        part_lum = np.zeros((len(node_t), n_z, n_wave))
        part_live = np.zeros((len(node_t), n_z))
        for j in range(len(node_t)):
            lo = edges[node_bin[j]]
            if node_t[j] > lo:
                lum, live = grid.time_average(np.array([lo, node_t[j]]) * 1e9)
                part_lum[j], part_live[j] = lum[0] * (node_t[j] - lo), live[0] * (node_t[j] - lo)
        self.first_cut_bin = first_cut

        self.register_buffer("wave", torch.as_tensor(grid.wave, dtype=torch.float64))  # vacuum
        self.register_buffer("wave_air", torch.as_tensor(grid.wave_air, dtype=torch.float64))
        self.register_buffer("bin_edges", torch.as_tensor(edges, dtype=dtype))
        self.register_buffer("seg_edges", torch.as_tensor(seg_edges, dtype=dtype))
        self.register_buffer("seg_bin", torch.as_tensor(seg_bin, dtype=torch.long))
        self.register_buffer("seg_live", torch.as_tensor(seg_live, dtype=dtype))
        self.register_buffer(
            "seg_lum_young",
            torch.as_tensor(seg_lum[: self.n_young].reshape(-1, n_wave), dtype=dtype),
        )
        self.register_buffer(
            "seg_lum_old", torch.as_tensor(seg_lum[self.n_young :].reshape(-1, n_wave), dtype=dtype)
        )
        # one sparse table for look-ups: raw SSPs (Z*A rows, for the burst), then P_b (N*Z rows)
        self.part_offset = n_z * self.n_ages
        table = np.concatenate([grid.lum.reshape(-1, n_wave), part_lum.reshape(-1, n_wave)], 0)
        self.register_buffer("sparse_lum", torch.as_tensor(table, dtype=dtype))
        live_table = np.concatenate([grid.live_frac.reshape(-1), part_live.reshape(-1)])
        self.register_buffer("sparse_live", torch.as_tensor(live_table, dtype=dtype))
        # (bin, t) search keys for the nodes: bins are < 100 and t < 100 Gyr
        self.register_buffer(
            "node_key", torch.as_tensor(node_bin * 100.0 + node_t, dtype=torch.float64)
        )
        self.register_buffer("node_t", torch.as_tensor(node_t, dtype=dtype))
        node_first = np.array(
            [np.argmax(node_bin == b) if b >= first_cut else 0 for b in range(self.n_bins)]
        )
        node_last = np.array(
            [
                len(node_bin) - 1 - np.argmax(node_bin[::-1] == b) if b >= first_cut else 1
                for b in range(self.n_bins)
            ]
        )
        self.register_buffer("node_first", torch.as_tensor(node_first, dtype=torch.long))
        self.register_buffer("node_last", torch.as_tensor(node_last, dtype=torch.long))
        self.register_buffer(
            "raw_log_age", torch.as_tensor(np.log10(grid.ages_yr[1:] / 1e9), dtype=dtype)
        )
        self.register_buffer("log_zgrid", torch.as_tensor(np.log10(grid.zmet), dtype=dtype))

        nmf = load_nmf_bases()
        t = nmf.t_gyr
        trapz = 0.5 * (nmf.sfh[:, 1:] + nmf.sfh[:, :-1]) * np.diff(t)
        cum = np.concatenate([np.zeros((4, 1)), np.cumsum(trapz, -1)], -1)
        self.register_buffer("nmf_t", torch.as_tensor(t, dtype=dtype))
        self.register_buffer("nmf_sfh", torch.as_tensor(nmf.sfh, dtype=dtype))
        self.register_buffer("nmf_cum", torch.as_tensor(cum, dtype=dtype))
        self.register_buffer("nmf_zh", torch.as_tensor(nmf.zh, dtype=dtype))
        # tables of whole bins (not saved: derived from the buffers above). NMF mass integral
        # of each basis over each bin (nbins, 4); the 2 metallicity bases at each bin's middle
        # and lower edge (nbins, 2); the surviving mass per unit bin mass at each grid Z
        # (nbins, Z), its segments weighted by duration as in _dense_weights
        lo_edges, hi_edges = edges[:-1], edges[1:]
        mid = 0.5 * (lo_edges + hi_edges)
        bin_cum = self._nmf_cumulative(torch.as_tensor(hi_edges, dtype=dtype))
        bin_cum = bin_cum - self._nmf_cumulative(torch.as_tensor(lo_edges, dtype=dtype))
        zh = lambda x: self._nmf_zh(torch.as_tensor(x, dtype=dtype))  # noqa: E731
        self.register_buffer("_bin_cum", bin_cum, persistent=False)
        self.register_buffer("_bin_zh_mid", zh(mid), persistent=False)
        self.register_buffer("_bin_zh_lo", zh(lo_edges), persistent=False)
        frac = (seg_edges[1:] - seg_edges[:-1]) / (hi_edges - lo_edges)[seg_bin]
        bin_live = np.zeros((self.n_bins, n_z))
        np.add.at(bin_live, seg_bin, frac[:, None] * seg_live)
        self.register_buffer("_bin_live", torch.as_tensor(bin_live, dtype=dtype), persistent=False)
        self.dust = CharlotFallKriekConroy(grid.wave, dtype=dtype, compile=compile)
        self.has_nebular = bool(nebular)
        if nebular:
            self._init_nebular(wave_min, wave_max, dtype)
        del self.tables

    @staticmethod
    def segment_edges_gyr() -> np.ndarray:
        """Edges (Gyr) of the dense segments: the PROVABGS bins, the one straddling
        10 Myr split there."""
        return np.unique(np.concatenate([BIN_EDGES_GYR, [T_BC_GYR]]))

    @staticmethod
    def n_young_segments() -> int:
        """Number of segments younger than 10 Myr (the birth clouds)."""
        return int(np.sum(SEDModel.segment_edges_gyr()[1:] <= T_BC_GYR * (1 + 1e-9)))

    def _init_nebular(self, wave_min: float, wave_max: float, dtype: torch.dtype) -> None:
        if self.tables is None:
            neb = load_nebular_grid(wave_min, wave_max)
        else:
            neb = self.tables.nebular_grid(wave_min, wave_max)
        if neb.cont.shape[-1] != self.n_wave:
            raise ValueError("nebular continuum and SSP grids have different wavelengths")
        # nebular age k is bagpipes' (and our) young segment k: 10^(6 + 0.1 k) yr
        n_young = self.n_young
        expected = 10 ** (6.0 + 0.1 * np.arange(n_young))
        if not np.allclose(neb.ages_yr[:n_young], expected, rtol=1e-6):
            raise ValueError("nebular grid ages do not match the young segments")
        # rows ordered (logU, young segment, Z) to match the coefficient layout below
        cont = neb.cont[:, :, :n_young].transpose(1, 2, 0, 3).reshape(-1, self.n_wave)
        lines = neb.line_lum[:, :, :n_young].transpose(1, 2, 0, 3).reshape(-1, len(neb.line_wave))
        self.line_names = tuple(neb.line_names)
        self.register_buffer("neb_logu", torch.as_tensor(neb.logu, dtype=dtype))
        self.register_buffer("neb_cont", torch.as_tensor(cont, dtype=dtype))
        self.register_buffer("neb_lines", torch.as_tensor(lines, dtype=dtype))
        self.register_buffer(
            "line_wavelengths", torch.as_tensor(neb.line_wave, dtype=torch.float64)
        )
        deposit = line_deposit_matrix(neb.line_wave, self.wave.numpy())
        self.register_buffer("line_deposit", torch.as_tensor(deposit, dtype=dtype))
        self.register_buffer(
            "line_transmission_index",
            torch.as_tensor(
                np.clip(np.searchsorted(self.wave.numpy(), neb.line_wave), 0, self.n_wave - 1)
            ),
        )

    # wavelengths stay float64 whatever dtype the model is cast to (float32 would round 0.5 A
    # pixels at 10^4 A and break flux-conserving resampling)
    _FLOAT64_BUFFERS = ("wave", "wave_air", "line_wavelengths")

    def _apply(self, fn, recurse=True):
        keep = {
            k: v for k, v in self._buffers.items() if k in self._FLOAT64_BUFFERS and v is not None
        }
        super()._apply(fn, recurse)
        for k, v in keep.items():
            self._buffers[k] = v.to(device=self._buffers[k].device)
        return self

    # ---- inputs ---------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.seg_lum_old.dtype

    @property
    def n_wave(self) -> int:
        return self.wave.shape[0]

    def check_inputs(self, theta: torch.Tensor, z) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate (theta, z) and cast them to the model dtype; ValueError names the problem."""
        theta, z = check_theta_z(theta, z, float(self.z_max), Z_MIN_SUPPORTED)
        return theta.to(self.dtype), z.to(self.dtype)

    # ---- histories --------------------------------------------------------------------------
    def _nmf_cumulative(self, t: torch.Tensor) -> torch.Tensor:
        """Exact integral from 0 to t (Gyr) of each piecewise-linear NMF SFH basis: (..., 4)."""
        t = t.clamp(self.nmf_t[0], self.nmf_t[-1])
        idx, _ = _interp_weights(self.nmf_t, t)
        dt = t - self.nmf_t[idx]
        b0, b1 = self.nmf_sfh[:, idx], self.nmf_sfh[:, idx + 1]
        slope = (b1 - b0) / (self.nmf_t[idx + 1] - self.nmf_t[idx])
        return (self.nmf_cum[:, idx] + b0 * dt + 0.5 * slope * dt**2).movedim(0, -1)

    def _nmf_zh(self, t: torch.Tensor) -> torch.Tensor:
        """The 2 NMF metallicity bases at lookback time t (Gyr): (..., 2)."""
        idx, w = _interp_weights(self.nmf_t, t)
        return (self.nmf_zh[:, idx] * (1 - w) + self.nmf_zh[:, idx + 1] * w).movedim(0, -1)

    def _zweights(self, zmet: torch.Tensor) -> torch.Tensor:
        """Linear-in-log-Z interpolation weights (..., Z) on the grid (two non-zeros)."""
        idx, w = _interp_weights(self.log_zgrid, torch.log10(zmet))
        n = len(self.log_zgrid)
        lo = F.one_hot(idx, n).to(zmet.dtype)
        return lo * (1 - w)[..., None] + F.one_hot(idx + 1, n).to(zmet.dtype) * w[..., None]

    def history(self, theta: torch.Tensor, z: torch.Tensor) -> History:
        """SFH and metallicity history per unit formed mass, for validated inputs.

        Bins that end before t_U(z) are whole, so their NMF mass integrals and mid-bin
        metallicity bases come from tables (``_bin_cum``, ``_bin_zh_mid``): only the bin that
        t_U cuts is integrated per galaxy (the same numbers as integrating every bin up to
        min(edge, t_U), 2.5x faster for the million samples of a catalog batch)."""
        t_u = age_of_universe_gyr(z).to(self.dtype)
        lo, edge_hi = self.bin_edges[:-1], self.bin_edges[1:]
        hi = torch.maximum(torch.minimum(edge_hi[None], t_u[:, None]), lo[None])
        whole = edge_hi[None] <= t_u[:, None]  # (B, nbins)
        cut = (lo[None] < t_u[:, None]) & ~whole  # at most one bin per galaxy
        bin_of_tu = torch.searchsorted(self.bin_edges, t_u.detach().contiguous()) - 1
        b_cut = bin_of_tu.clamp(0, self.n_bins - 1)
        lo_cut = lo[b_cut]
        beta = theta[:, THETA.BETA]
        cum_cut = self._nmf_cumulative(t_u) - self._nmf_cumulative(lo_cut)  # (B, 4)
        mass_cut = (cum_cut * beta).sum(-1)
        bin_mass = torch.where(whole, beta @ self._bin_cum.T, 0.0)
        bin_mass = torch.where(cut, mass_cut[:, None], bin_mass).clamp_min(0.0)
        bin_mass = bin_mass / bin_mass.sum(-1, keepdim=True).clamp_min(1e-30)

        t_burst = theta[:, THETA.T_BURST]
        f_burst = theta[:, THETA.F_BURST] * (t_burst < t_u).to(theta.dtype)
        zmin, zmax = 10 ** self.log_zgrid[0], 10 ** self.log_zgrid[-1]
        gamma = theta[:, THETA.GAMMA]
        # Z at mid-bin of [lo, hi]: a whole bin's middle, an empty bin's lower edge (hi = lo),
        # or the middle of the cut bin's part before t_U
        z_whole, z_empty = gamma @ self._bin_zh_mid.T, gamma @ self._bin_zh_lo.T
        z_cut = (self._nmf_zh(0.5 * (lo_cut + t_u)) * gamma).sum(-1)
        bin_z = torch.where(cut, z_cut[:, None], torch.where(whole, z_whole, z_empty))
        bin_z = bin_z.clamp(zmin, zmax)
        return History(
            bin_mass=bin_mass * (1 - f_burst)[:, None],
            bin_z=bin_z,
            bin_hi_gyr=hi,
            cut_bin=bin_of_tu.clamp(self.first_cut_bin, self.n_bins - 1),
            burst_mass=f_burst,
            burst_age_gyr=t_burst,
            burst_z=(self._nmf_zh(t_burst) * gamma).sum(-1).clamp(zmin, zmax),
            t_univ_gyr=t_u,
        )

    def _dense_weights(self, h: History) -> torch.Tensor:
        """(B, S, Z) mass per dense segment and metallicity; the cut bin is left to the
        sparse look-up, so it is zero here."""
        lo = self.bin_edges[:-1]
        keep = torch.ones_like(h.bin_mass).scatter_(1, h.cut_bin[:, None], 0.0)
        s_lo, s_hi = self.seg_edges[:-1], self.seg_edges[1:]
        # segments inside one bin share its mass in proportion to their duration
        frac = (s_hi - s_lo) / (self.bin_edges[1:] - lo)[self.seg_bin]
        mass = (h.bin_mass * keep)[:, self.seg_bin] * frac
        return mass[..., None] * self._zweights(h.bin_z)[:, self.seg_bin]

    def _dense_live(self, h: History) -> torch.Tensor:
        """(B,) surviving mass of the dense segments, sum over segments and Z of
        ``_dense_weights(h) * seg_live``, from the per-bin table ``_bin_live`` and the two
        Z-interpolation weights of each bin (no (B, S, Z) array: 8x faster)."""
        keep = torch.ones_like(h.bin_mass).scatter_(1, h.cut_bin[:, None], 0.0)
        idx, w = _interp_weights(self.log_zgrid, torch.log10(h.bin_z))  # (B, nbins)
        rows = torch.arange(self.n_bins, device=idx.device)[None]
        live = (1 - w) * self._bin_live[rows, idx] + w * self._bin_live[rows, idx + 1]
        return (h.bin_mass * keep * live).sum(-1)

    def _sparse_rows(self, h: History) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the sparse tables and their weights, (B, 8): the cut bin's partial integral
        (2 nodes x 2 Z) and the burst SSP (2 ages x 2 Z, log-age interpolation)."""
        n_z = len(self.log_zgrid)
        rows, weights = [], []
        # cut bin: mass m over [lo, t_U] -> m / (t_U - lo) * P_b(t_U)
        b = h.cut_bin
        key = b.to(torch.float64) * 100.0 + h.t_univ_gyr.detach().to(torch.float64)
        j = torch.searchsorted(self.node_key, key.contiguous(), right=True) - 1
        j = torch.minimum(torch.maximum(j, self.node_first[b]), self.node_last[b] - 1)
        t0, t1 = self.node_t[j], self.node_t[j + 1]
        w_t = ((h.t_univ_gyr - t0) / (t1 - t0)).clamp(0.0, 1.0)
        lo = self.bin_edges[b]
        m = h.bin_mass.gather(1, b[:, None])[:, 0] / (h.t_univ_gyr - lo).clamp_min(1e-12)
        zw_idx, zw = _interp_weights(
            self.log_zgrid, torch.log10(h.bin_z.gather(1, b[:, None])[:, 0])
        )
        for dz, wz in ((0, 1 - zw), (1, zw)):
            for dj, wt in ((0, 1 - w_t), (1, w_t)):
                rows.append(self.part_offset + (j + dj) * n_z + zw_idx + dz)
                weights.append(m * wz * wt)
        # burst: SSP at t_burst, raw ages skip the age-0 row
        a_idx, a_w = _interp_weights(self.raw_log_age, torch.log10(h.burst_age_gyr))
        z_idx, z_w = _interp_weights(self.log_zgrid, torch.log10(h.burst_z))
        for dz, wz in ((0, 1 - z_w), (1, z_w)):
            for da, wa in ((0, 1 - a_w), (1, a_w)):
                rows.append((z_idx + dz) * self.n_ages + a_idx + 1 + da)
                weights.append(h.burst_mass * wz * wa)
        return torch.stack(rows, -1), torch.stack(weights, -1)

    # ---- spectra ----------------------------------------------------------------------------
    def components(
        self, h: History, mass: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unattenuated young (< 10 Myr) and old (incl. burst) spectra of a history, each
        (B, L) in L_sun/A, scaled by ``mass`` (B,) M_sun (default: unit formed mass)."""
        B = h.bin_mass.shape[0]
        scale = torch.ones_like(h.burst_mass) if mass is None else mass.to(self.dtype)
        dense = self._dense_weights(h) * scale[:, None, None]
        lum_young = dense[:, : self.n_young].reshape(B, -1) @ self.seg_lum_young
        rows, weights = self._sparse_rows(h)
        sparse = F.embedding_bag(
            rows, self.sparse_lum, per_sample_weights=weights * scale[:, None], mode="sum"
        )
        lum_old = torch.addmm(sparse, dense[:, self.n_young :].reshape(B, -1), self.seg_lum_old)
        return lum_young, lum_old

    def spectrum_from_history(
        self, h: History, dust: torch.Tensor, mass: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attenuated rest-frame spectrum (B, L), L_sun/A, of an explicit history.

        ``dust`` (B, 3) holds (tau_BC, tau_ISM, n_dust); ``mass`` (B,) the formed mass in M_sun.
        Used by ``forward`` and by tests that impose a history (e.g. a constant metallicity).
        """
        lum_young, lum_old = self.components(h, mass)
        return self.dust(lum_old, lum_young, dust[:, 0], dust[:, 1], dust[:, 2])

    def forward(self, theta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Rest-frame L_lambda (B, L) in L_sun/A for parameters theta (B, 12) at redshift z (B,)."""
        theta, z = self.check_inputs(theta, z)
        mass = 10 ** theta[:, THETA.LOGMSTAR]
        return self.spectrum_from_history(self.history(theta, z), theta[:, THETA.DUST], mass)

    # ---- nebular emission and broadening (simulator options for mocks) -------------------
    def _require_nebular(self) -> None:
        if not self.has_nebular:
            raise ValueError(
                "this SEDModel was built without nebular grids: use SEDModel(nebular=True)"
            )

    def _nebular_coefficients(self, h: History, logu: torch.Tensor) -> torch.Tensor:
        """(B, U * young segments * Z) weights of the nebular tables."""
        self._require_nebular()
        logu = torch.as_tensor(logu, dtype=self.dtype, device=h.bin_mass.device)
        if logu.shape != h.bin_mass.shape[:1] or not torch.isfinite(logu).all():
            raise ValueError(f"logU must be finite with shape ({h.bin_mass.shape[0]},)")
        if (logu < self.neb_logu[0]).any() or (logu > self.neb_logu[-1]).any():
            raise ValueError(
                f"logU must lie in [{self.neb_logu[0].item()}, {self.neb_logu[-1].item()}]"
            )
        idx, w = _interp_weights(self.neb_logu, logu)
        n_u = len(self.neb_logu)
        w_u = F.one_hot(idx, n_u).to(logu.dtype) * (1 - w)[:, None]
        w_u = w_u + F.one_hot(idx + 1, n_u).to(logu.dtype) * w[:, None]
        young = self._dense_weights(h)[:, : self.n_young]  # (B, Ay, Z)
        return (w_u[:, :, None, None] * young[:, None]).flatten(1)

    def nebular_spectrum(
        self,
        h: History,
        dust: torch.Tensor,
        logu: torch.Tensor,
        line_factors: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Nebular lines (unresolved) + continuum, attenuated like the young stars (birth
        clouds and ISM): (B, L) L_sun/A per M_sun formed. ``line_factors`` (B, N_lines)
        multiplies each Cloudy line luminosity (``line_names``; the generative simulator's
        free line ratios), the nebular continuum is left as it is."""
        coef = self._nebular_coefficients(h, logu)
        lines = coef @ self.neb_lines
        if line_factors is not None:
            lines = lines * line_factors.to(lines.dtype)
        lum = coef @ self.neb_cont + lines @ self.line_deposit
        t_bc, t_ism = self.dust.transmission(dust[:, 0], dust[:, 1], dust[:, 2])
        return lum * t_bc * t_ism

    def line_luminosities(
        self, theta: torch.Tensor, z: torch.Tensor, logu: torch.Tensor,
        history: History | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Attenuated emission-line luminosities (B, N_lines), L_sun (``line_names``,
        ``line_wavelengths`` vacuum A): the truth for line-flux recovery. ``history``: as in
        :meth:`simulate`, a star-formation history to use instead of theta's."""
        theta, z = self.check_inputs(theta, z)
        h = self.history(theta, z) if history is None else history
        mass = 10 ** theta[:, THETA.LOGMSTAR, None]
        lines = (self._nebular_coefficients(h, logu) @ self.neb_lines) * mass
        t_bc, t_ism = self.dust.transmission(
            theta[:, THETA.TAU_BC], theta[:, THETA.TAU_ISM], theta[:, THETA.N_DUST]
        )
        return lines * (t_bc * t_ism)[:, self.line_transmission_index]

    def _broaden_operators(self):
        """The two fixed resamplings of :meth:`broaden` (native pixels blueward of
        ``broaden_max_wave`` to the uniform ln(lambda) grid and back) as sparse matrices, built
        once per model: the same integrals as ``physics.resample.resample``, ~15x faster."""
        from ..physics.resample import ResampleOperator

        key = (float(self.wave[0]), int(self.wave.shape[0]), self.broaden_max_wave,
               self.broaden_dlnlam)  # fmt: skip
        cached = self.__dict__.get("_broaden_cache")
        if cached is None or cached[0] != key:
            wave = self.wave.detach().cpu().to(torch.float64)
            n_blue = int(np.searchsorted(wave.numpy(), self.broaden_max_wave))
            wave_blue = wave[:n_blue]
            ln_lo, ln_hi = float(torch.log(wave_blue[0])), float(torch.log(wave_blue[-1]))
            n_u = int(np.ceil((ln_hi - ln_lo) / self.broaden_dlnlam))
            wave_u = torch.exp(torch.linspace(ln_lo, ln_hi, n_u, dtype=torch.float64))
            ops = (n_blue, n_u, ResampleOperator(wave_blue, wave_u),
                   ResampleOperator(wave_u, wave_blue))  # fmt: skip
            cached = (key, ops)
            self.__dict__["_broaden_cache"] = cached
        return cached[1]

    def broaden(self, lum: torch.Tensor, sigma_v: torch.Tensor) -> torch.Tensor:
        """Gaussian line-of-sight velocity broadening (stars and gas alike), flux conserving.

        The spectrum blueward of ``broaden_max_wave`` is integrated onto a uniform ln(lambda)
        grid, convolved by FFT with a Gaussian of sigma_v/c, and integrated back onto the
        native pixels; redder pixels are much wider than sigma_v and are left as they are.

        lum : (B, L) on ``wave``; sigma_v : (B,) km/s in [0, 1000].
        """
        sigma_v = torch.as_tensor(sigma_v, dtype=lum.dtype, device=lum.device)
        if sigma_v.shape != lum.shape[:1] or not torch.isfinite(sigma_v).all():
            raise ValueError(f"sigma_v must be finite with shape ({lum.shape[0]},)")
        if (sigma_v < 0).any() or (sigma_v > 1000).any():
            raise ValueError("sigma_v must lie in [0, 1000] km/s")
        n_blue, n_u, to_fine, to_native = self._broaden_operators()
        pad = int(np.ceil(6 * 1000.0 / 299792.458 / self.broaden_dlnlam))  # 6 sigma at 1000 km/s
        # any length >= n_u + 2 pad is the same linear convolution (the kernel is < 2e-9 beyond
        # the padding): a 5-smooth one, about half the power of two above it
        n_fft = next_fast_len(n_u + 2 * pad, real=True)
        if lum.device.type == "cpu" and not lum.requires_grad:
            # the spectra as columns (L, B) from the first resampling to the last: the same
            # operations on the same numbers (equal to the bit) without transposing the
            # (B, n_u) fine grid twice (scipy's sparse products take and return one spectrum
            # per column; the FFTs run along the first dimension as fast)
            x = torch.empty(n_blue, lum.shape[0], dtype=torch.float64).copy_(lum[:, :n_blue].T)
            fine = torch.from_numpy(to_fine.matrix @ x.numpy()).to(lum.dtype)  # (n_u, B)
            smooth = self._convolve_uniform(fine, sigma_v, pad, n_fft, dim=0)
            blue = torch.from_numpy(to_native.matrix @ smooth.to(torch.float64).numpy())
            blue = blue.T.to(lum.dtype)
        else:
            blue = to_native(self._convolve_uniform(to_fine(lum[:, :n_blue]), sigma_v, pad,
                                                    n_fft, dim=1))  # fmt: skip
        # the outermost native pixels are only half covered by the uniform grid: keep them
        blue[:, 0], blue[:, -1] = lum[:, 0], lum[:, n_blue - 1]
        return torch.cat([blue, lum[:, n_blue:]], -1)

    def _convolve_uniform(self, fine, sigma_v, pad: int, n_fft: int, dim: int) -> torch.Tensor:
        """Spectra on the uniform ln(lambda) grid (n_u points along ``dim``, one spectrum per
        index of the other dimension) convolved with Gaussians of sigma_v / c (km/s): edges
        replicated over ``pad`` points, FFTs of length ``n_fft``, cropped back to n_u."""
        n_u = fine.shape[dim]

        def edge(i: int, k: int) -> torch.Tensor:  # point i repeated k times along dim
            size = list(fine.shape)
            size[dim] = k
            return fine.narrow(dim, i, 1).expand(size)

        padded = torch.cat([edge(0, pad), fine, edge(n_u - 1, n_fft - n_u - pad)], dim)
        spec = torch.fft.rfft(padded, n=n_fft, dim=dim)
        freq = torch.fft.rfftfreq(n_fft, d=self.broaden_dlnlam, dtype=fine.dtype,
                                  device=fine.device)  # fmt: skip
        sig = sigma_v / 299792.458  # in ln(lambda)
        pf = np.pi * (freq[:, None] if dim == 0 else freq[None, :])
        kernel = torch.exp(-2 * (pf * (sig[None, :] if dim == 0 else sig[:, None])) ** 2)
        return torch.fft.irfft(spec * kernel, n=n_fft, dim=dim).narrow(dim, pad, n_u)

    def simulate(
        self,
        theta: torch.Tensor,
        z: torch.Tensor,
        logu: torch.Tensor | None = None,
        sigma_v: torch.Tensor | None = None,
        line_factors: torch.Tensor | None = None,
        history: History | None = None,
    ) -> torch.Tensor:
        """Rest-frame spectra for mocks, (B, L) L_sun/A incl. 10^logM*: stars, plus nebular
        emission when ``logu`` is given (each line times ``line_factors`` (B, N_lines) when
        given), broadened by ``sigma_v`` (km/s) when given. ``history``: a star-formation
        history to use instead of theta's (e.g. ``sedvae.sps.continuity``); theta then gives
        the mass, dust and nothing else."""
        theta, z = self.check_inputs(theta, z)
        h = self.history(theta, z) if history is None else history
        mass = 10 ** theta[:, THETA.LOGMSTAR]
        lum = self.spectrum_from_history(h, theta[:, THETA.DUST], mass)
        if logu is not None:
            neb = self.nebular_spectrum(h, theta[:, THETA.DUST], logu, line_factors)
            lum = lum + neb * mass[:, None]
        if sigma_v is not None:
            lum = self.broaden(lum, sigma_v)
        return lum

    # ---- derived properties ---------------------------------------------------------------
    def derived(self, theta: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Derived properties, each (B,):

        ``logmstar_surv``: log10 surviving stellar mass (M_sun); ``sfr_100myr``, ``sfr_1gyr``:
        mean SFR over the last 100 Myr and 1 Gyr (M_sun/yr); ``z_mw``: formed-mass-weighted
        metallicity (absolute Z, clipped to the grid as in the spectrum); ``t_mw_gyr``:
        formed-mass-weighted lookback age (Gyr).
        """
        theta, z = self.check_inputs(theta, z)
        return self.derived_from_history(self.history(theta, z), 10 ** theta[:, THETA.LOGMSTAR])

    def derived_from_history(self, h: History, mass: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`derived` of an explicit history ``h`` (per unit formed mass) and its formed
        mass ``mass`` (B,) in M_sun: the truths of histories that have no theta."""
        mass = torch.as_tensor(mass, dtype=self.dtype, device=h.bin_mass.device)
        rows, weights = self._sparse_rows(h)
        live = self._dense_live(h) + (self.sparse_live[rows] * weights).sum(-1)

        lo = self.bin_edges[:-1]

        def formed_within(t_gyr: float) -> torch.Tensor:
            inside = (torch.clamp(h.bin_hi_gyr, max=t_gyr) - lo).clamp_min(0.0)
            frac = inside / (h.bin_hi_gyr - lo).clamp_min(1e-12)
            burst = (h.burst_age_gyr < t_gyr).to(h.burst_mass.dtype) * h.burst_mass
            return (h.bin_mass * frac).sum(-1) + burst

        t_mid = 0.5 * (lo + h.bin_hi_gyr)
        z_mw = (h.bin_mass * h.bin_z).sum(-1) + h.burst_mass * h.burst_z
        t_mw = (h.bin_mass * t_mid).sum(-1) + h.burst_mass * h.burst_age_gyr
        return {
            "logmstar_surv": torch.log10(mass * live),
            "sfr_100myr": mass * formed_within(0.1) / 1e8,
            "sfr_1gyr": mass * formed_within(1.0) / 1e9,
            "z_mw": z_mw,
            "t_mw_gyr": t_mw,
        }

    def sfh(self, theta: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Binned histories for plots: lookback bin edges (Gyr; upper edges cut at t_U(z)),
        SFR per bin (M_sun/yr, burst excluded), Z per bin, the burst mass (M_sun) and age."""
        theta, z = self.check_inputs(theta, z)
        h = self.history(theta, z)
        mass = 10 ** theta[:, THETA.LOGMSTAR, None]
        width_yr = (h.bin_hi_gyr - self.bin_edges[:-1]) * 1e9
        sfr = torch.where(width_yr > 0, mass * h.bin_mass / width_yr.clamp_min(1.0), 0.0)
        return {
            "bin_lo_gyr": self.bin_edges[:-1].expand_as(sfr),
            "bin_hi_gyr": h.bin_hi_gyr,
            "sfr": sfr,
            "zmet": h.bin_z,
            "burst_mass": mass[:, 0] * h.burst_mass,
            "burst_age_gyr": h.burst_age_gyr,
        }


__all__ = ["SEDModel", "History"]
