"""Approximate nearest neighbours of particle features with FAISS.

MFVDM builds its graph from the ``k`` nearest neighbours of every image in a
rotation-invariant feature space, optionally among the reflected images too.
This module wraps FAISS so that the same call runs exactly (``IndexFlat``) on
small stacks and approximately (IVF-Flat or HNSW, with the search breadth tuned
to a target recall) on large ones, on the CPU or, where ``faiss-gpu`` and a
CUDA device are present, on the GPU.

Conventions
-----------
* ``metric="l2"``: distances are squared Euclidean distances (FAISS's own).
* ``metric="cosine"``: features are L2-normalised and searched by inner
  product; distances are ``1 - cosine similarity`` (so smaller is closer for
  both metrics). All-zero feature rows stay zero (similarity 0 to everything).
* With reflections the search runs over ``2 n`` nodes: node ``j < n`` is image
  ``j`` and node ``j >= n`` is the reflection of image ``j - n``.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

from .errors import InputError, ParameterError

__all__ = [
    "AUTO_FLAT_MAX_N",
    "build_index",
    "choose_method",
    "faiss_gpu_count",
    "nearest_neighbors",
    "prepare_features",
    "resolve_device",
    "search_parameter",
]

#: ``method="auto"`` uses the exact flat index up to this many database vectors.
AUTO_FLAT_MAX_N = 20_000
#: Number of sampled queries used to tune ``nprobe`` / ``efSearch`` against exact search.
TUNE_QUERIES = 256
#: Fewest training points per IVF centroid (FAISS warns below 39).
MIN_POINTS_PER_CENTROID = 39
#: Training points sampled per IVF centroid (k-means cost grows with it; 64 is ample).
TRAIN_POINTS_PER_CENTROID = 64
#: ``method="auto"`` replaces an IVF index by the exact one when the tuned ``nprobe`` exceeds this
#: fraction of the lists: an IVF-Flat scan costs about 10x more per distance than the BLAS flat search
#: (benchmarks/knn_align.py: on 10^4 random 300-d vectors nprobe 128/256 searched 5x slower than flat).
AUTO_MAX_PROBE_FRACTION = 1 / 8

_METHODS = ("auto", "flat", "ivf", "hnsw")
_METRICS = ("l2", "cosine")
_DEVICES = ("auto", "cpu", "gpu")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ParameterError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}: pick one of these")


def prepare_features(features, metric: str = "l2", name: str = "features") -> np.ndarray:
    """Validate features and convert them to what the index stores.

    Parameters
    ----------
    features : array_like, shape (n, d)
        Real feature vectors, one row per image.
    metric : {"l2", "cosine"}
        For ``"cosine"`` each row is scaled to unit length (zero rows stay zero).
    name : str
        Name used in error messages.

    Returns
    -------
    ndarray, shape (n, d), float32, C-contiguous
        A new array (the input is never modified).

    Raises
    ------
    ParameterError
        If the array is not two-dimensional, empty, or complex.
    InputError
        If it holds NaN or infinite values.
    """
    _check_choice("metric", metric, _METRICS)
    array = np.asarray(features)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ParameterError(
            f"{name} must be a non-empty 2-D array [n, d], got shape {array.shape}: pass one row per image"
        )
    if np.iscomplexobj(array):
        raise ParameterError(f"{name} are complex: pass real features (e.g. real and imaginary parts side by side)")
    data = np.array(array, dtype=np.float32, order="C", copy=True)
    finite = np.isfinite(data)
    if not finite.all():
        rows = np.flatnonzero(~finite.all(axis=1))
        raise InputError(
            f"{name} hold {int((~finite).sum())} NaN/infinite values in {rows.size} rows (first row {rows[0]}): "
            "check the input images of those particles for NaN/Inf pixels"
        )
    if metric == "cosine":
        norms = np.linalg.norm(data, axis=1, keepdims=True)
        np.divide(data, norms, out=data, where=norms > 0)
    return data


def choose_method(n: int, method: str = "auto") -> str:
    """The index type used for ``n`` database vectors.

    ``"auto"`` is exact (``"flat"``) up to :data:`AUTO_FLAT_MAX_N` vectors and
    ``"ivf"`` beyond: IVF-Flat runs on GPUs as well as CPUs, needs no more
    memory than the data, and its ``nprobe`` is tuned to a target recall.
    (:func:`build_index` still falls back to ``"flat"`` when the tuning
    shows the features have too little structure for IVF to pay off.)
    """
    _check_choice("method", method, _METHODS)
    if method != "auto":
        return method
    return "flat" if n <= AUTO_FLAT_MAX_N else "ivf"


def faiss_gpu_count() -> int:
    """GPUs FAISS sees in this process (0 with ``faiss-cpu``); run it on a worker with ``client.run``."""
    return int(faiss.get_num_gpus())


def resolve_device(device: str, method: str, n_gpus: int | None = None) -> str:
    """Decide where the index lives: ``"cpu"`` or ``"gpu"``.

    Parameters
    ----------
    device : {"auto", "cpu", "gpu"}
        Requested device. ``"auto"`` uses the GPUs when FAISS sees any and the
        index type has a GPU implementation, else the CPU.
    method : {"flat", "ivf", "hnsw"}
        Resolved index type (see :func:`choose_method`); FAISS has no GPU HNSW.
    n_gpus : int, optional
        Number of GPUs FAISS sees; default ``faiss.get_num_gpus()`` (always 0
        with ``faiss-cpu``). Exposed so the decision can be tested anywhere.

    Raises
    ------
    ParameterError
        For ``device="gpu"`` without a usable GPU or with ``method="hnsw"``.
    """
    _check_choice("device", device, _DEVICES)
    _check_choice("method", method, _METHODS[1:])
    if device == "cpu":
        return "cpu"
    if n_gpus is None:
        n_gpus = faiss.get_num_gpus()
    gpu_capable = method in ("flat", "ivf")
    if device == "gpu":
        if n_gpus == 0:
            raise ParameterError(
                "device='gpu' needs the faiss-gpu package and a CUDA device, but FAISS sees no GPU: "
                "install faiss-gpu on a GPU node or use device='cpu'"
            )
        if not gpu_capable:
            raise ParameterError("method='hnsw' has no FAISS GPU implementation: use method='ivf' or device='cpu'")
        return "gpu"
    return "gpu" if n_gpus > 0 and gpu_capable else "cpu"


def _index_to_gpus(index: faiss.Index) -> faiss.Index:
    """Copy a CPU index to all visible GPUs (the only GPU-specific call in this module).

    Search parameters already set on the CPU index (``nprobe``) are copied by
    FAISS's cloner.
    """
    return faiss.index_cpu_to_all_gpus(index)


def search_parameter(index: faiss.Index) -> dict[str, int]:
    """The tuned search-breadth parameter of a CPU index (empty for a flat index)."""
    if isinstance(index, faiss.IndexHNSW):
        return {"ef_search": int(index.hnsw.efSearch)}
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # neither HNSW nor IVF: an exact flat index
        return {}
    return {"nprobe": int(ivf.nprobe), "nlist": int(ivf.nlist)}


def _faiss_metric(metric: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


def _ivf_nlist(n: int) -> int:
    """About ``4 sqrt(n)`` lists, but few enough that each centroid trains on 39+ points."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_CENTROID))


def _recall(approx: np.ndarray, exact: np.ndarray, query_ids: np.ndarray) -> float:
    """Mean fraction of the exact neighbours (the query itself excluded) that the approximate search found."""
    exact_others = exact != query_ids[:, None]
    hits = (approx[:, :, None] == exact[:, None, :]).any(axis=1) & exact_others
    return float(hits.sum() / max(exact_others.sum(), 1))


def _tune(index, data, metric, recall_k, target_recall, values, apply, seed) -> None:
    """Set the smallest search breadth in ``values`` whose recall@k on sampled queries reaches ``target_recall``.

    Recall is measured against exact brute-force search (``faiss.knn``) of
    :data:`TUNE_QUERIES` database vectors; the largest value is kept if none
    reaches the target.
    """
    rng = np.random.default_rng(seed)
    query_ids = np.sort(rng.choice(len(data), size=min(len(data), TUNE_QUERIES), replace=False))
    queries = data[query_ids]
    k = min(recall_k + 1, len(data))  # +1: the query finds itself
    _, exact = faiss.knn(queries, data, k, metric=_faiss_metric(metric))
    for value in values:
        apply(value)
        _, approx = index.search(queries, k)
        if _recall(approx, exact, query_ids) >= target_recall:
            return


def _doubling(start: int, stop: int) -> list[int]:
    values = []
    value = max(1, start)
    while value < stop:
        values.append(value)
        value *= 2
    return [*values, stop]


def _flat_index(data: np.ndarray, metric: str) -> faiss.Index:
    index = faiss.IndexFlat(data.shape[1], _faiss_metric(metric))
    index.add(data)
    return index


def _ivf_index(data, metric, nprobe, recall_k, target_recall, seed) -> faiss.Index:
    n, d = data.shape
    nlist = _ivf_nlist(n)
    quantizer = faiss.IndexFlat(d, _faiss_metric(metric))  # FAISS's Python wrapper keeps it referenced
    index = faiss.IndexIVFFlat(quantizer, d, nlist, _faiss_metric(metric))
    index.cp.seed = seed
    rng = np.random.default_rng(seed)
    n_train = min(n, TRAIN_POINTS_PER_CENTROID * nlist)
    index.train(data[np.sort(rng.choice(n, size=n_train, replace=False))])
    index.add(data)

    def apply(value: int) -> None:
        index.nprobe = value

    if nprobe is not None:
        apply(min(nprobe, nlist))
    else:
        _tune(index, data, metric, recall_k, target_recall, _doubling(1, nlist), apply, seed)
    return index


def _hnsw_index(data, metric, ef_search, hnsw_m, recall_k, target_recall, seed) -> faiss.Index:
    n, d = data.shape
    index = faiss.IndexHNSWFlat(d, hnsw_m, _faiss_metric(metric))
    index.hnsw.efConstruction = max(40, 2 * hnsw_m)
    index.add(data)

    def apply(value: int) -> None:
        index.hnsw.efSearch = value

    if ef_search is not None:
        apply(ef_search)
    else:
        start = max(16, recall_k + 1)
        _tune(index, data, metric, recall_k, target_recall, _doubling(start, max(start, min(n, 4096))), apply, seed)
    return index


def build_index(
    features,
    method: str = "auto",
    metric: str = "l2",
    device: str = "auto",
    nprobe: int | None = None,
    *,
    ef_search: int | None = None,
    hnsw_m: int = 32,
    recall_k: int = 10,
    target_recall: float = 0.95,
    seed: int = 0,
) -> faiss.Index:
    """Build a FAISS index of the feature vectors.

    Parameters
    ----------
    features : array_like, shape (n, d)
        Real database vectors (converted to float32; the input is not modified).
    method : {"auto", "flat", "ivf", "hnsw"}
        ``"flat"``: exact search. ``"ivf"``: IVF-Flat with about ``4 sqrt(n)``
        lists (capped so each centroid trains on 39+ points), k-means trained on
        a random sample of ``64 nlist`` vectors. ``"hnsw"``: HNSW graph with
        ``hnsw_m`` links per node (CPU only). ``"auto"``: see :func:`choose_method`;
        an IVF index whose tuned ``nprobe`` exceeds ``nlist / 8`` (features
        without cluster structure) is replaced by the exact flat index, which
        is then faster.
    metric : {"l2", "cosine"}
        ``"cosine"`` L2-normalises the vectors and builds an inner-product
        index; queries must then be passed through
        ``prepare_features(queries, "cosine")``.
    device : {"auto", "cpu", "gpu"}
        Where the index lives (see :func:`resolve_device`).
    nprobe : int, optional
        IVF lists visited per query. Default: the smallest power of two whose
        recall@``recall_k`` on 256 sampled database queries, measured against
        exact search, reaches ``target_recall``.
    ef_search : int, optional
        HNSW search breadth; default tuned like ``nprobe``.
    hnsw_m : int
        HNSW links per node.
    recall_k : int
        Number of neighbours the recall is tuned for (the ``k`` of later searches).
    target_recall : float
        Recall in (0, 1] the tuning aims at.
    seed : int
        Seed of the training sample, the k-means and the tuning queries.

    Returns
    -------
    faiss.Index
        A CPU index, or a GPU index (all visible GPUs) when the device resolves to ``"gpu"``.

    Raises
    ------
    ParameterError, InputError
        For invalid parameters, a wrong shape, or NaN/infinite features.
    """
    data = prepare_features(features, metric)
    return _build_prepared(data, method, metric, device, nprobe, ef_search, hnsw_m, recall_k, target_recall, seed)


def _check_positive_int(name: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ParameterError(f"{name}={value!r} must be a positive integer")


def _build_prepared(data, method, metric, device, nprobe, ef_search, hnsw_m, recall_k, target_recall, seed):
    resolved = choose_method(len(data), method)
    where = resolve_device(device, resolved)
    for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
        _check_positive_int(name, value)
    _check_positive_int("hnsw_m", hnsw_m, allow_none=False)
    _check_positive_int("recall_k", recall_k, allow_none=False)
    if not 0 < target_recall <= 1:
        raise ParameterError(f"target_recall={target_recall!r} must lie in (0, 1]")
    if resolved == "flat":
        index = _flat_index(data, metric)
    elif resolved == "ivf":
        index = _ivf_index(data, metric, nprobe, recall_k, target_recall, seed)
        if method == "auto" and nprobe is None and index.nprobe > index.nlist * AUTO_MAX_PROBE_FRACTION:
            # Features without cluster structure: reaching the recall needs most lists scanned, which
            # costs more than the exact (BLAS) search.
            index = _flat_index(data, metric)
    else:
        index = _hnsw_index(data, metric, ef_search, hnsw_m, recall_k, target_recall, seed)
    return _index_to_gpus(index) if where == "gpu" else index


def _first_valid(labels: np.ndarray, distances: np.ndarray, excluded: np.ndarray, k: int):
    """The first ``k`` non-excluded results of each row, in search order."""
    order = np.argsort(excluded, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(labels, order, axis=1), np.take_along_axis(distances, order, axis=1)


def _excluded(labels: np.ndarray, query_ids: np.ndarray, n: int, reflections: bool) -> np.ndarray:
    """Results a query must not get: itself, its own reflection, and FAISS's -1 (no result) padding."""
    own = query_ids[:, None]
    excluded = (labels == own) | (labels < 0)
    if reflections:
        excluded |= labels == own + n
    return excluded


def nearest_neighbors(
    features,
    k: int,
    *,
    reflected_features=None,
    method: str = "auto",
    metric: str = "l2",
    device: str = "auto",
    nprobe: int | None = None,
    batch: int = 8192,
    target_recall: float = 0.95,
    seed: int = 0,
    queries: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest neighbours of every image (or of the images ``queries``), excluding the image itself.

    Parameters
    ----------
    features : array_like, shape (n, d)
        Real feature vectors of the images.
    k : int
        Neighbours per image: ``1 <= k <= n - 1``, or ``<= 2 n - 2`` with reflections.
    reflected_features : array_like, shape (n, d), optional
        Features of the reflected images. The search then runs over ``2 n``
        nodes (node ``j >= n`` is the reflection of image ``j - n``) and query
        ``i`` never returns ``i`` nor its own reflection ``i + n``.
    method, metric, device, nprobe, target_recall, seed
        As in :func:`build_index`; the tuning aims at recall@``k``.
    batch : int
        Queries searched at once (bounds the memory of one search call).
    queries : (start, stop), optional
        Search the neighbours of images ``start .. stop - 1`` only (all nodes stay in the index), so that
        row ranges can be searched by separate tasks; the index is built the same way (same seed) in each.

    Returns
    -------
    indices : ndarray, shape (n, k), int64
        Node ids, nearest first.
    distances : ndarray, shape (n, k), float32
        Squared L2 distances (``"l2"``) or ``1 - cosine similarity`` (``"cosine"``).

    Notes
    -----
    An approximate index may return fewer than ``k`` usable results for a
    query (IVF lists near that query hold too few vectors); those queries are
    searched again exactly, so every row is complete.
    """
    data = prepare_features(features, metric)
    n = len(data)
    reflections = reflected_features is not None
    database = data
    if reflections:
        reflected = prepare_features(reflected_features, metric, name="reflected_features")
        if reflected.shape != data.shape:
            raise ParameterError(
                f"reflected_features have shape {reflected.shape} but features have {data.shape}: "
                "pass one reflected feature row per image"
            )
        database = np.concatenate([data, reflected])
    n_excluded = 2 if reflections else 1
    _check_positive_int("k", k, allow_none=False)
    _check_positive_int("batch", batch, allow_none=False)
    if k > len(database) - n_excluded:
        raise ParameterError(
            f"k={k} neighbours requested but only {len(database) - n_excluded} other nodes exist "
            f"among {n} images{' and their reflections' if reflections else ''}: lower k"
        )
    search_k = k + n_excluded
    index = _build_prepared(database, method, metric, device, nprobe, None, 32, search_k, target_recall, seed)

    first, last = (0, n) if queries is None else queries
    if not 0 <= first < last <= n:
        raise ParameterError(f"queries={queries!r}: need 0 <= start < stop <= {n} (the number of images)")
    indices = np.empty((last - first, k), dtype=np.int64)
    distances = np.empty((last - first, k), dtype=np.float32)
    for start in range(first, last, batch):
        query_ids = np.arange(start, min(start + batch, last))
        found_d, found = index.search(data[query_ids], search_k)
        excluded = _excluded(found, query_ids, n, reflections)
        short = (~excluded).sum(axis=1) < k
        if short.any():
            exact_d, exact = faiss.knn(data[query_ids[short]], database, search_k, metric=_faiss_metric(metric))
            found[short], found_d[short] = exact, exact_d
            excluded[short] = _excluded(exact, query_ids[short], n, reflections)
        indices[query_ids - first], distances[query_ids - first] = _first_valid(found, found_d, excluded, k)
    if metric == "cosine":
        distances = 1.0 - distances
    # Rounding can make the squared distance of (near-)duplicates slightly negative.
    np.maximum(distances, 0.0, out=distances)
    return indices, distances
