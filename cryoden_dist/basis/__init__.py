"""Steerable bases of particle images (Fourier-Bessel) used by steerable PCA, alignment and MFVDM."""

from .fb import FBBasis, bessel_zeros_table, dense_basis_matrix

__all__ = ["FBBasis", "bessel_zeros_table", "dense_basis_matrix"]
