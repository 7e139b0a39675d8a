"""Rotational (and reflection) alignment of image pairs from steerable-basis coefficients.

The images are given only through their steerable-basis coefficients
``coeffs [n, count]`` and the angular frequency ``k >= 0`` of every
coefficient (several radial indices ``q`` share each ``k``; the ``-k``
coefficients of a real image are the conjugates and are not stored). Nothing
here depends on which basis produced them.

Conventions
-----------
Everything is stated on the coefficients, so it holds for any steerable basis.

* Rotation by ``alpha`` multiplies the coefficients of frequency ``k`` by
  ``exp(1j k alpha)`` (:func:`rotate_coefficients`). For a basis of
  ``exp(-1j k theta)`` functions this is the counter-clockwise rotation by
  ``alpha``; for one of ``exp(+1j k theta)`` functions, such as
  :class:`cryoden_dist.basis.fb.FBBasis`, it is the clockwise one
  (``FBBasis.rotate(c, beta) == rotate_coefficients(c, k, -beta)``).
* Reflection (``y -> -y``, i.e. ``theta -> -theta``) conjugates every
  coefficient in either basis (:func:`reflect_coefficients`).
* Pairs may index ``2 n`` nodes: node ``j >= n`` is the reflection of image
  ``j - n``, with coefficients ``conj(coeffs[j - n])``.
* The alignment angle ``alpha`` of the pair ``(i, j)`` maximises the
  correlation ``C(alpha)`` of node ``j`` with image ``i`` rotated by
  ``alpha``: if ``coeffs_j = coeffs_i exp(1j k alpha)`` the angle returned is
  ``alpha``. For a reflected node ``j = m + n`` this reads
  ``conj(coeffs_m) ~ coeffs_i exp(1j k alpha)``, i.e. image ``m`` is the
  reflection of image ``i`` rotated by ``alpha``, equivalently the reflection
  of image ``i`` rotated by ``-alpha`` (reflection reverses rotations).
  In the notation of :mod:`cryoden_dist.mfvdm` (``A_k(i) = exp(1j k
  alpha_ij) A_k(j)``) the edge angle is ``alpha_ij = -alpha``.
* Inner products: with ``positive_frequency_weight = w`` the inner product of
  two images is ``Re sum_q a_0q conj(b_0q) + w Re sum_{k>0,q} a_kq
  conj(b_kq)``. ``w = 1`` (default) is right for coefficients scaled like
  ``FBBasis``'s (the ``k > 0`` ones carry a factor ``sqrt 2`` for their
  implied ``-k`` partner); ``w = 2`` for plain coefficients of an orthonormal
  complex basis, whose implied ``-k`` conjugates add the same real part again.
  The weight changes the correlations, never the angles (the ``k = 0`` term
  does not depend on the angle).
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from .errors import InputError, ParameterError

__all__ = [
    "align_pairs",
    "default_n_angles",
    "frequency_weights",
    "reflect_coefficients",
    "rotate_coefficients",
]

#: Newton steps refining the grid maximum. The grid maximum is within half a grid step (< 0.01 rad by
#: default) of the true one and Newton converges quadratically, so 3 steps reach float64 precision.
NEWTON_STEPS = 3


def rotate_coefficients(coeffs: np.ndarray, angular_frequency: np.ndarray, angles) -> np.ndarray:
    """Coefficients of the images rotated by ``angles``: ``coeffs * exp(1j k angle)``.

    Counter-clockwise for a basis of ``exp(-1j k theta)`` functions, clockwise
    for one of ``exp(+1j k theta)`` functions such as ``FBBasis`` (see the
    module conventions).

    Parameters
    ----------
    coeffs : ndarray, shape (n, count), complex
        Steerable-basis coefficients.
    angular_frequency : ndarray, shape (count,), int
        Angular frequency ``k >= 0`` of every coefficient.
    angles : float or array_like, shape (n,)
        Rotation angles in radians.

    Returns
    -------
    ndarray, shape (n, count)
        ``coeffs * exp(1j k angle)``.
    """
    angles = np.asarray(angles, dtype=np.float64)
    phases = np.exp(1j * np.multiply.outer(angles, np.asarray(angular_frequency)))
    return coeffs * phases.astype(np.result_type(coeffs.dtype, np.complex64), copy=False)


def reflect_coefficients(coeffs: np.ndarray) -> np.ndarray:
    """Coefficients of the images reflected about the x axis (``y -> -y``): the complex conjugates."""
    return np.conj(coeffs)


def frequency_weights(frequencies: np.ndarray, positive_frequency_weight: float = 1.0) -> np.ndarray:
    """Weight of each frequency in inner products of real images: 1 for ``k = 0``, ``w`` for ``k > 0``.

    ``sum_k w_k Re sum_q b_kq conj(a_kq)`` is then the inner product of the
    images: ``w = 1`` for coefficients scaled like ``FBBasis``'s (``sqrt 2``
    folded into ``k > 0``), ``w = 2`` for plain coefficients of an orthonormal
    complex basis (the unstored ``-k`` conjugates contribute the same real part
    again). See the module conventions.
    """
    return np.where(np.asarray(frequencies) == 0, 1.0, float(positive_frequency_weight))


def default_n_angles(k_max: int) -> int:
    """Default grid size ``max(360, 8 (k_max + 1))``: fine enough that the grid maximum lies in the peak's lobe."""
    return max(360, 8 * (k_max + 1))


def _check_coefficients(coeffs, angular_frequency) -> tuple[np.ndarray, np.ndarray]:
    coeffs = np.asarray(coeffs)
    if coeffs.ndim != 2 or coeffs.shape[0] == 0 or coeffs.shape[1] == 0:
        raise ParameterError(f"coeffs must be a non-empty 2-D array [n, count], got shape {coeffs.shape}")
    if not (np.issubdtype(coeffs.dtype, np.complexfloating) or np.issubdtype(coeffs.dtype, np.floating)):
        raise ParameterError(f"coeffs have dtype {coeffs.dtype}: pass complex64 or complex128 coefficients")
    frequencies = np.asarray(angular_frequency)
    if frequencies.shape != (coeffs.shape[1],) or not np.issubdtype(frequencies.dtype, np.integer):
        raise ParameterError(
            f"angular_frequency must be an integer array of length {coeffs.shape[1]} (one per coefficient), "
            f"got dtype {frequencies.dtype} and shape {frequencies.shape}"
        )
    if frequencies.min() < 0:
        raise ParameterError("angular_frequency holds negative values: store only k >= 0 (negative k are conjugates)")
    return coeffs, frequencies.astype(np.int64)


def _check_pairs(i, j, reflect, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair arrays as (image i, image j, reflect j) with ``0 <= i, j < n``."""
    i = np.asarray(i)
    j = np.asarray(j)
    if i.ndim != 1 or i.shape != j.shape:
        raise ParameterError(
            f"pair index arrays i and j must be 1-D of equal length, got shapes {i.shape} and {j.shape}"
        )
    if i.size and not (np.issubdtype(i.dtype, np.integer) and np.issubdtype(j.dtype, np.integer)):
        raise ParameterError(f"pair indices must be integers, got dtypes {i.dtype} and {j.dtype}")
    i = i.astype(np.int64)
    j = j.astype(np.int64)
    n_nodes = n if reflect is not None else 2 * n
    if i.size and (i.min() < 0 or i.max() >= n or j.min() < 0 or j.max() >= n_nodes):
        raise ParameterError(
            f"pair indices out of range: i must lie in [0, {n}) and j in [0, {n_nodes}) "
            f"({'reflections are given by reflect' if reflect is not None else 'j >= n is a reflected image'})"
        )
    if reflect is None:
        return i, j % n, j >= n
    flags = np.asarray(reflect)
    if flags.dtype != bool:
        raise ParameterError(f"reflect must be boolean (one flag per pair or one for all), got dtype {flags.dtype}")
    try:
        flags = np.broadcast_to(flags, i.shape)
    except ValueError:
        raise ParameterError(f"reflect has shape {flags.shape} but there are {i.size} pairs") from None
    return i, j, flags


def _weighted_norms(coeffs: np.ndarray, weights: np.ndarray, chunk: int) -> np.ndarray:
    """``sqrt(sum w_k |a_kq|^2)`` of every image, in row chunks to bound memory."""
    norms = np.empty(len(coeffs), dtype=np.float64)
    for start in range(0, len(coeffs), chunk):
        block = coeffs[start : start + chunk]
        norms[start : start + chunk] = (block.real**2 + block.imag**2) @ weights
    return np.sqrt(norms)


class _FrequencyGroups:
    """How to sum the coefficient axis per angular frequency with ``np.add.reduceat``."""

    def __init__(self, frequencies: np.ndarray, positive_frequency_weight: float):
        # reduceat needs each frequency's coefficients contiguous; most bases already store them so.
        self.order = None if np.all(np.diff(frequencies) >= 0) else np.argsort(frequencies, kind="stable")
        ordered = frequencies if self.order is None else frequencies[self.order]
        self.starts = np.flatnonzero(np.r_[True, np.diff(ordered) != 0])
        self.frequencies = ordered[self.starts]
        self.weights = frequency_weights(self.frequencies, positive_frequency_weight)
        self.k_max = int(ordered[-1])

    def gather(self, coeffs: np.ndarray, rows: np.ndarray) -> np.ndarray:
        block = coeffs[rows]
        return block if self.order is None else block[:, self.order]


def _frequency_sums(coeffs, groups: _FrequencyGroups, i, j, reflect) -> np.ndarray:
    """``s_k = w_k sum_q b_kq conj(a_kq)`` for image ``a = i`` and node ``b = j`` (reflected where flagged).

    Returns complex128 ``[p, k_max + 1]`` (zero at frequencies with no coefficient).
    """
    # Both gathers are fresh copies, so they can be overwritten in place.
    products = groups.gather(coeffs, i)
    # For a reflected node b -> conj(b): conj(b) conj(a) = conj(b a), so multiply by a (not conj(a))
    # on those rows and conjugate the small per-frequency sums afterwards.
    direct = ~reflect
    if direct.all():
        np.conjugate(products, out=products)
    elif direct.any():
        products[direct] = np.conjugate(products[direct])
    np.multiply(products, groups.gather(coeffs, j), out=products)
    grouped = np.add.reduceat(products, groups.starts, axis=1).astype(np.complex128)
    grouped[reflect] = np.conj(grouped[reflect])
    sums = np.zeros((len(i), groups.k_max + 1), dtype=np.complex128)
    sums[:, groups.frequencies] = grouped * groups.weights
    return sums


def _correlation_grid(sums: np.ndarray, n_angles: int) -> np.ndarray:
    """``C(2 pi m / n_angles) = Re sum_k s_k exp(-1j k alpha)`` for all ``m``, by one real inverse FFT.

    With the half spectrum ``Y_0 = Re s_0``, ``Y_k = conj(s_k) / 2`` (``k < n_angles / 2``),
    ``irfft(Y, norm="forward")[m] = Y_0 + 2 Re sum_k Y_k exp(2 pi i k m / n_angles) = C(alpha_m)``.
    In single precision (scipy's float32 FFT: measured 2-3x faster than numpy's float64 one): the grid only
    locates the maximum, whose value is then evaluated in double precision.
    """
    half = np.zeros((len(sums), n_angles // 2 + 1), dtype=np.complex64)
    half[:, : sums.shape[1]] = np.conj(sums) / 2
    half[:, 0] = sums[:, 0].real
    return scipy.fft.irfft(half, n=n_angles, axis=1, norm="forward")


def _correlation_derivatives(sums: np.ndarray, angles: np.ndarray):
    """``C``, ``C'`` and ``C''`` at one angle per pair."""
    k = np.arange(sums.shape[1], dtype=np.float64)
    # exp(-1j k alpha) as running powers of exp(-1j alpha): one complex exponential per pair, not per (pair, k).
    terms = np.empty(sums.shape, dtype=np.complex128)
    terms[:, 0] = 1.0
    terms[:, 1:] = np.exp(-1j * angles)[:, None]
    np.cumprod(terms, axis=1, out=terms)
    terms *= sums
    value = terms.real.sum(axis=1)
    slope = terms.imag @ k  # Re(-1j k t) = k Im(t)
    curvature = -(terms.real @ (k * k))
    return value, slope, curvature


def _refine(sums: np.ndarray, grid_angles: np.ndarray, spacing: float):
    """Safeguarded Newton iterations on ``C'(alpha) = 0`` from the grid maximum; angles and ``C`` there.

    Steps are taken only where ``C'' < 0`` (a maximum), and the angle stays
    within one grid spacing of the grid maximum (the true maximum lies there
    when the grid resolves the highest frequency). A refined angle is kept only
    if it does not lower ``C``.
    """
    angles = grid_angles.copy()
    grid_values = None
    for _ in range(NEWTON_STEPS):
        values, slope, curvature = _correlation_derivatives(sums, angles)
        if grid_values is None:
            grid_values = values
        step = np.zeros_like(angles)
        concave = curvature < 0
        step[concave] = -slope[concave] / curvature[concave]
        angles = grid_angles + np.clip(angles + step - grid_angles, -spacing, spacing)
    values, _, _ = _correlation_derivatives(sums, angles)
    better = values >= grid_values
    return np.where(better, angles, grid_angles), np.where(better, values, grid_values)


def align_pairs(
    coeffs,
    angular_frequency,
    i,
    j,
    reflect=None,
    n_angles: int | None = None,
    refine: bool = True,
    batch: int = 4096,
    positive_frequency_weight: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Rotation angle and normalised correlation that best align each pair of images.

    For each pair, ``s_k = w_k sum_q b_kq conj(a_kq)`` with ``a = coeffs[i]``,
    ``b`` the coefficients of node ``j`` and ``w_k`` from
    :func:`frequency_weights`; the correlation of node ``j`` with image ``i``
    rotated by ``alpha`` is ``C(alpha) = Re sum_k s_k exp(-1j k alpha)``. It is
    evaluated on ``n_angles`` equispaced angles by one FFT, maximised on the
    grid, and the maximum refined by Newton's method on the trigonometric
    polynomial.

    Parameters
    ----------
    coeffs : array_like, shape (n, count), complex64 or complex128
        Steerable-basis coefficients of the images (``k >= 0`` only).
    angular_frequency : array_like, shape (count,), int
        Angular frequency of every coefficient (any order; usually grouped by ``k``).
    i, j : array_like, shape (p,), int
        Pairs. ``0 <= i < n``. Without ``reflect``, ``0 <= j < 2 n`` and
        ``j >= n`` stands for the reflection of image ``j - n`` (coefficients
        ``conj(coeffs[j - n])``).
    reflect : bool or array_like of bool, shape (p,), optional
        Alternative to the ``j >= n`` encoding: ``0 <= j < n`` and node ``j``
        is reflected where ``reflect`` is true.
    n_angles : int, optional
        Size of the angle grid, at least ``2 k_max + 1``; default
        :func:`default_n_angles`.
    refine : bool
        Refine the grid maximum to sub-grid precision (Newton on ``C'``).
    batch : int
        Pairs processed at once; memory is about ``5 * batch * count`` complex values.
    positive_frequency_weight : float
        Weight ``w > 0`` of the ``k > 0`` terms in inner products (see the module
        conventions): 1 for ``FBBasis`` coefficients, 2 for plain ones. Changes
        the correlations only.

    Returns
    -------
    angles : ndarray, shape (p,), float64
        Radians in ``[0, 2 pi)``: node ``j`` is best matched by image ``i``
        rotated by ``angles`` in the sense of :func:`rotate_coefficients` (if
        ``coeffs_j = coeffs_i exp(1j k alpha)`` the angle is ``alpha``).
    correlations : ndarray, shape (p,), float64
        ``C(angle) / (||a_i|| ||b_j||)`` in ``[-1, 1]`` (norms weighted by
        ``w_k``): the normalised correlation of the images (for an orthonormal
        basis and the right ``positive_frequency_weight``), 1 for identical
        images, 0 when either image is all zero.

    Raises
    ------
    ParameterError
        For shapes, dtypes, index ranges or grid sizes that do not fit.
    InputError
        For NaN or infinite coefficients.
    """
    coeffs, frequencies = _check_coefficients(coeffs, angular_frequency)
    i, j, flags = _check_pairs(i, j, reflect, len(coeffs))
    if not positive_frequency_weight > 0:
        raise ParameterError(
            f"positive_frequency_weight={positive_frequency_weight!r} must be positive: "
            "1 for FBBasis-scaled coefficients, 2 for plain ones"
        )
    groups = _FrequencyGroups(frequencies, positive_frequency_weight)
    if n_angles is None:
        n_angles = default_n_angles(groups.k_max)
    if isinstance(n_angles, bool) or not isinstance(n_angles, (int, np.integer)) or n_angles < 2 * groups.k_max + 1:
        raise ParameterError(
            f"n_angles={n_angles!r} cannot resolve frequencies up to k_max={groups.k_max}: "
            f"use at least {2 * groups.k_max + 1} (default {default_n_angles(groups.k_max)})"
        )
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ParameterError(f"batch={batch!r} must be a positive integer")
    if np.isrealobj(coeffs):
        coeffs = coeffs.astype(np.result_type(coeffs.dtype, np.complex64))
    coefficient_weights = frequency_weights(frequencies, positive_frequency_weight)
    norms = _weighted_norms(coeffs, coefficient_weights, batch)
    if not np.isfinite(norms).all():
        rows = np.flatnonzero(~np.isfinite(norms))
        raise InputError(
            f"coeffs of {rows.size} images are NaN or infinite (first image {rows[0]}): "
            "check those particles' images for NaN/Inf pixels"
        )

    spacing = 2 * np.pi / n_angles
    angles = np.empty(len(i), dtype=np.float64)
    correlations = np.empty(len(i), dtype=np.float64)
    for start in range(0, len(i), batch):
        pairs = slice(start, start + batch)
        sums = _frequency_sums(coeffs, groups, i[pairs], j[pairs], flags[pairs])
        grid = _correlation_grid(sums, n_angles)
        best = np.argmax(grid, axis=1)
        best_angles = best * spacing
        if refine:
            best_angles, best_values = _refine(sums, best_angles, spacing)
        else:
            best_values = _correlation_derivatives(sums, best_angles)[0]
        best_angles = np.mod(best_angles, 2 * np.pi)
        best_angles[best_angles >= 2 * np.pi] = 0.0  # mod of a tiny negative angle rounds to 2 pi
        angles[pairs] = best_angles
        scale = norms[i[pairs]] * norms[j[pairs]]
        correlations[pairs] = np.divide(best_values, scale, out=np.zeros_like(scale), where=scale > 0)
    # Cauchy-Schwarz bounds the correlation by 1; rounding may overshoot it by an ulp.
    np.clip(correlations, -1.0, 1.0, out=correlations)
    return angles, correlations
