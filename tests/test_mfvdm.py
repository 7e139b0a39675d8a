"""MFVDM graph maths on planted graphs: angles, neighbours, spectra, filter, Dask tasks, errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from cryoden_dist import mfvdm
from cryoden_dist.errors import ParameterError


def angle_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Absolute wrapped difference of angles, radians in [0, pi]."""
    return np.abs(np.angle(np.exp(1j * (np.asarray(a) - np.asarray(b)))))


def consistent_graph(n: int = 300, n_neighbors: int = 10, seed: int = 0):
    """A clean, consistent graph with reflections: ``alpha_ij = theta_i - theta_j`` exactly.

    Images sit at random points of S^2 with in-plane angles ``theta``; mirror
    node ``i + n`` sits at the antipode with ``-theta_i`` (reflection
    conjugates the rotation), and neighbours are searched among all 2n nodes,
    so about half the edges cross between images and mirrors and the graph
    is connected.
    """
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((n, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    theta = rng.uniform(0.0, 2 * np.pi, n)
    node_theta = np.concatenate([theta, -theta])
    _, neighbors = cKDTree(np.concatenate([directions, -directions])).query(directions, n_neighbors + 1)
    neighbors = neighbors[:, 1:]  # the first is the image itself
    angles = theta[:, None] - node_theta[neighbors]
    return mfvdm.build_graph(neighbors, angles, with_reflections=True), theta, node_theta, neighbors


@pytest.fixture(scope="module")
def planted():
    """Random graph model: 300 images (600 nodes), K = 15, 30 % outlier edges, 3 degrees of angle noise."""
    n, k = 300, 15
    noisy = mfvdm.planted_graph(n, k, outlier_fraction=0.3, angle_noise=np.radians(3.0), seed=0)
    clean = mfvdm.planted_graph(n, k, outlier_fraction=0.0, seed=0)
    own = np.arange(n)[:, None]
    # A node is a true neighbour of image i if its viewing direction is within the K-th true neighbour's distance.
    radius = mfvdm.viewing_angle_distance(clean.rotations, own, clean.neighbors).max(axis=1, keepdims=True)
    graph = mfvdm.build_graph(noisy.neighbors, noisy.angles, noisy.weights)
    embeddings = mfvdm.eigenpairs_per_frequency(graph, range(1, 7), 20)
    return noisy, graph, embeddings, own, radius


def test_eigenvectors_recover_planted_rotations_on_a_consistent_graph():
    graph, _, node_theta, neighbors = consistent_graph()
    embeddings = mfvdm.eigenpairs_per_frequency(graph, [1, 3], 4, method="eigsh")
    d = graph.degrees()
    for k, (eigenvalues, vectors) in embeddings.items():
        u = vectors[:, 0]
        assert eigenvalues[0] == pytest.approx(1.0, abs=1e-10)
        # u_k(i) = exp(i phi) sqrt(d_i / sum d) exp(1j k theta_i): one global phase phi for all nodes.
        relative = u * np.exp(-1j * k * node_theta)
        phase = relative.sum() / abs(relative.sum())
        assert np.max(np.abs(np.angle(relative / phase))) < 1e-8
        np.testing.assert_allclose(np.abs(u), np.sqrt(d / d.sum()), atol=1e-10)
    # Eq. 5 recovers the planted edge angles beyond the search grid (Newton refinement).
    n = neighbors.shape[0]
    i, j = np.repeat(np.arange(n), neighbors.shape[1]), neighbors.ravel()
    estimated = mfvdm.mfvdm_angles(embeddings, i, j, n_grid=64)
    assert np.max(angle_error(estimated, node_theta[i] - node_theta[j])) < 1e-6
    assert estimated.min() >= 0 and estimated.max() < 2 * np.pi


def test_mfvdm_improves_neighbours_and_angles_of_a_noisy_graph(planted):
    noisy, graph, embeddings, own, radius = planted
    n, n_neighbors = noisy.neighbors.shape
    refined, affinity = mfvdm.mfvdm_affinity_neighbors(embeddings, n, n_neighbors)

    def true_fraction(neighbors: np.ndarray, slack: float) -> float:
        return float(np.mean(mfvdm.viewing_angle_distance(noisy.rotations, own, neighbors) <= slack * radius))

    # Measured on this graph: within the true K-NN radius 0.71 -> 0.83; within 1.5 radii 0.72 -> 0.996.
    assert true_fraction(noisy.neighbors, 1.0) < 0.75
    assert true_fraction(refined, 1.0) > true_fraction(noisy.neighbors, 1.0) + 0.08
    assert true_fraction(refined, 1.5) > 0.98
    assert np.all(np.diff(affinity, axis=1) <= 0) and affinity.max() <= len(embeddings) + 1e-9
    assert not np.any((refined == own) | (refined == own + n))

    # Angles (eq. 5) on the true input edges beat the noisy input angles (measured medians 1.9 -> 0.8 degrees) and
    # the single-frequency (VDM) estimate; errors stay bounded on the refined pairs too.
    images = np.broadcast_to(own, noisy.neighbors.shape)
    i, j = images[noisy.is_true], noisy.neighbors[noisy.is_true]
    truth = mfvdm.inplane_angles(noisy.rotations, i, j)
    input_error = angle_error(noisy.angles[noisy.is_true], truth)
    mfvdm_error = angle_error(mfvdm.mfvdm_angles(embeddings, i, j), truth)
    vdm_error = angle_error(mfvdm.mfvdm_angles({1: embeddings[1]}, i, j), truth)
    assert np.median(mfvdm_error) < 0.6 * np.median(input_error)
    assert np.median(mfvdm_error) < 0.6 * np.median(vdm_error)
    assert np.degrees(np.quantile(mfvdm_error, 0.95)) < 4.0

    close = mfvdm.viewing_angle_distance(noisy.rotations, own, refined) <= 1.5 * radius
    pairs_i, pairs_j = np.broadcast_to(own, refined.shape)[close], refined[close]
    refined_error = angle_error(
        mfvdm.mfvdm_angles(embeddings, pairs_i, pairs_j), mfvdm.inplane_angles(noisy.rotations, pairs_i, pairs_j)
    )
    assert np.degrees(np.median(refined_error)) < 1.5 and np.degrees(refined_error.max()) < 15.0


def test_affinity_neighbours_are_exact_and_independent_of_the_batch(planted):
    noisy, _, embeddings, own, _ = planted
    n = noisy.neighbors.shape[0]
    t = 2
    blocked, blocked_affinity = mfvdm.mfvdm_affinity_neighbors(embeddings, n, 7, t=t, batch=13)
    # Brute force, straight from the definition.
    dense = np.zeros((n, 2 * n))
    for eigenvalues, vectors in embeddings.values():
        V = vectors * eigenvalues**t
        norms = np.linalg.norm(V, axis=1)
        dense += np.abs(V[:n] @ V.conj().T) / np.outer(norms[:n], norms)
    dense[np.arange(n), np.arange(n)] = dense[np.arange(n), np.arange(n) + n] = -np.inf
    expected = np.sort(dense, axis=1)[:, ::-1][:, :7]
    np.testing.assert_allclose(blocked_affinity, expected, rtol=1e-12)
    np.testing.assert_allclose(np.take_along_axis(dense, blocked, axis=1), expected, rtol=1e-12)


def test_connection_matrix_is_hermitian_with_spectrum_in_unit_interval(planted):
    _, graph, _, _, _ = planted
    for k in (0, 1, 4):
        W = mfvdm.connection_matrix(graph, k)
        assert W.dtype == np.complex128 and W.shape == (graph.n_nodes, graph.n_nodes)
        assert abs(W - W.conj().T).max() < 1e-14
        S, d = mfvdm.normalized_connection(graph, k)
        np.testing.assert_allclose(d, np.asarray(abs(W).sum(axis=1)).ravel())
        spectrum = np.linalg.eigvalsh(S.toarray())
        assert spectrum.min() >= -1 - 1e-12 and spectrum.max() <= 1 + 1e-12
    # S_0 is a normalised adjacency: top eigenvalue exactly 1 (eigenvector sqrt(d)); outliers push S_k, k > 0, below.
    assert spectrum.max() < 0.99
    assert np.linalg.eigvalsh(mfvdm.normalized_connection(graph, 0)[0].toarray()).max() == pytest.approx(1.0)


def test_reflection_mirroring_is_consistent_with_planted_reflections():
    n = 200
    clean = mfvdm.planted_graph(n, 12, outlier_fraction=0.0, seed=3)
    graph = mfvdm.build_graph(clean.neighbors, clean.angles, clean.weights)
    assert graph.n_nodes == 2 * n and graph.with_reflections and np.all(graph.rows < graph.cols)
    # Every edge, input or mirrored, carries the angle of its planted rotations (mirror rotation R diag(1,-1,-1)).
    planted_angles = mfvdm.inplane_angles(clean.rotations, graph.rows, graph.cols)
    assert np.max(angle_error(graph.angles, planted_angles)) < 1e-9
    # Mirrored edges exist and carry the conjugate (negated) angle.
    keys = graph.rows.astype(np.int64) * graph.n_nodes + graph.cols
    mirror_rows, mirror_cols = (graph.rows + n) % (2 * n), (graph.cols + n) % (2 * n)
    low, high = np.minimum(mirror_rows, mirror_cols), np.maximum(mirror_rows, mirror_cols)
    position = np.searchsorted(keys, low.astype(np.int64) * graph.n_nodes + high)
    assert np.array_equal(keys[position], low.astype(np.int64) * graph.n_nodes + high)
    mirror_angle = np.where(mirror_rows < mirror_cols, graph.angles[position], -graph.angles[position])
    assert np.max(angle_error(mirror_angle, -graph.angles)) < 1e-12
    # The symmetric union merges an edge listed from both ends into one.
    assert graph.n_edges < 2 * clean.neighbors.size


def test_build_graph_merges_duplicates_and_drops_self_loops():
    # Image 0 lists itself (dropped) and 1; images 0 and 1 list each other; 1 and 2 list each other with
    # different weights and angles (merged: mean weight, weighted circular mean angle).
    neighbors = np.array([[0, 1], [0, 2], [1, 0]])
    angles = np.array([[0.0, 0.3], [-0.3, 1.0], [0.5, 0.2]])
    weights = np.array([[1.0, 1.0], [3.0, 2.0], [1.0, 1.0]])
    graph = mfvdm.build_graph(neighbors, angles, weights, with_reflections=False)
    edges = {
        (int(r), int(c)): (w, a) for r, c, w, a in zip(graph.rows, graph.cols, graph.weights, graph.angles, strict=True)
    }
    assert set(edges) == {(0, 1), (0, 2), (1, 2)}
    assert edges[(0, 1)] == pytest.approx((2.0, 0.3))
    assert edges[(0, 2)] == pytest.approx((1.0, 2 * np.pi - 0.2))  # listed as 2 -> 0 with 0.2
    merged_angle = np.mod(np.angle(2 * np.exp(1j * 1.0) + np.exp(-0.5j)), 2 * np.pi)
    assert edges[(1, 2)] == pytest.approx((1.5, merged_angle))
    np.testing.assert_allclose(graph.degrees(), [3.0, 3.5, 2.5])


def test_filter_response_and_threshold():
    eigenvalues = np.array([1.0, 0.9, 0.5, 0.3, 0.1, -0.2])
    np.testing.assert_allclose(mfvdm.filter_response(eigenvalues, 0.2), [1.0, 0.99, 0.75, 0.51, 0.0, 0.0])
    np.testing.assert_allclose(mfvdm.filter_response(eigenvalues, -1.0)[4:], [0.19, -0.44])
    assert np.all(mfvdm.filter_response(np.linspace(-1, 1, 101), 0.0) <= 1.0)
    A = np.arange(6).reshape(3, 2) * (1 + 1j)
    np.testing.assert_array_equal(mfvdm.stack_with_reflections(A), np.concatenate([A, np.conj(A)]))


def test_spectral_filter_denoises_rotated_copies_of_one_signal():
    graph, theta, _, _ = consistent_graph()
    n = theta.size
    rng = np.random.default_rng(1)
    clean, noisy = {}, {}
    for k in range(4):
        # Real c_k: the mirror edges also need the mirrored images to be copies of the signal, i.e. conj(c_k) = c_k.
        c = rng.standard_normal(3)
        clean[k] = c * np.exp(1j * k * theta)[:, None] if k else np.tile(c, (n, 1))
        noise = rng.standard_normal((n, 3)) + (1j * rng.standard_normal((n, 3)) if k else 0)
        noisy[k] = clean[k] + 0.5 * noise
    filtered = mfvdm.spectral_filter(graph, noisy, 20, delta=0.0)
    for k in range(4):
        reduction = np.linalg.norm(noisy[k] - clean[k]) / np.linalg.norm(filtered[k] - clean[k])
        assert reduction > 3.5, (k, reduction)  # measured 4.8 to 6.0
        assert filtered[k].shape == noisy[k].shape
    assert filtered[0].dtype == np.float64 and filtered[1].dtype == np.complex128
    # delta above every eigenvalue: nothing passes.
    assert np.all(mfvdm.spectral_filter(graph, {2: noisy[2]}, 5, delta=1.5)[2] == 0)
    # Two nodes, one edge of angle 0.4: S_1 has eigenvalues +-1 and the top eigenvector (h(1) = 1) averages node 0
    # with node 1 rotated onto it, A_hat(0) = (A(0) + exp(0.4j) A(1)) / 2, and A_hat(1) = exp(-0.4j) A_hat(0).
    small = mfvdm.build_graph(np.array([[1], [0]]), np.array([[0.4], [-0.4]]), with_reflections=False)
    block = np.array([[1.0 + 2j], [3.0 - 1j]])
    kept = mfvdm.spectral_filter(small, {1: block}, 1, delta=0.0, method="dense")[1]
    consistent = np.exp(1j * 0.4) * block[1, 0]
    np.testing.assert_allclose(
        kept[:, 0], [(block[0, 0] + consistent) / 2, (block[0, 0] + consistent) / 2 / np.exp(1j * 0.4)]
    )


def test_eigensolvers_agree():
    # Small graph: dense complex eigh and LOBPCG's dense Rayleigh-Ritz steps are BLAS-bound.
    small = mfvdm.planted_graph(120, 10, outlier_fraction=0.3, seed=5)
    S, _ = mfvdm.normalized_connection(mfvdm.build_graph(small.neighbors, small.angles), 2)
    dense_values, _ = mfvdm.top_eigenpairs(S, 10, method="dense")
    for method in ("eigsh", "lobpcg", "auto"):
        values, vectors = mfvdm.top_eigenpairs(S, 10, method=method, tol=1e-8)
        np.testing.assert_allclose(values, dense_values, atol=1e-7)
        assert np.all(np.diff(values) <= 0)
        assert np.max(np.linalg.norm(S @ vectors - vectors * values, axis=0)) < 1e-5
        np.testing.assert_allclose(vectors.conj().T @ vectors, np.eye(10), atol=1e-8)
    # A mirrored graph's real symmetric form: the same spectrum, eigenvectors (u, conj(u)) of S.
    n = small.neighbors.shape[0]
    real_form = mfvdm.mirror_real_form(S)
    assert real_form.dtype == np.float64 and abs(real_form - real_form.T).max() == 0
    for method in ("eigsh", "lobpcg", "dense"):
        values, vectors = mfvdm.top_eigenpairs(S, 10, method=method, tol=1e-8, mirrored=True)
        np.testing.assert_allclose(values, dense_values, atol=1e-7)
        assert np.max(np.linalg.norm(S @ vectors - vectors * values, axis=0)) < 1e-5
        np.testing.assert_allclose(vectors.conj().T @ vectors, np.eye(10), atol=1e-8)
        np.testing.assert_allclose(vectors[n:], vectors[:n].conj(), atol=1e-12)
    # Single precision (what the pipeline stores): complex64 vectors of the same subspace, float32-accurate.
    single_values, single_vectors = mfvdm.top_eigenpairs(
        S, 10, method="eigsh", tol=1e-4, mirrored=True, precision="single"
    )
    assert single_vectors.dtype == np.complex64 and single_values.dtype == np.float64
    np.testing.assert_allclose(single_values, dense_values, atol=1e-5)
    cosines = np.linalg.svd(vectors[:, :8].conj().T @ single_vectors, compute_uv=False)
    assert cosines.min() > 1 - 1e-5
    with pytest.raises(ParameterError, match="precision"):
        mfvdm.top_eigenpairs(S, 10, precision="half")
    # k = 0: the real solver path gives the same spectrum as the dense complex one.
    S0, _ = mfvdm.normalized_connection(mfvdm.build_graph(small.neighbors, small.angles), 0)
    np.testing.assert_allclose(
        mfvdm.top_eigenpairs(S0, 5, method="eigsh")[0], mfvdm.top_eigenpairs(S0, 5, method="dense")[0], atol=1e-8
    )


def test_eigenpairs_per_frequency_on_dask_matches_serial(client, planted):
    _, graph, _, _, _ = planted
    serial = mfvdm.eigenpairs_per_frequency(graph, [1, 2, 3], {1: 8, 2: 10, 3: 12})
    distributed = mfvdm.eigenpairs_per_frequency(graph, [1, 2, 3], {1: 8, 2: 10, 3: 12}, client=client)
    assert sorted(distributed) == [1, 2, 3]
    for k, (values, vectors) in serial.items():
        other_values, other_vectors = distributed[k]
        assert vectors.shape == (graph.n_nodes, 6 + 2 * k)
        np.testing.assert_allclose(other_values, values, atol=1e-10)
        # Eigenvectors are defined up to phase: compare the spectral projectors.
        assert np.abs(other_vectors @ other_vectors.conj().T - vectors @ vectors.conj().T).max() < 1e-6
    neighbors, affinity = mfvdm.mfvdm_affinity_neighbors(serial, graph.n_images, 9, batch=40)
    neighbors_dask, affinity_dask = mfvdm.mfvdm_affinity_neighbors(serial, graph.n_images, 9, batch=40, client=client)
    np.testing.assert_array_equal(neighbors_dask, neighbors)
    np.testing.assert_allclose(affinity_dask, affinity, rtol=1e-12)
    blocks = {0: np.ones((graph.n_images, 2)), 2: np.exp(2j * np.arange(graph.n_images))[:, None]}
    filtered = mfvdm.spectral_filter(graph, blocks, 10, delta=0.1, client=client)
    expected = mfvdm.spectral_filter(graph, blocks, 10, delta=0.1)
    for k in blocks:
        np.testing.assert_allclose(filtered[k], expected[k], atol=1e-8)


def test_parameter_errors(planted):
    _, graph, embeddings, _, _ = planted
    n = graph.n_images
    S, _ = mfvdm.normalized_connection(graph, 1)
    with pytest.raises(ParameterError, match="m=600"):
        mfvdm.top_eigenpairs(S, graph.n_nodes)
    with pytest.raises(ParameterError, match="m=0"):
        mfvdm.eigenpairs_per_frequency(graph, [1], 0)
    with pytest.raises(ParameterError, match="k_max >= 1"):
        mfvdm.eigenpairs_per_frequency(graph, range(1, 1), 5)
    with pytest.raises(ParameterError, match="k_max >= 1"):
        mfvdm.mfvdm_affinity_neighbors({}, n, 5)
    with pytest.raises(ParameterError, match="k=-1"):
        mfvdm.connection_matrix(graph, -1)
    with pytest.raises(ParameterError, match="method="):
        mfvdm.top_eigenpairs(S, 5, method="arnoldi")
    with pytest.raises(ParameterError, match="outside 0..5"):
        mfvdm.build_graph(np.array([[1], [6], [0]]), np.zeros((3, 1)))
    with pytest.raises(ParameterError, match="outside 0..2"):
        mfvdm.build_graph(np.array([[1], [3], [0]]), np.zeros((3, 1)), with_reflections=False)
    with pytest.raises(ParameterError, match="angles has shape"):
        mfvdm.build_graph(np.array([[1], [0]]), np.zeros((2, 2)), with_reflections=False)
    with pytest.raises(ParameterError, match="weights must be > 0"):
        mfvdm.build_graph(np.array([[1], [0]]), np.zeros((2, 1)), np.zeros((2, 1)), with_reflections=False)
    with pytest.raises(ParameterError, match="n_neighbors"):
        mfvdm.mfvdm_affinity_neighbors(embeddings, n, 2 * n - 1)
    with pytest.raises(ParameterError, match="n_images"):
        mfvdm.mfvdm_affinity_neighbors(embeddings, n + 1, 5)
    with pytest.raises(ParameterError, match="n_grid"):
        mfvdm.mfvdm_angles(embeddings, [0], [1], n_grid=12)
    with pytest.raises(ParameterError, match="coefficient block k=1"):
        mfvdm.spectral_filter(graph, {1: np.ones((n - 1, 2))}, 5, delta=0.0)
