"""MFVDM denoising (Fan & Zhao, ICIP 2021) and the aligned class-average baseline, as resumable stages.

``cryoden denoise IN.zarr --method mfvdm --out OUT.zarr`` runs the stages below. Every stage writes its arrays
into the *output* store, in one group per stage, and a record under the store's ``stages`` attribute (its
parameters, completion, wall time); a rerun of the same command skips the complete stages (and the complete
chunks of a partly done one, :func:`cryoden_dist.pipeline.run_chunks`). A stage that runs again invalidates
the stages after it (their records and chunk flags are dropped), so they are recomputed from its output.

Stages
------
``coeffs`` (one task per chunk)
    Phase flip ``sign(H) Y = |H| X + N'`` when the stack is CTF-modulated: from here on the images carry
    ``|H|``, not ``H`` (attribute ``phase_flipped``). FB expansion (:class:`~cryoden_dist.basis.fb.FBBasis`,
    float32, radius ``L // 2 - 1``, band limit 0.5) -> ``coeffs/fb`` [n, count] complex64; the isotropic part of
    each particle's ``|H|`` on the pixel radii of the FB disk (:func:`ctf_profiles`) -> ``coeffs/ctf_profile``.
``spca`` (a reduction over chunks) and ``spca-projection`` (one task per chunk)
    Steerable PCA with Wiener shrinkage (:mod:`cryoden_dist.basis.spca`) fitted on ``coeffs/fb``, noise variance
    from the image corners (statistics kept in ``coeffs/spca_statistics``); ``coeffs/spca``: the reduced, denoised
    steerable coefficients (``SteerablePCA.project``).
``features`` (one task per chunk) and ``knn`` (one task)
    Bispectrum / power-spectrum invariants and those of the mirror images (:mod:`cryoden_dist.features`) ->
    ``features/values``, ``features/reflected``; FAISS kNN over the ``2n`` images and mirror images
    (:func:`cryoden_dist.knn.nearest_neighbors`) -> ``features/neighbors`` (nodes ``0 .. 2n-1``). The cosine
    metric is the default: on the 70S map (n 1000, L 49, SNR 0.05, no CTF, knn 10) 23.2 % of its neighbours lie
    within 10 degrees against 12.8 % with L2 (exhaustive rotational alignment of the sPCA coefficients: 26.5 %).
``align`` (one task per chunk)
    :func:`cryoden_dist.align.align_pairs` of every (image, neighbour) pair on ``coeffs/spca`` ->
    ``graph/angles`` (MFVDM convention, below), ``graph/correlations``.
``mfvdm-eigs`` (one task per frequency)
    :func:`~cryoden_dist.mfvdm.build_graph` (``2n`` nodes) on the initial neighbours (uniform weights, as the
    authors' code, or the correlations clipped to ``[1e-3, 1]``), top ``m`` eigenpairs of ``S_k``,
    ``k = 1 .. k_max`` (:func:`~cryoden_dist.mfvdm.eigenpairs_per_frequency`, the graph scattered once) ->
    ``mfvdm/eigenvalues``, ``mfvdm/eigenvectors`` (complex64).
``mfvdm-neighbors`` (one task per chunk)
    The ``knn`` nodes of largest MFVDM affinity among the two-hop neighbourhood of the initial graph
    (:func:`refine_neighbors`; the exact search costs ``O(n 2n sum m)``) and their angles by ICIP 2021 eq. 5
    (:func:`~cryoden_dist.mfvdm.mfvdm_angles`) -> ``mfvdm/neighbors``, ``mfvdm/affinity``, ``mfvdm/angles``.
``mfvdm-filter`` (one task per frequency)
    The graph rebuilt on the refined neighbours and angles (weights: affinity / ``k_max``) and the filter
    ``h(lambda) = 2 lambda - lambda^2`` for ``lambda >= delta`` on the top ``m`` eigenpairs (ICIP 2021 eq. 7,
    :func:`~cryoden_dist.mfvdm.spectral_filter`; ``filter="polynomial"``: on the whole spectrum,
    :func:`polynomial_filter`) applied to every frequency block of the image coefficients, the ``k = 0`` block
    together with the ``|H|`` profiles -> ``mfvdm/filtered`` (FB coefficients), ``mfvdm/filtered_ctf_profile``.
    The rank-``m`` projection smooths over the viewing sphere at the resolution of ``m`` eigenvectors whatever
    ``n``; the full-spectrum form averages over two-hop graph neighbourhoods. Measured on the 70S map (n 2000,
    L 65, SNR 0.05, CTF): rel_mse 0.329 (spectral), 0.299 (polynomial), class averages 0.323; the polynomial
    filter stage took 0.6 s against 3 s.
``images`` (one task per chunk)
    Synthesis and CTF correction (below) -> ``images``.

``--method class-average`` runs ``coeffs`` .. ``align``, then ``images``: each image becomes the mean of itself
and its ``knn`` initial neighbours rotated into its frame (mirror nodes conjugated, :func:`aligned_average`),
corrected with the mean of their ``|H|`` profiles.

Which coefficients are filtered
-------------------------------
``coefficients="spca"`` (default): the sPCA-denoised coefficients. The filter acts on the reduced coefficients of
each frequency, then :meth:`SteerablePCA.reconstruct` maps them to FB coefficients; the two commute (both linear
and per frequency, and the filter passes the ``k = 0`` mean: its top eigenvector is ``sqrt(d)``, ``lambda = 1``).
``coefficients="fb"``: the phase-flipped images' FB coefficients, as the authors' MATLAB code does. Measured on
the 70S map, n = 1000, L = 49, SNR 0.05 with CTF (knn 10, ``ctf_epsilon`` 0.01): rel_mse 0.499 (spca) against
0.568 (fb); class averages 0.491 against 1.19. Either way the filtered frequencies are ``0 ..`` the last one
before the first frequency where the sPCA keeps no component (:func:`filtered_frequencies`): each costs one
eigensolve (the basis has ``k`` up to 82 at L = 65), and the sPCA finds no signal beyond.

Conventions reconciled
----------------------
* FB (:mod:`cryoden_dist.basis.fb`): rotating the image content by ``beta`` multiplies ``a_k`` by
  ``exp(-1j k beta)``; the mirror image (``theta -> -theta``) has ``conj(a)``. The sPCA coefficients inherit both
  rules (real eigenvectors, per-``k`` blocks) and the ``sqrt(2)`` scaling of ``k > 0`` (so the alignment uses
  ``positive_frequency_weight = 1``).
* :func:`~cryoden_dist.align.align_pairs` returns ``alpha`` with ``coeffs_j ~ coeffs_i exp(1j k alpha)``, for
  mirror nodes ``j >= n`` too (coefficients ``conj(coeffs_{j-n})``).
* :mod:`cryoden_dist.mfvdm` wants edge angles with ``A_k(i) = exp(1j k alpha_ij) A_k(j)``, mirror nodes carrying
  ``conj``: hence ``alpha_ij = -alpha`` (:func:`alignment_to_edge_angles`; checked on ``np.rot90`` copies in
  ``tests/test_mfvdm_pipeline.py``). ``graph/angles`` and ``mfvdm/angles`` hold ``alpha_ij``.
* The filter output of image ``i`` is ``sum_j F_ij A_k(j)`` with the phases ``exp(1j k alpha_ij)`` inside ``F``:
  the neighbours rotated into the frame of ``i``. The class average applies the same phases explicitly.
* Neighbour accuracy (:func:`neighbor_accuracy`): a mirror node is a view along the antipodal direction.

CTF correction (ICIP 2021 eqs. 8-9)
-----------------------------------
The filter is a linear operator ``F`` over rotated (and mirrored) neighbours. For the phase-flipped data
``Y_j = |H_j| X_j + N_j`` (Fourier space) and neighbours whose aligned clean images agree, ``R_ij X_j ~ X_i``::

    sum_j F_ij R_ij(|H_j| X_j) = sum_j F_ij (R_ij |H_j|)(R_ij X_j) ~ (sum_j F_ij R_ij |H_j|) X_i = H_eff,i X_i,

where ``R_ij`` rotates (and mirrors) ``|H_j|`` on the centred DFT grid exactly as it rotates the image. The
operator acts per angular frequency, so the ``k = 0`` (isotropic) part of ``H_eff`` is the ``k = 0`` filter
applied to the neighbours' isotropic ``|H|``, whatever the rotations. That part is what this module uses: the
ring means of ``|H|`` over the pixels of equal radius inside the disk (:func:`ctf_profiles`), filtered beside the
``k = 0`` image block. The astigmatic part (``k = 2, 4 ..``; at 400 A astigmatism and 5 A pixels a few per cent of
``|H|`` near Nyquist, and averaged out over neighbours of random astigmatism angles) is neglected. Expanding
``|H|`` in the FB basis instead, as if it were an image, fails: ``|H|`` does not vanish at the disk edge (Gibbs
ringing) and has kinks at its zeros, and ``|H(0)| ~ 0.1`` amplifies the errors at low frequency (measured on
noise-free particles corrected with their own ``|H|``: rel_mse 0.35 with the FB expansion, 0.0008 with the ring
profiles, as good as the exact pixels). The estimate ``Z_i`` (FB synthesis of the filtered coefficients,
``~ H_eff,i X_i``) is then deconvolved in Fourier space, zero outside the disk::

    X_hat_i = H_eff,i Z_i / (H_eff,i^2 + eps_i),   eps_i = ctf_epsilon * mean over the disk of H_eff,i^2.

``ctf_epsilon`` is a Wiener-style constant bounding the gain near CTF zeros; default 0.003, measured on the
simulation above (rel_mse mfvdm / class-average): 0.452 / 0.499 at 0.001, 0.454 / 0.501 at 0.003, 0.468 / 0.514 at
0.01, 0.517 / 0.561 at 0.03. With the sPCA input the approximation also ignores that the sPCA shrinkage is not a
Fourier multiplier. A stack without CTF (or already corrected) skips the phase flip and the deconvolution.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.fft
import scipy.sparse
import zarr

from .align import align_pairs
from .basis.fb import FBBasis
from .basis.spca import SHRINKERS, SPCAStatistics, SteerablePCA, fit_spca, input_ctf_state, spca_statistics
from .ctf import ctf_images, phase_flip
from .errors import InputError, ParameterError
from .features import fit_invariant_features
from .image import centered_coordinates, noise_variance_from_corners
from .knn import choose_method, nearest_neighbors, resolve_device
from .mfvdm import (
    build_graph,
    eigenpairs_per_frequency,
    mfvdm_angles,
    normalized_connection,
    normalized_embedding,
    spectral_filter,
    stack_with_reflections,
)
from .pipeline import gather_in_order, map_chunks, record_stage, run_chunks
from .sim.rotations import viewing_directions
from .stack import ParticleStack

__all__ = [
    "CLASS_AVERAGE_DEFAULTS",
    "CLASS_AVERAGE_STAGES",
    "MFVDM_DEFAULTS",
    "MFVDM_STAGES",
    "aligned_average",
    "alignment_to_edge_angles",
    "candidate_affinity",
    "ctf_corrected_images",
    "ctf_profiles",
    "ctf_rings",
    "filtered_frequencies",
    "neighbor_accuracy",
    "polynomial_filter",
    "refine_neighbors",
    "resolve_class_average",
    "resolve_mfvdm",
    "run_class_average",
    "run_mfvdm",
    "two_hop_candidates",
]

log = logging.getLogger(__name__)

TWO_PI = 2.0 * np.pi
#: Diffusion time of the MFVDM embedding (the inner products carry ``lambda^2t``), as in :mod:`cryoden_dist.mfvdm`.
DIFFUSION_TIME = 1
#: Image rows whose candidate affinities are computed at once (memory ``rows x candidates x m`` complex64).
AFFINITY_ROWS = 32
#: Images averaged at once by :func:`aligned_average` (memory ``rows x knn x count`` complex64).
AVERAGE_ROWS = 64
#: Seed of the feature sample and of the bispectrum triples.
FEATURE_SEED = 0

_SHARED_STAGES = ("coeffs", "spca", "spca-projection", "features", "knn", "align")
MFVDM_STAGES = (*_SHARED_STAGES, "mfvdm-eigs", "mfvdm-neighbors", "mfvdm-filter", "images")
CLASS_AVERAGE_STAGES = (*_SHARED_STAGES, "images")

_COMMON_DEFAULTS: dict[str, Any] = {
    "radius": None,
    "bandlimit": None,
    "shrinker": SHRINKERS[0],
    "knn": 50,
    "coefficients": "spca",
    "ctf_epsilon": 0.003,
    "n_features": 300,
    "metric": "cosine",
    "device": "auto",
}
#: ``mfvdm`` parameters (paper defaults: knn 50, k_max 10, m_k 50).
MFVDM_DEFAULTS: dict[str, Any] = {
    **_COMMON_DEFAULTS,
    "k_max": 10,
    "m": 50,
    "delta": 0.0,
    "eig_tol": 1e-4,
    "filter": "spectral",
    "edge_weights": "uniform",
}
#: ``class-average`` parameters.
CLASS_AVERAGE_DEFAULTS: dict[str, Any] = dict(_COMMON_DEFAULTS)

_COEFFICIENT_INPUTS = ("spca", "fb")
_EDGE_WEIGHTS = ("uniform", "correlation")
_METRICS = ("cosine", "l2")
_FILTERS = ("spectral", "polynomial")
_DEVICES = ("auto", "cpu", "gpu")


# ============================================================================================== conventions
def alignment_to_edge_angles(angles: np.ndarray) -> np.ndarray:
    """MFVDM edge angles ``alpha_ij`` from :func:`~cryoden_dist.align.align_pairs` angles of the pairs ``(i, j)``.

    ``align_pairs`` returns ``alpha`` with ``coeffs_j ~ coeffs_i exp(1j k alpha)``; :mod:`cryoden_dist.mfvdm`
    wants ``A_k(i) = exp(1j k alpha_ij) A_k(j)``, so ``alpha_ij = -alpha`` (mirror nodes alike: both modules give
    node ``j >= n`` the coefficients ``conj(coeffs_{j-n})``).

    Parameters
    ----------
    angles : ndarray
        Alignment angles in radians.

    Returns
    -------
    ndarray of float64, same shape, in ``[0, 2 pi)``
    """
    return np.mod(-np.asarray(angles, dtype=np.float64), TWO_PI)


def neighbor_accuracy(neighbors: np.ndarray, rotations: np.ndarray, max_angle: float) -> float:
    """Fraction of neighbours whose true viewing direction lies within ``max_angle`` of the image's.

    Node ``j >= n`` is the mirror image of image ``j - n``, i.e. a view along the antipodal direction
    ``-v_{j-n}`` (:func:`cryoden_dist.sim.rotations.viewing_directions`), and is scored against it.

    Parameters
    ----------
    neighbors : ndarray of int, shape (n, K)
        Nodes in ``0 .. 2n-1``.
    rotations : ndarray, shape (n, 3, 3)
        True rotations of the images.
    max_angle : float
        Radians.

    Returns
    -------
    float
    """
    n = rotations.shape[0]
    directions = viewing_directions(rotations)
    sign = np.where(neighbors >= n, -1.0, 1.0)
    cosine = sign * np.einsum("ia,ika->ik", directions, directions[neighbors % n])
    return float(np.mean(np.arccos(np.clip(cosine, -1.0, 1.0)) <= max_angle))


# ============================================================================================= the graph
def two_hop_candidates(neighbors: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The neighbours and neighbours of neighbours of some images, over ``2n`` nodes with mirror images.

    The neighbours of a mirror node ``j + n`` are the mirrors of those of ``j``: ``(l + n) mod 2n``.

    Parameters
    ----------
    neighbors : ndarray of int, shape (n, K)
        Nodes ``0 .. 2n-1`` (``j >= n``: mirror of image ``j - n``), e.g. the initial kNN.
    rows : ndarray of int, shape (b,)
        The images.

    Returns
    -------
    candidates : ndarray of int64, shape (b, C)
        Distinct nodes per row, the image itself and its own mirror excluded, in increasing order; rows with
        fewer than ``C`` candidates are padded (see ``valid``).
    valid : ndarray of bool, shape (b, C)
    """
    n = neighbors.shape[0]
    rows = np.asarray(rows, dtype=np.int64)
    first = neighbors[rows].astype(np.int64)
    second = neighbors[first % n].astype(np.int64)  # [b, K, K]
    second = np.where((first >= n)[..., None], (second + n) % (2 * n), second)
    candidates = np.sort(np.concatenate([first, second.reshape(rows.size, -1)], axis=1), axis=1)
    invalid = np.zeros(candidates.shape, dtype=bool)
    invalid[:, 1:] = candidates[:, 1:] == candidates[:, :-1]
    invalid |= (candidates == rows[:, None]) | (candidates == rows[:, None] + n)
    # Valid entries first (still sorted), then drop the columns no row needs.
    order = np.argsort(invalid, axis=1, kind="stable")
    candidates = np.take_along_axis(candidates, order, axis=1)
    valid = ~np.take_along_axis(invalid, order, axis=1)
    width = int(valid.sum(axis=1).max()) if rows.size else 0
    return candidates[:, :width], valid[:, :width]


def candidate_affinity(
    unit: list[np.ndarray], rows: np.ndarray, candidates: np.ndarray, valid: np.ndarray
) -> np.ndarray:
    """MFVDM affinities ``sum_k |<V_k(i), V_k(j)>|`` of each image with its candidate nodes.

    Parameters
    ----------
    unit : list of ndarray, shape (N, m_k)
        Per frequency, the embedding rows ``lambda^t u(i)`` scaled to unit norm.
    rows : ndarray of int, shape (b,)
    candidates : ndarray of int, shape (b, C)
    valid : ndarray of bool, shape (b, C)

    Returns
    -------
    ndarray of float32, shape (b, C)
        ``-inf`` where not valid.
    """
    out = np.full(candidates.shape, -np.inf, dtype=np.float32)
    for start in range(0, rows.size, AFFINITY_ROWS):  # blocks of rows bound the gathered [rows, C, m] array
        block = slice(start, start + AFFINITY_ROWS)
        total = np.zeros(candidates[block].shape, dtype=np.float32)
        for Y in unit:
            # One batched matrix-vector product per row: the candidate rows against the image's row.
            products = np.matmul(Y[candidates[block]], Y[rows[block]].conj()[:, :, None])[..., 0]
            total += np.abs(products)
        out[block] = np.where(valid[block], total, -np.inf)
    return out


def refine_neighbors(
    embeddings: dict[int, tuple[np.ndarray, np.ndarray]],
    initial: np.ndarray,
    rows: np.ndarray,
    n_neighbors: int,
    t: float = DIFFUSION_TIME,
) -> tuple[np.ndarray, np.ndarray]:
    """MFVDM neighbours ranked among the two-hop neighbourhood of the initial graph.

    The exact search (:func:`cryoden_dist.mfvdm.mfvdm_affinity_neighbors`) compares every image with all ``2n``
    nodes, ``O(n 2n sum m)``; here each image is compared with its :func:`two_hop_candidates` only (at most
    ``K + K^2``, far fewer once duplicates go: the neighbourhoods of neighbours overlap), ``O(n K^2 sum m)``.
    The affinity is the same, ``A_ij = sum_k |<V_k(i), V_k(j)>| / (|V_k(i)| |V_k(j)|)``.

    Parameters
    ----------
    embeddings : mapping k -> (eigenvalues [m_k], eigenvectors [N, m_k])
        :func:`~cryoden_dist.mfvdm.eigenpairs_per_frequency` for ``k = 1 .. k_max``, ``N = 2n``.
    initial : ndarray of int, shape (n, K0)
        Initial neighbours (nodes ``0 .. 2n-1``).
    rows : ndarray of int, shape (b,)
        Images to refine.
    n_neighbors : int
        Neighbours kept per image (at most the number of candidates of the row with fewest).
    t : float
        Diffusion time.

    Returns
    -------
    neighbors : ndarray of int64, shape (b, n_neighbors)
        By decreasing affinity.
    affinity : ndarray of float32, shape (b, n_neighbors)
    """
    unit = [
        normalized_embedding(values, vectors, t).astype(np.complex64)
        for values, vectors in (embeddings[k] for k in sorted(embeddings))
    ]
    rows = np.asarray(rows, dtype=np.int64)
    candidates, valid = two_hop_candidates(initial, rows)
    if valid.sum(axis=1).min() < n_neighbors:
        raise ParameterError(f"mfvdm: some images have fewer than {n_neighbors} two-hop candidates; lower --param knn")
    affinity = candidate_affinity(unit, rows, candidates, valid)
    top = np.argpartition(-affinity, n_neighbors - 1, axis=1)[:, :n_neighbors]
    values = np.take_along_axis(affinity, top, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    return np.take_along_axis(candidates, np.take_along_axis(top, order, axis=1), axis=1), np.take_along_axis(
        values, order, axis=1
    )


def _polynomial_frequency(graph, k: int, coefficients: np.ndarray) -> np.ndarray:
    S, d = normalized_connection(graph, k)
    scale = np.sqrt(d)
    inverse = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)  # isolated nodes: zero rows
    nodes = stack_with_reflections(coefficients) * scale[:, None]
    once = S @ nodes
    filtered = (2.0 * once - S @ once) * inverse[:, None]
    return filtered[: graph.n_images].astype(np.result_type(coefficients.dtype, np.complex64), copy=False)


def polynomial_filter(graph, coefficient_blocks: dict[int, np.ndarray], client=None) -> dict[int, np.ndarray]:
    """The MFVDM filter ``h(lambda) = 2 lambda - lambda^2`` on the whole spectrum, one task per frequency.

    ``D^-1/2 (2 S_k - S_k^2) D^1/2 A_k = (2 P_k - P_k^2) A_k`` with ``P_k = D^-1 W_k``: the filter of
    :func:`~cryoden_dist.mfvdm.spectral_filter` without the truncation to the top ``m`` eigenpairs (and without
    ``delta``), i.e. filter 4 of the authors' MATLAB code. Two sparse products per frequency, no eigensolve; it
    averages over two-hop neighbourhoods of the graph, where the rank-``m`` projection smooths over the whole
    viewing sphere at the resolution of ``m`` eigenvectors.

    Parameters
    ----------
    graph : cryoden_dist.mfvdm.Graph
        With reflections (``2n`` nodes).
    coefficient_blocks : mapping k -> ndarray, shape (n, q_k)
        Coefficients of frequency ``k`` (mirror nodes get the conjugates).
    client : distributed.Client, optional
        One task per frequency, the graph scattered once; serial without.

    Returns
    -------
    dict k -> ndarray, shape (n, q_k)
    """
    if client is None:
        return {k: _polynomial_frequency(graph, k, block) for k, block in coefficient_blocks.items()}
    [shared] = client.scatter([graph], broadcast=True)
    stamp = time.time_ns()
    futures = [
        client.submit(_polynomial_frequency, shared, k, block, key=f"mfvdm-polynomial-k{k}-{stamp}")
        for k, block in coefficient_blocks.items()
    ]
    return dict(zip(coefficient_blocks, gather_in_order(client, futures, "mfvdm-filter"), strict=True))


# ======================================================================================= coefficients
def aligned_average(
    coeffs: np.ndarray,
    angular_frequency: np.ndarray,
    rows: np.ndarray,
    neighbors: np.ndarray,
    edge_angles: np.ndarray,
) -> np.ndarray:
    """Mean of each image and its neighbours rotated into its frame: ``(A(i) + sum_j exp(1j k alpha_ij) A(j)) / (K+1)``.

    Parameters
    ----------
    coeffs : ndarray, shape (n, count), complex
        Steerable coefficients of all images (node ``j >= n`` has ``conj(coeffs[j - n])``).
    angular_frequency : ndarray of int, shape (count,)
    rows : ndarray of int, shape (b,)
        The images to average.
    neighbors : ndarray of int, shape (b, K)
        Their neighbours (nodes ``0 .. 2n-1``).
    edge_angles : ndarray, shape (b, K)
        MFVDM edge angles ``alpha_ij`` (:func:`alignment_to_edge_angles`).

    Returns
    -------
    ndarray of complex64, shape (b, count)
    """
    n = coeffs.shape[0]
    out = np.empty((len(rows), coeffs.shape[1]), dtype=np.complex64)
    for start in range(0, len(rows), AVERAGE_ROWS):  # blocks of rows bound the [rows, K, count] gather
        block = slice(start, start + AVERAGE_ROWS)
        nodes = neighbors[block]
        members = coeffs[nodes % n].astype(np.complex64)
        members = np.where((nodes >= n)[..., None], members.conj(), members)
        phases = np.exp(1j * edge_angles[block][..., None] * angular_frequency).astype(np.complex64)
        out[block] = (coeffs[rows[block]] + (members * phases).sum(axis=1)) / (nodes.shape[1] + 1)
    return out


@functools.lru_cache(maxsize=8)
def ctf_rings(box: int, radius: float) -> tuple[np.ndarray, scipy.sparse.csr_matrix]:
    """The rings of equal radius of the centred DFT grid inside the disk, and the ring-averaging matrix.

    Parameters
    ----------
    box : int
    radius : float
        Pixels strictly inside (distance ``< radius`` from pixel ``L // 2``, the FB disk) belong to a ring.

    Returns
    -------
    ring : ndarray of int64, shape (L, L)
        Ring of each pixel (rings ordered by radius), -1 outside the disk.
    average : scipy.sparse.csr_matrix, shape (rings, L * L)
        ``average @ image.ravel()``: the mean of the image over each ring.
    """
    y, x = centered_coordinates(box)
    squared = (x * x + y * y).astype(np.int64)  # integer offsets: equal radii are equal integers
    inside = squared < radius * radius
    _, index = np.unique(squared[inside], return_inverse=True)
    ring = np.full((box, box), -1, dtype=np.int64)
    ring[inside] = index
    pixels = np.flatnonzero(inside.ravel())
    counts = np.bincount(index)
    average = scipy.sparse.csr_matrix((1.0 / counts[index], (index, pixels)), shape=(counts.size, box * box))
    return ring, average


def ctf_profiles(magnitude: np.ndarray, radius: float) -> np.ndarray:
    """Ring means of ``|H|`` on the centred DFT grid: its isotropic (``k = 0``) part on the pixel radii.

    Parameters
    ----------
    magnitude : ndarray, shape (n, L, L)
        ``|H|`` with the zero frequency at pixel ``L // 2`` (``np.fft.fftshift`` of :func:`ctf_images`).
    radius : float
        The FB disk radius: frequencies up to ``radius / L`` cycles per pixel.

    Returns
    -------
    ndarray of float32, shape (n, rings)
    """
    _, average = ctf_rings(magnitude.shape[-1], float(radius))
    return (average @ magnitude.reshape(magnitude.shape[0], -1).T).T.astype(np.float32)


def ctf_corrected_images(basis: FBBasis, coeffs: np.ndarray, profiles: np.ndarray | None, epsilon: float) -> np.ndarray:
    """Images of (filtered) FB coefficients, deconvolved by their effective CTF (module docstring).

    Parameters
    ----------
    basis : FBBasis
    coeffs : ndarray, shape (b, count), complex
        Estimates of ``H_eff X`` (phase-flipped data) or of ``X`` (no CTF).
    profiles : ndarray, shape (b, rings), or None
        ``H_eff`` on the rings of :func:`ctf_rings` (its isotropic part); None: no deconvolution.
    epsilon : float
        ``ctf_epsilon``: the Wiener constant relative to the mean of ``H_eff^2`` over the disk.

    Returns
    -------
    ndarray of float32, shape (b, L, L)
    """
    estimate = basis.evaluate(coeffs)
    if profiles is None:
        return estimate.astype(np.float32)
    box = basis.box
    ring, _ = ctf_rings(box, basis.radius)
    ring = np.fft.ifftshift(ring)[:, : box // 2 + 1]  # centred grid to the rfft half plane in plain FFT order
    mask = ring >= 0
    effective = np.zeros((len(profiles), *ring.shape), dtype=np.float32)
    effective[:, mask] = profiles[:, ring[mask]]
    power = effective * effective
    eps = epsilon * power[:, mask].mean(axis=1)
    transfer = np.divide(effective, power + eps[:, None, None], out=np.zeros_like(effective), where=mask)
    return scipy.fft.irfft2(scipy.fft.rfft2(estimate) * transfer, s=(box, box)).astype(np.float32)


# ============================================================================================= stages
class _Stages:
    """Stage records of an output store: completion, parameters, wall time, and invalidation of later stages.

    Chunked stages are recorded by :func:`cryoden_dist.pipeline.run_chunks` in the same ``stages`` attribute;
    the others (reductions, per-frequency tasks) through :meth:`record`.
    """

    def __init__(self, stack: ParticleStack, order: tuple[str, ...]) -> None:
        self.stack = stack
        self.order = order

    def complete(self, name: str) -> bool:
        return bool(self.stack.info.get("stages", {}).get(name, {}).get("complete"))

    def begin(self, name: str) -> float:
        """Before (re)computing ``name``: drop the records and chunk flags of every later stage."""
        later = self.order[self.order.index(name) + 1 :]
        stages = dict(self.stack.info.get("stages", {}))
        for stage in later:
            stages.pop(stage, None)
            if f"_done/{stage}" in self.stack.group:
                del self.stack.group[f"_done/{stage}"]
        self.stack.update_info(stages=stages)
        return time.perf_counter()

    def record(self, name: str, params: dict, started: float) -> None:
        record_stage(self.stack, name, params, started)

    def run(self, name: str, params: dict, compute: Callable[[], None]) -> None:
        """Run a non-chunked stage unless complete, and record it."""
        if self.complete(name):
            log.info("stage %s: complete, skipped", name)
            return
        started = self.begin(name)
        compute()
        self.record(name, params, started)

    def run_chunked(self, name: str, client, kernel, args: Callable[[], tuple], params: dict, bounds=None) -> None:
        """Run a chunked stage (:func:`run_chunks`) unless complete; ``args`` is called only if it runs."""
        if self.complete(name):
            log.info("stage %s: complete, skipped", name)
            return
        self.begin(name)
        run_chunks(client, self.stack, name, kernel, args=args(), bounds=bounds, params=params)


def _array(stack: ParticleStack, name: str, shape: tuple[int, ...], dtype, rows: int | None = None) -> zarr.Array:
    """The array ``name`` of ``shape`` (kept if it exists with that shape and dtype, else made), chunked by rows."""
    group = stack.group
    if name in group:
        existing = group[name]
        if existing.shape == tuple(shape) and existing.dtype == np.dtype(dtype):
            return existing
        del group[name]
    chunks = (min(rows or shape[0], shape[0]), *shape[1:])
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0)


def _basis(spec: tuple[int, float, float]) -> FBBasis:
    """The float32 FB basis of ``(box, radius, bandlimit)``, built once per process."""
    box, radius, bandlimit = spec
    return FBBasis.cached(box, radius, bandlimit, 1e-6, "float32")


def _read(store: str, name: str, rows: slice | None = None) -> np.ndarray:
    array = zarr.open_group(store, mode="r")[name]
    return array[:] if rows is None else array[rows]


# ---------------------------------------------------------------------------------------- kernels
def _coefficients_chunk(start: int, stop: int, source_path: str, basis_spec: tuple, flip: bool) -> dict:
    """FB coefficients of particles ``[start, stop)`` (phase-flipped when ``flip``) and of their ``|H|``."""
    source = ParticleStack.open(source_path)
    basis = _basis(basis_spec)
    images = source.images[start:stop]
    out = {}
    if flip:
        ctf = ctf_images(source.ctf_params(slice(start, stop)), source.box)
        images = phase_flip(images, ctf)
        out["coeffs/ctf_profile"] = ctf_profiles(np.abs(np.fft.fftshift(ctf, axes=(-2, -1))), basis.radius)
    out["coeffs/fb"] = basis.expand(images).astype(np.complex64)
    return out


def _statistics_chunk(start: int, stop: int, store: str, source_path: str, basis_spec: tuple, radius: float):
    """sPCA statistics of particles ``[start, stop)`` and their summed corner noise variance."""
    images = ParticleStack.open(source_path).images[start:stop]
    return {
        "stats": spca_statistics(_read(store, "coeffs/fb", slice(start, stop)), _basis(basis_spec)),
        "noise_variance_sum": noise_variance_from_corners(images, radius) * (stop - start),
    }


def _project_chunk(start: int, stop: int, store: str, model: SteerablePCA) -> dict:
    return {"coeffs/spca": model.project(_read(store, "coeffs/fb", slice(start, stop))).astype(np.complex64)}


def _features_chunk(start: int, stop: int, store: str, model) -> dict:
    values, reflected = model.transform(_read(store, "coeffs/spca", slice(start, stop)))
    return {"features/values": values, "features/reflected": reflected}


def _knn_kernel(start: int, stop: int, store: str, k: int, metric: str, device: str) -> dict:
    """All images at once (``start, stop = 0, n``): FAISS over the images and their mirror images."""
    features, reflected = _read(store, "features/values"), _read(store, "features/reflected")
    neighbors, distances = nearest_neighbors(features, k, reflected_features=reflected, metric=metric, device=device)
    return {"features/neighbors": neighbors, "features/distances": distances}


def _align_chunk(start: int, stop: int, store: str, angular_frequency: np.ndarray) -> dict:
    coeffs = _read(store, "coeffs/spca")
    neighbors = _read(store, "features/neighbors", slice(start, stop))
    i = np.repeat(np.arange(start, stop), neighbors.shape[1])
    angles, correlations = align_pairs(coeffs, angular_frequency, i, neighbors.ravel())
    return {
        "graph/angles": alignment_to_edge_angles(angles).reshape(neighbors.shape),
        "graph/correlations": correlations.reshape(neighbors.shape),
    }


def _stored_embeddings(store: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    group = zarr.open_group(store, mode="r")
    values, vectors = group["mfvdm/eigenvalues"][:], group["mfvdm/eigenvectors"][:]
    m = values.shape[1]
    return {k + 1: (values[k], vectors[:, k * m : (k + 1) * m]) for k in range(values.shape[0])}


def _refine_chunk(start: int, stop: int, store: str, n_neighbors: int) -> dict:
    embeddings = _stored_embeddings(store)
    rows = np.arange(start, stop)
    neighbors, affinity = refine_neighbors(embeddings, _read(store, "features/neighbors"), rows, n_neighbors)
    angles = mfvdm_angles(embeddings, np.repeat(rows, n_neighbors), neighbors.ravel(), t=DIFFUSION_TIME)
    return {
        "mfvdm/neighbors": neighbors,
        "mfvdm/affinity": affinity,
        "mfvdm/angles": angles.reshape(neighbors.shape),
    }


def _filtered_images_chunk(start: int, stop: int, store: str, basis_spec: tuple, epsilon: float, ctf: bool) -> dict:
    rows = slice(start, stop)
    profiles = _read(store, "mfvdm/filtered_ctf_profile", rows) if ctf else None
    images = ctf_corrected_images(_basis(basis_spec), _read(store, "mfvdm/filtered", rows), profiles, epsilon)
    return {"images": images}


def _class_average_chunk(
    start: int, stop: int, store: str, basis_spec: tuple, model: SteerablePCA | None, epsilon: float, ctf: bool
) -> dict:
    basis = _basis(basis_spec)
    rows = np.arange(start, stop)
    neighbors = _read(store, "features/neighbors", slice(start, stop))
    angles = _read(store, "graph/angles", slice(start, stop))
    if model is None:
        averaged = aligned_average(_read(store, "coeffs/fb"), basis.angular_frequency, rows, neighbors, angles)
    else:
        reduced = aligned_average(_read(store, "coeffs/spca"), model.angular_frequency, rows, neighbors, angles)
        averaged = model.reconstruct(reduced)
    profiles = None
    if ctf:
        # Isotropic: the same for every rotation and mirror, a plain mean.
        stored = _read(store, "coeffs/ctf_profile")
        profiles = (stored[rows] + stored[neighbors % len(stored)].sum(axis=1)) / (neighbors.shape[1] + 1)
    return {"images": ctf_corrected_images(basis, averaged, profiles, epsilon)}


# ------------------------------------------------------------------------------------- parameters
def _integer(method: str, key: str, value: Any, low: int, high: int | None = None) -> int:
    integer = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not integer or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ParameterError(f"--param {key}={value!r}: method {method} needs an integer {bound}")
    return int(value)


def _choice(method: str, key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ParameterError(f"--param {key}={value!r}: method {method} knows {', '.join(choices)}")
    return value


def _fraction(method: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ParameterError(f"--param {key}={value!r}: method {method} needs a number in [0, 1)")
    return float(value)


def _positive_float(method: str, key: str, value: Any, low: float = 0.0, high: float = np.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
        raise ParameterError(f"--param {key}={value!r}: method {method} needs a number in ({low:g}, {high:g}]")
    return float(value)


def _resolve_common(method: str, source: ParticleStack, params: dict) -> dict:
    box, n = source.box, source.n
    radius = box // 2 - 1 if params["radius"] is None else params["radius"]
    radius = _positive_float(method, "radius", radius, 1.0, box / 2)
    bandlimit = 0.5 if params["bandlimit"] is None else params["bandlimit"]
    device = _choice(method, "device", params["device"], _DEVICES)
    resolve_device(device, choose_method(2 * n))  # a GPU request without a GPU fails here, before any output
    return {
        "radius": radius,
        "bandlimit": _positive_float(method, "bandlimit", bandlimit, 0.0, 0.5),
        "shrinker": _choice(method, "shrinker", params["shrinker"], SHRINKERS),
        # Each image needs knn other nodes among the 2n - 2 that are neither itself nor its mirror.
        "knn": _integer(method, "knn", params["knn"], 1, max(1, 2 * n - 2)),
        "coefficients": _choice(method, "coefficients", params["coefficients"], _COEFFICIENT_INPUTS),
        "ctf_epsilon": _positive_float(method, "ctf_epsilon", params["ctf_epsilon"]),
        "n_features": _integer(method, "n_features", params["n_features"], 1),
        "metric": _choice(method, "metric", params["metric"], _METRICS),
        "device": device,
    }


def resolve_mfvdm(source: ParticleStack, params: dict) -> dict:
    """Check the ``mfvdm`` parameters and fill the stack-dependent defaults.

    ``radius`` (px, default ``L // 2 - 1``), ``bandlimit`` (cycles/px, default 0.5), ``shrinker``: the FB basis
    and sPCA (:mod:`cryoden_dist.basis.spca`). ``knn``: neighbours, initial and refined (50). ``metric``: of the
    feature kNN, ``"cosine"`` (default) or ``"l2"``. ``k_max``: frequencies of the MFVDM embedding (10). ``m``:
    eigenpairs per frequency, embedding and spectral filter (50). ``delta``: spectral filter threshold (``h = 0``
    below; 0). ``eig_tol``: ARPACK tolerance (1e-4). ``filter``: ``"spectral"`` (eq. 7 with the top ``m``
    eigenpairs, default) or ``"polynomial"`` (the same ``h`` on the whole spectrum, :func:`polynomial_filter`).
    ``coefficients``: ``"spca"`` (default) or ``"fb"`` (module docstring). ``ctf_epsilon``: Wiener constant of
    the CTF correction (0.003). ``n_features``: dimension of the invariant features (300). ``edge_weights``:
    ``"uniform"`` (the authors' code, default) or ``"correlation"`` (alignment correlation clipped to
    ``[1e-3, 1]``) for the initial graph. ``device``: FAISS ``"auto"``, ``"cpu"`` or ``"gpu"``.
    """
    resolved = _resolve_common("mfvdm", source, params)
    n_nodes = 2 * source.n
    resolved.update(
        k_max=_integer("mfvdm", "k_max", params["k_max"], 1),
        m=_integer("mfvdm", "m", params["m"], 1, max(1, n_nodes - 2)),
        delta=_fraction("mfvdm", "delta", params["delta"]),
        eig_tol=_positive_float("mfvdm", "eig_tol", params["eig_tol"], 0.0, 0.1),
        filter=_choice("mfvdm", "filter", params["filter"], _FILTERS),
        edge_weights=_choice("mfvdm", "edge_weights", params["edge_weights"], _EDGE_WEIGHTS),
    )
    return resolved


def resolve_class_average(source: ParticleStack, params: dict) -> dict:
    """Check the ``class-average`` parameters (the common ones of :func:`resolve_mfvdm`)."""
    return _resolve_common("class-average", source, params)


# ---------------------------------------------------------------------------------------- driver
class _Run:
    """The shared stages ``coeffs`` .. ``align`` of both methods."""

    def __init__(self, source: ParticleStack, target: ParticleStack, params: dict, client, order: tuple) -> None:
        self.source, self.target, self.params, self.client = source, target, params, client
        self.store = str(target.path)
        self.stages = _Stages(target, order)
        state = input_ctf_state(source)
        self.ctf = state == "modulated" and source.has_ctf
        self.basis_spec = (source.box, params["radius"], params["bandlimit"])
        self.basis = _basis(self.basis_spec)
        self.n, self.rows = source.n, source.chunk
        target.update_info(images_ctf_state="corrected" if self.ctf else state, phase_flipped=self.ctf)

    def coefficients(self) -> None:
        n, count = self.n, self.basis.count
        _array(self.target, "coeffs/fb", (n, count), np.complex64, self.rows)
        if self.ctf:
            rings = ctf_rings(self.basis.box, self.basis.radius)[1].shape[0]
            _array(self.target, "coeffs/ctf_profile", (n, rings), np.float32, self.rows)
        self.stages.run_chunked(
            "coeffs",
            self.client,
            _coefficients_chunk,
            lambda: (str(self.source.path), self.basis_spec, self.ctf),
            params={"radius": self.params["radius"], "bandlimit": self.params["bandlimit"], "phase_flip": self.ctf},
        )

    def spca(self) -> SteerablePCA:
        group = "coeffs/spca_statistics"
        if self.stages.complete("spca"):
            stored = self.target.group[group]
            stats = SPCAStatistics.from_arrays({name: stored[name][:] for name in stored.array_keys()})
            noise_variance = self.target.info["stages"]["spca"]["params"]["noise_variance"]
        else:
            started = self.stages.begin("spca")
            parts = map_chunks(
                self.client,
                _statistics_chunk,
                self.source.chunk_bounds(),
                args=(self.store, str(self.source.path), self.basis_spec, self.params["radius"]),
                desc="spca statistics",
            )
            stats = sum(part["stats"] for part in parts)
            noise_variance = float(sum(part["noise_variance_sum"] for part in parts) / stats.count)
            for name, values in stats.to_arrays().items():
                _array(self.target, f"{group}/{name}", values.shape, values.dtype)[...] = values
            self.stages.record("spca", {"shrinker": self.params["shrinker"], "noise_variance": noise_variance}, started)
        model = fit_spca(stats, self.basis, noise_variance, self.params["shrinker"])
        if model.count == 0:
            raise InputError(
                f"{self.source.path}: the steerable PCA finds no signal above the noise (noise variance "
                f"{noise_variance:.3g}); mfvdm and class-average need more particles or a higher SNR"
            )
        _array(self.target, "coeffs/spca", (self.n, model.count), np.complex64, self.rows)
        self.stages.run_chunked(
            "spca-projection",
            self.client,
            _project_chunk,
            lambda: (self.store, model),
            params=model.summary(),
        )
        return model

    def through_alignment(self) -> SteerablePCA:
        """Run the shared stages ``coeffs`` .. ``align`` (each skipped when complete); return the sPCA model."""
        self.coefficients()
        model = self.spca()
        self.features_and_neighbors(model)
        return model

    def features_and_neighbors(self, model: SteerablePCA) -> None:
        knn = self.params["knn"]

        def fitted():
            reduced = _read(self.store, "coeffs/spca")
            features = fit_invariant_features(
                reduced, model.angular_frequency, n_features=self.params["n_features"], seed=FEATURE_SEED
            )
            for name in ("features/values", "features/reflected"):
                _array(self.target, name, (self.n, features.n_features), np.float32, self.rows)
            return (self.store, features)

        self.stages.run_chunked(
            "features", self.client, _features_chunk, fitted, params={"n_features": self.params["n_features"]}
        )
        _array(self.target, "features/neighbors", (self.n, knn), np.int64, self.rows)
        _array(self.target, "features/distances", (self.n, knn), np.float32, self.rows)
        self.stages.run_chunked(
            "knn",
            self.client,
            _knn_kernel,
            lambda: (self.store, knn, self.params["metric"], self.params["device"]),
            params={"knn": knn, "metric": self.params["metric"], "device": self.params["device"]},
            bounds=[(0, self.n)],
        )
        for name in ("graph/angles", "graph/correlations"):
            _array(self.target, name, (self.n, knn), np.float64, self.rows)
        self.stages.run_chunked(
            "align",
            self.client,
            _align_chunk,
            lambda: (self.store, model.angular_frequency),
            params={"convention": "A_k(i) = exp(1j k alpha_ij) A_k(j)", "positive_frequency_weight": 1},
        )

    def initial_graph(self):
        neighbors = _read(self.store, "features/neighbors")
        angles = _read(self.store, "graph/angles")
        weights = None
        if self.params["edge_weights"] == "correlation":
            weights = np.clip(_read(self.store, "graph/correlations"), 1e-3, 1.0)
        return build_graph(neighbors, angles, weights, with_reflections=True)


def filtered_frequencies(kept: np.ndarray) -> list[int]:
    """The angular frequencies the MFVDM filter acts on: ``0 .. k*``, the leading run of sPCA-kept frequencies.

    ``k*`` is the last frequency before the first one where the sPCA keeps no component. Isolated kept
    components beyond a gap are eigenvalues just above the Marchenko-Pastur edge with Wiener weights near 0
    (measured: the 70S simulations keep single components at k = 43-58 after a gap at k = 17); each frequency
    costs an eigensolve, and the image estimate is zero at the others.

    Parameters
    ----------
    kept : ndarray of int, shape (k_max_basis + 1,)
        Components kept per frequency (:attr:`SteerablePCA.kept`).

    Returns
    -------
    list of int
        Always contains 0 (the mean lives there).
    """
    empty = np.flatnonzero(np.asarray(kept) == 0)
    stop = int(empty[0]) if empty.size else len(kept)
    return list(range(max(stop, 1)))


def run_mfvdm(source: ParticleStack, target: ParticleStack, params: dict, client) -> None:
    """The ``mfvdm`` method: every stage of the module docstring, resumable.

    Parameters
    ----------
    source, target : ParticleStack
        Input stack and the prepared output.
    params : dict
        Resolved parameters (:func:`resolve_mfvdm`).
    client : distributed.Client
    """
    run = _Run(source, target, params, client, MFVDM_STAGES)
    model = run.through_alignment()
    n, knn, k_max, m = run.n, params["knn"], params["k_max"], params["m"]

    def eigenpairs() -> None:
        graph = run.initial_graph()
        pairs = eigenpairs_per_frequency(graph, range(1, k_max + 1), m, client=client, tol=params["eig_tol"])
        _array(target, "mfvdm/eigenvalues", (k_max, m), np.float64)[...] = np.stack([pairs[k][0] for k in pairs])
        vectors = np.concatenate([pairs[k][1] for k in pairs], axis=1).astype(np.complex64)
        _array(target, "mfvdm/eigenvectors", vectors.shape, np.complex64, run.rows)[...] = vectors

    run.stages.run(
        "mfvdm-eigs",
        {"k_max": k_max, "m": m, "eig_tol": params["eig_tol"], "edge_weights": params["edge_weights"]},
        eigenpairs,
    )
    for name, dtype in (("neighbors", np.int64), ("affinity", np.float32), ("angles", np.float64)):
        _array(target, f"mfvdm/{name}", (n, knn), dtype, run.rows)
    run.stages.run_chunked(
        "mfvdm-neighbors",
        client,
        _refine_chunk,
        lambda: (run.store, knn),
        params={"knn": knn, "candidates": "two-hop", "t": DIFFUSION_TIME},
    )
    frequencies = filtered_frequencies(model.kept)

    def filtered() -> None:
        graph = build_graph(
            _read(run.store, "mfvdm/neighbors"),
            _read(run.store, "mfvdm/angles"),
            np.clip(_read(run.store, "mfvdm/affinity") / k_max, 1e-6, 1.0),
            with_reflections=True,
        )
        basis = run.basis
        use_spca = params["coefficients"] == "spca"
        coeffs = _read(run.store, "coeffs/spca" if use_spca else "coeffs/fb")
        frequency = model.angular_frequency if use_spca else basis.angular_frequency
        blocks = {k: np.ascontiguousarray(coeffs[:, frequency == k]) for k in frequencies}
        if run.ctf:  # |H| is filtered as a k = 0 quantity (isotropic), beside the image's k = 0 block
            blocks[0] = np.concatenate([blocks[0], _read(run.store, "coeffs/ctf_profile")], axis=1)
        blocks = {k: block for k, block in blocks.items() if block.shape[1]}  # nothing to filter: no eigensolve
        if params["filter"] == "spectral":
            result = spectral_filter(graph, blocks, m, params["delta"], client=client, tol=params["eig_tol"])
        else:
            result = polynomial_filter(graph, blocks, client=client)
        width = int(np.count_nonzero(frequency == 0))
        image_part = np.zeros((n, coeffs.shape[1]), dtype=np.complex64)
        for k in result:
            image_part[:, frequency == k] = result[k][:, : width if k == 0 else None]
        image_part = model.reconstruct(image_part) if use_spca else image_part
        _array(target, "mfvdm/filtered", image_part.shape, np.complex64, run.rows)[...] = image_part
        if run.ctf:
            profiles = result[0][:, width:].real.astype(np.float32)
            _array(target, "mfvdm/filtered_ctf_profile", profiles.shape, np.float32, run.rows)[...] = profiles

    run.stages.run(
        "mfvdm-filter",
        {
            "filter": params["filter"],
            "m": m,
            "delta": params["delta"],
            "coefficients": params["coefficients"],
            "frequencies": frequencies,
        },
        filtered,
    )
    run.stages.run_chunked(
        "images",
        client,
        _filtered_images_chunk,
        lambda: (run.store, run.basis_spec, params["ctf_epsilon"], run.ctf),
        params={"ctf_epsilon": params["ctf_epsilon"], "ctf_corrected": run.ctf},
    )


def run_class_average(source: ParticleStack, target: ParticleStack, params: dict, client) -> None:
    """The ``class-average`` baseline: stages ``coeffs`` .. ``align``, then aligned neighbour means.

    Parameters
    ----------
    source, target : ParticleStack
        Input stack and the prepared output.
    params : dict
        Resolved parameters (:func:`resolve_class_average`).
    client : distributed.Client
    """
    run = _Run(source, target, params, client, CLASS_AVERAGE_STAGES)
    model = run.through_alignment()
    use_spca = params["coefficients"] == "spca"
    run.stages.run_chunked(
        "images",
        client,
        _class_average_chunk,
        lambda: (run.store, run.basis_spec, model if use_spca else None, params["ctf_epsilon"], run.ctf),
        params={"ctf_epsilon": params["ctf_epsilon"], "coefficients": params["coefficients"], "knn": params["knn"]},
    )
