"""Image-quality metrics of estimates against ground truth, over stacks ``[n, L, L]``.

Every function takes the estimate first and the reference (clean truth)
second, both of shape ``[n, L, L]`` (a single ``[L, L]`` image is treated as
a stack of one), and returns one value per image unless it says otherwise.
Sums are accumulated in float64 whatever the input dtype.

Conventions
-----------
* Relative MSE of a stack: ``sum_i ||x^_i - x_i||^2 / sum_i ||x_i||^2``: the
  error energy over the signal energy of the whole stack, so images with more
  signal weigh more. 0 is perfect; 1 is what the all-zero estimate scores.
* PSNR peak: the data range (max - min) of each *clean* image, as
  scikit-image does, so the value does not depend on the estimate's range.
* Fourier shells: shell ``k`` holds the DFT grid points whose frequency
  radius rounds to ``k`` Fourier pixels (:func:`cryoden_dist.image.radial_index`);
  shells ``0 .. L // 2`` are complete rings, the corners beyond Nyquist are
  left out of the FRC. Shell ``k`` is the spatial frequency ``k / (L p)`` in
  1/Å for a pixel size ``p`` in Å, i.e. the resolution ``L p / k`` Å.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from .image import radial_index

__all__ = [
    "fourier_ring_correlation",
    "frc_resolution",
    "mse",
    "psnr",
    "relative_mse",
    "relative_mse_per_image",
    "shell_frequencies",
    "squared_error",
    "squared_norm",
    "ssim",
]


def _as_stack(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"expected square images of shape [n, L, L], got {images.shape}")
    return images


def _as_pair(estimate: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    estimate, truth = _as_stack(estimate), _as_stack(truth)
    if estimate.shape != truth.shape:
        raise ValueError(f"estimate {estimate.shape} and truth {truth.shape} differ in shape")
    return estimate, truth


def squared_norm(images: np.ndarray) -> np.ndarray:
    """``||x_i||^2`` of every image, float64 ``[n]``."""
    images = _as_stack(images)
    return np.einsum("nij,nij->n", images, images, dtype=np.float64)


def squared_error(estimate: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``||x^_i - x_i||^2`` of every image, float64 ``[n]``."""
    estimate, truth = _as_pair(estimate, truth)
    return squared_norm(estimate.astype(np.float64) - truth)


def mse(estimate: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Mean squared error per pixel of every image, ``[n]``."""
    estimate, truth = _as_pair(estimate, truth)
    return squared_error(estimate, truth) / (truth.shape[-1] * truth.shape[-2])


def relative_mse(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Relative MSE of the stack, ``sum_i ||x^_i - x_i||^2 / sum_i ||x_i||^2``.

    Returns
    -------
    float
        0 for a perfect estimate, 1 for the all-zero estimate; ``nan`` if
        every clean image is zero.
    """
    error, norm = squared_error(estimate, truth).sum(), squared_norm(truth).sum()
    return float(error / norm) if norm > 0 else float("nan")


def relative_mse_per_image(estimate: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Relative squared error of every image, ``||x^_i - x_i||^2 / ||x_i||^2``.

    Returns
    -------
    ndarray, shape (n,)
        ``nan`` where the clean image is zero.
    """
    error, norm = squared_error(estimate, truth), squared_norm(truth)
    return np.divide(error, norm, out=np.full_like(error, np.nan), where=norm > 0)


def _data_range(truth: np.ndarray) -> np.ndarray:
    flat = truth.reshape(truth.shape[0], -1)
    return flat.max(axis=1).astype(np.float64) - flat.min(axis=1)


def psnr(estimate: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Peak signal-to-noise ratio in dB of every image.

    ``PSNR_i = 10 log10(R_i^2 / MSE_i)`` with the peak ``R_i = max(x_i) -
    min(x_i)``, the data range of the *clean* image.

    Returns
    -------
    ndarray, shape (n,)
        ``inf`` for an exact estimate; ``nan`` for a flat clean image
        (``R_i = 0``), where the peak is undefined.
    """
    estimate, truth = _as_pair(estimate, truth)
    peak = _data_range(truth)
    error = mse(estimate, truth)
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(peak * peak) - 10.0 * np.log10(error)
    values[peak == 0] = np.nan
    return values


#: SSIM window (pixels) and constants: scikit-image's defaults (Wang et al. 2004 with a uniform window).
SSIM_WINDOW, SSIM_K1, SSIM_K2 = 7, 0.01, 0.03
#: Images per vectorised SSIM batch.
SSIM_BATCH = 32


def ssim(estimate: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Structural similarity of every image, as ``skimage.metrics.structural_similarity``.

    Each image is compared with ``data_range`` set to its clean image's data
    range (the same peak as :func:`psnr`), with scikit-image's defaults: a
    7 x 7 uniform window (reflecting edges), sample covariances, ``K1 =
    0.01``, ``K2 = 0.03``, and the mean over the image less a 3-pixel border.
    This is scikit-image's computation vectorised over the images (batches
    of :data:`SSIM_BATCH`, small enough to stay in cache): about twice as
    fast as calling scikit-image once per image.

    Returns
    -------
    ndarray, shape (n,)
        1 for an exact estimate; ``nan`` for a flat clean image.
    """
    estimate, truth = _as_pair(estimate, truth)
    if truth.shape[-1] < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} x {SSIM_WINDOW} pixels, got {truth.shape}")
    values = np.concatenate(
        [
            _ssim_batch(estimate[i : i + SSIM_BATCH], truth[i : i + SSIM_BATCH])
            for i in range(0, truth.shape[0], SSIM_BATCH)
        ]
    )
    values[_data_range(truth) == 0] = np.nan
    return values


def _ssim_batch(estimate: np.ndarray, truth: np.ndarray) -> np.ndarray:
    from scipy.ndimage import uniform_filter

    x, y = truth.astype(np.float64), estimate.astype(np.float64)
    peak = _data_range(truth)[:, None, None]

    def local_mean(values: np.ndarray) -> np.ndarray:
        return uniform_filter(values, size=(1, SSIM_WINDOW, SSIM_WINDOW))

    points = SSIM_WINDOW * SSIM_WINDOW
    sample = points / (points - 1)
    mean_x, mean_y = local_mean(x), local_mean(y)
    var_x = sample * (local_mean(x * x) - mean_x * mean_x)
    var_y = sample * (local_mean(y * y) - mean_y * mean_y)
    cov_xy = sample * (local_mean(x * y) - mean_x * mean_y)
    c1, c2 = (SSIM_K1 * peak) ** 2, (SSIM_K2 * peak) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        index = ((2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)) / (
            (mean_x * mean_x + mean_y * mean_y + c1) * (var_x + var_y + c2)
        )
    border = (SSIM_WINDOW - 1) // 2
    return index[:, border:-border, border:-border].mean(axis=(1, 2))


def shell_frequencies(box: int, pixel_size: float = 1.0) -> np.ndarray:
    """Spatial frequency of the FRC shells ``0 .. L // 2`` (1/Å, or cycles/pixel when ``pixel_size`` is 1)."""
    return np.arange(box // 2 + 1) / (box * pixel_size)


def _half_plane_shells(box: int) -> tuple[np.ndarray, np.ndarray]:
    """Shell index and weight of the ``rfft2`` grid points inside the Nyquist circle (flattened).

    The weight counts each point of the real-FFT half plane together with its
    Hermitian mirror, so weighted sums over the half plane equal sums over the
    full DFT plane.
    """
    columns = box // 2 + 1
    # Columns 0 .. L//2 of the full grid have the same frequency magnitudes as the rfft2 columns.
    shells = radial_index(box)[:, :columns]
    column_weight = np.full(columns, 2.0)
    column_weight[0] = 1.0
    if box % 2 == 0:
        column_weight[-1] = 1.0  # the Nyquist column is its own mirror
    weights = np.broadcast_to(column_weight, shells.shape)
    inside = shells <= box // 2
    return shells[inside], weights[inside]


def fourier_ring_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fourier ring correlation of every pair of images ``a[i]``, ``b[i]``.

    .. math::

        \\mathrm{FRC}_i(k) = \\frac{\\mathrm{Re}\\sum_{|q| = k} A_i(q) B_i(q)^*}
            {\\sqrt{\\sum_{|q| = k} |A_i(q)|^2 \\sum_{|q| = k} |B_i(q)|^2}}

    Parameters
    ----------
    a, b : ndarray, shape (n, L, L)

    Returns
    -------
    ndarray, shape (n, L // 2 + 1)
        Shells ``0`` (zero frequency) to ``L // 2`` (Nyquist). A shell where
        either image has no power is 0: nothing is correlated there (this is
        what a low-pass filtered estimate gives above its cutoff).
    """
    a, b = _as_pair(a, b)
    n, box = a.shape[0], a.shape[-1]
    n_shells = box // 2 + 1
    spectrum_a = scipy.fft.rfft2(a).reshape(n, -1)
    spectrum_b = scipy.fft.rfft2(b).reshape(n, -1)
    shells, weights = _half_plane_shells(box)
    inside = (radial_index(box)[:, :n_shells] <= box // 2).ravel()
    spectrum_a, spectrum_b = spectrum_a[:, inside], spectrum_b[:, inside]
    # One bincount over (image, shell) pairs sums every ring of every image at once.
    bins = (np.arange(n)[:, None] * n_shells + shells[None, :]).ravel()

    def ring_sums(values: np.ndarray) -> np.ndarray:
        weighted = (values * weights).ravel()
        return np.bincount(bins, weights=weighted, minlength=n * n_shells).reshape(n, n_shells)

    cross = ring_sums((spectrum_a * spectrum_b.conj()).real)
    power = ring_sums(np.abs(spectrum_a) ** 2) * ring_sums(np.abs(spectrum_b) ** 2)
    return np.divide(cross, np.sqrt(power), out=np.zeros_like(cross), where=power > 0)


def frc_resolution(
    frc: np.ndarray, pixel_size: float, threshold: float = 0.143, *, box: int | None = None
) -> np.ndarray | float:
    """Resolution in Å at which FRC curves first drop below ``threshold``.

    The crossing is interpolated linearly between the last shell at or above
    the threshold and the first shell below it (searching from shell 1; shell
    0 is the zero frequency).

    Parameters
    ----------
    frc : ndarray, shape (..., L // 2 + 1)
        Curves from :func:`fourier_ring_correlation` (or their mean).
    pixel_size : float
        Pixel size in Å.
    threshold : float
        0.143 (the usual criterion for a comparison with a reference) or 0.5.
    box : int, optional
        Image size ``L``; default ``2 * (n_shells - 1)`` (an even box). Pass
        it for odd boxes.

    Returns
    -------
    float or ndarray
        Resolution in Å per curve (a float for one curve). Conventions:
        a curve that never drops below the threshold gets the Nyquist
        resolution ``L p / (L // 2)`` (the finest measurable; the true value
        may be finer); a curve already below the threshold at shell 0 gets
        ``inf`` (nothing resolved); an all-NaN curve gets ``nan``. Isolated
        NaN shells count as uncorrelated (0).
    """
    frc = np.asarray(frc, dtype=np.float64)
    n_shells = frc.shape[-1]
    box = int(box) if box is not None else 2 * (n_shells - 1)
    if box // 2 + 1 != n_shells:
        raise ValueError(f"an FRC of {n_shells} shells does not belong to a box of {box}")
    all_nan = np.isnan(frc).all(axis=-1)
    curve = np.nan_to_num(frc, nan=0.0)
    below = curve[..., 1:] < threshold
    crossed = below.any(axis=-1)
    first_below = np.argmax(below, axis=-1)[..., None] + 1
    after = np.take_along_axis(curve, first_below, axis=-1)[..., 0]
    before = np.take_along_axis(curve, first_below - 1, axis=-1)[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        shell = first_below[..., 0] - 1 + (before - threshold) / (before - after)
        resolution = np.where(shell > 0, box * pixel_size / shell, np.inf)
    resolution = np.where(before < threshold, np.inf, resolution)
    resolution = np.where(crossed, resolution, box * pixel_size / (box // 2))
    resolution = np.where(all_nan, np.nan, resolution)
    return float(resolution) if resolution.ndim == 0 else resolution
