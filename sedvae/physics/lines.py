"""Emission lines the residual network may place (rest-frame vacuum wavelengths, Angstrom).

The list holds the optical/near-UV lines that exceed ~0.3 A equivalent width in the 99th
percentile of prior draws of the Cloudy nebular grid (measured with ``SEDModel(nebular=True)``,
2048 draws, logU in [-4, -1]), i.e. the usual strong-line set of spectral fitters (Balmer and
He I recombination lines, [O II], [Ne III], [O III], [O I], [N II], [S II], [Ar III], [S III],
Mg II). Wavelengths are Cloudy's air values converted to vacuum, matching the simulator.
"""

from __future__ import annotations

EMISSION_LINES: dict[str, float] = {
    "CIII]2326": 2326.71,
    "[OII]2471": 2471.75,
    "AlII2660": 2661.14,
    "AlII2669": 2669.94,
    "MgII2796": 2796.35,
    "MgII2804": 2803.54,
    "[OII]3726": 3727.09,
    "[OII]3729": 3729.87,
    "H10": 3798.98,
    "H9": 3836.47,
    "[NeIII]3869": 3869.86,
    "HeI3889": 3889.74,
    "H8": 3890.15,
    "[NeIII]3968": 3968.59,
    "Hepsilon": 3971.19,
    "Hdelta": 4102.89,
    "Hgamma": 4341.68,
    "[OIII]4363": 4364.44,
    "HeI4472": 4472.75,
    "Hbeta": 4862.68,
    "[OIII]4959": 4960.29,
    "[OIII]5007": 5008.24,
    "HeI5876": 5877.29,
    "[OI]6300": 6302.04,
    "[SIII]6312": 6313.81,
    "[OI]6364": 6365.54,
    "[NII]6548": 6549.86,
    "Halpha": 6564.61,
    "[NII]6584": 6585.27,
    "HeI6678": 6679.99,
    "[SII]6716": 6718.29,
    "[SII]6731": 6732.68,
    "[ArIII]7136": 7137.76,
    "[OII]7320": 7325.02,
    "[OII]7330": 7334.02,
    "[ArIII]7751": 7753.24,
    "P10": 9017.38,
    "[SIII]9069": 9071.11,
    "P9": 9231.55,
    "[SIII]9531": 9533.23,
    "Pepsilon": 9548.59,
    "[CI]9850": 9852.70,
}

# Lines whose recovered flux the benchmark reports; doublets are summed.
BENCH_LINES: dict[str, tuple[str, ...]] = {
    "Halpha": ("Halpha",),
    "Hbeta": ("Hbeta",),
    "[OIII]5007": ("[OIII]5007",),
    "[OII]3727": ("[OII]3726", "[OII]3729"),
}
