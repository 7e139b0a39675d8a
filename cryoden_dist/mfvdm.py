"""Multi-frequency vector diffusion maps (MFVDM): the graph maths.

Implements the graph core of MFVDM (Fan & Zhao, "Multi-frequency vector
diffusion maps", ICML 2019) and of its denoising filter (Fan & Zhao,
"Cryo-electron microscopy image denoising using multi-frequency vector
diffusion maps", ICIP 2021). Nothing here touches images: the inputs are a
nearest-neighbour graph with in-plane rotation angles on its edges, and (for
the filter) blocks of steerable-basis coefficients, one block per angular
frequency.

Conventions
-----------
Nodes
    ``0 .. n-1`` are the images. With reflections, ``N = 2n`` and node
    ``i + n`` is the mirror image of image ``i`` (reflection ``phi -> -phi``
    in the polar angle of the image plane); without, ``N = n``.
Edge angles
    An edge ``(i, j)`` carries a weight ``w_ij > 0`` and an angle ``alpha_ij``
    (radians) such that the frequency-``k`` coefficients of the two nodes are
    related by ``A_k(i) = exp(1j k alpha_ij) A_k(j)`` ("image ``i`` is image
    ``j`` rotated by ``alpha_ij``"), hence ``alpha_ji = -alpha_ij``. Reflection
    conjugates the coefficients, so it negates the angle: if ``(i, j)`` has
    angle ``alpha``, the mirrored edge ``(i + n, j +- n)`` has ``-alpha``.
    Note the sign: for an expansion ``f(r, phi) = sum_k a_k(r) exp(1j k phi)``,
    rotating ``f`` counter-clockwise by ``beta`` multiplies ``a_k`` by
    ``exp(-1j k beta)``; so ``alpha_ij`` is minus the counter-clockwise angle
    that maps image ``j`` onto image ``i`` when ``A_k`` holds the ``a_k``
    (equivalently, ``alpha_ij`` is that counter-clockwise angle when ``A_k``
    holds the coefficients of ``exp(-1j k phi)``, i.e. ``conj(a_k)``).
Matrices
    ``W_k[i, j] = w_ij exp(1j k alpha_ij)`` (Hermitian, ``N x N``),
    ``D = diag(sum_j w_ij)``, ``S_k = D^-1/2 W_k D^-1/2``, whose spectrum lies
    in ``[-1, 1]``. For a consistent graph (``alpha_ij = theta_i - theta_j``)
    the top eigenvector of ``S_k`` is ``sqrt(d_i) exp(1j k theta_i)``.
Embedding and affinity (ICML 2019, section 3)
    With the top ``m_k`` eigenpairs ``(lambda_kl, u_kl)`` of ``S_k`` (largest
    algebraic), ``V_k^t(i) = (lambda_kl^t u_kl(i))_l``, so
    ``<V_k^t(i), V_k^t(j)> = sum_l lambda_kl^2t u_kl(i) conj(u_kl(j))``, the
    rank-``m_k`` truncation of ``(S_k^2t)[i, j]``: the "lambda^2t weights".
    The affinity of two nodes is ``A_ij = sum_k |<V_k^t(i), V_k^t(j)>| /
    (|V_k^t(i)| |V_k^t(j)|)``, in ``[0, k_max]``: a sum of cosines that are
    each invariant to the unknown phase of every eigenvector. (The authors'
    MATLAB code ranks by the squared moduli with one normalisation of the
    concatenated embedding and ``t = 2``; the per-frequency cosine is the
    paper's normalised form and treats every frequency equally.)
Alignment (ICIP 2021, eq. 5)
    ``alpha_hat_ij = argmax_alpha Re sum_k c_k exp(-1j k alpha)`` with
    ``c_k = <V_k(i), V_k(j)> / |<V_k(i), V_k(j)>|``, which is
    ``exp(1j k alpha_ij)`` on a consistent graph. The trigonometric polynomial
    is evaluated on a zero-padded grid of ``n_grid`` angles (the DFT the paper
    computes with an FFT) and its maximum refined by Newton steps, so the
    result is not limited to the grid. Angles are returned in ``[0, 2 pi)``.
Filter (ICIP 2021, eq. 7)
    For each frequency ``k >= 0`` of the image basis, on the refined graph:
    ``A_hat_k = D^-1/2 U h(Lambda) U* D^1/2 A_k`` with ``(Lambda, U)`` the top
    eigenpairs of ``S_k`` and ``h(lambda) = 2 lambda - lambda^2`` for
    ``lambda >= delta``, 0 below. ``A_k`` is ``[N, q_k]``: rows ``n..2n-1``
    are ``conj`` of rows ``0..n-1`` (:func:`stack_with_reflections`); the first
    ``n`` rows of the result are returned.

Complexity
----------
One sparse Hermitian eigensolve per frequency (``O(nnz m)`` per matrix-vector
block, independent across ``k``, hence one Dask task per ``k``); the exact
neighbour search is ``O(n N sum_k m_k)`` multiply-adds in dense row blocks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh, lobpcg

from .errors import ParameterError

__all__ = [
    "Graph",
    "PlantedGraph",
    "build_graph",
    "connection_matrix",
    "normalized_connection",
    "mirror_real_form",
    "top_eigenpairs",
    "eigenpairs_per_frequency",
    "mfvdm_affinity_neighbors",
    "normalized_embedding",
    "mfvdm_angles",
    "angles_from_products",
    "filter_response",
    "stack_with_reflections",
    "spectral_filter",
    "planted_graph",
    "inplane_angles",
    "viewing_angle_distance",
]

log = logging.getLogger(__name__)

TWO_PI = 2.0 * np.pi
#: Graphs up to this many nodes are solved densely under ``method="auto"`` (ARPACK is faster above ~100 nodes).
DENSE_MAX_NODES = 128
#: Default sparse eigensolver under ``method="auto"``: at N = 2e4, K = 50, m = 50 ARPACK took 6-11 s per frequency,
#: LOBPCG 82 s from a random block and 69 s warm-started from the previous frequency (benchmarks/mfvdm_eigs.py).
DEFAULT_SPARSE_METHOD = "eigsh"
#: Bytes of the dense complex row block used by :func:`mfvdm_affinity_neighbors` when ``batch`` is not given.
AFFINITY_BLOCK_BYTES = 256 * 2**20

Embeddings = Mapping[int, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Graph:
    """An undirected graph with an in-plane angle on every edge (COO, each edge once).

    Attributes
    ----------
    rows, cols : ndarray of int32 or int64, shape (E,)
        End nodes of each edge, ``rows < cols``.
    weights : ndarray of float64, shape (E,)
        Positive edge weights ``w_ij``.
    angles : ndarray of float64, shape (E,)
        ``alpha_ij`` of the edge ``rows -> cols`` in ``[0, 2 pi)``; the reverse
        direction carries ``-alpha_ij``.
    n_nodes : int
        ``N``: ``2 n`` with reflections, ``n`` without.
    n_images : int
        ``n``: the number of images.
    """

    rows: np.ndarray
    cols: np.ndarray
    weights: np.ndarray
    angles: np.ndarray
    n_nodes: int
    n_images: int

    @property
    def n_edges(self) -> int:
        """Number of undirected edges."""
        return int(self.rows.size)

    @property
    def with_reflections(self) -> bool:
        """Whether nodes ``n .. 2n-1`` are the mirrored images."""
        return self.n_nodes == 2 * self.n_images

    def degrees(self) -> np.ndarray:
        """``d_i = sum_j w_ij`` for every node, float64 ``[N]``."""
        return np.bincount(self.rows, self.weights, self.n_nodes) + np.bincount(self.cols, self.weights, self.n_nodes)


def _as_pair_array(values, shape: tuple[int, ...], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.shape != shape:
        raise ParameterError(f"mfvdm: {name} has shape {array.shape}, expected {shape} (one value per neighbour)")
    if not np.all(np.isfinite(array)):
        raise ParameterError(f"mfvdm: {name} contains NaN or infinite values; pass finite numbers")
    return array


def build_graph(
    neighbors: np.ndarray,
    angles: np.ndarray,
    weights: np.ndarray | None = None,
    with_reflections: bool = True,
) -> Graph:
    """Build the symmetrised (and mirrored) MFVDM graph from a kNN table.

    Parameters
    ----------
    neighbors : ndarray of int, shape (n, K)
        ``neighbors[i, l]`` is the ``l``-th neighbour of image ``i``: a node in
        ``0 .. 2n-1`` with reflections (``j >= n`` is the mirror of image
        ``j - n``), in ``0 .. n-1`` without.
    angles : ndarray of float, shape (n, K)
        ``alpha`` of each edge ``(i, neighbors[i, l])`` in radians (module
        conventions).
    weights : ndarray of float, shape (n, K), optional
        Positive edge weights; default 1.
    with_reflections : bool
        Add the mirror nodes ``n .. 2n-1`` and mirror every edge: ``(i, j)``
        with angle ``alpha`` gives ``(i + n, (j + n) mod 2n)`` with ``-alpha``.

    Returns
    -------
    Graph
        Each undirected edge once. An edge listed by both its ends (or by an
        edge and a mirror) is merged: mean weight, circular weighted mean
        angle. Self-loops ``(i, i)`` (a kNN search returning the query) are
        dropped.

    Raises
    ------
    ParameterError
        Shapes disagree, an index is out of range, a weight is not positive.
    """
    neighbors = np.asarray(neighbors)
    if neighbors.ndim != 2 or neighbors.shape[0] < 1 or neighbors.shape[1] < 1:
        raise ParameterError(f"mfvdm: neighbors has shape {neighbors.shape}; expected (n_images, n_neighbors) >= 1")
    if not np.issubdtype(neighbors.dtype, np.integer):
        raise ParameterError(f"mfvdm: neighbors has dtype {neighbors.dtype}; pass integer node indices")
    n_images, n_neighbors = neighbors.shape
    n_nodes = 2 * n_images if with_reflections else n_images
    if neighbors.min() < 0 or neighbors.max() >= n_nodes:
        bad = neighbors[(neighbors < 0) | (neighbors >= n_nodes)].flat[0]
        raise ParameterError(
            f"mfvdm: neighbors contains node {bad}, outside 0..{n_nodes - 1} "
            f"({n_images} images, reflections {'on' if with_reflections else 'off'}); "
            "pass indices of images (and mirrored images n..2n-1 with reflections)"
        )
    angles = _as_pair_array(angles, neighbors.shape, "angles")
    weights = np.ones(neighbors.shape) if weights is None else _as_pair_array(weights, neighbors.shape, "weights")
    if np.any(weights <= 0):
        raise ParameterError("mfvdm: weights must be > 0 (drop the edge instead of giving it weight 0)")

    rows = np.repeat(np.arange(n_images, dtype=np.int64), n_neighbors)
    cols = neighbors.astype(np.int64).ravel()
    alpha = angles.ravel()
    w = weights.ravel()
    if with_reflections:
        rows, cols = np.concatenate([rows, rows + n_images]), np.concatenate([cols, (cols + n_images) % n_nodes])
        alpha, w = np.concatenate([alpha, -alpha]), np.concatenate([w, w])
    keep = rows != cols
    rows, cols, alpha, w = rows[keep], cols[keep], alpha[keep], w[keep]

    # Canonical orientation low -> high: the reverse direction carries the negated angle.
    flip = rows > cols
    low, high = np.where(flip, cols, rows), np.where(flip, rows, cols)
    alpha = np.where(flip, -alpha, alpha)
    keys, inverse, counts = np.unique(low * n_nodes + high, return_inverse=True, return_counts=True)
    merged_weight = np.bincount(inverse, w) / counts
    phase = np.bincount(inverse, w * np.cos(alpha)) + 1j * np.bincount(inverse, w * np.sin(alpha))
    index_dtype = np.int32 if n_nodes < np.iinfo(np.int32).max else np.int64
    return Graph(
        rows=(keys // n_nodes).astype(index_dtype),
        cols=(keys % n_nodes).astype(index_dtype),
        weights=merged_weight,
        angles=np.mod(np.angle(phase), TWO_PI),
        n_nodes=n_nodes,
        n_images=n_images,
    )


def _check_frequency(k) -> int:
    if not isinstance(k, (int, np.integer)) or k < 0:
        raise ParameterError(f"mfvdm: angular frequency k={k!r} must be an integer >= 0")
    return int(k)


def _hermitian_csr(graph: Graph, values: np.ndarray) -> sp.csr_matrix:
    """The Hermitian ``N x N`` matrix with ``values`` on ``(rows, cols)`` and their conjugates on ``(cols, rows)``."""
    data = np.concatenate([values, np.conj(values)])
    rows = np.concatenate([graph.rows, graph.cols])
    cols = np.concatenate([graph.cols, graph.rows])
    return sp.csr_matrix((data, (rows, cols)), shape=(graph.n_nodes, graph.n_nodes))


def connection_matrix(graph: Graph, k: int) -> sp.csr_matrix:
    """``W_k[i, j] = w_ij exp(1j k alpha_ij)``: the frequency-``k`` connection matrix.

    Parameters
    ----------
    graph : Graph
    k : int
        Angular frequency, ``>= 0`` (``k = 0`` gives the weighted adjacency).

    Returns
    -------
    scipy.sparse.csr_matrix of complex128, shape (N, N)
        Hermitian.
    """
    k = _check_frequency(k)
    return _hermitian_csr(graph, graph.weights * np.exp(1j * k * graph.angles))


def normalized_connection(graph: Graph, k: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """``S_k = D^-1/2 W_k D^-1/2`` and the degrees ``d``.

    Parameters
    ----------
    graph : Graph
    k : int
        Angular frequency, ``>= 0``.

    Returns
    -------
    S : scipy.sparse.csr_matrix of complex128, shape (N, N)
        Hermitian, spectrum in ``[-1, 1]``. Rows of isolated nodes are zero.
    d : ndarray of float64, shape (N,)
        Degrees ``sum_j w_ij``.
    """
    k = _check_frequency(k)
    d = graph.degrees()
    inv_sqrt = _inverse_sqrt(d)
    values = graph.weights * inv_sqrt[graph.rows] * inv_sqrt[graph.cols] * np.exp(1j * k * graph.angles)
    return _hermitian_csr(graph, values), d


def _inverse_sqrt(d: np.ndarray) -> np.ndarray:
    # Isolated nodes (degree 0) get a zero row rather than a division by zero.
    out = np.zeros_like(d)
    np.divide(1.0, np.sqrt(d), out=out, where=d > 0)
    return out


def _check_m(m, n_nodes: int) -> int:
    if not isinstance(m, (int, np.integer)) or not 1 <= m < n_nodes:
        raise ParameterError(f"mfvdm: number of eigenpairs m={m!r} must be an integer in 1..{n_nodes - 1} (N - 1)")
    return int(m)


def _random_start(rng: np.random.Generator, shape: tuple[int, ...], complex_: bool) -> np.ndarray:
    start = rng.standard_normal(shape)
    if complex_:
        start = start + 1j * rng.standard_normal(shape)
    return start


def top_eigenpairs(
    S,
    m: int,
    method: str = "auto",
    tol: float = 1e-6,
    maxiter: int | None = None,
    seed: int = 0,
    start: np.ndarray | None = None,
    mirrored: bool = False,
    precision: str = "double",
) -> tuple[np.ndarray, np.ndarray]:
    """The ``m`` largest (algebraic) eigenpairs of a Hermitian matrix.

    Parameters
    ----------
    S : sparse matrix or ndarray, shape (N, N)
        Hermitian (real symmetric matrices, e.g. ``S_0``, use the real solver).
    m : int
        Number of eigenpairs, ``1 <= m < N``.
    method : {"auto", "eigsh", "lobpcg", "dense"}
        ``"eigsh"``: ARPACK (implicitly restarted Lanczos/Arnoldi) through
        :func:`scipy.sparse.linalg.eigsh`; ``"lobpcg"``: block LOBPCG with a
        random block of ``m + max(5, m // 4)`` columns; ``"dense"``:
        :func:`numpy.linalg.eigh`; ``"auto"``: dense up to
        :data:`DENSE_MAX_NODES` nodes or when ``m > N / 4``, else
        :data:`DEFAULT_SPARSE_METHOD`.
    tol : float
        Convergence tolerance, in each solver's own sense (ARPACK: relative
        accuracy of the Ritz values; LOBPCG: residual norms).
    maxiter : int, optional
        Iteration limit (ARPACK restarts / LOBPCG iterations).
    seed : int
        Seed of the random start vector(s), so results are reproducible.
    start : ndarray, shape (N, b), optional
        LOBPCG warm start: columns placed first in the start block.
    mirrored : bool
        ``S`` is the matrix of a graph over images and their mirror images (:func:`build_graph` with
        reflections): when it is complex, the equivalent real symmetric problem of the same size is solved instead
        (:func:`mirror_real_form`; ARPACK has no complex Hermitian mode, so a complex ``S`` takes its general
        Arnoldi path: measured 2.2 x slower at N = 20000, m = 50). The eigenvectors returned have the form
        ``(u, conj(u))``.
    precision : {"double", "single"}
        Arithmetic of the ``"eigsh"`` solve: ``"single"`` runs ARPACK in single precision (float32 matrix and
        vectors; the eigenvectors come back complex64/float32), for callers that store them in single precision
        anyway and a ``tol`` well above float32's 1e-7. Measured on one mirrored ``S_k`` (N = 20000, m = 50,
        tol 1e-4): 1.62 s -> 1.19 s, eigenvalues within 2.5e-6 of the double-precision ones. Other methods
        ignore it.

    Returns
    -------
    eigenvalues : ndarray of float64, shape (m,)
        Descending.
    eigenvectors : ndarray, shape (N, m)
        Orthonormal columns, in the same order.

    Notes
    -----
    ARPACK builds one Krylov space from one start vector, so of an *exactly*
    repeated eigenvalue it returns a single eigenvector. On MFVDM graphs this
    happens only when a connected component does not touch its own mirror
    (the component and its mirror are then isospectral); a kNN graph over
    images and their reflections is normally connected. Use ``"lobpcg"`` or
    ``"dense"`` for graphs with such components.
    """
    n_nodes = S.shape[0]
    m = _check_m(m, n_nodes)
    if precision not in ("double", "single"):
        raise ParameterError(f"mfvdm: precision={precision!r}; use 'double' or 'single'")
    if method == "auto":
        method = "dense" if n_nodes <= DENSE_MAX_NODES or 4 * m > n_nodes else DEFAULT_SPARSE_METHOD
    if method not in ("eigsh", "lobpcg", "dense"):
        raise ParameterError(f"mfvdm: eigensolver method={method!r}; use 'auto', 'eigsh', 'lobpcg' or 'dense'")
    S = _real_if_possible(S)
    if mirrored and np.iscomplexobj(S):  # a real S (k = 0) is solved as it is
        values, vectors = top_eigenpairs(
            mirror_real_form(S),
            m,
            method,
            tol,
            maxiter,
            seed,
            None if start is None else _real_form_vectors(start),
            precision=precision,
        )
        return values, _mirror_vectors(vectors)
    complex_ = np.iscomplexobj(S)
    rng = np.random.default_rng(seed)
    if method == "dense":
        dense = S.toarray() if sp.issparse(S) else np.asarray(S)
        values, vectors = np.linalg.eigh(dense)
        values, vectors = values[::-1][:m], vectors[:, ::-1][:, :m]
    elif method == "eigsh":
        if m >= n_nodes - 1:
            raise ParameterError(f"mfvdm: eigsh needs m < N - 1 = {n_nodes - 1}; use method='dense' for m={m}")
        v0 = _random_start(rng, (n_nodes,), complex_)
        if precision == "single":
            S, v0 = (
                S.astype(np.complex64 if complex_ else np.float32),
                v0.astype(np.complex64 if complex_ else np.float32),
            )
        values, vectors = eigsh(S, k=m, which="LA", tol=tol, maxiter=maxiter, v0=v0)
    else:
        block = min(m + max(5, m // 4), n_nodes // 3)
        if block < m:
            raise ParameterError(f"mfvdm: lobpcg needs m <= N / 3 (m={m}, N={n_nodes}); use method='dense'")
        initial = _random_start(rng, (n_nodes, block), complex_)
        if start is not None:
            columns = min(block, start.shape[1])
            initial[:, :columns] = start[:, :columns]
        values, vectors = lobpcg(S, initial, tol=tol, maxiter=maxiter or 500, largest=True)
    order = np.argsort(values)[::-1][:m]
    return np.asarray(values[order], dtype=np.float64), vectors[:, order]


def mirror_real_form(S) -> sp.csr_matrix:
    """The real symmetric matrix with the spectrum of a mirrored graph's Hermitian ``S`` (same size ``2n``).

    Nodes ``n + j`` mirror nodes ``j`` (:func:`build_graph`), so ``S = [[A, B], [conj(B), conj(A)]]`` with ``A``
    Hermitian and ``B`` symmetric. ``S`` commutes with ``(x, y) -> (conj(y), conj(x))``, so its eigenvectors can
    be taken as ``(u, conj(u))``; with ``u = a + i b``, ``S (u, conj(u)) = lambda (u, conj(u))`` is
    ``R (a, b) = lambda (a, b)`` for
    ``R = [[Re A + Re B, Im B - Im A], [Im A + Im B, Re A - Re B]]``, real symmetric of size ``2n``.

    Parameters
    ----------
    S : sparse matrix or ndarray, shape (2n, 2n)

    Returns
    -------
    scipy.sparse.csr_matrix of float64, shape (2n, 2n)
    """
    S = sp.csr_matrix(S)
    if S.shape[0] % 2:
        raise ParameterError(f"mfvdm: a mirrored graph has an even number of nodes, not {S.shape[0]}")
    n = S.shape[0] // 2
    A, B = S[:n, :n], S[:n, n:]
    return sp.bmat([[A.real + B.real, B.imag - A.imag], [A.imag + B.imag, A.real - B.real]], format="csr")


def _mirror_vectors(real_vectors: np.ndarray) -> np.ndarray:
    """Eigenvectors ``(a, b)`` of :func:`mirror_real_form` -> unit eigenvectors ``(u, conj(u)) / sqrt(2)`` of S."""
    n = real_vectors.shape[0] // 2
    u = real_vectors[:n] + 1j * real_vectors[n:]  # complex64 from float32 vectors
    u /= np.sqrt(2)  # in place: keeps the precision
    return np.concatenate([u, u.conj()])


def _real_form_vectors(vectors: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_mirror_vectors` (for warm starts): ``(u, conj(u)) / sqrt(2)`` -> ``(Re u, Im u)``."""
    n = vectors.shape[0] // 2
    u = vectors[:n] * np.sqrt(2)
    return np.concatenate([u.real, u.imag])


def _real_if_possible(S):
    """``S`` as a real matrix when its imaginary part is zero (k = 0): real solvers are about twice as fast."""
    if not np.iscomplexobj(S):
        return S
    data = S.data if sp.issparse(S) else S
    return S.real if not np.any(data.imag) else S


def filter_response(eigenvalues: np.ndarray, delta: float) -> np.ndarray:
    """``h(lambda) = 2 lambda - lambda^2`` for ``lambda >= delta``, 0 below (ICIP 2021, eq. 7).

    ``1 - h = (1 - lambda)^2``: the operator ``I - (I - S)^2``, a
    second-order correction of one diffusion step that passes eigenvalues
    near 1 (signals consistent over the graph) almost unchanged.
    """
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    return np.where(eigenvalues >= delta, 2.0 * eigenvalues - eigenvalues**2, 0.0)


def stack_with_reflections(A: np.ndarray) -> np.ndarray:
    """``[A; conj(A)]``: the coefficients of the ``2n`` nodes (mirror nodes carry the conjugates)."""
    A = np.asarray(A)
    return np.concatenate([A, np.conj(A)], axis=0)


def _m_for(m: int | Mapping[int, int], k: int) -> int:
    if isinstance(m, Mapping):
        if k not in m:
            raise ParameterError(f"mfvdm: no number of eigenpairs given for frequency k={k}; add it to m")
        return m[k]
    return m


def _frequencies(ks: Iterable[int], minimum: int) -> list[int]:
    ks = [_check_frequency(k) for k in ks]
    if not ks:
        raise ParameterError("mfvdm: no angular frequencies given; pass k = 1..k_max with k_max >= 1")
    if min(ks) < minimum:
        raise ParameterError(f"mfvdm: frequencies must be >= {minimum} here (got {min(ks)})")
    if len(set(ks)) != len(ks):
        raise ParameterError(f"mfvdm: repeated angular frequencies in {ks}")
    return ks


def _frequency_eigenpairs(
    graph: Graph, k: int, m: int, method: str, tol: float, precision: str
) -> tuple[np.ndarray, np.ndarray]:
    started = time.perf_counter()
    S, _ = normalized_connection(graph, k)
    result = top_eigenpairs(S, m, method=method, tol=tol, seed=k, mirrored=graph.with_reflections, precision=precision)
    log.debug("mfvdm: k=%d, %d eigenpairs of %d nodes in %.2f s", k, m, graph.n_nodes, time.perf_counter() - started)
    return result


def _per_frequency(client, task: Callable, graph: Graph, per_k_args: Mapping[int, tuple], desc: str) -> dict:
    """Run ``task(graph, k, *args)`` for every ``k``: serially, or one Dask task per ``k`` with the graph sent once."""
    if client is None:
        return {k: task(graph, k, *args) for k, args in per_k_args.items()}
    from .pipeline import gather_in_order

    [shared_graph] = client.scatter([graph], broadcast=True)
    # Array arguments (coefficient blocks) go to the workers as data, not inside the task graph.
    scattered = {
        k: [client.scatter(arg) if isinstance(arg, np.ndarray) else arg for arg in args]
        for k, args in per_k_args.items()
    }
    stamp = time.time_ns()
    futures = [
        client.submit(task, shared_graph, k, *scattered[k], key=f"{desc}-k{k}-{stamp}", pure=False) for k in per_k_args
    ]
    return dict(zip(per_k_args, gather_in_order(client, futures, desc), strict=True))


def eigenpairs_per_frequency(
    graph: Graph,
    ks: Iterable[int],
    m: int | Mapping[int, int],
    client=None,
    method: str = "auto",
    tol: float = 1e-6,
    precision: str = "double",
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Top eigenpairs of ``S_k`` for every frequency ``k``, each an independent task.

    Parameters
    ----------
    graph : Graph
    ks : iterable of int
        Frequencies (``1 .. k_max`` for the embedding; ``0`` is allowed).
    m : int or mapping k -> int
        Eigenpairs per frequency (``m_k``).
    client : distributed.Client, optional
        With a client, one task per ``k`` (the graph is scattered to the
        workers once); without, the frequencies run one after the other.
    method, tol, precision
        See :func:`top_eigenpairs`.

    Returns
    -------
    dict k -> (eigenvalues [m_k] descending, eigenvectors [N, m_k])
    """
    ks = _frequencies(ks, minimum=0)
    per_k = {k: (_check_m(_m_for(m, k), graph.n_nodes), method, tol, precision) for k in ks}
    return _per_frequency(client, _frequency_eigenpairs, graph, per_k, "mfvdm-eigs")


def _check_embeddings(embeddings: Embeddings) -> tuple[list[int], int]:
    if not embeddings:
        raise ParameterError("mfvdm: no embeddings given; compute eigenpairs for k = 1..k_max with k_max >= 1")
    ks = sorted(embeddings)
    n_nodes = {np.shape(embeddings[k][1])[0] for k in ks}
    if len(n_nodes) != 1:
        raise ParameterError(f"mfvdm: eigenvectors of the frequencies have different node counts {sorted(n_nodes)}")
    for k in ks:
        values, vectors = embeddings[k]
        if np.ndim(vectors) != 2 or np.shape(values) != (np.shape(vectors)[1],):
            raise ParameterError(f"mfvdm: embedding k={k} is not (eigenvalues [m], eigenvectors [N, m])")
    return ks, n_nodes.pop()


def _diffusion_weights(eigenvalues: np.ndarray, t: float) -> np.ndarray:
    # |lambda|^t: for integer t the inner products carry lambda^2t exactly, and a non-integer t stays real.
    return np.abs(np.asarray(eigenvalues, dtype=np.float64)) ** t


def _unit_rows(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    out = np.zeros_like(X)
    np.divide(X, norms, out=out, where=norms > 0)
    return out


def normalized_embedding(eigenvalues: np.ndarray, eigenvectors: np.ndarray, t: float = 1) -> np.ndarray:
    """Rows ``V_k^t(i) / ||V_k^t(i)||`` of the frequency-k diffusion embedding.

    ``V_k^t(i) = (|lambda_l|^t u_l(i))_l``; all-zero rows stay zero.
    """
    return _unit_rows(np.asarray(eigenvectors) * _diffusion_weights(eigenvalues, t))


def mfvdm_affinity_neighbors(
    embeddings: Embeddings,
    n_images: int,
    n_neighbors: int,
    t: float = 1,
    batch: int | None = None,
    client=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact MFVDM nearest neighbours of every image (ICML 2019).

    Parameters
    ----------
    embeddings : mapping k -> (eigenvalues [m_k], eigenvectors [N, m_k])
        Top eigenpairs of ``S_k`` for ``k = 1 .. k_max``
        (:func:`eigenpairs_per_frequency`).
    n_images : int
        ``n``; ``N`` must be ``n`` or ``2n`` (with reflections).
    n_neighbors : int
        ``K`` neighbours per image.
    t : float
        Diffusion time: the inner products carry ``lambda^2t``.
    batch : int, optional
        Image rows per dense block; default so that a ``[batch, N]`` complex
        block takes :data:`AFFINITY_BLOCK_BYTES`. Memory is
        ``O(batch N + N sum_k m_k)`` (per worker with a client).
    client : distributed.Client, optional
        Split the images into row ranges, one Dask task each (the normalised
        embeddings are sent to every worker once); serial without.

    Returns
    -------
    neighbors : ndarray of int64, shape (n, K)
        For image ``i``, the nodes ``j`` (in ``0 .. N-1``; ``j >= n`` is the
        mirror of image ``j - n``) with the ``K`` largest affinities, ``i``
        and ``i + n`` excluded, by decreasing affinity.
    affinity : ndarray of float64, shape (n, K)
        ``A_ij = sum_k |<V_k^t(i), V_k^t(j)>| / (|V_k^t(i)| |V_k^t(j)|)``.

    Notes
    -----
    Exact: every image is compared with every node, ``O(n N sum_k m_k)``
    complex multiply-adds done as one matrix product per block and frequency
    (about 3-5e9 per second and core, so ~1 core-hour for ``n = 1e5``,
    ``N = 2e5``, ``sum_k m_k = 500``; the row ranges parallelise perfectly).
    """
    ks, n_nodes = _check_embeddings(embeddings)
    if n_nodes not in (n_images, 2 * n_images):
        raise ParameterError(f"mfvdm: eigenvectors have {n_nodes} rows; expected n_images={n_images} or 2*n_images")
    excluded = 2 if n_nodes == 2 * n_images else 1
    if not isinstance(n_neighbors, (int, np.integer)) or not 1 <= n_neighbors <= n_nodes - excluded:
        raise ParameterError(f"mfvdm: n_neighbors={n_neighbors!r} must be in 1..{n_nodes - excluded}")
    if t < 0:
        raise ParameterError(f"mfvdm: diffusion time t={t} must be >= 0")
    if batch is None:
        batch = max(1, AFFINITY_BLOCK_BYTES // (16 * n_nodes))
    unit = [normalized_embedding(*embeddings[k], t) for k in ks]
    if client is None:
        return _affinity_rows(unit, n_images, n_neighbors, 0, n_images, batch)
    from .pipeline import gather_in_order

    n_tasks = min(-(-n_images // batch), 4 * max(1, len(client.scheduler_info()["workers"])))
    bounds = np.linspace(0, n_images, n_tasks + 1).astype(int)
    [shared_unit] = client.scatter([unit], broadcast=True)
    stamp = time.time_ns()
    futures = [
        client.submit(
            _affinity_rows, shared_unit, n_images, n_neighbors, start, stop, batch, key=f"mfvdm-knn-{start}-{stamp}"
        )
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    parts = gather_in_order(client, futures, "mfvdm-knn")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _affinity_rows(
    unit: list[np.ndarray], n_images: int, n_neighbors: int, start: int, stop: int, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``K`` affinities of images ``start:stop`` against all nodes, ``batch`` rows at a time."""
    n_nodes = unit[0].shape[0]
    unit_h = [np.ascontiguousarray(Y.conj().T) for Y in unit]
    neighbors = np.empty((stop - start, n_neighbors), dtype=np.int64)
    affinity = np.empty((stop - start, n_neighbors), dtype=np.float64)
    for first in range(start, stop, batch):
        last = min(first + batch, stop)
        block = np.zeros((last - first, n_nodes))
        for Y, Yh in zip(unit, unit_h, strict=True):
            block += np.abs(Y[first:last] @ Yh)
        rows = np.arange(last - first)
        block[rows, first + rows] = -np.inf  # the image itself
        if n_nodes == 2 * n_images:
            block[rows, first + rows + n_images] = -np.inf  # its own mirror
        top = np.argpartition(-block, n_neighbors - 1, axis=1)[:, :n_neighbors]
        values = np.take_along_axis(block, top, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")
        neighbors[first - start : last - start] = np.take_along_axis(top, order, axis=1)
        affinity[first - start : last - start] = np.take_along_axis(values, order, axis=1)
    return neighbors, affinity


def mfvdm_angles(
    embeddings: Embeddings,
    i: np.ndarray,
    j: np.ndarray,
    t: float = 1,
    n_grid: int = 256,
    batch: int = 2**15,
) -> np.ndarray:
    """MFVDM in-plane angles of node pairs (ICIP 2021, eq. 5).

    Parameters
    ----------
    embeddings : mapping k -> (eigenvalues [m_k], eigenvectors [N, m_k])
    i, j : array_like of int
        Node pairs (broadcast together).
    t : float
        Diffusion time (weights ``lambda^2t``).
    n_grid : int
        Points of the zero-padded DFT grid searched before the Newton
        refinement; must exceed ``2 k_max`` so the grid resolves every lobe.
    batch : int
        Pairs per block (memory ``O(batch n_grid)``).

    Returns
    -------
    ndarray of float64
        ``alpha_hat_ij`` in ``[0, 2 pi)``, the shape of ``broadcast(i, j)``.
    """
    ks, n_nodes = _check_embeddings(embeddings)
    if min(ks) < 1:
        raise ParameterError("mfvdm: alignment uses frequencies k >= 1; leave k = 0 out of the embeddings")
    i, j = np.broadcast_arrays(np.asarray(i), np.asarray(j))
    if i.size and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= n_nodes):
        raise ParameterError(f"mfvdm: node pairs must index 0..{n_nodes - 1}")
    if n_grid <= 2 * max(ks):
        raise ParameterError(f"mfvdm: n_grid={n_grid} must exceed 2 k_max = {2 * max(ks)}")
    weighted = [embeddings[k][1] * _diffusion_weights(embeddings[k][0], t) ** 2 for k in ks]
    vectors = [embeddings[k][1] for k in ks]
    flat_i, flat_j = i.ravel(), j.ravel()
    out = np.empty(flat_i.size)
    for start in range(0, flat_i.size, batch):
        a, b = flat_i[start : start + batch], flat_j[start : start + batch]
        products = np.stack(
            [np.einsum("pl,pl->p", X[a], np.conj(U[b])) for X, U in zip(weighted, vectors, strict=True)], 1
        )
        out[start : start + batch] = angles_from_products(products, ks, n_grid)
    return out.reshape(i.shape)


def angles_from_products(products: np.ndarray, frequencies, n_grid: int = 256) -> np.ndarray:
    """The angle of ICIP 2021 eq. 5 from each pair's per-frequency inner products.

    ``alpha_hat = argmax_alpha Re sum_k c_k / |c_k| exp(-1j k alpha)`` with
    ``c_k = sum_l lambda_l^2t u_l(i) conj(u_l(j))``; any positive factor per pair and frequency (e.g. unit-norm
    embedding rows) leaves it unchanged.

    Parameters
    ----------
    products : ndarray, shape (p, len(frequencies)), complex
        ``c_k`` of each pair.
    frequencies : sequence of int
        The ``k`` of the columns (``>= 1``).
    n_grid : int
        Points of the grid searched before the Newton refinement; must exceed ``2 max(k)``.

    Returns
    -------
    ndarray of float64, shape (p,)
        In ``[0, 2 pi)``.
    """
    freqs = np.asarray(frequencies, dtype=np.float64)
    if n_grid <= 2 * freqs.max():
        raise ParameterError(f"mfvdm: n_grid={n_grid} must exceed 2 k_max = {2 * int(freqs.max())}")
    grid = TWO_PI * np.arange(n_grid) / n_grid
    cos_grid, sin_grid = np.cos(np.outer(freqs, grid)), np.sin(np.outer(freqs, grid))
    c = np.asarray(products, dtype=np.complex128)
    modulus = np.abs(c)
    c = np.divide(c, modulus, out=np.zeros_like(c), where=modulus > 0)  # c_k / |c_k|
    # Re sum_k c_k exp(-1j k alpha) = sum_k Re(c_k) cos(k alpha) + Im(c_k) sin(k alpha): the zero-padded DFT of
    # c over k as one real matrix product (k_max << log2(n_grid) would be needed for an FFT to be cheaper).
    score = c.real @ cos_grid + c.imag @ sin_grid
    alpha = grid[np.argmax(score, axis=1)]
    return np.mod(_newton_maximum(c, freqs, alpha, TWO_PI / n_grid), TWO_PI)


def _newton_maximum(c: np.ndarray, freqs: np.ndarray, alpha: np.ndarray, spacing: float, steps: int = 4) -> np.ndarray:
    """Refine grid maxima of ``f(alpha) = Re sum_k c_k exp(-1j k alpha)`` by Newton steps (kept within the cell)."""
    lower, upper = alpha - spacing, alpha + spacing
    for _ in range(steps):
        phase = np.exp(-1j * np.outer(alpha, freqs)) * c
        slope = np.sum(freqs * phase.imag, axis=1)  # f'(alpha) = sum_k k Im(c_k exp(-1j k alpha))
        curvature = -np.sum(freqs**2 * phase.real, axis=1)  # f''
        step = np.zeros_like(alpha)
        np.divide(-slope, curvature, out=step, where=curvature < 0)
        alpha = np.clip(alpha + step, lower, upper)
    return alpha


def _filter_frequency(
    graph: Graph, k: int, coefficients: np.ndarray, m: int, delta: float, method: str, tol: float
) -> np.ndarray:
    S, d = normalized_connection(graph, k)
    eigenvalues, U = top_eigenpairs(S, m, method=method, tol=tol, seed=k, mirrored=graph.with_reflections)
    nodes = stack_with_reflections(coefficients) if graph.with_reflections else np.asarray(coefficients)
    projected = U.conj().T @ (np.sqrt(d)[:, None] * nodes)
    filtered = _inverse_sqrt(d)[: graph.n_images, None] * (
        U[: graph.n_images] @ (filter_response(eigenvalues, delta)[:, None] * projected)
    )
    return filtered.astype(np.result_type(coefficients.dtype, U.dtype), copy=False)


def spectral_filter(
    graph: Graph,
    coefficient_blocks: Mapping[int, np.ndarray],
    m: int | Mapping[int, int],
    delta: float,
    client=None,
    method: str = "auto",
    tol: float = 1e-6,
) -> dict[int, np.ndarray]:
    """MFVDM denoising filter (ICIP 2021, eq. 7), one frequency per task.

    Parameters
    ----------
    graph : Graph
        The refined graph (weights and MFVDM angles).
    coefficient_blocks : mapping k -> ndarray, shape (n, q_k)
        Steerable-basis coefficients of angular frequency ``k >= 0`` of the
        ``n`` images (module sign convention); the mirror nodes get their
        conjugates.
    m : int or mapping k -> int
        Eigenpairs per frequency.
    delta : float
        Eigenvalues below ``delta`` are discarded (``h = 0``).
    client : distributed.Client, optional
        One task per ``k`` (graph scattered once); serial without.
    method, tol
        See :func:`top_eigenpairs`.

    Returns
    -------
    dict k -> ndarray, shape (n, q_k)
        ``D^-1/2 U h(Lambda) U* D^1/2 A_k``, first ``n`` rows.
    """
    ks = _frequencies(coefficient_blocks, minimum=0)
    per_k = {}
    for k in ks:
        block = np.asarray(coefficient_blocks[k])
        if block.ndim != 2 or block.shape[0] != graph.n_images:
            raise ParameterError(
                f"mfvdm: coefficient block k={k} has shape {block.shape}; expected ({graph.n_images}, q_k)"
            )
        per_k[k] = (block, _check_m(_m_for(m, k), graph.n_nodes), float(delta), method, tol)
    return _per_frequency(client, _filter_frequency, graph, per_k, "mfvdm-filter")


# --- The random graph model of Fan & Zhao (ICML 2019, section 5): planted rotations, kNN and outliers. ---


@dataclass(frozen=True)
class PlantedGraph:
    """A kNN table with known truth, for validating MFVDM without images.

    Attributes
    ----------
    neighbors, angles, weights : ndarray, shape (n, K)
        Input of :func:`build_graph`.
    is_true : ndarray of bool, shape (n, K)
        Whether the edge is one of the true nearest neighbours (else an outlier
        with a random node and a random angle).
    rotations : ndarray of float64, shape (N, 3, 3)
        Rotation of every node; mirror nodes ``i + n`` have ``R_i diag(1, -1, -1)``.
    """

    neighbors: np.ndarray
    angles: np.ndarray
    weights: np.ndarray
    is_true: np.ndarray
    rotations: np.ndarray


def inplane_angles(rotations: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """``alpha_ij``: the in-plane angle of ``R_i^T R_j`` projected on rotations about z, in ``[0, 2 pi)``.

    For nodes with close viewing directions, image ``i`` (projection along
    ``R_i e_z``) is image ``j`` rotated by this angle (module conventions);
    it negates under mirroring (``R -> R diag(1, -1, -1)``).
    """
    Ri, Rj = rotations[i], rotations[j]
    Q = np.einsum("...ba,...bc->...ac", Ri, Rj)
    return np.mod(np.arctan2(Q[..., 1, 0] - Q[..., 0, 1], Q[..., 0, 0] + Q[..., 1, 1]), TWO_PI)


def viewing_angle_distance(rotations: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Angle in radians between the viewing directions ``R e_z`` of nodes ``i`` and ``j``."""
    cosine = np.einsum("...a,...a->...", rotations[i][..., 2], rotations[j][..., 2])
    return np.arccos(np.clip(cosine, -1.0, 1.0))


def planted_graph(
    n_images: int,
    n_neighbors: int,
    outlier_fraction: float = 0.3,
    angle_noise: float = 0.0,
    with_reflections: bool = True,
    seed: int = 0,
) -> PlantedGraph:
    """Random graph model: uniform rotations, true kNN by viewing direction, random outliers.

    Every image ``i`` gets a uniformly random rotation ``R_i``; with
    reflections the mirror node ``i + n`` is the projection for
    ``R_i diag(1, -1, -1)`` (the antipodal direction). Each image is linked to
    its ``K`` nearest nodes by viewing direction (itself and its mirror
    excluded) with the planted angle :func:`inplane_angles` plus Gaussian
    noise of standard deviation ``angle_noise``; then a fraction
    ``outlier_fraction`` of the edges is replaced by a random node with a
    uniformly random angle.

    Parameters
    ----------
    n_images, n_neighbors : int
    outlier_fraction : float
        In ``[0, 1]``.
    angle_noise : float
        Radians.
    with_reflections : bool
    seed : int

    Returns
    -------
    PlantedGraph
    """
    from scipy.spatial import cKDTree
    from scipy.spatial.transform import Rotation

    if not 0.0 <= outlier_fraction <= 1.0:
        raise ParameterError(f"mfvdm: outlier_fraction={outlier_fraction} must be in [0, 1]")
    n_nodes = 2 * n_images if with_reflections else n_images
    excluded = 2 if with_reflections else 1
    if not 1 <= n_neighbors <= n_nodes - excluded:
        raise ParameterError(f"mfvdm: n_neighbors={n_neighbors} must be in 1..{n_nodes - excluded}")
    rng = np.random.default_rng(seed)
    rotations = Rotation.random(n_images, random_state=rng).as_matrix()
    if with_reflections:
        rotations = np.concatenate([rotations, rotations * np.array([1.0, -1.0, -1.0])])
    directions = rotations[:, :, 2]
    # Chordal and angular distance order the same on the sphere; query K + 2 to drop i and i + n.
    _, nearest = cKDTree(directions).query(directions[:n_images], k=n_neighbors + excluded)
    own = np.arange(n_images)[:, None]
    keep = (nearest != own) & (nearest != own + n_images if with_reflections else True)
    # Stable argsort keeps distance order and moves the dropped columns last.
    nearest = np.take_along_axis(nearest, np.argsort(~keep, axis=1, kind="stable"), axis=1)[:, :n_neighbors]

    angles = inplane_angles(rotations, own, nearest) + angle_noise * rng.standard_normal(nearest.shape)
    is_true = rng.random(nearest.shape) >= outlier_fraction
    random_nodes = rng.integers(0, n_nodes - 1, size=nearest.shape)
    random_nodes = random_nodes + (random_nodes >= own)  # never the image itself
    neighbors = np.where(is_true, nearest, random_nodes)
    angles = np.where(is_true, angles, rng.uniform(0.0, TWO_PI, nearest.shape))
    return PlantedGraph(
        neighbors=neighbors.astype(np.int64),
        angles=np.mod(angles, TWO_PI),
        weights=np.ones(nearest.shape),
        is_true=is_true,
        rotations=rotations,
    )
