"""Covariance Wiener filtering with per-particle CTFs: the coefficient CTF map, mergeable statistics, recovery of a
planted mean and covariance through CTFs, and the Wiener estimate against the oracle filter and phase-flip sPCA."""

from __future__ import annotations

import numpy as np
import pytest

from cryoden_dist.basis import FBBasis
from cryoden_dist.basis.cwf import CWFStatistics, coefficient_ctf, cwf_statistics, fb_ctf, fit_cwf
from cryoden_dist.basis.spca import fit_spca, noise_covariance, spca_statistics
from cryoden_dist.ctf import CTFParams, ctf_images, ctf_ring_radii
from cryoden_dist.errors import ParameterError

BOX = 33
NOISE_VARIANCE = 1.0
N_IMAGES = 3000


@pytest.fixture(scope="module")
def basis() -> FBBasis:
    return FBBasis(BOX, radius=BOX // 2 - 1)


def _ctfs(n: int, rng: np.random.Generator) -> np.ndarray:
    """Real CTF images (FFT order) at 3 A/px with defoci 1-3 um: zeros inside the disk, as in real data."""
    params = CTFParams(
        defocus_u=rng.uniform(10000, 30000, n),
        defocus_v=rng.uniform(10000, 30000, n),
        defocus_angle=rng.uniform(0, np.pi, n),
        voltage=np.full(n, 300.0),
        cs=np.full(n, 2.7),
        amplitude_contrast=np.full(n, 0.1),
        phase_shift=np.zeros(n),
        pixel_size=np.full(n, 3.0),
    )
    return ctf_images(params, BOX)


@pytest.fixture(scope="module")
def planted(basis):
    """Coefficients ``a = h x + e`` of a planted low-rank, rotation-invariant population through real CTFs.

    ``x``: per ``k <= 6`` a rank-2 covariance (random orthonormal directions, variances 40 and 10), a ``k = 0``
    mean; ``h``: :func:`fb_ctf` of real CTFs; ``e``: FB coefficients of white pixel noise (exact noise model).
    """
    rng = np.random.default_rng(3)
    x = np.zeros((N_IMAGES, basis.count), dtype=np.complex128)
    directions = {}
    for k in range(7):
        part = basis.coefficients_at(k)
        q = part.stop - part.start
        vectors, _ = np.linalg.qr(rng.standard_normal((q, 2)))
        directions[k] = vectors
        scale = np.sqrt([40.0, 10.0])
        latent = rng.standard_normal((N_IMAGES, 2)) * scale
        if k > 0:  # complex: real and imaginary parts each carry the variance (E|z|^2 = 2 x variance)
            latent = latent + 1j * rng.standard_normal((N_IMAGES, 2)) * scale
        x[:, part] = latent @ vectors.T
    mean = np.zeros(basis.coefficients_at(0).stop)
    mean[:4] = [30.0, -20.0, 10.0, 5.0]
    x[:, basis.coefficients_at(0)] += mean
    h = fb_ctf(_ctfs(N_IMAGES, rng), basis)
    noise = basis.expand(rng.normal(0.0, np.sqrt(NOISE_VARIANCE), (N_IMAGES, BOX, BOX)))
    return {"x": x, "h": h, "a": h * x + noise, "mean": mean, "directions": directions}


def test_coefficient_ctf_interpolates_ring_profiles_at_the_radial_frequency(basis):
    radii = ctf_ring_radii(BOX, basis.radius)
    frequency = basis.bessel_zeros / (2 * np.pi * basis.radius) * BOX
    linear = coefficient_ctf(np.stack([radii, 2 * radii + 1]), basis)
    expected = np.minimum(frequency, radii[-1])
    np.testing.assert_allclose(linear[0], expected, rtol=1e-5)
    np.testing.assert_allclose(linear[1], 2 * expected + 1, rtol=1e-5)
    with pytest.raises(ParameterError, match="rings"):
        coefficient_ctf(np.ones((2, radii.size + 1)), basis)


def test_fb_ctf_of_an_isotropic_ctf_is_its_value_at_the_coefficient_frequency(basis):
    rng = np.random.default_rng(0)
    ctf = _ctfs(4, rng)
    magnitude = fb_ctf(ctf, basis)
    assert magnitude.shape == (4, basis.count) and magnitude.min() >= 0 and magnitude.max() <= 1
    # A constant CTF is a constant per coefficient.
    np.testing.assert_allclose(fb_ctf(np.full((1, BOX, BOX), -0.5), basis), 0.5, rtol=1e-6)


def test_statistics_merge_and_round_trip_through_arrays(basis, planted):
    a, h = planted["a"][:900], planted["h"][:900]
    whole = cwf_statistics(a, h, basis)
    merged = sum(cwf_statistics(a[s : s + 300], h[s : s + 300], basis) for s in range(0, 900, 300))
    restored = CWFStatistics.from_arrays(merged.to_arrays())
    assert restored.count == whole.count == 900
    for name in ("mean_numerator", "mean_denominator", "cross"):
        np.testing.assert_allclose(getattr(restored, name), getattr(whole, name), rtol=1e-9, atol=1e-9)
    for name in ("second_moments", "ctf_second", "ctf_fourth"):
        for got, want in zip(getattr(restored, name), getattr(whole, name), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-6)


def test_fit_recovers_the_ctf_free_mean_and_covariance(basis, planted):
    model = fit_cwf(cwf_statistics(planted["a"], planted["h"], basis), basis, NOISE_VARIANCE)
    np.testing.assert_allclose(model.mean[:4], planted["mean"][:4], atol=1.5)
    assert np.abs(model.mean[4:]).max() < 1.5
    for k, truth in planted["directions"].items():
        assert model.kept[k] >= 1, k
        # The leading kept direction lies in the planted plane (cosine of the angle to it).
        leading = model.eigenvectors[k][:, 0]
        assert np.linalg.norm(truth.T @ leading) > 0.97, k
    # Frequencies without planted signal keep (almost) nothing.
    assert model.kept[7:].sum() <= 2


def test_estimate_is_near_the_oracle_wiener_filter_and_beats_phase_flip_spca(basis, planted):
    x, h, a = planted["x"], planted["h"], planted["a"]
    model = fit_cwf(cwf_statistics(a, h, basis), basis, NOISE_VARIANCE)
    estimate = model.denoise(a, h)
    assert estimate.dtype == np.complex64 and estimate.shape == a.shape
    error = np.sum(np.abs(estimate - x) ** 2)
    # The oracle: the same Wiener filter with the planted mean and covariance.
    noise_cov = noise_covariance(basis)
    oracle = np.zeros_like(x)
    oracle[:, basis.coefficients_at(0)] = planted["mean"]
    for k, vectors in planted["directions"].items():
        part = basis.coefficients_at(k)
        covariance = vectors @ np.diag([40.0, 10.0]) @ vectors.T * (1 if k == 0 else 2)
        for i in range(len(a)):
            hi = h[i, part]
            gram = hi[:, None] * covariance * hi[None, :] + NOISE_VARIANCE * noise_cov[k]
            residual = a[i, part] - hi * oracle[i, part]
            oracle[i, part] += covariance @ (hi * np.linalg.solve(gram, residual))
    oracle_error = np.sum(np.abs(oracle - x) ** 2)
    # sPCA of the phase-flipped coefficients estimates |H| x, not x: its error includes the CTF.
    spca = fit_spca(spca_statistics(a, basis), basis, NOISE_VARIANCE)
    spca_error = np.sum(np.abs(spca.denoise(a) - x) ** 2)
    raw_error = np.sum(np.abs(a - x) ** 2)
    # measured: raw 3.68e6, sPCA of the flipped coefficients 2.45e6, CWF 1.724e5, oracle 1.716e5
    assert error < 1.03 * oracle_error
    assert error < 0.15 * spca_error
    assert error < 0.1 * raw_error


def test_bad_inputs_are_one_line_errors(basis, planted):
    stats = cwf_statistics(planted["a"][:10], planted["h"][:10], basis)
    with pytest.raises(ParameterError, match="noise variance"):
        fit_cwf(stats, basis, 0.0)
    with pytest.raises(ParameterError, match="shrinker"):
        fit_cwf(stats, basis, 1.0, shrinker="soft")
    with pytest.raises(ParameterError, match="must both be"):
        cwf_statistics(planted["a"][:10], planted["h"][:9], basis)
    with pytest.raises(ParameterError, match="too few"):
        fit_cwf(cwf_statistics(planted["a"][:1], planted["h"][:1], basis), basis, 1.0)
