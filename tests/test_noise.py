"""Noise models: white noise, and patches cut from the background of a real micrograph."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest

from cryoden_dist.errors import InputError, ParameterError
from cryoden_dist.image import fourier_resample, radial_average
from cryoden_dist.sim.noise import (
    background_centres,
    load_micrograph,
    local_lowpass_variance,
    micrograph_noise_patches,
    parse_noise_spec,
    prepare_micrograph_noise,
    white_noise,
)

BOX = 65
PIXEL_SIZE = 5.0


@pytest.fixture(scope="module")
def micrograph(shared_data):
    return load_micrograph(shared_data / "micrographs" / "bin4" / "epu2.9_example_bin4.mrc")


def radial_power(patches: np.ndarray) -> np.ndarray:
    """Mean power spectrum of the patches averaged over rings 1 .. L//2 (zero frequency left out)."""
    power = np.mean(np.abs(np.fft.fft2(patches)) ** 2, axis=0)
    return radial_average(power)[1:]


def test_white_noise_is_standard_normal():
    noise = white_noise((200, 33, 33), np.random.default_rng(0))
    assert noise.dtype == np.float32
    assert abs(noise.mean()) < 0.01 and abs(noise.var() - 1) < 0.01
    spectrum = radial_power(noise)
    assert spectrum.max() / spectrum.min() < 1.15  # measured 1.07


def test_load_micrograph_reads_header_pixel_size(micrograph, shared_data):
    image, pixel_size = micrograph
    assert image.shape == (1024, 1024) and image.dtype == np.float32
    assert pixel_size == pytest.approx(2.666, abs=1e-3)


def test_load_micrograph_errors(tmp_path):
    with pytest.raises(InputError, match="no such micrograph"):
        load_micrograph(tmp_path / "missing.mrc")
    no_pixel = tmp_path / "no_pixel.mrc"
    with mrcfile.new(no_pixel) as mrc:
        mrc.set_data(np.zeros((64, 64), dtype=np.float32))
    with pytest.raises(InputError, match="no pixel size"):
        load_micrograph(no_pixel)
    stack = tmp_path / "stack.mrc"
    with mrcfile.new(stack) as mrc:
        mrc.set_data(np.zeros((3, 64, 64), dtype=np.float32))
        mrc.voxel_size = 1.0
    with pytest.raises(InputError, match="one 2D micrograph"):
        load_micrograph(stack)
    garbage = tmp_path / "garbage.mrc"
    garbage.write_bytes(b"not an mrc file at all" * 100)
    with pytest.raises(InputError, match="not a readable MRC"):
        load_micrograph(garbage)


def test_fourier_resample_rectangular_keeps_mean_and_low_frequencies():
    y, x = np.mgrid[0:90, 0:120]
    # a band-limited image (3 and 2 cycles across) survives the crop exactly
    image = 2.0 + np.cos(2 * np.pi * 3 * x / 120) * np.sin(2 * np.pi * 2 * y / 90)
    small = fourier_resample(image, (45, 60))
    ys, xs = np.mgrid[0:45, 0:60]
    # centre pixel (45, 60) -> (22, 30): new pixel (ys, xs) sits at old (2 ys + 1, 2 xs)
    expected = 2.0 + np.cos(2 * np.pi * 3 * xs / 60) * np.sin(2 * np.pi * 2 * (ys + 0.5) / 45)
    np.testing.assert_allclose(small, expected, atol=1e-5)


def test_background_windows_are_flatter_than_random_ones(micrograph):
    noise = prepare_micrograph_noise(*micrograph, BOX, PIXEL_SIZE)
    # resampled to the simulation's pixel size: 1024 * 2.666 / 5 = 546 px
    assert noise.micrograph.shape == (546, 546)
    assert noise.pixel_size == pytest.approx(PIXEL_SIZE, rel=1e-3)
    variance = local_lowpass_variance(noise.micrograph, BOX)
    selected = variance[noise.centres[:, 0], noise.centres[:, 1]]
    rng = np.random.default_rng(0)
    low, high = BOX // 2, noise.micrograph.shape[0] - (BOX - BOX // 2)
    random_centres = rng.integers(low, high + 1, size=(len(selected), 2))
    random = variance[random_centres[:, 0], random_centres[:, 1]]
    # measured: background mean 129 vs 180 for random windows (x0.72)
    assert selected.mean() < 0.8 * random.mean()
    assert selected.max() <= np.quantile(random, 0.45)
    # every window lies inside the micrograph
    assert noise.centres.min() >= BOX // 2 and noise.centres.max() <= high
    # and the criterion picks the flattest windows of a synthetic image with "particles"
    flat = np.random.default_rng(2).standard_normal((256, 256))
    flat[40:90, 40:90] += 5 * np.hanning(50)[:, None] * np.hanning(50)[None, :]
    centres = background_centres(flat, 32)
    assert not np.any((np.abs(centres[:, 0] - 65) < 16) & (np.abs(centres[:, 1] - 65) < 16))


def test_patches_are_deterministic_normalised_and_coloured(micrograph):
    patches = micrograph_noise_patches(*micrograph, BOX, PIXEL_SIZE, 600, np.random.default_rng(5))
    again = micrograph_noise_patches(*micrograph, BOX, PIXEL_SIZE, 600, np.random.default_rng(5))
    other = micrograph_noise_patches(*micrograph, BOX, PIXEL_SIZE, 600, np.random.default_rng(6))
    np.testing.assert_array_equal(patches, again)
    assert not np.allclose(patches, other)
    assert patches.shape == (600, BOX, BOX) and patches.dtype == np.float32
    np.testing.assert_allclose(patches.mean(axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(patches.var(axis=(1, 2)), 1.0, rtol=1e-4)
    spectrum = radial_power(patches)
    # the micrograph's colour (CTF, detector, binning) is kept: measured max/min 12.0
    assert spectrum.max() / spectrum.min() > 4


def test_whitened_patches_have_a_flat_spectrum(micrograph):
    patches = micrograph_noise_patches(*micrograph, BOX, PIXEL_SIZE, 600, np.random.default_rng(5), whiten=True)
    np.testing.assert_allclose(patches.var(axis=(1, 2)), 1.0, rtol=1e-4)
    spectrum = radial_power(patches)
    # measured max/min 1.05 over rings 1..32, as for 600 white-noise patches (1.05)
    assert spectrum.max() / spectrum.min() < 1.15


def test_micrograph_coarser_than_the_simulation_is_refused(micrograph):
    with pytest.raises(ParameterError, match="coarser"):
        prepare_micrograph_noise(*micrograph, BOX, 1.0)


def test_parse_noise_spec():
    assert parse_noise_spec("white").kind == "white"
    spec = parse_noise_spec("micrograph:/data/m.mrc")
    assert (spec.kind, str(spec.micrograph), spec.whiten) == ("micrograph", "/data/m.mrc", False)
    assert parse_noise_spec("micrograph:m.mrc:whiten").whiten
    for bad in ("pink", "micrograph", "micrograph:", "micrograph::whiten", "gaussian:1"):
        with pytest.raises(ParameterError, match="--noise"):
            parse_noise_spec(bad)
