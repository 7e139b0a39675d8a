"""Fourier-Bessel expansion: measured rotation, inversion, adjoint, orthonormality and reference properties."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.special

from cryoden_dist.basis import FBBasis, bessel_zeros_table, dense_basis_matrix
from cryoden_dist.errors import ParameterError
from cryoden_dist.image import centered_coordinates

BOXES = (32, 33)  # even and odd
ENGINES = ("dense", "nufft")


@pytest.fixture(scope="module", params=[(box, engine) for box in BOXES for engine in ENGINES], ids=str)
def basis(request) -> FBBasis:
    box, engine = request.param
    return FBBasis(box, engine=engine, eps=1e-10)


def random_coefficients(basis: FBBasis, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coeffs = rng.standard_normal((n, basis.count)) + 1j * rng.standard_normal((n, basis.count))
    coeffs[:, basis.coefficients_at(0)] = coeffs[:, basis.coefficients_at(0)].real
    return coeffs


def relative_error(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(np.linalg.norm(estimate - truth) / np.linalg.norm(truth))


def gaussian_blobs(box: int, centres: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    """Images that are sums of isotropic Gaussians: ``centres`` [n, g, (x, y)] px from the centre pixel."""
    y, x = centered_coordinates(box)
    dx = x[None, None] - centres[:, :, 0, None, None]
    dy = y[None, None] - centres[:, :, 1, None, None]
    return np.einsum("ng,ngyx->nyx", weights, np.exp(-(dx * dx + dy * dy) / (2 * sigma**2)))


def random_blobs(basis: FBBasis, n: int, alpha: float, sigma: float = 2.0, seed: int = 1):
    """Blob images well inside the disk, and the same drawn rotated by ``alpha`` (theta -> theta + alpha)."""
    rng = np.random.default_rng(seed)
    radius = rng.uniform(0, basis.radius - 5 * sigma, (n, 6))
    angle = rng.uniform(0, 2 * np.pi, (n, 6))
    centres = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=-1)
    weights = rng.uniform(0.5, 1.5, (n, 6))
    rotation = np.array([[np.cos(alpha), -np.sin(alpha)], [np.sin(alpha), np.cos(alpha)]])
    return (
        gaussian_blobs(basis.box, centres, weights, sigma),
        gaussian_blobs(basis.box, centres @ rotation.T, weights, sigma),
    )


def rot90_about_centre(images: np.ndarray) -> np.ndarray:
    """``np.rot90`` about pixel ``L // 2`` (for even L, np.rot90 turns about ``(L - 1) / 2``)."""
    turned = np.rot90(images, axes=(-2, -1))
    if images.shape[-1] % 2 == 0:
        # The wrapped row lies outside the disk.
        turned = np.roll(turned, 1, axis=-2)
    return turned


# -- basis functions and truncation -------------------------------------------------------------------


@pytest.mark.parametrize("box", BOXES)
def test_truncation_follows_the_sampling_criterion(box):
    basis = FBBasis(box, engine="nufft")
    limit = 2 * np.pi * 0.5 * basis.radius
    for k in range(basis.k_max + 2):
        zeros = scipy.special.jn_zeros(k, 40)
        expected = int(np.count_nonzero(zeros[1:] <= limit))  # keep q while lambda_{k,q+1} <= 2 pi c R
        kept = basis.bessel_zeros[basis.angular_frequency == k]
        assert kept.size == expected
        np.testing.assert_allclose(kept, zeros[: kept.size], rtol=1e-14)
        assert np.all(np.abs(scipy.special.jv(k, kept)) < 1e-12)


def test_blocks_per_angular_frequency_are_contiguous(basis):
    covered = np.zeros(basis.count, dtype=int)
    for k in range(basis.k_max + 1):
        block = basis.coefficients_at(k)
        assert np.all(basis.angular_frequency[block] == k)
        np.testing.assert_array_equal(basis.radial_index[block], np.arange(1, block.stop - block.start + 1))
        covered[block] += 1
    np.testing.assert_array_equal(covered, 1)


@pytest.mark.parametrize("box", BOXES)
def test_dense_matrix_matches_direct_bessel_evaluation(box):
    basis = FBBasis(box, engine="nufft")
    k, zeros, radius = basis.angular_frequency, basis.bessel_zeros, basis.radius
    y, x = centered_coordinates(box)
    r, theta = np.hypot(x, y)[basis.mask], np.arctan2(y, x)[basis.mask]
    norm = np.where(k > 0, np.sqrt(2), 1) / (np.sqrt(np.pi) * radius * np.abs(scipy.special.jv(k + 1, zeros)))
    psi = norm * scipy.special.jv(k, np.outer(r, zeros / radius)) * np.exp(1j * np.outer(theta, k))
    direct = np.concatenate([psi.real, -psi.imag[:, k > 0]], axis=1)
    assert np.abs(dense_basis_matrix(basis) - direct).max() < 1e-13 * np.abs(direct).max()


# -- (4) agreement with a dense direct least-squares reference ---------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_match_direct_least_squares_reference(engine):
    box = 32
    basis = FBBasis(box, engine=engine, eps=1e-10)
    matrix = dense_basis_matrix(basis)
    images = np.random.default_rng(3).standard_normal((5, box, box))
    params = np.linalg.lstsq(matrix, images[:, basis.mask].T, rcond=None)[0].T
    n0 = basis.coefficients_at(0).stop
    reference = params[:, : basis.count] + 0j
    reference[:, n0:] += 1j * params[:, basis.count :]
    assert relative_error(basis.expand(images), reference) < 1e-8

    adjoint = matrix.T @ images[:, basis.mask].T
    reference_adjoint = adjoint[: basis.count].T + 0j
    reference_adjoint[:, n0:] += 1j * adjoint[basis.count :].T
    assert relative_error(basis.evaluate_adjoint(images), reference_adjoint) < 1e-8

    coeffs = random_coefficients(basis, 5)
    synthesis = np.zeros((5, box, box))
    synthesis[:, basis.mask] = (matrix @ np.concatenate([coeffs.real, coeffs.imag[:, n0:]], axis=1).T).T
    assert relative_error(basis.evaluate(coeffs), synthesis) < 1e-8


# -- (1) rotation ------------------------------------------------------------------------------------


def test_rotation_by_90_degrees_is_exact(basis):
    images = basis.evaluate(random_coefficients(basis, 4))
    coeffs = basis.expand(images)
    turned = basis.expand(rot90_about_centre(images))
    # np.rot90 maps (x, y) content to (y, -x): theta -> theta - pi / 2, so a_k -> exp(i k pi / 2) a_k.
    assert relative_error(turned, coeffs * (1j) ** (basis.angular_frequency % 4)) < 1e-8
    assert relative_error(turned, basis.rotate(coeffs, -np.pi / 2)) < 1e-8


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("box", (64, 65))
def test_rotation_by_generic_angle_multiplies_by_phase(box, engine):
    basis = FBBasis(box, engine=engine, eps=1e-8)
    alpha = 0.7
    images, rotated = random_blobs(basis, 4, alpha)
    coeffs, coeffs_rotated = basis.expand(images), basis.expand(rotated)
    # measured 2e-8 for these blobs (sigma 2 px): the residual outside the FB span is what breaks equivariance
    assert relative_error(coeffs_rotated, coeffs * np.exp(-1j * basis.angular_frequency * alpha)) < 1e-3
    # A single-angle and a per-image angle give the same result.
    per_image = basis.rotate(coeffs, np.full(4, alpha))
    np.testing.assert_allclose(per_image, basis.rotate(coeffs, alpha))
    assert relative_error(coeffs_rotated, per_image) < 1e-3


# -- (2) inversion -----------------------------------------------------------------------------------


def test_expand_inverts_evaluate(basis):
    coeffs = random_coefficients(basis, 6)
    assert relative_error(basis.expand(basis.evaluate(coeffs)), coeffs) < 1e-6


def test_evaluate_inverts_expand_on_band_limited_images(basis):
    images = basis.evaluate(random_coefficients(basis, 6))
    assert relative_error(basis.evaluate(basis.expand(images)), images) < 1e-6
    blobs, _ = random_blobs(basis, 4, 0.0)
    fitted = basis.evaluate(basis.expand(blobs))
    assert relative_error(fitted[:, basis.mask], blobs[:, basis.mask]) < 1e-3
    assert np.all(fitted[:, ~basis.mask] == 0)


# -- (3) adjoint -------------------------------------------------------------------------------------


def test_evaluate_adjoint_is_the_adjoint(basis):
    rng = np.random.default_rng(5)
    coeffs = rng.standard_normal((3, basis.count)) + 1j * rng.standard_normal((3, basis.count))
    images = rng.standard_normal((3, basis.box, basis.box))
    lhs = np.sum(basis.evaluate(coeffs) * images)
    rhs = np.real(np.vdot(coeffs, basis.evaluate_adjoint(images)))
    assert abs(lhs - rhs) <= 1e-10 * abs(lhs)
    assert np.all(basis.evaluate_adjoint(images)[:, basis.coefficients_at(0)].imag == 0)


# -- (6) orthonormality ------------------------------------------------------------------------------


def test_energy_in_disk_matches_coefficient_norm(basis):
    coeffs = random_coefficients(basis, 20)
    ratio = np.sum(basis.evaluate(coeffs) ** 2, axis=(1, 2)) / np.sum(np.abs(coeffs) ** 2, axis=1)
    assert np.all(np.abs(ratio - 1) < 0.02)  # measured 0.9988 .. 1.0084 (pixel sampling)
    blobs, _ = random_blobs(basis, 4, 0.0)
    ratio = np.sum(blobs[:, basis.mask] ** 2, axis=1) / np.sum(np.abs(basis.expand(blobs)) ** 2, axis=1)
    assert np.all(np.abs(ratio - 1) < 1e-3)


@pytest.mark.parametrize("box", BOXES)
def test_sampled_basis_is_nearly_orthonormal(box):
    matrix = dense_basis_matrix(FBBasis(box, engine="nufft"))
    eigenvalues = np.linalg.eigvalsh(matrix.T @ matrix)
    assert 0.8 < eigenvalues.min() and eigenvalues.max() < 1.25  # measured 0.88 .. 1.16 at L = 32, 33


# -- precision, batching, pickling -------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_float32_matches_float64(engine):
    single = FBBasis(33, engine=engine, dtype=np.float32)
    double = FBBasis(33, engine=engine, eps=1e-10)
    images = double.evaluate(random_coefficients(double, 4))
    coeffs = single.expand(images)
    assert coeffs.dtype == np.complex64
    assert relative_error(coeffs, double.expand(images)) < 1e-4
    assert single.evaluate(coeffs).dtype == np.float32


def test_single_image_and_batch_agree(basis):
    images = np.random.default_rng(7).standard_normal((3, basis.box, basis.box))
    batch = basis.expand(images)
    single = basis.expand(images[1])
    assert single.shape == (basis.count,)
    np.testing.assert_allclose(single, batch[1], rtol=1e-12, atol=1e-12)
    assert basis.evaluate(single).shape == (basis.box, basis.box)


def test_nufft_engine_batches_beyond_its_work_size():
    basis = FBBasis(32, engine="nufft", eps=1e-10)
    basis._engine.batch = 4  # several NUFFT batches, one partial
    reference = FBBasis(32, engine="dense")
    images = np.random.default_rng(8).standard_normal((10, 32, 32))
    assert relative_error(basis.evaluate_adjoint(images), reference.evaluate_adjoint(images)) < 1e-8
    assert relative_error(basis.expand(images), reference.expand(images)) < 1e-8


@pytest.mark.parametrize("engine", ENGINES)
def test_basis_pickles_for_dask_workers(engine):
    basis = FBBasis(32, engine=engine)
    images = np.random.default_rng(9).standard_normal((2, 32, 32))
    expected = basis.expand(images)
    np.testing.assert_allclose(pickle.loads(pickle.dumps(basis)).expand(images), expected, rtol=1e-12, atol=1e-12)


def test_cached_basis_is_shared():
    assert FBBasis.cached(32) is FBBasis.cached(32)


def test_auto_engine_is_dense_within_the_memory_budget(monkeypatch):
    from cryoden_dist.basis import fb

    basis = FBBasis(32)
    assert basis.engine == "dense"
    monkeypatch.setattr(fb, "DENSE_BUDGET_BYTES", basis.dense_bytes - 1)
    assert FBBasis(32).engine == "nufft"


# -- (7) bad parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"box": 32, "radius": 16.5}, "radius"),
        ({"box": 33, "radius": 17}, "radius"),
        ({"box": 32, "radius": 0}, "radius"),
        ({"box": 32, "bandlimit": 0.6}, "bandlimit"),
        ({"box": 32, "bandlimit": 0}, "bandlimit"),
        ({"box": 32, "engine": "fast"}, "engine"),
        ({"box": 32, "dtype": np.int32}, "dtype"),
        ({"box": 32, "radius": 0.5, "bandlimit": 0.1}, "keeps no basis function"),
    ],
)
def test_bad_parameters_raise_parameter_error(kwargs, words):
    with pytest.raises(ParameterError, match=words) as info:
        FBBasis(**kwargs)
    assert "\n" not in str(info.value)


def test_wrong_shapes_raise_parameter_error():
    basis = FBBasis(32, engine="nufft")
    with pytest.raises(ParameterError, match="box 32"):
        basis.expand(np.zeros((2, 33, 33)))
    with pytest.raises(ParameterError, match="coefficients"):
        basis.evaluate(np.zeros((2, basis.count + 1), dtype=complex))
    with pytest.raises(ParameterError, match="angular frequency"):
        basis.coefficients_at(basis.k_max + 1)


def test_zeros_table_of_tiny_disk_is_empty():
    k, q, zeros = bessel_zeros_table(0.5, 0.1)
    assert k.size == q.size == zeros.size == 0
