"""Figures that return ``(fig, axes)`` and never call ``plt.show()``."""

from .reconstruction import plot_reconstruction

__all__ = ["plot_reconstruction"]
