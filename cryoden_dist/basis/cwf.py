"""Covariance Wiener filtering (CWF) of Fourier-Bessel coefficients with each particle's own CTF.

After Bhamre, Zhang & Singer, "Denoising and covariance estimation of single particle cryo-EM images" (J. Struct.
Biol. 2016): the mean and covariance of the *CTF-free* images are estimated from CTF-modulated ones, and every
particle is Wiener filtered with its own CTF. Written from the paper's equations; no code of ASPIRE's.

Model
-----
Phase flipping (:func:`cryoden_dist.ctf.phase_flip`) leaves white noise white and turns ``Y = H X + N`` into
``|H| X + N``. In the FB basis a radial multiplier is nearly diagonal: the basis function ``(k, q)`` has its
energy near the radial frequency ``lambda_{k,q} / (2 pi R)``, so for particle ``i``

``a_i = h_i * x_i + e_i``,  ``h_{i,kq} = |H_i|`` at that frequency (its isotropic part),

with ``*`` the element-wise product, ``x_i`` the CTF-free coefficients and ``e_i`` the coefficient noise of
covariance ``sigma^2 N_k`` (:func:`cryoden_dist.basis.spca.noise_covariance`). The ring-to-coefficient map is
:func:`coefficient_ctf`. (Measured on the 70S benchmark at 65 px, n = 10^4, same images: rel_mse 0.3469 at SNR
0.05 and 0.5813 at SNR 0.01 against ASPIRE 0.14.3's CWF, whose CTF is a full matrix per ``k`` in its FB basis,
0.3473 and 0.5835: the diagonal approximation costs nothing measurable.)

Estimation (all sums over particles; mergeable across chunks, :class:`CWFStatistics`)
-----------------------------------------------------------------------------------------
* Mean (``k = 0`` only; rotation invariance makes the others 0), least squares per coefficient:
  ``mu = sum_i h_i a_i / sum_i h_i^2``.
* Covariance per ``k``, least squares ``min_C sum_i ||r_i r_i^H - diag(h_i) C diag(h_i) - sigma^2 N_k||_F^2``
  with ``r_i = a_i - h_i * mu``. With diagonal CTFs its normal equations decouple element by element:
  ``C_pq = sum_i h_ip h_iq (r_ip conj(r_iq) - sigma^2 N_pq) / sum_i h_ip^2 h_iq^2``. The real part is kept (the
  covariance of the particles and their mirror images, as for :mod:`cryoden_dist.basis.spca`).
* Shrinkage: each eigenpair ``(l_j, u_j)`` of ``C_k`` is seen in the data with the mean signal variance
  ``s_j = l_j mean_i ||h_i * u_j||^2``. The ratio ``x = 1 + s_j / nu_k`` is shrunk like a sample eigenvalue of the
  sPCA (:func:`cryoden_dist.basis.spca.shrinkage_weights`, the same Marchenko-Pastur edge and shrinkers) and
  ``l_j`` is scaled by the shrunk over the raw signal variance; components at or below the edge are dropped.
  Measured: Frobenius shrinkage 0.3469 / 0.5813 rel_mse at SNR 0.05 / 0.01, unshrunk eigenvalues above the edge
  0.3474 / 0.5838.

Estimate
--------
With ``C_k = U diag(l) U^T`` (kept components) the per-particle Wiener filter
``x_hat = mu + C h (h C h + sigma^2 N)^{-1} (a - h mu)`` is evaluated in the ``r``-dimensional component space
(Woodbury): ``x_hat = mu + U M^{-1} V^T (sigma^2 N)^{-1} r`` with ``V = diag(h) U`` and
``M = diag(1 / l) + V^T (sigma^2 N)^{-1} V``, one ``r x r`` solve per particle and frequency. The estimate is
CTF-corrected: there is no separate deconvolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..ctf import ctf_profiles, ctf_ring_radii
from ..errors import ParameterError
from .fb import FBBasis
from .spca import SHRINKERS, _block_noise_level, _real_samples, noise_covariance, shrinkage_weights

__all__ = ["CWFStatistics", "CovarianceWiener", "coefficient_ctf", "cwf_statistics", "fb_ctf", "fit_cwf"]


def coefficient_ctf(profiles: np.ndarray, basis: FBBasis) -> np.ndarray:
    """Each FB coefficient's CTF: a ring profile interpolated at the basis function's radial frequency.

    Parameters
    ----------
    profiles : ndarray, shape (n, rings)
        Ring means on the rings of :func:`cryoden_dist.ctf.ctf_rings` for ``basis.box`` and ``basis.radius``
        (e.g. :func:`cryoden_dist.ctf.ctf_profiles` of ``|H|``).
    basis : FBBasis

    Returns
    -------
    ndarray of float32, shape (n, basis.count)
        Linear interpolation in the radius; frequencies beyond the last ring take its value.
    """
    radii = ctf_ring_radii(basis.box, basis.radius)
    profiles = np.asarray(profiles)
    if profiles.ndim != 2 or profiles.shape[1] != radii.size:
        raise ParameterError(
            f"CWF: CTF profiles of shape {profiles.shape} do not match the rings of the basis; "
            f"pass [n, {radii.size}] (cryoden_dist.ctf.ctf_profiles with radius {basis.radius:g})"
        )
    frequency = basis.bessel_zeros / (2 * np.pi * basis.radius) * basis.box  # in pixels of the DFT grid
    upper = np.clip(np.searchsorted(radii, frequency), 1, radii.size - 1)
    fraction = np.clip((frequency - radii[upper - 1]) / (radii[upper] - radii[upper - 1]), 0.0, 1.0)
    return (profiles[:, upper - 1] * (1 - fraction) + profiles[:, upper] * fraction).astype(np.float32)


def fb_ctf(ctf: np.ndarray, basis: FBBasis) -> np.ndarray:
    """``|H|`` of each particle at each FB coefficient (the diagonal CTF of the module docstring).

    Parameters
    ----------
    ctf : ndarray, shape (n, L, L)
        CTF images in numpy's FFT order (:func:`cryoden_dist.ctf.ctf_images`).
    basis : FBBasis

    Returns
    -------
    ndarray of float32, shape (n, basis.count)
    """
    magnitude = np.abs(np.fft.fftshift(np.asarray(ctf), axes=(-2, -1)))
    return coefficient_ctf(ctf_profiles(magnitude, basis.radius), basis)


# --------------------------------------------------------------------------------------------- statistics
@dataclass
class CWFStatistics:
    """Mergeable sums over particles behind :func:`fit_cwf` (add chunks' parts with ``+`` or ``sum``).

    Attributes
    ----------
    count : int
    mean_numerator, mean_denominator : ndarray of float64, shape (q_0,)
        ``sum_i h_i a_i`` and ``sum_i h_i^2`` of the ``k = 0`` block.
    cross : ndarray of float64, shape (q_0, q_0)
        ``sum_i (h_i a_i)(h_i^2)^T`` of the ``k = 0`` block (to centre the second moments afterwards).
    second_moments, ctf_second, ctf_fourth : list of ndarray of float64
        Per ``k``, shape ``(q_k, q_k)``: ``Re sum_i (h_i a_i)(h_i a_i)^H``, ``sum_i h_i h_i^T`` and
        ``sum_i h_i^2 (h_i^2)^T``.
    """

    count: int
    mean_numerator: np.ndarray
    mean_denominator: np.ndarray
    cross: np.ndarray
    second_moments: list[np.ndarray]
    ctf_second: list[np.ndarray]
    ctf_fourth: list[np.ndarray]

    _VECTORS = ("mean_numerator", "mean_denominator", "cross")
    _BLOCKS = ("second_moments", "ctf_second", "ctf_fourth")

    def __add__(self, other: CWFStatistics) -> CWFStatistics:
        if not isinstance(other, CWFStatistics):
            return NotImplemented
        blocks = {
            name: [a + b for a, b in zip(getattr(self, name), getattr(other, name), strict=True)]
            for name in self._BLOCKS
        }
        vectors = {name: getattr(self, name) + getattr(other, name) for name in self._VECTORS}
        return CWFStatistics(self.count + other.count, **vectors, **blocks)

    def __radd__(self, other) -> CWFStatistics:
        return self if isinstance(other, int) and other == 0 else self.__add__(other)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat float64 arrays (for storage); :meth:`from_arrays` inverts it."""
        arrays = {"count": np.array([self.count], dtype=np.int64)}
        arrays["sizes"] = np.array([block.shape[0] for block in self.second_moments], dtype=np.int64)
        for name in self._VECTORS:
            arrays[name] = np.asarray(getattr(self, name), dtype=np.float64)
        for name in self._BLOCKS:
            arrays[name] = np.concatenate([block.ravel() for block in getattr(self, name)])
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> CWFStatistics:
        """Inverse of :meth:`to_arrays`."""
        sizes = np.asarray(arrays["sizes"])
        bounds = np.concatenate([[0], np.cumsum(sizes**2)])

        def blocks(flat: np.ndarray) -> list[np.ndarray]:
            return [flat[a:b].reshape(q, q) for a, b, q in zip(bounds[:-1], bounds[1:], sizes, strict=True)]

        return cls(
            int(np.asarray(arrays["count"])[0]),
            **{name: np.asarray(arrays[name], dtype=np.float64) for name in cls._VECTORS},
            **{name: blocks(np.asarray(arrays[name], dtype=np.float64)) for name in cls._BLOCKS},
        )


def _check_pair(coeffs: np.ndarray, ctf: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    coeffs, ctf = np.asarray(coeffs), np.asarray(ctf)
    if coeffs.ndim != 2 or coeffs.shape[1] != count or ctf.shape != coeffs.shape:
        raise ParameterError(
            f"CWF: coefficients {coeffs.shape} and CTFs {ctf.shape} must both be [n, {count}] "
            "(FB coefficients and fb_ctf of the same particles)"
        )
    return coeffs, ctf


def cwf_statistics(coeffs: np.ndarray, ctf: np.ndarray, basis: FBBasis) -> CWFStatistics:
    """Sums over particles for :func:`fit_cwf`.

    Parameters
    ----------
    coeffs : ndarray, shape (n, basis.count), complex
        FB coefficients of phase-flipped particles.
    ctf : ndarray, shape (n, basis.count)
        Their ``|H|`` per coefficient (:func:`fb_ctf`).
    basis : FBBasis

    Returns
    -------
    CWFStatistics
    """
    coeffs, ctf = _check_pair(coeffs, ctf, basis.count)
    blocks: dict[str, list[np.ndarray]] = {name: [] for name in CWFStatistics._BLOCKS}
    for k in range(basis.k_max + 1):
        part = basis.coefficients_at(k)
        h = ctf[:, part].astype(np.float64)
        weighted = h * coeffs[:, part].astype(np.complex128)
        blocks["second_moments"].append((weighted.T @ weighted.conj()).real)
        blocks["ctf_second"].append(h.T @ h)
        blocks["ctf_fourth"].append((h * h).T @ (h * h))
    part = basis.coefficients_at(0)
    h0 = ctf[:, part].astype(np.float64)
    weighted0 = h0 * coeffs[:, part].real.astype(np.float64)
    return CWFStatistics(
        count=int(coeffs.shape[0]),
        mean_numerator=weighted0.sum(axis=0),
        mean_denominator=(h0 * h0).sum(axis=0),
        cross=weighted0.T @ (h0 * h0),
        **blocks,
    )


# --------------------------------------------------------------------------------------------- the model
@dataclass
class CovarianceWiener:
    """A fitted CWF (build it with :func:`fit_cwf`); :meth:`denoise` filters particles with their own CTFs.

    Attributes
    ----------
    basis_frequency : ndarray of int64, shape (basis.count,)
    noise_variance : float
        Pixel noise variance ``sigma^2``.
    n_images : int
    shrinker : str
    mean : ndarray of float64, shape (q_0,)
        CTF-free mean ``k = 0`` coefficients.
    eigenvectors : list of ndarray
        Per ``k``, the kept eigenvectors of the CTF-free covariance, ``(q_k, r_k)``.
    signal_variances : list of ndarray
        Their shrunk eigenvalues ``l``, ``(r_k,)``.
    noise_precision : list of ndarray
        ``(sigma^2 N_k)^{-1}``, ``(q_k, q_k)``.
    kept : ndarray of int64, shape (k_max + 1,)
    """

    basis_frequency: np.ndarray
    noise_variance: float
    n_images: int
    shrinker: str
    mean: np.ndarray
    eigenvectors: list[np.ndarray]
    signal_variances: list[np.ndarray]
    noise_precision: list[np.ndarray]
    kept: np.ndarray

    def __post_init__(self) -> None:
        bounds = np.searchsorted(self.basis_frequency, np.arange(self.kept.size + 1))
        self._slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    @property
    def count(self) -> int:
        """Total number of kept components."""
        return int(self.kept.sum())

    def denoise(self, coeffs: np.ndarray, ctf: np.ndarray) -> np.ndarray:
        """CTF-free Wiener estimates of the FB coefficients of phase-flipped particles.

        Parameters
        ----------
        coeffs : ndarray, shape (n, basis.count), complex
        ctf : ndarray, shape (n, basis.count)
            ``|H|`` per coefficient (:func:`fb_ctf`).

        Returns
        -------
        ndarray of complex64, shape (n, basis.count)
            Frequencies without kept components are their mean (0 for ``k > 0``).
        """
        coeffs, ctf = _check_pair(coeffs, ctf, self.basis_frequency.size)
        out = np.zeros(coeffs.shape, dtype=np.complex64)
        out[:, self._slices[0]] = self.mean
        for k in np.flatnonzero(self.kept):
            part = self._slices[k]
            h = ctf[:, part].astype(np.float64)
            residual = coeffs[:, part].astype(np.complex128) - (h * self.mean if k == 0 else 0)
            vectors = self.eigenvectors[k]
            scaled = h[:, :, None] * vectors[None]  # V_i = diag(h_i) U: [n, q, r]
            precise = np.einsum("pq,nqr->npr", self.noise_precision[k], scaled)
            system = np.einsum("npr,nps->nrs", scaled, precise) + np.diag(1.0 / self.signal_variances[k])
            rhs = np.einsum("npr,np->nr", precise, residual)
            solution = np.linalg.solve(system, rhs[..., None])[..., 0]
            out[:, part] += (solution @ vectors.T).astype(np.complex64)
        out[:, self._slices[0]] = out[:, self._slices[0]].real  # real images: real k = 0 coefficients
        return out

    def summary(self) -> dict[str, Any]:
        """A JSON-able description: noise, components kept per ``k``, shrinker."""
        return {
            "noise_variance": float(self.noise_variance),
            "images": int(self.n_images),
            "shrinker": self.shrinker,
            "components": self.count,
            "kept_per_k": self.kept.tolist(),
        }


def fit_cwf(
    stats: CWFStatistics,
    basis: FBBasis,
    noise_variance: float,
    shrinker: str = "frobenius",
    noise_cov: list[np.ndarray] | None = None,
) -> CovarianceWiener:
    """Fit the CTF-free mean and covariance and their shrinkage (module docstring).

    Parameters
    ----------
    stats : CWFStatistics
        Merged over the stack (:func:`cwf_statistics`).
    basis : FBBasis
    noise_variance : float
        Pixel noise variance ``sigma^2``.
    shrinker : {"frobenius", "operator", "naive"}
    noise_cov : list of ndarray, optional
        :func:`cryoden_dist.basis.spca.noise_covariance` of ``basis`` (computed when omitted).

    Returns
    -------
    CovarianceWiener
    """
    if stats.count < 2:
        raise ParameterError(f"CWF: {stats.count} image(s) are too few to estimate a covariance; use more")
    if not (np.isfinite(noise_variance) and noise_variance > 0):
        raise ParameterError(f"CWF: noise variance {noise_variance!r} must be positive; check the image corners")
    if len(stats.second_moments) != basis.k_max + 1:
        raise ParameterError("CWF: the statistics were computed with another basis; recompute them")
    if shrinker not in SHRINKERS:
        raise ParameterError(f"CWF: shrinker {shrinker!r} is unknown; use one of {', '.join(SHRINKERS)}")
    noise_cov = noise_covariance(basis) if noise_cov is None else noise_cov
    n = stats.count
    # A coefficient no particle transfers (h = 0 everywhere) has no information: its mean stays 0.
    mean = np.divide(
        stats.mean_numerator,
        stats.mean_denominator,
        out=np.zeros_like(stats.mean_numerator),
        where=stats.mean_denominator > 0,
    )
    vectors_kept, variances_kept, precision, kept = [], [], [], []
    for k in range(basis.k_max + 1):
        second = stats.second_moments[k]
        if k == 0:  # centre: sum (h a - h^2 mu)(h a - h^2 mu)^T from the stored sums
            shifted = stats.cross * mean[None, :]
            second = second - shifted - shifted.T + stats.ctf_fourth[0] * np.outer(mean, mean)
        noise = noise_variance * noise_cov[k]
        fourth = stats.ctf_fourth[k]
        covariance = np.divide(
            second - stats.ctf_second[k] * noise, fourth, out=np.zeros_like(second), where=fourth > 0
        )
        values, vectors = np.linalg.eigh((covariance + covariance.T) / 2)
        # Signal variance of each component as the data see it (through the particles' CTFs) vs the noise.
        seen = values * ((np.diag(stats.ctf_second[k]) / n) @ (vectors * vectors))
        order = np.argsort(-seen)
        values, vectors, seen = values[order], vectors[:, order], seen[order]
        nu = noise_variance * _block_noise_level(k)
        gamma = values.size / _real_samples(k, n)
        weights = shrinkage_weights(1.0 + np.maximum(seen, 0.0) / nu, gamma, shrinker)
        count = int(np.count_nonzero(weights > 0))
        shrunk_seen = nu * weights[:count] / (1.0 - weights[:count])
        vectors_kept.append(vectors[:, :count])
        variances_kept.append(values[:count] * shrunk_seen / seen[:count])
        precision.append(np.linalg.inv(noise))
        kept.append(count)
    return CovarianceWiener(
        basis_frequency=basis.angular_frequency.copy(),
        noise_variance=float(noise_variance),
        n_images=n,
        shrinker=shrinker,
        mean=mean,
        eigenvectors=vectors_kept,
        signal_variances=variances_kept,
        noise_precision=precision,
        kept=np.asarray(kept, dtype=np.int64),
    )
