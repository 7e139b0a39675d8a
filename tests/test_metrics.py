"""Metrics against values derived by hand or by a straightforward reference implementation."""

from __future__ import annotations

import numpy as np
import pytest
from _synthetic import blob_particles
from skimage.metrics import structural_similarity

from cryoden_dist.image import radial_index
from cryoden_dist.metrics import (
    fourier_ring_correlation,
    frc_resolution,
    mse,
    psnr,
    relative_mse,
    relative_mse_per_image,
    shell_frequencies,
    ssim,
)


@pytest.fixture(scope="module")
def clean():
    return blob_particles(12, 32, np.random.default_rng(3))


def test_relative_mse_reference_points(clean):
    assert relative_mse(clean, clean) == 0.0
    assert relative_mse(np.zeros_like(clean), clean) == pytest.approx(1.0)
    assert relative_mse(2 * clean, clean) == pytest.approx(1.0)
    per_image = relative_mse_per_image(0.5 * clean, clean)
    np.testing.assert_allclose(per_image, 0.25, rtol=1e-6)
    # the stack value weighs images by their energy
    scaled = clean * np.arange(1, 13, dtype=np.float32)[:, None, None]
    estimate = scaled.copy()
    estimate[0] = 0
    expected = np.sum(scaled[0] ** 2) / np.sum(scaled**2)
    assert relative_mse(estimate, scaled) == pytest.approx(expected, rel=1e-6)


def test_mse_and_psnr_of_a_constant_offset(clean):
    offset = 0.05
    np.testing.assert_allclose(mse(clean + offset, clean), offset**2, rtol=1e-4)
    peak = clean.max(axis=(1, 2)) - clean.min(axis=(1, 2))
    np.testing.assert_allclose(psnr(clean + offset, clean), 20 * np.log10(peak / offset), rtol=1e-4)
    assert np.all(np.isinf(psnr(clean, clean)))
    assert np.isnan(psnr(np.ones((1, 8, 8)), np.zeros((1, 8, 8))))[0]


@pytest.mark.parametrize("box", [32, 33])
def test_ssim_matches_scikit_image_per_image(box):
    rng = np.random.default_rng(0)
    clean = blob_particles(40, box, rng)  # more than one vectorised batch
    noisy = clean + rng.normal(0, 0.2, clean.shape).astype(np.float32)
    values = ssim(noisy, clean)
    expected = [
        # in float64: scikit-image computes float32 inputs in float32
        structural_similarity(
            clean[i].astype(np.float64),
            noisy[i].astype(np.float64),
            data_range=float(clean[i].max()) - float(clean[i].min()),
        )
        for i in range(40)
    ]
    np.testing.assert_allclose(values, expected, rtol=1e-9)
    np.testing.assert_allclose(ssim(clean, clean), 1.0)
    assert np.all(values < 0.9)
    assert np.isnan(ssim(np.ones((1, 8, 8)), np.zeros((1, 8, 8)))[0])


def _frc_loop(a, b):
    """Reference FRC: full FFT, an explicit loop over rings."""
    box = a.shape[-1]
    shells = radial_index(box)
    fa, fb = np.fft.fft2(a), np.fft.fft2(b)
    out = np.zeros((a.shape[0], box // 2 + 1))
    for k in range(box // 2 + 1):
        ring = shells == k
        cross = (fa[:, ring] * fb[:, ring].conj()).real.sum(axis=1)
        power = (np.abs(fa[:, ring]) ** 2).sum(axis=1) * (np.abs(fb[:, ring]) ** 2).sum(axis=1)
        out[:, k] = cross / np.sqrt(power)
    return out


@pytest.mark.parametrize("box", [32, 33])
def test_frc_matches_a_loop_over_rings(box):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, box, box))
    b = a + rng.normal(size=(5, box, box))
    frc = fourier_ring_correlation(a, b)
    assert frc.shape == (5, box // 2 + 1)
    np.testing.assert_allclose(frc, _frc_loop(a, b), atol=1e-10)


def test_frc_limits():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(200, 32, 32))
    np.testing.assert_allclose(fourier_ring_correlation(a, a), 1.0, atol=1e-12)
    np.testing.assert_allclose(fourier_ring_correlation(a, -3 * a), -1.0, atol=1e-12)
    independent = fourier_ring_correlation(a, rng.normal(size=a.shape)).mean(axis=0)
    # the mean over 200 images of a correlation over >= 8 coefficients: |mean| < 4 / sqrt(200 * 8)
    assert np.all(np.abs(independent[1:]) < 4 / np.sqrt(200 * 8))
    # no power in a ring -> 0, not nan
    assert np.all(fourier_ring_correlation(np.zeros((1, 16, 16)), a[:1, :16, :16]) == 0)


def test_frc_resolution_interpolates_the_crossing():
    box, pixel_size = 64, 2.0
    shells = np.arange(box // 2 + 1)
    curve = 1.0 - shells / (box // 2)  # drops below 0.5 just after shell 16
    assert frc_resolution(curve, pixel_size, 0.5) == pytest.approx(box * pixel_size / 16)
    assert frc_resolution(curve, pixel_size, 0.143) == pytest.approx(box * pixel_size / (32 * 0.857))
    # two curves at once
    both = frc_resolution(np.stack([curve, np.ones_like(curve)]), pixel_size, 0.5)
    np.testing.assert_allclose(both, [8.0, 2 * pixel_size])  # never below -> Nyquist
    low = np.full_like(curve, 0.01)
    assert frc_resolution(low, pixel_size, 0.143) == np.inf
    assert np.isnan(frc_resolution(np.full_like(curve, np.nan), pixel_size))
    odd = np.ones(33)
    assert frc_resolution(odd, 1.0, box=65) == pytest.approx(65 / 32)
    with pytest.raises(ValueError, match="box"):
        frc_resolution(odd, 1.0, box=70)
    np.testing.assert_allclose(shell_frequencies(box, pixel_size)[[0, 32]], [0.0, 1 / (2 * pixel_size)])


def test_shape_errors():
    with pytest.raises(ValueError, match="differ"):
        mse(np.zeros((2, 8, 8)), np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="square"):
        mse(np.zeros((2, 8, 9)), np.zeros((2, 8, 9)))
