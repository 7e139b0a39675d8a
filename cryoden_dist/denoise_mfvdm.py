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
``features`` (one task per chunk), ``knn`` (one task per worker, at most 8, each searching the whole index for
its rows) and ``align`` (one task per chunk): graph round 1
    Bispectrum / power-spectrum invariants and those of the mirror images (:mod:`cryoden_dist.features`) ->
    ``features/values``, ``features/reflected``; FAISS kNN over the ``2n`` images and mirror images
    (:func:`cryoden_dist.knn.nearest_neighbors`) -> ``features/neighbors``: ``candidates`` (default ``3 knn``)
    nodes ``0 .. 2n-1`` per image. ``align``: :func:`cryoden_dist.align.align_pairs` of every (image, candidate)
    pair on ``coeffs/spca``; the ``knn`` best correlated are kept (:func:`rerank_by_alignment`) ->
    ``graph/neighbors``, ``graph/angles`` (MFVDM convention, below), ``graph/correlations``. The features rank
    coarsely, the aligned correlation finely: on the 70S map (n 10^4, L 65, SNR 0.05, EMPIAR-10028 CTFs) 74.9 %
    of the 50 nearest by features lie within 10 degrees, 81.6 % of the 50 best of 150 by correlation.
``mfvdm-eigs`` (one task per frequency)
    :func:`~cryoden_dist.mfvdm.build_graph` (``2n`` nodes) on the round-1 graph (uniform weights, as the
    authors' code, or the correlations clipped to ``[1e-3, 1]``), top ``m`` eigenpairs of ``S_k``,
    ``k = 1 .. k_max`` (:func:`~cryoden_dist.mfvdm.eigenpairs_per_frequency`, the graph scattered once) ->
    ``mfvdm/eigenvalues``, ``mfvdm/eigenvectors`` (complex64).
``mfvdm-neighbors`` (about 8 tasks, :func:`coarse_bounds`: each reads all eigenvectors)
    The ``knn`` nodes of largest MFVDM affinity among the two-hop neighbourhood of the round-1 graph, the second
    hop through each image's best ``hop_neighbors`` (10) neighbours (:data:`HOP_NEIGHBORS`; :func:`refine_neighbors`;
    the exact search costs ``O(n 2n sum m)``), and their angles by ICIP 2021 eq. 5 (from the same inner products,
    :func:`~cryoden_dist.mfvdm.angles_from_products`) -> ``mfvdm/neighbors``, ``mfvdm/affinity``, ``mfvdm/angles``.
    Same data: 81.6 % -> 88.2 % within 10 degrees (87.8 % with the second hop through all 50).
``average-2``, ``features-2``, ``knn-2``, ``align-2``: graph round 2 (``rounds``, default 2; then 3 ..)
    Each image's sPCA coefficients averaged with those of its ``average_knn`` (10) best round-1 neighbours
    rotated into its frame (:func:`aligned_average`) -> ``round2/coeffs``, and round 1 again on these averages
    (about ten times the SNR), the FAISS candidates (``averaged_candidates``, default ``2 knn``) joined by MFVDM's
    refined neighbours before the re-ranking: ``round2/features/*``, ``round2/graph/*``. The averages' features rank
    well enough that fewer candidates suffice: 92.53 % within 10 degrees of the 50 kept from 150 + 50 candidates,
    92.49 % from 100 + 50, 92.46 % from 75 + 50 (round 1 needs its 150: 81.6 % against 80.8 % from 100).
    Rounds 3 .. repeat on the previous round's graph. Same data: 92.5 % within 10 degrees without MFVDM's
    candidates. MFVDM's affinity ranks worse than the aligned correlation of
    such averages (the MFVDM refinement of the round-2 graph: 92.5 % -> 88.3 %; averages over MFVDM's
    neighbours: 89.1 %), so its neighbours enter as candidates and the correlation decides.
``mfvdm-filter`` (one task per frequency)
    A filter ``h`` of the last round's graph (with ``rounds=1``: of MFVDM's neighbours, angles and affinities, as
    the paper) applied to the frequency blocks ``k = 0 .. k_filter`` (24) of the phase-flipped FB coefficients;
    beside the ``k = 0`` block the ``|H|`` profiles and ``NOISE_PROBES`` white-noise columns -> ``mfvdm/fb``,
    ``mfvdm/ctf_profile`` and ``mfvdm/noise_gain`` (each image's ``sum_j F_ij^2``, measured by the probes).
    ``filter="diffusion"`` (default): one step of the vector diffusion, ``h(lambda) = lambda``, i.e. ``P_k = D^-1
    W_k``: the neighbours rotated into each image's frame and averaged over the symmetrised graph;
    ``"polynomial"``: the paper's ``h(lambda) = 2 lambda - lambda^2`` (ICIP 2021 eq. 7) on the whole spectrum;
    ``"spectral"``: eq. 7 on the top ``m`` eigenpairs with ``h = 0`` below ``delta``
    (:func:`~cryoden_dist.mfvdm.spectral_filter`). Measured on the 70S map (n 10^4, L 65, SNR 0.05, EMPIAR-10028
    CTFs) with the post-Wiener, on one graph (89 % within 10 degrees): rel_mse 0.0797 (diffusion), 0.0945
    (polynomial: its negative two-hop weights average less), 0.0819 (plain means of the 50 neighbours). With the
    earlier sPCA input (n 7000): 0.312 (spectral, m 50: the rank-``m`` projection over-smooths) and 0.253
    (polynomial).
``post-spca`` (a reduction) and ``images`` (one task per chunk)
    A steerable PCA fitted on the filtered coefficients at their reduced noise ``sigma^2 g`` (``g`` the mean gain)
    and a Wiener filter of each image with its own gain (:meth:`SteerablePCA.denoise` with ``noise_scale``);
    synthesis and CTF correction (below) -> ``images``.

``--method class-average`` runs ``coeffs`` .. ``align`` (``rounds`` 1 by default, no MFVDM), then ``average``:
each image's FB coefficients averaged with those of its ``knn`` neighbours rotated into its frame (mirror nodes
conjugated, :func:`aligned_average`) with the mean of their ``|H|`` profiles (``average/*``, gain ``1/(knn+1)``),
then ``post-spca`` and ``images`` as above.

Denoise after averaging
-----------------------
``coefficients="fb"`` (default) with ``post_wiener`` (default): average (filter) the images' FB coefficients,
then Wiener filter the averages with an sPCA fitted on them. Averaging first lowers the noise by the gain, and
the sPCA of the averages keeps far more components than that of single images (70S, n 10^4, SNR 0.05: 111 kept
from single images, up to ``k = 22``; about 500 from averages of 21, up to ``k = 75``); the frequencies beyond
``k = 20`` changed rel_mse by < 0.5 %, hence ``k_filter`` 24. Measured on that data with the round-2 graph
(rel_mse; the CTF-corrected images against the clean ones): averaging the sPCA-denoised coefficients 0.222
(``coefficients="spca"``: the Wiener shrinkage of single images loses what no averaging recovers); averaging the
FB coefficients without Wiener 0.39-0.49; with the post-Wiener 0.085-0.092.
``coefficients="spca"``: the filter acts on the reduced sPCA coefficients of each frequency
(:meth:`SteerablePCA.reconstruct` maps them back; the two commute), ``post_wiener`` is not applied.

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
import zarr

from .align import align_pairs
from .basis.fb import FBBasis
from .basis.spca import SHRINKERS, SPCAStatistics, SteerablePCA, fit_spca, input_ctf_state, spca_statistics
from .ctf import ctf_images, ctf_profiles, ctf_ring_radii, ctf_rings, phase_flip
from .errors import InputError, ParameterError
from .features import fit_invariant_features
from .image import noise_variance_from_corners
from .knn import choose_method, faiss_gpu_count, nearest_neighbors, resolve_device
from .mfvdm import (
    angles_from_products,
    build_graph,
    eigenpairs_per_frequency,
    normalized_connection,
    normalized_embedding,
    spectral_filter,
    stack_with_reflections,
)
from .pipeline import StageStart, gather_in_order, map_chunks, record_stage, run_chunks, start_stage
from .sim.rotations import viewing_directions
from .stack import ParticleStack

__all__ = [
    "CLASS_AVERAGE_DEFAULTS",
    "MFVDM_DEFAULTS",
    "aligned_average",
    "alignment_to_edge_angles",
    "candidate_affinity",
    "check_gpu_request",
    "coarse_bounds",
    "class_average_stages",
    "ctf_corrected_images",
    "filtered_frequencies",
    "joined_embedding",
    "knn_resources",
    "mfvdm_stages",
    "neighbor_accuracy",
    "polynomial_filter",
    "refine_neighbors",
    "rerank_by_alignment",
    "resolve_class_average",
    "resolve_mfvdm",
    "round_prefix",
    "round_stages",
    "run_class_average",
    "run_mfvdm",
    "shared_stages",
    "two_hop_candidates",
    "HOP_NEIGHBORS",
]

log = logging.getLogger(__name__)

TWO_PI = 2.0 * np.pi
#: Diffusion time of the MFVDM embedding (the inner products carry ``lambda^2t``), as in :mod:`cryoden_dist.mfvdm`.
DIFFUSION_TIME = 1
#: About how many tasks ``mfvdm-neighbors`` runs (:func:`coarse_bounds`).
REFINE_TASKS = 8
#: MFVDM's candidates: the initial neighbours and the neighbours of the best ``HOP_NEIGHBORS`` of them (sorted by
#: aligned correlation). Measured on the 70S map (n 10^4; 50 refined neighbours within 10 degrees, time of 2500
#: rows): SNR 0.05 through all 50: 87.6 % (406 candidates per image, 4.6 s), 25: 87.8 %, 15: 88.0 %, 10: 88.2 %
#: (177, 2.6 s), 5: 88.2 %; SNR 0.01: 6.20 % (1422, 12.0 s), 6.32 %, 6.44 %, 6.48 % (436, 4.0 s), 6.52 %. The
#: neighbours of poorly matched neighbours add mostly wrong candidates.
HOP_NEIGHBORS = 10
#: Image rows whose candidate affinities are computed at once (memory ``rows x candidates x m`` complex64).
AFFINITY_ROWS = 16
#: Images averaged at once by :func:`aligned_average` (memory ``rows x knn x count`` complex64).
AVERAGE_ROWS = 64
#: Seed of the feature sample and of the bispectrum triples.
FEATURE_SEED = 0
#: White-noise columns filtered beside the k = 0 block to measure each image's noise gain, and their seed.
NOISE_PROBES = 32
NOISE_PROBE_SEED = 1
#: Floor of a measured noise gain (a gain of 0 would make the post-Wiener weights 1 on pure noise).
MIN_NOISE_GAIN = 1e-4

_MFVDM_REFINE = ("mfvdm-eigs", "mfvdm-neighbors")
_MFVDM_TAIL = ("mfvdm-filter", "post-spca", "images")


def round_stages(r: int) -> tuple[str, ...]:
    """Stage names of graph round ``r``: ``features, knn, align``; from round 2 ``average-r, features-r ..``."""
    if r == 1:
        return ("features", "knn", "align")
    return tuple(f"{name}-{r}" for name in ("average", "features", "knn", "align"))


def round_prefix(r: int) -> str:
    """Group of round ``r``'s arrays in the output store: ``""`` for round 1, ``"round<r>/"`` after."""
    return "" if r == 1 else f"round{r}/"


def shared_stages(rounds: int) -> tuple[str, ...]:
    """Stages ``coeffs`` .. the last round's ``align``, shared by ``mfvdm`` and ``class-average``."""
    return ("coeffs", "spca", "spca-projection", *(name for r in range(1, rounds + 1) for name in round_stages(r)))


def mfvdm_stages(rounds: int) -> tuple[str, ...]:
    """Every stage of ``--method mfvdm`` with ``rounds`` graph rounds, in order (MFVDM after round 1)."""
    first = shared_stages(1)
    return (*first, *_MFVDM_REFINE, *shared_stages(rounds)[len(first) :], *_MFVDM_TAIL)


def class_average_stages(rounds: int) -> tuple[str, ...]:
    """Every stage of ``--method class-average`` with ``rounds`` graph rounds, in order."""
    return (*shared_stages(rounds), "average", "post-spca", "images")


_COMMON_DEFAULTS: dict[str, Any] = {
    "radius": None,
    "bandlimit": None,
    "shrinker": SHRINKERS[0],
    "knn": 50,
    "candidates": None,
    "averaged_candidates": None,
    "average_knn": 10,
    "coefficients": "fb",
    "post_wiener": True,
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
    "filter": "diffusion",
    "edge_weights": "uniform",
    "k_filter": 24,
    "rounds": 2,
    "hop_neighbors": HOP_NEIGHBORS,
}
#: ``class-average`` parameters (one graph round: the FAISS candidates re-ranked by alignment).
CLASS_AVERAGE_DEFAULTS: dict[str, Any] = {**_COMMON_DEFAULTS, "rounds": 1}

_COEFFICIENT_INPUTS = ("spca", "fb")
_EDGE_WEIGHTS = ("uniform", "correlation")
_METRICS = ("cosine", "l2")
_FILTERS = ("diffusion", "polynomial", "spectral")
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
def two_hop_candidates(
    neighbors: np.ndarray, rows: np.ndarray, hop_neighbors: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The neighbours and neighbours of neighbours of some images, over ``2n`` nodes with mirror images.

    The neighbours of a mirror node ``j + n`` are the mirrors of those of ``j``: ``(l + n) mod 2n``.

    Parameters
    ----------
    neighbors : ndarray of int, shape (n, K)
        Nodes ``0 .. 2n-1`` (``j >= n``: mirror of image ``j - n``), e.g. the initial kNN, best first.
    rows : ndarray of int, shape (b,)
        The images.
    hop_neighbors : int, optional
        The second hop goes through the first ``hop_neighbors`` neighbours of each image only (all ``K``
        by default): all ``K`` first-hop nodes and the ``K`` neighbours of each of those.

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
    through = first[:, :hop_neighbors]
    second = neighbors[through % n].astype(np.int64)  # [b, J, K]
    second = np.where((through >= n)[..., None], (second + n) % (2 * n), second)
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
    joined: np.ndarray, frequencies: int, rows: np.ndarray, candidates: np.ndarray, valid: np.ndarray
) -> np.ndarray:
    """MFVDM affinities ``sum_k |<V_k(i), V_k(j)>|`` of each image with its candidate nodes.

    Parameters
    ----------
    joined : ndarray, shape (N, frequencies * m)
        Per node, the embedding rows ``lambda^t u(i)`` of every frequency, each scaled to unit norm, side by
        side (:func:`joined_embedding`).
    frequencies : int
        Number of frequencies in ``joined`` (each has ``m`` columns).
    rows : ndarray of int, shape (b,)
    candidates : ndarray of int, shape (b, C)
    valid : ndarray of bool, shape (b, C)

    Returns
    -------
    ndarray of float32, shape (b, C)
        ``-inf`` where not valid.
    """
    out = np.full(candidates.shape, -np.inf, dtype=np.float32)
    conjugate = np.conj(joined[rows])  # once per image, not per pair
    for start in range(0, rows.size, AFFINITY_ROWS):  # blocks of rows bound the gathered [pairs, sum m] arrays
        block = slice(start, start + AFFINITY_ROWS)
        # Valid pairs only: rows have ~400 distinct two-hop candidates, padded to the widest row (~1900).
        owner, column = np.nonzero(valid[block])
        nodes = candidates[block][owner, column]
        shape = (nodes.size, frequencies, -1)
        # einsum sums the products without storing them: 1.5x faster than multiply-then-sum.
        products = np.einsum("pfm,pfm->pf", joined[nodes].reshape(shape), conjugate[block][owner].reshape(shape))
        out[block][owner, column] = np.abs(products).sum(axis=1)
    return out


def joined_embedding(embeddings: dict[int, tuple[np.ndarray, np.ndarray]], t: float = DIFFUSION_TIME) -> np.ndarray:
    """The unit-norm diffusion embeddings of every frequency side by side, ``[N, sum m]`` complex64.

    Parameters
    ----------
    embeddings : mapping k -> (eigenvalues [m], eigenvectors [N, m])
    t : float
        Diffusion time.

    Returns
    -------
    ndarray of complex64, shape (N, len(embeddings) * m)
    """
    ks = sorted(embeddings)
    first = embeddings[ks[0]][1]
    widths = [embeddings[k][1].shape[1] for k in ks]
    if len(set(widths)) != 1:
        raise ParameterError(f"mfvdm: the frequencies have different numbers of eigenpairs {widths}; use one m")
    out = np.empty((first.shape[0], sum(widths)), dtype=np.complex64)
    for index, k in enumerate(ks):  # one frequency at a time: no second full-size copy
        out[:, index * widths[0] : (index + 1) * widths[0]] = normalized_embedding(*embeddings[k], t)
    return out


def refine_neighbors(
    embeddings: dict[int, tuple[np.ndarray, np.ndarray]],
    initial: np.ndarray,
    rows: np.ndarray,
    n_neighbors: int,
    t: float = DIFFUSION_TIME,
    hop_neighbors: int | None = HOP_NEIGHBORS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MFVDM neighbours ranked among the two-hop neighbourhood of the initial graph, and their angles.

    The exact search (:func:`cryoden_dist.mfvdm.mfvdm_affinity_neighbors`) compares every image with all ``2n``
    nodes, ``O(n 2n sum m)``; here each image is compared with its :func:`two_hop_candidates` only (at most
    ``K + K^2``, far fewer once duplicates go: the neighbourhoods of neighbours overlap), ``O(n K^2 sum m)``.
    The affinity is the same, ``A_ij = sum_k |<V_k(i), V_k(j)>| / (|V_k(i)| |V_k(j)|)``. The angles are ICIP 2021
    eq. 5 (:func:`~cryoden_dist.mfvdm.angles_from_products`) from the same unit-norm inner products, whose phases
    are those of ``sum_l lambda_l^2t u_l(i) conj(u_l(j))`` (as :func:`~cryoden_dist.mfvdm.mfvdm_angles`).

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
    hop_neighbors : int, optional
        Second hop through the best ``hop_neighbors`` initial neighbours only (:func:`two_hop_candidates`;
        ``None``: all). Default :data:`HOP_NEIGHBORS`.

    Returns
    -------
    neighbors : ndarray of int64, shape (b, n_neighbors)
        By decreasing affinity.
    affinity : ndarray of float32, shape (b, n_neighbors)
    angles : ndarray of float64, shape (b, n_neighbors)
        ``alpha_hat_ij`` in ``[0, 2 pi)``.
    """
    joined = joined_embedding(embeddings, t)
    rows = np.asarray(rows, dtype=np.int64)
    candidates, valid = two_hop_candidates(initial, rows, hop_neighbors)
    if valid.sum(axis=1).min() < n_neighbors:
        raise ParameterError(f"mfvdm: some images have fewer than {n_neighbors} two-hop candidates; lower --param knn")
    affinity = candidate_affinity(joined, len(embeddings), rows, candidates, valid)
    top = np.argpartition(-affinity, n_neighbors - 1, axis=1)[:, :n_neighbors]
    values = np.take_along_axis(affinity, top, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    neighbors = np.take_along_axis(candidates, np.take_along_axis(top, order, axis=1), axis=1)
    angles = np.empty(neighbors.shape)
    shape = (-1, len(embeddings), joined.shape[1] // len(embeddings))
    for start in range(0, rows.size, AVERAGE_ROWS):  # blocks bound the gathered [pairs, sum m] arrays
        block = slice(start, start + AVERAGE_ROWS)
        mine = np.repeat(joined[rows[block]], n_neighbors, axis=0).reshape(shape)
        products = np.einsum("pfm,pfm->pf", mine, np.conj(joined[neighbors[block].ravel()]).reshape(shape))
        angles[block] = angles_from_products(products, sorted(embeddings)).reshape(-1, n_neighbors)
    return neighbors, np.take_along_axis(values, order, axis=1), angles


FILTER_POLYNOMIALS = {"polynomial": (2.0, -1.0), "diffusion": (1.0,)}


def _polynomial_frequency(graph, k: int, coefficients: np.ndarray, polynomial: tuple[float, ...]) -> np.ndarray:
    S, d = normalized_connection(graph, k)
    scale = np.sqrt(d)
    inverse = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)  # isolated nodes: zero rows
    power = stack_with_reflections(coefficients) * scale[:, None]
    filtered = 0
    for weight in polynomial:  # sum_p weight_p S^p x, one sparse product per power
        power = S @ power
        filtered = filtered + weight * power
    filtered = filtered * inverse[:, None]
    return filtered[: graph.n_images].astype(np.result_type(coefficients.dtype, np.complex64), copy=False)


def polynomial_filter(
    graph, coefficient_blocks: dict[int, np.ndarray], client=None, polynomial: tuple[float, ...] = (2.0, -1.0)
) -> dict[int, np.ndarray]:
    """A polynomial filter ``h`` of the MFVDM graph on the whole spectrum, one task per frequency.

    Default ``h(lambda) = 2 lambda - lambda^2``: ``D^-1/2 (2 S_k - S_k^2) D^1/2 A_k = (2 P_k - P_k^2) A_k`` with
    ``P_k = D^-1 W_k``, the filter of :func:`~cryoden_dist.mfvdm.spectral_filter` without the truncation to the top
    ``m`` eigenpairs (and without ``delta``), i.e. filter 4 of the authors' MATLAB code; it averages over two-hop
    neighbourhoods (with negative two-hop weights), where the rank-``m`` projection smooths over the whole viewing
    sphere at the resolution of ``m`` eigenvectors. ``polynomial=(1,)``: one diffusion step ``P_k``, the mean of
    the neighbours rotated into each image's frame, weighted by the graph. No eigensolve.

    Parameters
    ----------
    graph : cryoden_dist.mfvdm.Graph
        With reflections (``2n`` nodes).
    coefficient_blocks : mapping k -> ndarray, shape (n, q_k)
        Coefficients of frequency ``k`` (mirror nodes get the conjugates).
    client : distributed.Client, optional
        One task per frequency, the graph scattered once; serial without.
    polynomial : tuple of float
        Coefficients of ``lambda, lambda^2, ..`` in ``h`` (no constant term).

    Returns
    -------
    dict k -> ndarray, shape (n, q_k)
    """
    polynomial = tuple(float(c) for c in polynomial)
    if client is None:
        return {k: _polynomial_frequency(graph, k, block, polynomial) for k, block in coefficient_blocks.items()}
    [shared] = client.scatter([graph], broadcast=True)
    scattered = client.scatter(list(coefficient_blocks.values()))  # data to workers, not inside the task graph
    stamp = time.time_ns()
    futures = [
        client.submit(_polynomial_frequency, shared, k, block, polynomial, key=f"mfvdm-polynomial-k{k}-{stamp}")
        for k, block in zip(coefficient_blocks, scattered, strict=True)
    ]
    return dict(zip(coefficient_blocks, gather_in_order(client, futures, "mfvdm-filter"), strict=True))


# ======================================================================================= coefficients
def rerank_by_alignment(
    coeffs: np.ndarray, angular_frequency: np.ndarray, rows: np.ndarray, candidates: np.ndarray, n_neighbors: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the ``n_neighbors`` candidates best correlated with each image after rotational alignment.

    The invariant features rank candidates cheaply but coarsely; the correlation of the aligned denoised
    coefficients (:func:`~cryoden_dist.align.align_pairs`, mirror nodes included) is the finer similarity,
    computed for the few candidates only. Measured on the 70S map (n 10^4, L 65, SNR 0.05, EMPIAR-10028 CTFs):
    of the 50 nearest by features 74.9 % lie within 10 degrees; keeping the best 50 of 150 by correlation: 81.6 %.

    Parameters
    ----------
    coeffs : ndarray, shape (n, count), complex
        Steerable coefficients of all images.
    angular_frequency : ndarray of int, shape (count,)
    rows : ndarray of int, shape (b,)
        The images.
    candidates : ndarray of int, shape (b, C)
        Their candidate nodes ``0 .. 2n-1`` (``j >= n``: mirror of image ``j - n``); repeats count once.
    n_neighbors : int
        Neighbours kept, ``<= C``.

    Returns
    -------
    neighbors : ndarray of int64, shape (b, n_neighbors)
        By decreasing correlation.
    edge_angles : ndarray of float64, shape (b, n_neighbors)
        MFVDM edge angles ``alpha_ij`` (:func:`alignment_to_edge_angles`).
    correlations : ndarray of float64, shape (b, n_neighbors)
    """
    rows = np.asarray(rows, dtype=np.int64)
    candidates = np.asarray(candidates, dtype=np.int64)
    if not 1 <= n_neighbors <= candidates.shape[1]:
        raise ParameterError(f"re-ranking: {n_neighbors} neighbours from {candidates.shape[1]} candidates")
    # A node proposed twice (candidates from two sources) is kept once.
    candidates = np.sort(candidates, axis=1)
    repeated = np.zeros(candidates.shape, dtype=bool)
    repeated[:, 1:] = candidates[:, 1:] == candidates[:, :-1]
    if n_neighbors > int((~repeated).sum(axis=1).min()):
        raise ParameterError(f"re-ranking: fewer than {n_neighbors} distinct candidates for some image")
    pairs_i = np.repeat(rows, candidates.shape[1])
    angles, correlations = align_pairs(coeffs, angular_frequency, pairs_i, candidates.ravel())
    angles, correlations = angles.reshape(candidates.shape), correlations.reshape(candidates.shape)
    correlations = np.where(repeated, -np.inf, correlations)
    order = np.argsort(-correlations, axis=1, kind="stable")[:, :n_neighbors]
    pick = functools.partial(np.take_along_axis, indices=order, axis=1)
    return pick(candidates), alignment_to_edge_angles(pick(angles)), pick(correlations)


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

    def __init__(self, stack: ParticleStack, order: tuple[str, ...], client=None) -> None:
        self.stack = stack
        self.order = order
        self.client = client

    def complete(self, name: str) -> bool:
        return bool(self.stack.info.get("stages", {}).get(name, {}).get("complete"))

    def begin(self, name: str) -> StageStart:
        """Before (re)computing ``name``: drop the records and chunk flags of every later stage."""
        later = self.order[self.order.index(name) + 1 :]
        stages = dict(self.stack.info.get("stages", {}))
        for stage in later:
            stages.pop(stage, None)
            if f"_done/{stage}" in self.stack.group:
                del self.stack.group[f"_done/{stage}"]
        self.stack.update_info(stages=stages)
        return start_stage(self.client)  # the workers' peak memory is measured from here

    def record(self, name: str, params: dict, started: StageStart) -> None:
        record_stage(self.stack, name, params, started)

    def run(self, name: str, params: dict, compute: Callable[[], None]) -> None:
        """Run a non-chunked stage unless complete, and record it."""
        if self.complete(name):
            log.info("stage %s: complete, skipped", name)
            return
        started = self.begin(name)
        compute()
        self.record(name, params, started)

    def run_chunked(
        self, name: str, client, kernel, args: Callable[[], tuple], params: dict, bounds=None, resources=None
    ) -> None:
        """Run a chunked stage (:func:`run_chunks`) unless complete; ``args`` is called only if it runs."""
        if self.complete(name):
            log.info("stage %s: complete, skipped", name)
            return
        self.begin(name)
        run_chunks(client, self.stack, name, kernel, args=args(), bounds=bounds, params=params, resources=resources)


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


def _store_statistics(stack: ParticleStack, group: str, stats: SPCAStatistics) -> None:
    """Write sPCA statistics under ``group`` (a resumed run fits its model from them)."""
    for name, values in stats.to_arrays().items():
        _array(stack, f"{group}/{name}", values.shape, values.dtype)[...] = values


def _load_statistics(stack: ParticleStack, group: str) -> SPCAStatistics:
    stored = stack.group[group]
    return SPCAStatistics.from_arrays({name: stored[name][:] for name in stored.array_keys()})


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


def _fit_features(store: str, coeffs_name: str, angular_frequency: np.ndarray, n_features: int):
    return fit_invariant_features(
        _read(store, coeffs_name), angular_frequency, n_features=n_features, seed=FEATURE_SEED
    )


def _features_chunk(start: int, stop: int, store: str, model, coeffs_name: str, prefix: str) -> dict:
    values, reflected = model.transform(_read(store, coeffs_name, slice(start, stop)))
    return {f"{prefix}features/values": values, f"{prefix}features/reflected": reflected}


def _knn_kernel(start: int, stop: int, store: str, k: int, metric: str, device: str, prefix: str) -> dict:
    """FAISS over all images and their mirror images; the neighbours of images ``start .. stop - 1``."""
    features = _read(store, f"{prefix}features/values")
    reflected = _read(store, f"{prefix}features/reflected")
    neighbors, distances = nearest_neighbors(
        features, k, reflected_features=reflected, metric=metric, device=device, queries=(start, stop)
    )
    return {f"{prefix}features/neighbors": neighbors, f"{prefix}features/distances": distances}


def _align_chunk(
    start: int,
    stop: int,
    store: str,
    angular_frequency: np.ndarray,
    coeffs_name: str,
    prefix: str,
    knn: int,
    extra_candidates: str | None,
) -> dict:
    rows = slice(start, stop)
    candidates = _read(store, f"{prefix}features/neighbors", rows)
    if extra_candidates is not None:
        candidates = np.concatenate([candidates, _read(store, extra_candidates, rows)], axis=1)
    neighbors, angles, correlations = rerank_by_alignment(
        _read(store, coeffs_name), angular_frequency, np.arange(start, stop), candidates, knn
    )
    return {
        f"{prefix}graph/neighbors": neighbors,
        f"{prefix}graph/angles": angles,
        f"{prefix}graph/correlations": correlations,
    }


def _average_chunk(
    start: int, stop: int, store: str, angular_frequency: np.ndarray, previous: str, count: int, name: str
) -> dict:
    """Aligned means with the best ``count`` neighbours of the graph ``<previous>neighbors, angles``."""
    rows = np.arange(start, stop)
    neighbors = _read(store, f"{previous}neighbors", slice(start, stop))[:, :count]
    angles = _read(store, f"{previous}angles", slice(start, stop))[:, :count]
    return {name: aligned_average(_read(store, "coeffs/spca"), angular_frequency, rows, neighbors, angles)}


def _stored_embeddings(store: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    group = zarr.open_group(store, mode="r")
    values, vectors = group["mfvdm/eigenvalues"][:], group["mfvdm/eigenvectors"][:]
    m = values.shape[1]
    return {k + 1: (values[k], vectors[:, k * m : (k + 1) * m]) for k in range(values.shape[0])}


def _refine_chunk(start: int, stop: int, store: str, n_neighbors: int, prefix: str, hop_neighbors: int) -> dict:
    embeddings = _stored_embeddings(store)
    rows = np.arange(start, stop)
    neighbors, affinity, angles = refine_neighbors(
        embeddings, _read(store, f"{prefix}graph/neighbors"), rows, n_neighbors, hop_neighbors=hop_neighbors
    )
    return {"mfvdm/neighbors": neighbors, "mfvdm/affinity": affinity, "mfvdm/angles": angles}


def _class_average_chunk(
    start: int, stop: int, store: str, basis_spec: tuple, model: SteerablePCA | None, ctf: bool, prefix: str
) -> dict:
    """Aligned means of particles ``[start, stop)`` and their neighbours -> ``average/*``."""
    basis = _basis(basis_spec)
    rows = np.arange(start, stop)
    neighbors = _read(store, f"{prefix}graph/neighbors", slice(start, stop))
    angles = _read(store, f"{prefix}graph/angles", slice(start, stop))
    if model is None:
        averaged = aligned_average(_read(store, "coeffs/fb"), basis.angular_frequency, rows, neighbors, angles)
    else:
        reduced = aligned_average(_read(store, "coeffs/spca"), model.angular_frequency, rows, neighbors, angles)
        averaged = model.reconstruct(reduced)
    # K + 1 images of independent noise, weights 1 / (K + 1): the noise variance drops by K + 1.
    out = {
        "average/fb": averaged.astype(np.complex64),
        "average/noise_gain": np.full(rows.size, 1.0 / (neighbors.shape[1] + 1), dtype=np.float32),
    }
    if ctf:
        # Isotropic: the same for every rotation and mirror, a plain mean.
        stored = _read(store, "coeffs/ctf_profile")
        out["average/ctf_profile"] = (stored[rows] + stored[neighbors % len(stored)].sum(axis=1)) / (
            neighbors.shape[1] + 1
        )
    return out


def _post_statistics_chunk(start: int, stop: int, store: str, group: str, basis_spec: tuple) -> dict:
    rows = slice(start, stop)
    return {
        "stats": spca_statistics(_read(store, f"{group}/fb", rows), _basis(basis_spec)),
        "gain_sum": float(_read(store, f"{group}/noise_gain", rows).astype(np.float64).sum()),
    }


def _estimate_images_chunk(
    start: int, stop: int, store: str, group: str, basis_spec: tuple, post, epsilon: float, ctf: bool
) -> dict:
    """Images of the averaged (filtered) coefficients ``<group>/fb``: post-Wiener, then CTF correction."""
    rows = slice(start, stop)
    coeffs = _read(store, f"{group}/fb", rows)
    if post is not None:
        model, mean_gain = post
        coeffs = model.denoise(coeffs, _read(store, f"{group}/noise_gain", rows) / mean_gain)
    profiles = _read(store, f"{group}/ctf_profile", rows) if ctf else None
    return {"images": ctf_corrected_images(_basis(basis_spec), coeffs, profiles, epsilon)}


# ------------------------------------------------------------------------------------- parameters
def _integer(method: str, key: str, value: Any, low: int, high: int | None = None) -> int:
    integer = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not integer or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ParameterError(f"--param {key}={value!r}: method {method} needs an integer {bound}")
    return int(value)


def _boolean(method: str, key: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ParameterError(f"--param {key}={value!r}: method {method} needs true or false")
    return bool(value)


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
    # Only whether the index type has a GPU version: the GPU is looked for on the workers (check_gpu_request),
    # since a cluster's driver (a login node) has none.
    resolve_device(device, choose_method(2 * n), n_gpus=1)
    # Each image needs knn other nodes among the 2n - 2 that are neither itself nor its mirror.
    knn = _integer(method, "knn", params["knn"], 1, max(1, 2 * n - 2))
    candidates = min(3 * knn, max(knn, 2 * n - 2)) if params["candidates"] is None else params["candidates"]
    averaged = params["averaged_candidates"]
    averaged = min(2 * knn, max(knn, 2 * n - 2)) if averaged is None else averaged
    return {
        "radius": radius,
        "bandlimit": _positive_float(method, "bandlimit", bandlimit, 0.0, 0.5),
        "shrinker": _choice(method, "shrinker", params["shrinker"], SHRINKERS),
        "knn": knn,
        "candidates": _integer(method, "candidates", candidates, knn, max(knn, 2 * n - 2)),
        "averaged_candidates": _integer(method, "averaged_candidates", averaged, knn, max(knn, 2 * n - 2)),
        "rounds": _integer(method, "rounds", params["rounds"], 1),
        "average_knn": _integer(method, "average_knn", params["average_knn"], 1, knn),
        "coefficients": _choice(method, "coefficients", params["coefficients"], _COEFFICIENT_INPUTS),
        "post_wiener": _boolean(method, "post_wiener", params["post_wiener"]),
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
    below; 0). ``eig_tol``: ARPACK tolerance (1e-4). ``filter``: ``"diffusion"`` (default), ``"polynomial"`` or
    ``"spectral"``; ``k_filter``: the last frequency filtered (24); ``coefficients``: ``"fb"`` (default) or
    ``"spca"``; ``post_wiener``: true (default) or false (module docstring). ``candidates``: FAISS candidates
    re-ranked by alignment in round 1 (``3 knn``) and ``averaged_candidates`` in the rounds on averaged images
    (``2 knn``); ``rounds``: graph rounds (2); ``average_knn``: neighbours in the round-2
    averages (10). ``ctf_epsilon``: Wiener constant of
    the CTF correction (0.003). ``n_features``: dimension of the invariant features (300). ``edge_weights``:
    ``"uniform"`` (the authors' code, default) or ``"correlation"`` (alignment correlation clipped to
    ``[1e-3, 1]``) for the initial graph. ``hop_neighbors``: MFVDM's candidates are the initial neighbours and
    the neighbours of the best ``hop_neighbors`` of them (10, :data:`HOP_NEIGHBORS`). ``device``: FAISS
    ``"auto"``, ``"cpu"`` or ``"gpu"``.
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
        k_filter=_integer("mfvdm", "k_filter", params["k_filter"], 0),
        hop_neighbors=_integer("mfvdm", "hop_neighbors", params["hop_neighbors"], 1, resolved["knn"]),
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
        self.stages = _Stages(target, order, client)
        state = input_ctf_state(source)
        self.ctf = state == "modulated" and source.has_ctf
        self.basis_spec = (source.box, params["radius"], params["bandlimit"])
        self.basis = _basis(self.basis_spec)
        self.n, self.rows = source.n, source.chunk
        check_gpu_request(client, params["device"])
        target.update_info(images_ctf_state="corrected" if self.ctf else state, phase_flipped=self.ctf)

    def coefficients(self) -> None:
        n, count = self.n, self.basis.count
        _array(self.target, "coeffs/fb", (n, count), np.complex64, self.rows)
        if self.ctf:
            rings = ctf_ring_radii(self.basis.box, self.basis.radius).size
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
            stats = _load_statistics(self.target, group)
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
            _store_statistics(self.target, group, stats)
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

    def through_alignment(self, after_first: Callable[[SteerablePCA], str] | None = None) -> SteerablePCA:
        """Run the shared stages ``coeffs`` .. the last round's ``align`` (each skipped when complete).

        ``after_first(model)`` runs between rounds 1 and 2 and names an array of more candidate neighbours for
        round 2's re-ranking (MFVDM's refined neighbours).
        """
        self.coefficients()
        model = self.spca()
        self.graph_round(model, 1)
        extra = after_first(model) if after_first is not None else None
        for r in range(2, self.params["rounds"] + 1):
            self.graph_round(model, r, extra if r == 2 else None)
        return model

    @property
    def graph_prefix(self) -> str:
        """Where the final graph lives: ``<prefix>graph/neighbors`` etc. of the last round."""
        return round_prefix(self.params["rounds"])

    def graph_round(self, model: SteerablePCA, r: int, extra_candidates: str | None = None) -> None:
        """Round ``r``: (from round 2) average each image with its best neighbours of round ``r - 1``, then
        invariant features, FAISS candidates (plus the nodes of the array ``extra_candidates``) and their
        re-ranking by alignment (module docstring)."""
        previous = f"{round_prefix(r - 1)}graph/"
        knn = self.params["knn"]
        # Averages rank their candidates better: fewer suffice (module docstring).
        candidates = self.params["candidates"] if r == 1 else self.params["averaged_candidates"]
        prefix, names = round_prefix(r), round_stages(r)
        coeffs_name = "coeffs/spca" if r == 1 else f"{prefix}coeffs"
        if r > 1:
            average_knn = self.params["average_knn"]
            _array(self.target, coeffs_name, (self.n, model.count), np.complex64, self.rows)
            self.stages.run_chunked(
                names[0],
                self.client,
                _average_chunk,
                lambda: (self.store, model.angular_frequency, previous, average_knn, coeffs_name),
                params={"average_knn": average_knn},
            )
        features_stage, knn_stage, align_stage = names[-3:]

        def fitted():
            # Fitted on a worker, not the driver: workers run BLAS single-threaded on every backend (the nanny
            # sets the thread variables), the driver's thread count depends on how it was started, and a
            # multi-threaded BLAS rounds differently (measured: 18 feature values off by 1 ulp between SLURM
            # and LocalCluster runs when fitted on the driver).
            features = self.client.submit(
                _fit_features,
                self.store,
                coeffs_name,
                model.angular_frequency,
                self.params["n_features"],
                pure=False,
            ).result()
            for name in ("features/values", "features/reflected"):
                _array(self.target, prefix + name, (self.n, features.n_features), np.float32, self.rows)
            return (self.store, features, coeffs_name, prefix)

        self.stages.run_chunked(
            features_stage,
            self.client,
            _features_chunk,
            fitted,
            params={"n_features": self.params["n_features"], "coefficients": coeffs_name},
        )
        _array(self.target, f"{prefix}features/neighbors", (self.n, candidates), np.int64, self.rows)
        _array(self.target, f"{prefix}features/distances", (self.n, candidates), np.float32, self.rows)
        metric, device = self.params["metric"], self.params["device"]
        self.stages.run_chunked(
            knn_stage,
            self.client,
            _knn_kernel,
            lambda: (self.store, candidates, metric, device, prefix),
            params={"candidates": candidates, "metric": metric, "device": device},
            # One task per worker (at most REFINE_TASKS), each with the whole index: the search splits by rows.
            bounds=coarse_bounds(
                self.n, self.rows, min(REFINE_TASKS, max(1, len(self.client.scheduler_info()["workers"])))
            ),
            resources=knn_resources(self.client, device),
        )
        _array(self.target, f"{prefix}graph/neighbors", (self.n, knn), np.int64, self.rows)
        for name in ("graph/angles", "graph/correlations"):
            _array(self.target, prefix + name, (self.n, knn), np.float64, self.rows)
        self.stages.run_chunked(
            align_stage,
            self.client,
            _align_chunk,
            lambda: (self.store, model.angular_frequency, coeffs_name, prefix, knn, extra_candidates),
            params={
                "knn": knn,
                "coefficients": coeffs_name,
                "extra_candidates": extra_candidates,
                "convention": "A_k(i) = exp(1j k alpha_ij) A_k(j)",
                "positive_frequency_weight": 1,
            },
        )

    def estimate_images(self, group: str, model: SteerablePCA) -> None:
        """Stages ``post-spca`` and ``images`` from the averaged coefficients ``<group>/fb`` (module docstring).

        With ``coefficients="fb"`` and ``post_wiener``, a steerable PCA is fitted on the averaged coefficients at
        their reduced noise level ``sigma^2 g`` (``g`` the mean noise gain ``<group>/noise_gain``), and each image
        is Wiener filtered with its own gain; then the CTF correction.
        """
        post = self.params["post_wiener"] and self.params["coefficients"] == "fb"
        group_stats = "post_spca/statistics"
        if self.stages.complete("post-spca"):
            record = self.target.info["stages"]["post-spca"]["params"]
        else:
            started = self.stages.begin("post-spca")
            record = {"applied": post}
            if post:
                parts = map_chunks(
                    self.client,
                    _post_statistics_chunk,
                    self.source.chunk_bounds(),
                    args=(self.store, group, self.basis_spec),
                    desc="post-spca statistics",
                )
                stats = sum(part["stats"] for part in parts)
                _store_statistics(self.target, group_stats, stats)
                mean_gain = float(sum(part["gain_sum"] for part in parts) / self.n)
                record.update(mean_noise_gain=mean_gain, noise_variance=model.noise_variance * mean_gain)
            self.stages.record("post-spca", record, started)
        fitted = None
        if record["applied"]:
            post_model = fit_spca(
                _load_statistics(self.target, group_stats),
                self.basis,
                record["noise_variance"],
                self.params["shrinker"],
            )
            fitted = (post_model, record["mean_noise_gain"])
            self.target.update_info(post_spca_model=post_model.summary())
        epsilon = self.params["ctf_epsilon"]
        self.stages.run_chunked(
            "images",
            self.client,
            _estimate_images_chunk,
            lambda: (self.store, group, self.basis_spec, fitted, epsilon, self.ctf),
            params={"ctf_epsilon": epsilon, "ctf_corrected": self.ctf, "post_wiener": record["applied"]},
        )

    def graph(self, prefix: str):
        """The graph of round ``prefix`` (:func:`round_prefix`) with its edge weights."""
        weights = None
        if self.params["edge_weights"] == "correlation":
            weights = np.clip(_read(self.store, f"{prefix}graph/correlations"), 1e-3, 1.0)
        neighbors, angles = _read(self.store, f"{prefix}graph/neighbors"), _read(self.store, f"{prefix}graph/angles")
        return build_graph(neighbors, angles, weights, with_reflections=True)


def check_gpu_request(client, device: str) -> None:
    """Fail before any stage when ``device="gpu"`` and no Dask worker's FAISS sees a GPU.

    Raises
    ------
    ParameterError
        Naming the fix: GPU workers (``--gpu-workers``, faiss-gpu on a CUDA node) or another device.
    """
    if device != "gpu":
        return
    counts = client.run(faiss_gpu_count)
    if not any(counts.values()):
        raise ParameterError(
            f"--param device=gpu: FAISS sees no GPU on any of the {len(counts)} Dask workers; start GPU workers "
            "(--gpu-workers, with faiss-gpu installed on a CUDA node) or use device=auto or device=cpu"
        )


def knn_resources(client, device: str) -> dict[str, int] | None:
    """Worker resources of the FAISS stage: ``{"GPU": 1}`` when some worker advertises a GPU (``--gpu-workers``)
    and ``device`` is ``"gpu"`` or ``"auto"``; else None (any worker: a cluster without GPU-tagged workers, e.g.
    a workstation's LocalCluster, where FAISS finds the GPU itself)."""
    if device == "cpu":
        return None
    workers = client.scheduler_info().get("workers", {}).values()
    return {"GPU": 1} if any(worker.get("resources", {}).get("GPU", 0) > 0 for worker in workers) else None


def coarse_bounds(n: int, chunk: int, tasks: int = REFINE_TASKS) -> list[tuple[int, int]]:
    """Row ranges of a stage whose every task reads an ``O(n)`` array (``mfvdm-neighbors``: all eigenvectors).

    About ``tasks`` ranges, each a whole number of ``chunk`` rows (the output arrays' chunks, so no two tasks
    write one chunk); never smaller than one chunk. At n = 10^5 and 65 px (chunks of 1985) the eigenvectors
    (``2n x k_max m`` complex64, 0.8 GB) are then read 8 times instead of 51.

    Parameters
    ----------
    n : int
    chunk : int
    tasks : int

    Returns
    -------
    list of (start, stop)
    """
    per_task = chunk * max(1, -(-n // (tasks * chunk)))
    return [(start, min(start + per_task, n)) for start in range(0, n, per_task)]


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
    run = _Run(source, target, params, client, mfvdm_stages(params["rounds"]))
    n, knn, k_max, m = run.n, params["knn"], params["k_max"], params["m"]

    def refine(model: SteerablePCA) -> str:
        """MFVDM on the round-1 graph: eigenpairs per frequency, then refined neighbours and angles."""

        def eigenpairs() -> None:
            graph = run.graph(round_prefix(1))
            # Single precision: the eigenvectors are stored as complex64, and half the bytes go back to the driver.
            pairs = eigenpairs_per_frequency(
                graph, range(1, k_max + 1), m, client=client, tol=params["eig_tol"], precision="single"
            )
            values = np.stack([pairs[k][0] for k in pairs])
            _array(target, "mfvdm/eigenvalues", (k_max, m), np.float64)[...] = values
            vectors = np.concatenate([pairs[k][1] for k in pairs], axis=1).astype(np.complex64, copy=False)
            del pairs  # the per-frequency copies, before the write adds its own buffers
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
            lambda: (run.store, knn, round_prefix(1), params["hop_neighbors"]),
            bounds=coarse_bounds(n, run.rows),
            params={"knn": knn, "candidates": "two-hop", "hop_neighbors": params["hop_neighbors"], "t": DIFFUSION_TIME},
        )
        return "mfvdm/neighbors"

    model = run.through_alignment(after_first=refine)
    use_spca = params["coefficients"] == "spca"
    frequencies = (
        filtered_frequencies(model.kept) if use_spca else list(range(min(params["k_filter"], run.basis.k_max) + 1))
    )

    def filtered() -> None:
        if params["rounds"] == 1:  # the paper: the graph of MFVDM's neighbours, weighted by their affinity
            graph = build_graph(
                _read(run.store, "mfvdm/neighbors"),
                _read(run.store, "mfvdm/angles"),
                np.clip(_read(run.store, "mfvdm/affinity") / k_max, 1e-6, 1.0),
                with_reflections=True,
            )
        else:  # the last round's graph, built from MFVDM's neighbours
            graph = run.graph(run.graph_prefix)
        coeffs = _read(run.store, "coeffs/spca" if use_spca else "coeffs/fb")
        frequency = model.angular_frequency if use_spca else run.basis.angular_frequency
        blocks = {k: np.ascontiguousarray(coeffs[:, frequency == k]) for k in frequencies}
        width = blocks[0].shape[1]
        # Beside the image's k = 0 block: |H| (isotropic, filtered as a k = 0 quantity) and white-noise probes,
        # whose filtered variance is each image's noise gain sum_j F_ij^2 (k = 0 weights; the phases of k > 0
        # agree along consistent paths, so the same gain is used for every k).
        extra = [_read(run.store, "coeffs/ctf_profile")] if run.ctf else []
        extra.append(np.random.default_rng(NOISE_PROBE_SEED).standard_normal((n, NOISE_PROBES)))
        blocks[0] = np.concatenate([blocks[0], *extra], axis=1)
        blocks = {k: block for k, block in blocks.items() if block.shape[1]}  # nothing to filter: no eigensolve
        if params["filter"] == "spectral":
            result = spectral_filter(graph, blocks, m, params["delta"], client=client, tol=params["eig_tol"])
        else:
            result = polynomial_filter(graph, blocks, client=client, polynomial=FILTER_POLYNOMIALS[params["filter"]])
        image_part = np.zeros((n, coeffs.shape[1]), dtype=np.complex64)
        for k in result:
            image_part[:, frequency == k] = result[k][:, : width if k == 0 else None]
        image_part = model.reconstruct(image_part) if use_spca else image_part
        _array(target, "mfvdm/fb", image_part.shape, np.complex64, run.rows)[...] = image_part
        gain = np.mean(result[0][:, -NOISE_PROBES:].real ** 2, axis=1)
        _array(target, "mfvdm/noise_gain", (n,), np.float32, run.rows)[...] = np.maximum(gain, MIN_NOISE_GAIN)
        if run.ctf:
            profiles = result[0][:, width:-NOISE_PROBES].real.astype(np.float32)
            _array(target, "mfvdm/ctf_profile", profiles.shape, np.float32, run.rows)[...] = profiles

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
    run.estimate_images("mfvdm", model)


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
    run = _Run(source, target, params, client, class_average_stages(params["rounds"]))
    model = run.through_alignment()
    use_spca = params["coefficients"] == "spca"
    _array(target, "average/fb", (run.n, run.basis.count), np.complex64, run.rows)
    _array(target, "average/noise_gain", (run.n,), np.float32, run.rows)
    if run.ctf:
        rings = ctf_ring_radii(run.basis.box, run.basis.radius).size
        _array(target, "average/ctf_profile", (run.n, rings), np.float32, run.rows)
    run.stages.run_chunked(
        "average",
        client,
        _class_average_chunk,
        lambda: (run.store, run.basis_spec, model if use_spca else None, run.ctf, run.graph_prefix),
        params={"coefficients": params["coefficients"], "knn": params["knn"]},
    )
    run.estimate_images("average", model)
