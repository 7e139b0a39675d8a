"""Rotational and reflection alignment from steerable-basis coefficients (cryoden_dist.align)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cryoden_dist.align import (
    align_pairs,
    default_n_angles,
    frequency_weights,
    reflect_coefficients,
    rotate_coefficients,
)
from cryoden_dist.errors import InputError, ParameterError

K_MAX = 30


def fb_like_frequencies(k_max: int = K_MAX) -> np.ndarray:
    """Angular frequencies laid out like a Fourier-Bessel basis: fewer radial indices at higher k (~420 in all)."""
    radial_counts = np.maximum(1, (26 - 0.8 * np.arange(k_max + 1)).astype(int))
    return np.repeat(np.arange(k_max + 1), radial_counts)


def random_coefficients(rng, n: int, frequencies: np.ndarray, decay: float = 8.0) -> np.ndarray:
    """Coefficients of random real images: complex Gaussian with a decaying spectrum, real at k = 0."""
    shape = (n, frequencies.size)
    coeffs = (rng.normal(size=shape) + 1j * rng.normal(size=shape)) * np.exp(-frequencies / decay)
    coeffs[:, frequencies == 0] = coeffs[:, frequencies == 0].real * np.sqrt(2)
    return coeffs


def add_noise(rng, coeffs: np.ndarray, frequencies: np.ndarray, snr: float) -> np.ndarray:
    """Add white complex noise so that (weighted signal energy) / (weighted noise energy) = snr on average."""
    weights = frequency_weights(frequencies)
    signal = np.mean((np.abs(coeffs) ** 2) @ weights)
    sigma = np.sqrt(signal / snr / weights.sum())
    noise = (rng.normal(size=coeffs.shape) + 1j * rng.normal(size=coeffs.shape)) * sigma / np.sqrt(2)
    noise[:, frequencies == 0] = noise[:, frequencies == 0].real * np.sqrt(2)
    return coeffs + noise


def angle_error_degrees(estimated: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.abs(np.degrees(np.angle(np.exp(1j * (estimated - truth)))))


def planted_pairs(seed: int, n: int, snr: float | None):
    """Images 0..n-1 and their rotations n..2n-1 by random angles, both noisy when snr is given."""
    rng = np.random.default_rng(seed)
    frequencies = fb_like_frequencies()
    clean = random_coefficients(rng, n, frequencies)
    angles = rng.uniform(0, 2 * np.pi, n)
    rotated = rotate_coefficients(clean, frequencies, angles)
    if snr is not None:
        clean, rotated = add_noise(rng, clean, frequencies, snr), add_noise(rng, rotated, frequencies, snr)
    coeffs = np.concatenate([clean, rotated])
    return coeffs, frequencies, np.arange(n), np.arange(n, 2 * n), angles


def test_planted_rotations_high_snr_error_below_a_tenth_of_a_degree():
    coeffs, frequencies, i, j, truth = planted_pairs(seed=0, n=300, snr=1e3)
    angles, correlations = align_pairs(coeffs, frequencies, i, j)
    errors = angle_error_degrees(angles, truth)
    assert errors.max() < 0.1, errors.max()  # measured max 0.07 deg at this SNR
    assert np.all((angles >= 0) & (angles < 2 * np.pi))
    assert correlations.min() > 0.99


def test_planted_rotations_low_snr_error_within_measured_bounds():
    # Measured with these seeds: SNR 1 median 0.92 deg, 90th percentile 2.35 deg; SNR 0.3 median 2.45, p90 6.45 deg.
    coeffs, frequencies, i, j, truth = planted_pairs(seed=1, n=400, snr=1.0)
    errors = angle_error_degrees(align_pairs(coeffs, frequencies, i, j)[0], truth)
    assert np.median(errors) < 1.5 and np.percentile(errors, 90) < 4.0, (np.median(errors), np.percentile(errors, 90))
    coeffs, frequencies, i, j, truth = planted_pairs(seed=2, n=400, snr=0.3)
    angles, correlations = align_pairs(coeffs, frequencies, i, j)
    errors = angle_error_degrees(angles, truth)
    assert np.median(errors) < 5.0 and np.percentile(errors, 90) < 12.0, (np.median(errors), np.percentile(errors, 90))
    # Noise lowers the correlation to about snr / (1 + snr) for equal-energy noisy copies.
    assert 0.15 < np.median(correlations) < 0.35


def test_refinement_improves_on_the_grid_maximum():
    coeffs, frequencies, i, j, truth = planted_pairs(seed=3, n=300, snr=None)
    n_angles = default_n_angles(K_MAX)
    grid_angles, grid_corr = align_pairs(coeffs, frequencies, i, j, refine=False)
    refined_angles, refined_corr = align_pairs(coeffs, frequencies, i, j, refine=True)
    grid_errors = angle_error_degrees(grid_angles, truth)
    refined_errors = angle_error_degrees(refined_angles, truth)
    step = 360 / n_angles
    assert grid_errors.max() <= step / 2 + 1e-9  # the grid maximum is the nearest grid angle
    assert grid_errors.mean() > step / 8  # ... and so is typically a quarter step off
    assert refined_errors.max() < 1e-4  # noiseless: Newton reaches float64 precision
    assert np.all(refined_corr >= grid_corr - 1e-12)
    np.testing.assert_allclose(refined_corr, 1.0, atol=1e-9)


def test_reflected_pairs_return_the_documented_angle():
    rng = np.random.default_rng(4)
    frequencies = fb_like_frequencies()
    n = 50
    originals = random_coefficients(rng, n, frequencies)
    alpha = rng.uniform(0, 2 * np.pi, n)
    # Image j = reflection of (image i rotated by alpha) ...
    mirrored = reflect_coefficients(rotate_coefficients(originals, frequencies, alpha))
    # ... which is also the reflection of image i rotated by -alpha (reflection reverses rotations).
    np.testing.assert_allclose(mirrored, rotate_coefficients(reflect_coefficients(originals), frequencies, -alpha))
    coeffs = np.concatenate([originals, mirrored])
    i, j = np.arange(n), np.arange(n, 2 * n)
    # Node j + N (N = 2n images) is the reflection of image j = image i rotated by alpha: the angle is alpha.
    angles, correlations = align_pairs(coeffs, frequencies, i, j + 2 * n)
    assert angle_error_degrees(angles, alpha).max() < 1e-6
    np.testing.assert_allclose(correlations, 1.0, atol=1e-9)
    flagged = align_pairs(coeffs, frequencies, i, j, reflect=np.ones(n, dtype=bool))
    np.testing.assert_array_equal(flagged[0], angles)
    np.testing.assert_array_equal(flagged[1], correlations)
    # Without the reflection the mirrored images do not match: independent random spectra correlate weakly.
    assert np.abs(align_pairs(coeffs, frequencies, i, j)[1]).max() < 0.7


def test_identical_images_correlate_to_one_at_angle_zero():
    rng = np.random.default_rng(5)
    frequencies = fb_like_frequencies()
    coeffs = random_coefficients(rng, 20, frequencies).astype(np.complex64)
    ids = np.arange(20)
    angles, correlations = align_pairs(coeffs, frequencies, ids, ids)
    np.testing.assert_allclose(correlations, 1.0, atol=1e-6)
    assert angle_error_degrees(angles, np.zeros(20)).max() < 1e-3


def test_all_zero_coefficients_give_zero_correlation_without_warnings():
    rng = np.random.default_rng(6)
    frequencies = fb_like_frequencies()
    coeffs = random_coefficients(rng, 4, frequencies)
    coeffs[[0, 2]] = 0
    i, j = np.array([0, 0, 1, 2]), np.array([1, 4, 2, 6])
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        angles, correlations = align_pairs(coeffs, frequencies, i, j)
    assert np.all(np.isfinite(angles)) and np.all(np.isfinite(correlations))
    np.testing.assert_array_equal(correlations, 0.0)


def test_results_do_not_depend_on_batching_coefficient_order_or_precision():
    coeffs, frequencies, _, _, _ = planted_pairs(seed=7, n=60, snr=1.0)
    rng = np.random.default_rng(8)
    # The 60 planted pairs (correlation ~0.5) and 440 random ones, reflected nodes included.
    i = np.concatenate([np.arange(60), rng.integers(0, 120, 440)])
    j = np.concatenate([np.arange(60, 120), rng.integers(0, 240, 440)])
    angles, correlations = align_pairs(coeffs, frequencies, i, j)
    batched = align_pairs(coeffs, frequencies, i, j, batch=7)
    np.testing.assert_allclose(batched[0], angles, atol=1e-12)
    np.testing.assert_allclose(batched[1], correlations, atol=1e-12)
    shuffle = rng.permutation(frequencies.size)
    shuffled = align_pairs(coeffs[:, shuffle], frequencies[shuffle], i, j)
    np.testing.assert_allclose(np.exp(1j * shuffled[0]), np.exp(1j * angles), atol=1e-9)
    np.testing.assert_allclose(shuffled[1], correlations, atol=1e-12)
    weighted = align_pairs(coeffs, frequencies, i, j, positive_frequency_weight=2.0)
    np.testing.assert_allclose(np.exp(1j * weighted[0]), np.exp(1j * angles), atol=1e-9)  # angles do not change
    assert np.abs(weighted[1] - correlations).max() > 1e-3  # correlations do
    single = align_pairs(coeffs.astype(np.complex64), frequencies, i, j)
    np.testing.assert_allclose(single[1], correlations, atol=1e-5)
    # Well-correlated pairs have a sharp peak, so the float32 angle agrees closely.
    sharp = correlations > 0.3
    assert sharp.sum() >= 50
    assert angle_error_degrees(single[0][sharp], angles[sharp]).max() < 0.01


@pytest.mark.parametrize(
    ("basis_sign", "positive_scale", "weight"),
    [
        (-1, 2.0, 2.0),  # plain coefficients of R_kq(r) exp(-1j k theta): f = sum a psi + 2 Re sum_{k>0} a psi
        (+1, np.sqrt(2), 1.0),  # FBBasis-like: exp(+1j k theta) and sqrt(2) folded into the k > 0 coefficients
    ],
)
def test_correlation_is_the_image_inner_product_maximised_over_rotations(basis_sign, positive_scale, weight):
    """On a polar grid with an orthonormal steerable basis, C(alpha) is the inner product of the real images."""
    rng = np.random.default_rng(9)
    k_max, n_radial, n_theta = 6, 8, 64
    frequencies = np.repeat(np.arange(k_max + 1), 3)
    radial = np.concatenate([np.linalg.qr(rng.normal(size=(n_radial, 3)))[0] for _ in range(k_max + 1)], axis=1)
    scale = np.where(frequencies == 0, 1.0, positive_scale)

    def image(coeffs: np.ndarray, counter_clockwise: float = 0.0, mirror: bool = False) -> np.ndarray:
        """f(r, theta - rotation), or f(r, -theta) mirrored, on the [n_radial, n_theta] polar grid."""
        theta = 2 * np.pi * np.arange(n_theta) / n_theta
        theta = (-theta if mirror else theta) - counter_clockwise
        waves = np.exp(basis_sign * 1j * np.multiply.outer(frequencies, theta)) / np.sqrt(n_theta)
        terms = (scale * coeffs)[:, None, None] * radial.T[:, :, None] * waves[:, None, :]
        return terms.sum(axis=0).real

    coeffs = random_coefficients(rng, 2, frequencies, decay=3.0)
    coeffs[1] = add_noise(rng, rotate_coefficients(coeffs[:1], frequencies, [1.0]), frequencies, snr=2.0)[0]
    mirrored = reflect_coefficients(coeffs[1])
    np.testing.assert_allclose(image(mirrored), image(coeffs[1], mirror=True), atol=1e-12)  # conj = mirror
    angles, correlations = align_pairs(
        coeffs, frequencies, [0, 0], [1, 3], positive_frequency_weight=weight
    )  # node 3 = reflection of image 1
    # rotate_coefficients(alpha) is the counter-clockwise rotation by -basis_sign * alpha.
    rotations = -basis_sign * angles
    first = image(coeffs[0])
    assert np.linalg.norm(first) ** 2 == pytest.approx(frequency_weights(frequencies, weight) @ np.abs(coeffs[0]) ** 2)
    for rotation, correlation, target in zip(rotations, correlations, [coeffs[1], mirrored], strict=True):
        second = image(target)
        norms = np.linalg.norm(first) * np.linalg.norm(second)
        assert np.sum(image(coeffs[0], rotation) * second) / norms == pytest.approx(correlation, abs=1e-12)
        scanned = [np.sum(image(coeffs[0], angle) * second) / norms for angle in np.linspace(0, 2 * np.pi, 721)]
        assert correlation >= max(scanned) - 1e-12
    assert angle_error_degrees(angles[:1], np.array([1.0]))[0] < 3.0


def test_rotation_and_reflection_helpers_follow_the_contract():
    rng = np.random.default_rng(10)
    frequencies = fb_like_frequencies(5)
    coeffs = random_coefficients(rng, 3, frequencies)
    alpha = np.array([0.3, -1.2, 2.0])
    rotated = rotate_coefficients(coeffs, frequencies, alpha)
    np.testing.assert_allclose(rotated, coeffs * np.exp(1j * frequencies * alpha[:, None]))
    np.testing.assert_allclose(rotate_coefficients(rotated, frequencies, -alpha), coeffs)
    np.testing.assert_array_equal(reflect_coefficients(coeffs), np.conj(coeffs))
    assert rotate_coefficients(coeffs.astype(np.complex64), frequencies, alpha).dtype == np.complex64


def with_nan(coeffs: np.ndarray) -> np.ndarray:
    spoiled = coeffs.copy()
    spoiled[1, 7] = np.nan
    return spoiled


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda c, f, i, j: (c[0], f, i, j, {}), ParameterError, "2-D"),
        (lambda c, f, i, j: (c, f[:-1], i, j, {}), ParameterError, "one per coefficient"),
        (lambda c, f, i, j: (c, f - 1, i, j, {}), ParameterError, "negative"),
        (lambda c, f, i, j: (c, f.astype(float), i, j, {}), ParameterError, "integer"),
        (lambda c, f, i, j: (c, f, i, j[:-1], {}), ParameterError, "equal length"),
        (lambda c, f, i, j: (c, f, i, j + 100, {}), ParameterError, "out of range"),
        (lambda c, f, i, j: (c, f, i + 4, j, {}), ParameterError, "out of range"),
        (lambda c, f, i, j: (c, f, i, j + 4, {"reflect": True}), ParameterError, "out of range"),
        (lambda c, f, i, j: (c, f, i, j, {"reflect": np.ones(2)}), ParameterError, "boolean"),
        (lambda c, f, i, j: (c, f, i, j, {"n_angles": 2 * K_MAX}), ParameterError, "n_angles"),
        (lambda c, f, i, j: (c, f, i, j, {"batch": 0}), ParameterError, "batch"),
        (lambda c, f, i, j: (c, f, i, j, {"positive_frequency_weight": 0}), ParameterError, "positive_frequency"),
        (lambda c, f, i, j: (with_nan(c), f, i, j, {}), InputError, "NaN"),
    ],
)
def test_bad_input_raises_one_line_errors(change, error, match):
    rng = np.random.default_rng(11)
    frequencies = fb_like_frequencies()
    coeffs = random_coefficients(rng, 6, frequencies)
    coeffs_, frequencies_, i, j, options = change(coeffs, frequencies, np.array([0, 1, 2]), np.array([3, 4, 5]))
    with pytest.raises(error, match=match) as raised:
        align_pairs(coeffs_, frequencies_, i, j, **options)
    assert "\n" not in str(raised.value)
