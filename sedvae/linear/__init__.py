"""Linear parts of the spectral model, solved exactly per galaxy: emission lines and calibration.

Model on the instrument pixels (all fluxes 1e-17 erg/s/cm^2/A, line fluxes 1e-17 erg/s/cm^2):

    model(lambda) = C(lambda) [1 + sum_a sum_{k=0..K} c_{a,k} P_k(x_a(lambda))]
                    + sum_l F_l D_l(lambda; z, v, sigma_v)

- C: the continuum through the instrument (SPS, redshift, resampling, LSF: sedvae.physics);
- P_k: Legendre polynomials on each spectrograph arm a (DESI b, r, z; one segment otherwise),
  a multiplicative calibration like pPXF's ``mdegree``; prior c_{a,k} ~ N(0, 0.05^2) for
  k >= 1 and a free per-arm scale c_{a,0} ~ N(0, 0.05^2) (see :class:`LinearModel`);
- D_l: unit-flux Gaussian line profiles (shared narrow kinematics v, sigma_v in km/s; an
  optional broad Balmer component with its own width) through the same instrument path,
  with fixed doublet ratios as tied components (:mod:`sedvae.linear.lines`);
- F_l >= 0: line fluxes, solved with the c's by batched non-negative least squares on the
  normal equations (:mod:`sedvae.linear.solve`), errors from their inverse.

The approach is that of pPXF (Cappellari 2017, MNRAS 466, 798; 2023, MNRAS 526, 3273: gas
templates and multiplicative polynomials fitted linearly with the stellar templates) and of
fastspecfit (Moustakas et al. 2023, ascl:2308.005: lines with tied doublets and shared
kinematics, fluxes and equivalent widths against the fitted continuum), batched in torch.
"""

from sedvae.linear.design import (
    LineDesign,
    arm_index,
    calibration_basis,
    component_design,
    default_calibration_degree,
    line_design,
    model_diagonals,
)
from sedvae.linear.lines import (
    BROAD_BALMER,
    CATALOG_LINES,
    NARROW_LINES,
    TIED_RATIOS,
    LineList,
    line_list,
)
from sedvae.linear.solve import LinearFit, LinearModel, NNLSResult, nnls_normal, solve_linear

__all__ = [
    "BROAD_BALMER",
    "CATALOG_LINES",
    "NARROW_LINES",
    "TIED_RATIOS",
    "LineDesign",
    "LineList",
    "LinearFit",
    "LinearModel",
    "NNLSResult",
    "arm_index",
    "calibration_basis",
    "component_design",
    "default_calibration_degree",
    "line_design",
    "line_list",
    "model_diagonals",
    "nnls_normal",
    "solve_linear",
]
