"""The canonical emission-line list: vacuum wavelengths, tied doublets, optional broad Balmer.

A *line* is one transition at one rest wavelength. A *component* is what the solve fits one
non-negative amplitude to: a single line, or a doublet whose ratio atomic physics fixes, in
which case the amplitude is the flux of the stronger line and the weaker line carries
``1 / ratio`` of it. Every amplitude is therefore a line flux in 1e-17 erg/s/cm^2.

Wavelengths are Cloudy's air values converted to vacuum with the simulator's IAU formula,
Angstrom. The [O II] 7320 and 7330 blends are placed at the centroids of their two lines
(7319.65 and 7330.20 A air), not at Cloudy's rounded blend labels (7323, 7332 A air).
Narrow lines share one velocity offset and one width per galaxy; the optional broad Balmer
components have their own width.

Fixed ratios (the two lines share their upper level, so the ratio is A-values x photon energies,
independent of density and temperature):

- [O III] 5007/4959 = 2.98 (Storey & Zeippen 2000, MNRAS 312, 813);
- [N II] 6584/6548 = 2.94 (Storey & Zeippen 2000; pPXF ties 6548 at 0.34 of 6584);
- [O I] 6300/6364 = 3.0 (pPXF's and most fitters' value).

[O II] 3726/3729 and [S II] 6716/6731 are left free: their ratios measure the electron density.
He I 3889 is not in the list: it lies 0.4 A from H8, so no spectrograph separates the two and
fitting both would leave a degenerate pair; the H8 flux includes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..physics.lines import EMISSION_LINES

# The strong nebular lines from 3700 to 9600 A rest, in wavelength order. Vacuum wavelengths
# (Angstrom) come from the one table of line positions, sedvae.physics.lines.EMISSION_LINES,
# except for the lines below that it lacks and the [O II] 7320/7330 centroids (module docstring).
_OWN_WAVELENGTHS: dict[str, float] = {
    "HeII4686": 4686.99,
    "[NII]5755": 5756.19,
    "HeI7065": 7067.17,
    "[OII]7320": 7321.67,
    "[OII]7330": 7332.22,
}
_NARROW_NAMES = (
    "[OII]3726", "[OII]3729", "H10", "H9", "[NeIII]3869", "H8", "[NeIII]3968", "Hepsilon",
    "Hdelta", "Hgamma", "[OIII]4363", "HeI4472", "HeII4686", "Hbeta", "[OIII]4959",
    "[OIII]5007", "[NII]5755", "HeI5876", "[OI]6300", "[SIII]6312", "[OI]6364", "[NII]6548",
    "Halpha", "[NII]6584", "HeI6678", "[SII]6716", "[SII]6731", "HeI7065", "[ArIII]7136",
    "[OII]7320", "[OII]7330", "[ArIII]7751", "P10", "[SIII]9069", "P9", "[SIII]9531",
    "Pepsilon",
)  # fmt: skip
# name -> vacuum wavelength (Angstrom)
NARROW_LINES: dict[str, float] = {
    name: _OWN_WAVELENGTHS.get(name) or EMISSION_LINES[name] for name in _NARROW_NAMES
}

# weaker line -> (stronger line, flux ratio stronger / weaker); see the module docstring.
TIED_RATIOS: dict[str, tuple[str, float]] = {
    "[OIII]4959": ("[OIII]5007", 2.98),
    "[NII]6548": ("[NII]6584", 2.94),
    "[OI]6364": ("[OI]6300", 3.0),
}

# Balmer lines that may carry a broad (AGN) component, fitted with their own width.
BROAD_BALMER: tuple[str, ...] = ("Halpha", "Hbeta", "Hgamma", "Hdelta")

# Lines a catalog must report (issue 25); each is a line of the list above.
CATALOG_LINES: tuple[str, ...] = (
    "[OII]3726",
    "[OII]3729",
    "Hbeta",
    "[OIII]4959",
    "[OIII]5007",
    "[NII]6548",
    "Halpha",
    "[NII]6584",
    "[SII]6716",
    "[SII]6731",
)


@dataclass(frozen=True)
class LineList:
    """Lines, the components that carry their amplitudes, and which lines are broad.

    Attributes
    ----------
    names : tuple of str, (L,)
        Line names; broad components are ``"<Balmer>_broad"``.
    wave : tuple of float, (L,)
        Rest-frame vacuum wavelengths, Angstrom.
    component : tuple of int, (L,)
        Index of the component whose amplitude the line's flux is a multiple of.
    ratio : tuple of float, (L,)
        Line flux / component amplitude (1 for the primary line, 1/ratio for a tied one).
    broad : tuple of bool, (L,)
        True for broad Balmer lines (their own width).
    component_names : tuple of str, (K,)
        Name of each component: its primary (strongest) line.
    """

    names: tuple[str, ...]
    wave: tuple[float, ...]
    component: tuple[int, ...]
    ratio: tuple[float, ...]
    broad: tuple[bool, ...]
    component_names: tuple[str, ...]

    @property
    def n_lines(self) -> int:
        return len(self.names)

    @property
    def n_components(self) -> int:
        return len(self.component_names)

    def index(self, name: str) -> int:
        """Position of line ``name`` in :attr:`names` (ValueError naming the choices if absent)."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"unknown line {name!r}; lines are {list(self.names)}") from None

    def tie_matrix(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """T (K, L): line fluxes = amplitudes @ T; component design = T @ line design."""
        t = torch.zeros(self.n_components, self.n_lines, dtype=dtype, device=device)
        t[list(self.component), list(range(self.n_lines))] = torch.tensor(
            self.ratio, dtype=dtype, device=device
        )
        return t


def line_list(
    *,
    broad_balmer: bool = False,
    wave_min: float = 3700.0,
    wave_max: float = 9600.0,
    tied: bool = True,
) -> LineList:
    """Build the line list between ``wave_min`` and ``wave_max`` (rest, vacuum, Angstrom).

    Parameters
    ----------
    broad_balmer : bool
        Add a broad component for each of :data:`BROAD_BALMER` (free amplitude each).
    wave_min, wave_max : float, Angstrom
        Rest-frame range; a tied doublet is kept only when both its lines are inside.
    tied : bool
        Fix the doublet ratios of :data:`TIED_RATIOS`; False fits every line freely.

    Returns
    -------
    LineList
    """
    names = [n for n, w in NARROW_LINES.items() if wave_min <= w <= wave_max]
    if tied:
        # A doublet split by the range is dropped whole: half of it would bias the other half.
        names = [
            n
            for n in names
            if not (n in TIED_RATIOS and TIED_RATIOS[n][0] not in names)
            and not any(p == n and w not in names for w, (p, _) in TIED_RATIOS.items())
        ]
    comp_names: list[str] = []
    component, ratio = [], []
    for n in names:
        if tied and n in TIED_RATIOS:
            continue
        comp_names.append(n)
    for n in names:
        if tied and n in TIED_RATIOS:
            primary, r = TIED_RATIOS[n]
            component.append(comp_names.index(primary))
            ratio.append(1.0 / r)
        else:
            component.append(comp_names.index(n))
            ratio.append(1.0)
    broad = [False] * len(names)
    waves = [NARROW_LINES[n] for n in names]
    if broad_balmer:
        for n in BROAD_BALMER:
            if n in names:
                comp_names.append(f"{n}_broad")
                names.append(f"{n}_broad")
                waves.append(NARROW_LINES[n])
                component.append(len(comp_names) - 1)
                ratio.append(1.0)
                broad.append(True)
    return LineList(
        names=tuple(names),
        wave=tuple(waves),
        component=tuple(component),
        ratio=tuple(ratio),
        broad=tuple(broad),
        component_names=tuple(comp_names),
    )
