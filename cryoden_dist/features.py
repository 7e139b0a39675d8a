"""Rotation-invariant features of particle images from their steerable (sPCA) coefficients.

MFVDM needs the nearest neighbours of every image among all images *and their mirror images*, whatever their
in-plane rotation. This module turns steerable coefficients ``b`` (:meth:`cryoden_dist.basis.spca.SteerablePCA.
project`: rotating an image by ``alpha`` multiplies ``b_{k,l}`` by ``exp(-i k alpha)``, mirroring it (``y -> -y``)
conjugates every ``b``) into real vectors that do not change under rotation, and whose mirrored versions come from
the same code.

Invariants (all made homogeneous of degree 1 in ``b``, so that every kind weighs alike in Euclidean distances)
-------------------------------------------------------------------------------------------------------------
``b_{0,l}``
    The ``k = 0`` coefficients themselves (real).
Power spectrum ``P = b_{k,l1} conj(b_{k,l2})``, ``l1 <= l2``
    Every pair of components of the same ``k``; compressed ``z -> z / |z|^(1/2)``.
Bispectrum ``B = b_{k1,l1} b_{k2,l2} conj(b_{k1+k2,l3})``, ``0 <= k1 <= k2``
    The phases cancel under rotation, ``exp(-i (k1 + k2 - (k1 + k2)) alpha) = 1``. The triples are a sample,
    deterministic by seed (:func:`sample_triples`): for every frequency pair ``(k1, k2)`` with ``k1 + k2 <= k_max``
    (the largest kept frequency) its leading triple (``l1 = l2 = l3 = 0``), which covers every frequency and the
    ``k1 = 0`` terms, then triples drawn with probability proportional to their root-mean-square
    ``sqrt(v_1 v_2 v_3)`` (``v = mean |b|^2`` of a component), which favours the components with signal. Compressed
    ``z -> z / |z|^(2/3)``.

Mirror images
-------------
Mirroring conjugates ``b``, hence ``P`` and ``B`` (``|z|`` is unchanged, so also their compressed values), and
leaves ``b_{0,l}`` alone. The raw invariant vector is laid out as ``[even | odd]``: the real parts (and
``b_{0,l}``) first, then the imaginary parts; a mirror image has ``[even | -odd]``. The PCA is fitted on a sample
*and its mirror images*, so its covariance has no even-odd block and each principal axis is purely even or purely
odd: the features of a mirror image are the image's features with the odd axes' signs flipped,
``reflected = features * parity``. One projection gives both.

Dimension reduction
-------------------
PCA to ``n_features`` (default 300, fewer if there are fewer invariants or sample images) fitted on ``sample``
images (default 2000, drawn by seed) and applied to all in batches of bounded memory (never the full ``n x
invariants`` matrix). Each image's features are then scaled to unit length: images of one view differ in overall
contrast (CTF envelope and defocus, ice thickness), which carries no information on the view.

Measured (70S ribosome, 65 px, real CTFs, phase-flipped sPCA, n = 4000, FAISS k = 50 with mirror images): the
fraction of neighbours within 10 degrees of the true viewing direction is 58 % at SNR 0.05 (uniform triples and no
unit length: 31 %), 3.4 % at SNR 0.01 (random: 0.76 %); ``benchmarks/spca_wiener.py`` has the n = 10^4 figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .errors import ParameterError

__all__ = [
    "InvariantFeatures",
    "fit_invariant_features",
    "invariant_layout",
    "neighbour_viewing_angles",
    "sample_triples",
]

#: Bytes of complex invariants computed at once by :meth:`InvariantFeatures.transform`.
_BATCH_BYTES = 64 * 2**20
#: Most bispectrum triples enumerated as candidates by :func:`sample_triples` (bounds its memory to ~100 MB).
_MAX_CANDIDATES = 4_000_000


def _check_coefficients(b: np.ndarray, angular_frequency: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b = np.asarray(b)
    angular_frequency = np.asarray(angular_frequency, dtype=np.int64)
    if b.ndim != 2 or b.shape[1] != angular_frequency.size or b.shape[1] == 0:
        raise ParameterError(
            f"invariant features: coefficients of shape {b.shape} do not match {angular_frequency.size} angular "
            "frequencies; pass [n, count] steerable coefficients (SteerablePCA.project) with their frequencies"
        )
    if np.any(angular_frequency < 0) or np.any(np.diff(angular_frequency) < 0):
        raise ParameterError("invariant features: angular frequencies must be >= 0 and sorted (as sPCA orders them)")
    return b, angular_frequency


def _blocks(angular_frequency: np.ndarray) -> list[np.ndarray]:
    """Indices of the coefficients of each frequency ``0 .. max`` (empty arrays for frequencies not present)."""
    top = int(angular_frequency.max())
    return [np.flatnonzero(angular_frequency == k) for k in range(top + 1)]


def _candidate_triples(blocks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Bispectrum triples of every frequency pair ``k1 <= k2`` (``k1 + k2`` present), at most ~``_MAX_CANDIDATES``.

    Within a pair the triples run over the leading ``cap`` components of each block (all of them unless that
    would exceed the budget), ``l1 <= l2`` when ``k1 = k2`` (the product is symmetric). Returns the triples
    ``[m, 3]`` and a mask of the leading triple (``l1 = l2 = l3 = 0``) of every pair.
    """
    top = len(blocks) - 1
    pairs = [
        (k1, k2)
        for k1 in range(top + 1)
        for k2 in range(k1, top - k1 + 1)
        if blocks[k1].size and blocks[k2].size and blocks[k1 + k2].size
    ]
    if not pairs:
        return np.zeros((0, 3), dtype=np.int64), np.zeros(0, dtype=bool)
    sizes = np.array([(blocks[k1].size, blocks[k2].size, blocks[k1 + k2].size) for k1, k2 in pairs])
    cap = int(sizes.max())
    while cap > 1 and np.minimum(sizes, cap).prod(axis=1).sum() > _MAX_CANDIDATES:
        cap -= 1
    triples, leading = [], []
    for (k1, k2), shape in zip(pairs, np.minimum(sizes, cap), strict=True):  # a loop over frequencies only
        l1, l2, l3 = (grid.ravel() for grid in np.meshgrid(*(np.arange(q) for q in shape), indexing="ij"))
        keep = (l1 <= l2) if k1 == k2 else np.ones(l1.size, dtype=bool)
        triples.append(np.stack([blocks[k1][l1[keep]], blocks[k2][l2[keep]], blocks[k1 + k2][l3[keep]]], axis=1))
        leading.append(np.arange(int(keep.sum())) == 0)
    return np.concatenate(triples).astype(np.int64), np.concatenate(leading)


def sample_triples(
    angular_frequency: np.ndarray, n_triples: int, seed: int = 0, variances: np.ndarray | None = None
) -> np.ndarray:
    """Index triples ``(i1, i2, i3)`` of bispectrum terms ``b_i1 b_i2 conj(b_i3)``, ``k_i1 + k_i2 = k_i3``.

    The leading triple (``l1 = l2 = l3 = 0``) of every frequency pair ``(k1 <= k2)`` comes first, ordered by
    ``k1`` then ``k2``: it covers every frequency ``0 .. k_max`` and the ``k1 = 0`` terms (with fewer triples
    than pairs, the first ``n_triples`` of them). The rest are drawn without replacement with probability
    proportional to the root-mean-square of the term, ``sqrt(v_i1 v_i2 v_i3)`` (uniformly without ``variances``),
    by the Gumbel top-k trick: low-variance (noise-dominated) components enter few invariants.

    Parameters
    ----------
    angular_frequency : ndarray of int, shape (count,)
        Frequency of each coefficient, sorted; within a frequency the coefficients are in decreasing order of
        importance (as sPCA orders them).
    n_triples : int
        At most this many triples (fewer if there are fewer).
    seed : int
        Seed of the draw.
    variances : ndarray, shape (count,), optional
        Mean ``|b|^2`` of each coefficient.

    Returns
    -------
    ndarray of int64, shape (m, 3)
        Leading triples, then the drawn ones in enumeration order (by ``k1``, ``k2``, ``l1``, ``l2``, ``l3``).
    """
    if n_triples < 1:
        raise ParameterError(f"invariant features: n_triples={n_triples} must be >= 1")
    triples, leading = _candidate_triples(_blocks(np.asarray(angular_frequency, dtype=np.int64)))
    first = np.flatnonzero(leading)[:n_triples]
    others = np.flatnonzero(~leading)
    draw = min(others.size, n_triples - first.size)
    if draw <= 0:
        return triples[first]
    if variances is None:
        log_weight = np.zeros(others.size)
    else:
        tiny = np.finfo(np.float64).tiny
        log_variance = np.log(np.maximum(np.asarray(variances, dtype=np.float64), tiny))
        log_weight = 0.5 * log_variance[triples[others]].sum(axis=1)
    keys = log_weight + np.random.default_rng(seed).gumbel(size=others.size)
    drawn = np.sort(others[np.argpartition(-keys, draw - 1)[:draw]])
    return np.concatenate([triples[first], triples[drawn]])


def invariant_layout(angular_frequency: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``k = 0`` coefficients and the power-spectrum pairs ``(i1, i2)``, ``i1 <= i2`` of equal frequency.

    Returns
    -------
    zero : ndarray of int64
        Indices of the ``k = 0`` coefficients.
    pairs : ndarray of int64, shape (m, 2)
    """
    angular_frequency = np.asarray(angular_frequency, dtype=np.int64)
    zero = np.flatnonzero(angular_frequency == 0)
    i1, i2 = np.triu_indices(angular_frequency.size)
    same = angular_frequency[i1] == angular_frequency[i2]
    return zero, np.stack([i1[same], i2[same]], axis=1).astype(np.int64)


def _compress(z: np.ndarray, degree: int) -> np.ndarray:
    """``z / |z|^((degree - 1) / degree)``: magnitude ``|z|^(1 / degree)``, phase kept, 0 at 0."""
    magnitude = np.abs(z)
    scale = np.divide(1.0, magnitude ** ((degree - 1) / degree), out=np.zeros_like(magnitude), where=magnitude > 0)
    return z * scale


@dataclass
class InvariantFeatures:
    """Bispectrum and power-spectrum invariants reduced by a reflection-symmetric PCA (see the module docstring).

    Attributes
    ----------
    angular_frequency : ndarray of int64, shape (count,)
        Frequencies of the steerable coefficients it was fitted on.
    zero : ndarray of int64
        Indices of the ``k = 0`` coefficients.
    pairs : ndarray of int64, shape (n_pairs, 2)
        Power-spectrum pairs.
    triples : ndarray of int64, shape (n_triples, 3)
        Bispectrum triples ``b_i1 b_i2 conj(b_i3)``.
    mean : ndarray of float64, shape (n_even,)
        Mean of the even raw invariants (the odd ones have mean 0 over images and mirror images).
    components : ndarray of float32, shape (n_features, n_even + n_odd)
        Principal axes, each supported on the even or on the odd invariants only.
    parity : ndarray of float32, shape (n_features,)
        +1 for even axes, -1 for odd axes: ``reflected_features = features * parity``.
    variances : ndarray of float64, shape (n_features,)
        Variance of the sample (and its mirror images) along each axis, decreasing.
    """

    angular_frequency: np.ndarray
    zero: np.ndarray
    pairs: np.ndarray
    triples: np.ndarray
    mean: np.ndarray
    components: np.ndarray
    parity: np.ndarray
    variances: np.ndarray

    @property
    def n_features(self) -> int:
        """Dimension of the features."""
        return int(self.components.shape[0])

    @property
    def n_even(self) -> int:
        """Number of even raw invariants (``k = 0`` coefficients, real parts of P and B)."""
        return self.zero.size + len(self.pairs) + len(self.triples)

    def raw_invariants(self, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Compressed invariants of some images: ``(even, odd)`` parts, float32.

        Parameters
        ----------
        b : ndarray, shape (m, count), complex
            Steerable coefficients of ``m`` images (keep ``m`` small: the result is ``m x invariants``).

        Returns
        -------
        even : ndarray, shape (m, n_even)
        odd : ndarray, shape (m, n_pairs + n_triples)
            The parts a mirror image has with the opposite sign.
        """
        b, _ = _check_coefficients(b, self.angular_frequency)
        b = b.astype(np.complex64, copy=False)
        power = _compress(b[:, self.pairs[:, 0]] * b[:, self.pairs[:, 1]].conj(), 2)
        triple = self.triples
        bispectrum = _compress(b[:, triple[:, 0]] * b[:, triple[:, 1]] * b[:, triple[:, 2]].conj(), 3)
        even = np.concatenate([b[:, self.zero].real, power.real, bispectrum.real], axis=1)
        odd = np.concatenate([power.imag, bispectrum.imag], axis=1)
        return even.astype(np.float32, copy=False), odd.astype(np.float32, copy=False)

    def _batch_size(self) -> int:
        per_image = 8 * (len(self.pairs) + len(self.triples)) + 4 * self.components.shape[1]
        return max(16, _BATCH_BYTES // max(per_image, 1))

    def transform(self, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features of images and of their mirror images.

        Parameters
        ----------
        b : ndarray, shape (n, count), complex
            Steerable coefficients (``SteerablePCA.project``).

        Returns
        -------
        features : ndarray, shape (n, n_features), float32
            Invariant to in-plane rotations of the images; unit length (L2 distances rank like cosines).
        reflected_features : ndarray, shape (n, n_features), float32
            The features of the mirror images (``np.flipud``), equal to ``features * parity``.
        """
        b, _ = _check_coefficients(b, self.angular_frequency)
        out = np.empty((b.shape[0], self.n_features), dtype=np.float32)
        mean = self.mean.astype(np.float32)
        even_axes, odd_axes = self.components[:, : self.n_even], self.components[:, self.n_even :]
        step = self._batch_size()
        for start in range(0, b.shape[0], step):  # batches bound the memory of the invariants
            even, odd = self.raw_invariants(b[start : start + step])
            out[start : start + step] = (even - mean) @ even_axes.T + odd @ odd_axes.T
        # Unit length: images of one view differ in overall contrast (CTF envelope, defocus, ice), which says
        # nothing about the view (measured: kNN within 10 degrees 31 % -> 54 % on the 70S at SNR 0.05).
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out, out * self.parity


def _leading_axes(centred: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``count`` principal axes (rows) and variances of the rows of ``centred`` [m, D] (m samples)."""
    m, dim = centred.shape
    count = min(count, m, dim)
    if count == 0:
        return np.zeros((0, dim)), np.zeros(0)
    # Single precision (the features are float32): on a worker (single-threaded BLAS), 2000 samples x 2400
    # invariants, the Gram matrix 0.61 s -> 0.12 s and its leading 300 eigenpairs 1.95 s -> 0.51 s, eigenvalues
    # within 1e-7 and axes within cosines of 1 - 1e-7 of the double-precision ones.
    data = np.asarray(centred, dtype=np.float32)
    # Eigen-decompose the smaller of the two Gram matrices.
    small = data @ data.T if m < dim else data.T @ data
    # Only the leading ``count`` eigenpairs (MRRR): about half the time of the whole spectrum by divide and conquer.
    size = len(small)
    values, vectors = scipy.linalg.eigh(small, subset_by_index=(size - count, size - 1), driver="evr")
    values, vectors = np.maximum(values[::-1].astype(np.float64), 0.0), vectors[:, ::-1]
    if m < dim:
        scale = (1.0 / np.sqrt(np.maximum(values, np.finfo(np.float32).tiny))).astype(np.float32)
        axes = ((data.T @ vectors) * scale).T
    else:
        axes = vectors.T
    return axes, values / m


def fit_invariant_features(
    b: np.ndarray,
    angular_frequency: np.ndarray,
    n_features: int = 300,
    n_triples: int = 2000,
    seed: int = 0,
    sample: int = 2000,
) -> InvariantFeatures:
    """Choose the invariants and fit their PCA on a sample of images.

    Parameters
    ----------
    b : ndarray, shape (n, count), complex
        Steerable coefficients of the images (``SteerablePCA.project``), frequencies sorted.
    angular_frequency : ndarray of int, shape (count,)
        Their angular frequencies (``SteerablePCA.angular_frequency``).
    n_features : int
        Dimension of the features (fewer if there are fewer invariants or sample images).
    n_triples : int
        Bispectrum triples (at most; :func:`sample_triples`).
    seed : int
        Seed of the triples and of the image sample.
    sample : int
        Images the PCA is fitted on (all if fewer).

    Returns
    -------
    InvariantFeatures
    """
    b, angular_frequency = _check_coefficients(b, angular_frequency)
    if n_features < 1 or sample < 2:
        raise ParameterError(f"invariant features: need n_features >= 1 and sample >= 2 (got {n_features}, {sample})")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(b.shape[0], size=min(sample, b.shape[0]), replace=False))
    zero, pairs = invariant_layout(angular_frequency)
    variances = np.mean(np.abs(b[rows]) ** 2, axis=0)
    triples = sample_triples(angular_frequency, n_triples, seed, variances=variances)
    empty = np.zeros((0, 0), dtype=np.float32)
    model = InvariantFeatures(angular_frequency, zero, pairs, triples, np.zeros(0), empty, empty, np.zeros(0))
    even, odd = model.raw_invariants(b[rows])
    mean = even.astype(np.float64).mean(axis=0)
    # Images and mirror images: the even parts are the same (centred on their mean), the odd parts come with both
    # signs (mean 0, covariance odd^T odd / m).
    even_axes, even_var = _leading_axes(even - mean, n_features)
    odd_axes, odd_var = _leading_axes(odd, n_features)
    variances = np.concatenate([even_var, odd_var])
    order = np.argsort(-variances, kind="stable")[:n_features]
    components = np.zeros((order.size, even.shape[1] + odd.shape[1]), dtype=np.float32)
    is_even = order < even_var.size
    components[is_even, : even.shape[1]] = even_axes[order[is_even]]
    components[~is_even, even.shape[1] :] = odd_axes[order[~is_even] - even_var.size]
    return InvariantFeatures(
        angular_frequency=angular_frequency,
        zero=zero,
        pairs=pairs,
        triples=triples,
        mean=mean,
        components=components,
        parity=np.where(is_even, 1.0, -1.0).astype(np.float32),
        variances=variances[order],
    )


def neighbour_viewing_angles(neighbours: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """Angles between the true viewing directions of images and of their neighbours (simulations).

    Node ``j < n`` is image ``j``; node ``j >= n`` is the mirror image of image ``j - n``, which looks like a
    projection along the antipodal direction (:func:`cryoden_dist.sim.rotations.viewing_angle`), so its angle is
    measured to ``-v_j``: ``pi - angle(v_i, v_j)``. Random neighbours are within ``t`` for a fraction
    ``(1 - cos t) / 2`` of them (0.76 % for 10 degrees; twice that if ``v`` and ``-v`` were both accepted, as with
    ``viewing_angle(..., antipodal=True)``).

    Parameters
    ----------
    neighbours : ndarray of int, shape (n, k)
        Node ids per image (:func:`cryoden_dist.knn.nearest_neighbors`, with or without reflections).
    rotations : ndarray, shape (n, 3, 3)
        True rotations (``truth/rotations`` of a simulation).

    Returns
    -------
    ndarray of float64, shape (n, k)
        Radians, in ``[0, pi]``.
    """
    from .sim.rotations import viewing_angle

    n = len(rotations)
    image, mirrored = neighbours % n, neighbours >= n
    angle = viewing_angle(rotations[:, None], rotations[image])
    return np.where(mirrored, np.pi - angle, angle)
