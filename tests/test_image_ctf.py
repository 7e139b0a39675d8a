"""Image utilities and the CTF model: measured properties."""

from __future__ import annotations

import numpy as np
import pytest

from cryoden_dist.ctf import CTFParams, apply_ctf, ctf_images, electron_wavelength, phase_flip
from cryoden_dist.image import (
    centered_coordinates,
    disk_mask,
    fourier_crop,
    fourier_shift,
    noise_variance_from_corners,
    radial_average,
)


def _gaussian(box: int, sigma: float, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    y, x = centered_coordinates(box)
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))


def _centroid(image: np.ndarray) -> tuple[float, float]:
    y, x = centered_coordinates(image.shape[-1])
    w = np.clip(image, 0, None)
    return float((w * x).sum() / w.sum()), float((w * y).sum() / w.sum())


@pytest.mark.parametrize(("box", "new_box"), [(65, 33), (65, 32), (64, 32), (64, 33), (96, 48)])
def test_fourier_crop_keeps_centre_and_mean(box, new_box):
    image = _gaussian(box, 4.0, cx=2.0, cy=-3.0)[None]
    out = fourier_crop(image, new_box)
    assert out.shape == (1, new_box, new_box)
    np.testing.assert_allclose(out.mean(), image.mean(), rtol=1e-6)
    cx, cy = _centroid(out[0])
    scale = new_box / box
    assert abs(cx - 2.0 * scale) < 1e-3 and abs(cy + 3.0 * scale) < 1e-3


def test_fourier_crop_same_box_is_identity():
    image = np.random.default_rng(0).normal(size=(2, 16, 16))
    np.testing.assert_allclose(fourier_crop(image, 16), image.astype(np.float32))
    with pytest.raises(ValueError, match="larger"):
        fourier_crop(image, 17)


@pytest.mark.parametrize("box", [32, 33])
def test_fourier_shift_integer_equals_roll_and_subpixel_moves_centroid(box):
    image = _gaussian(box, 3.0)[None]
    shifted = fourier_shift(image, np.array([[3.0, -2.0]]))
    np.testing.assert_allclose(shifted[0], np.roll(image[0], (-2, 3), axis=(0, 1)), atol=1e-6)
    cx, cy = _centroid(fourier_shift(image, np.array([[0.4, 1.3]]))[0])
    assert abs(cx - 0.4) < 1e-3 and abs(cy - 1.3) < 1e-3


def test_noise_variance_from_corners_and_radial_average():
    rng = np.random.default_rng(1)
    images = 5.0 + rng.normal(scale=2.0, size=(50, 64, 64))
    images[:, disk_mask(64, 20)] += 100.0  # a "particle" that must not leak into the estimate
    assert abs(noise_variance_from_corners(images, radius=20) - 4.0) < 0.1
    power = np.abs(np.fft.fft2(rng.normal(size=(20, 32, 32)))) ** 2
    profile = radial_average(power).mean(axis=0)
    assert profile.shape == (17,)
    np.testing.assert_allclose(profile[1:], 32 * 32, rtol=0.15)  # white noise: flat


def _params(**overrides) -> CTFParams:
    values = dict(
        defocus_u=15000.0,
        defocus_v=15000.0,
        defocus_angle=0.0,
        voltage=300.0,
        cs=2.7,
        amplitude_contrast=0.1,
        phase_shift=0.0,
        pixel_size=1.0,
    )
    values.update(overrides)
    return CTFParams(**values)


def test_electron_wavelength_known_values():
    # Standard relativistic wavelengths (Å): 0.02508 at 200 kV, 0.01969 at 300 kV
    np.testing.assert_allclose(electron_wavelength([200.0, 300.0]), [0.025079, 0.019687], atol=2e-6)


def test_ctf_origin_is_amplitude_contrast_and_first_zero_matches_theory():
    box, px = 256, 1.0
    ctf = ctf_images(_params(cs=0.0, pixel_size=px), box, centered=True)[0]
    centre = box // 2
    assert abs(ctf[centre, centre] - 0.1) < 1e-6
    # Cs = 0: first zero where pi*lambda*df*s^2 + atan(Q/sqrt(1-Q^2)) = pi
    lam = electron_wavelength(300.0)
    s_zero = np.sqrt((np.pi - np.arcsin(0.1)) / (np.pi * lam * 15000.0))
    profile = ctf[centre, centre:]
    s = np.arange(profile.size) / (box * px)
    crossing = np.nonzero(np.diff(np.sign(profile)))[0][0]
    s_measured = s[crossing] + (s[crossing + 1] - s[crossing]) * profile[crossing] / (
        profile[crossing] - profile[crossing + 1]
    )
    assert abs(s_measured - s_zero) / s_zero < 2e-3
    assert profile[1] > 0.1  # positive first lobe (RELION convention)


def test_ctf_astigmatism_angle_orientation():
    box = 128
    params = _params(defocus_u=20000.0, defocus_v=10000.0, defocus_angle=np.pi / 2, pixel_size=4.0)
    ctf = ctf_images(params, box, centered=True)[0]
    # defocus_u lies along the astigmatism angle (here the y axis): faster oscillation along y
    c = box // 2
    along_y = np.count_nonzero(np.diff(np.sign(ctf[c:, c])))
    along_x = np.count_nonzero(np.diff(np.sign(ctf[c, c:])))
    assert along_y > along_x
    rotated = ctf_images(_params(defocus_u=2e4, defocus_v=1e4, defocus_angle=0.0, pixel_size=4.0), box, centered=True)[
        0
    ]
    np.testing.assert_allclose(ctf[1:, 1:], rotated[1:, 1:].T, atol=1e-5)


def test_apply_ctf_and_phase_flip():
    rng = np.random.default_rng(2)
    images = rng.normal(size=(3, 32, 32))
    ctf = ctf_images(_params(defocus_u=[1e4, 2e4, 3e4], defocus_v=[1e4, 2e4, 3e4], pixel_size=3.0), 32)
    modulated = apply_ctf(images, ctf)
    expected = np.fft.ifft2(np.fft.fft2(images) * ctf).real
    np.testing.assert_allclose(modulated, expected, atol=1e-5)
    flipped = phase_flip(modulated, ctf)
    spectrum = np.fft.fft2(flipped)
    np.testing.assert_allclose(spectrum, np.fft.fft2(images) * np.abs(ctf), atol=1e-3)
    assert len(CTFParams(**_params().as_dict())) == 1
