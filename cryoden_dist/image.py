"""Small pure functions on stacks of square images, shape ``[n, L, L]``.

Conventions: array axes are ``(y, x)``; the image centre is pixel
``(L // 2, L // 2)``, which is also the zero frequency after ``fftshift``.
Frequencies are in cycles per pixel unless a pixel size is given, then in
1/Å.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "centered_coordinates",
    "disk_mask",
    "frequency_grid",
    "fourier_crop",
    "fourier_resample",
    "fourier_shift",
    "noise_variance_from_corners",
    "radial_average",
    "radial_index",
]


def centered_coordinates(box: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates ``(y, x)`` relative to the centre ``box // 2``.

    Parameters
    ----------
    box : int
        Side length ``L`` of the image.

    Returns
    -------
    y, x : ndarray, shape (L, L)
        Integer-valued float64 grids.
    """
    axis = np.arange(box, dtype=np.float64) - box // 2
    return np.meshgrid(axis, axis, indexing="ij")


def disk_mask(box: int, radius: float | None = None) -> np.ndarray:
    """Boolean mask of the pixels within ``radius`` of the centre.

    Parameters
    ----------
    box : int
        Side length ``L``.
    radius : float, optional
        Radius in pixels; default ``L // 2`` (the inscribed disk).
    """
    if radius is None:
        radius = box // 2
    y, x = centered_coordinates(box)
    return (x * x + y * y) <= radius * radius


def frequency_grid(box: int, pixel_size: float = 1.0, centered: bool = False):
    """Spatial frequency magnitude and angle of a 2D DFT grid.

    Parameters
    ----------
    box : int
        Side length ``L``.
    pixel_size : float
        Pixel size in Å; frequencies are returned in 1/Å (cycles per pixel
        when 1).
    centered : bool
        If True the grid is in ``fftshift`` order (zero at ``L // 2``),
        otherwise in plain FFT order.

    Returns
    -------
    s : ndarray, shape (L, L)
        Frequency magnitude.
    angle : ndarray, shape (L, L)
        ``atan2(ky, kx)`` in radians.
    """
    f = np.fft.fftfreq(box, d=pixel_size)
    if centered:
        f = np.fft.fftshift(f)
    ky, kx = np.meshgrid(f, f, indexing="ij")
    return np.hypot(kx, ky), np.arctan2(ky, kx)


def radial_index(box: int, centered: bool = False) -> np.ndarray:
    """Integer radius (in Fourier pixels) of every DFT grid point.

    Shells ``0 .. L // 2`` are complete circles; larger indices are the
    corners.
    """
    s, _ = frequency_grid(box, 1.0, centered=centered)
    return np.rint(s * box).astype(np.int64)


def radial_average(values: np.ndarray, centered: bool = False) -> np.ndarray:
    """Average ``values[..., L, L]`` over rings of the DFT grid.

    Returns an array ``[..., L // 2 + 1]`` (shell 0 to Nyquist).
    """
    box = values.shape[-1]
    shells = radial_index(box, centered=centered).ravel()
    n_shells = box // 2 + 1
    keep = shells < n_shells
    flat = values.reshape(values.shape[:-2] + (-1,))[..., keep]
    shells = shells[keep]
    counts = np.bincount(shells, minlength=n_shells)
    out = np.stack([np.bincount(shells, weights=row, minlength=n_shells) for row in flat.reshape(-1, flat.shape[-1])])
    return (out / counts).reshape(values.shape[:-2] + (n_shells,))


def fourier_crop(images: np.ndarray, new_box: int) -> np.ndarray:
    """Downsample square images by cropping their Fourier transform.

    Parameters
    ----------
    images : ndarray, shape (..., L, L)
    new_box : int
        Target side length, ``new_box <= L``.

    Returns
    -------
    ndarray, shape (..., new_box, new_box), float32

    See Also
    --------
    fourier_resample : the same for rectangular images.
    """
    return fourier_resample(images, (new_box, new_box))


def fourier_resample(images: np.ndarray, new_shape: tuple[int, int]) -> np.ndarray:
    """Downsample images by cropping their Fourier transform, per axis.

    The image mean (DC term per pixel) is preserved, so pixel values keep
    their scale, and the centre pixel ``(ny // 2, nx // 2)`` maps to
    ``(my // 2, mx // 2)``. For an even target size the unpaired Nyquist
    row or column is dropped, keeping the result real and free of aliasing.

    Parameters
    ----------
    images : ndarray, shape (..., ny, nx)
    new_shape : (int, int)
        Target ``(my, mx)``, no larger than ``(ny, nx)``.

    Returns
    -------
    ndarray, shape (..., my, mx), float32
    """
    (ny, nx), (my, mx) = images.shape[-2:], tuple(new_shape)
    if my > ny or mx > nx:
        raise ValueError(f"new shape {(my, mx)} is larger than {(ny, nx)}")
    if (my, mx) == (ny, nx):
        return np.asarray(images, dtype=np.float32)
    axes = (-2, -1)
    # Transform about the centre pixel (not pixel 0), so the centre stays the
    # centre for every size parity.
    spectrum = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(images, axes=axes)), axes=axes)
    y0, x0 = ny // 2 - my // 2, nx // 2 - mx // 2
    cropped = spectrum[..., y0 : y0 + my, x0 : x0 + mx].copy()
    if my % 2 == 0:
        cropped[..., 0, :] = 0
    if mx % 2 == 0:
        cropped[..., :, 0] = 0
    out = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(cropped, axes=axes)).real, axes=axes)
    return (out * (my * mx / (ny * nx))).astype(np.float32)


def noise_variance_from_corners(images: np.ndarray, radius: float | None = None) -> float:
    """Noise variance estimated from the pixels outside the particle disk.

    Parameters
    ----------
    images : ndarray, shape (n, L, L)
    radius : float, optional
        Particle radius in pixels; default ``L // 2``.

    Returns
    -------
    float
        Variance of the corner pixels after removing each image's corner
        mean (the mean carries no noise information and differs per image).
    """
    box = images.shape[-1]
    outside = ~disk_mask(box, radius)
    corners = images[..., outside].astype(np.float64)
    corners = corners - corners.mean(axis=-1, keepdims=True)
    return float(np.mean(corners * corners))


def fourier_shift(images: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Translate images by sub-pixel amounts with a Fourier phase ramp.

    Exact for band-limited images (no interpolation blur); periodic at the
    box edge.

    Parameters
    ----------
    images : ndarray, shape (n, L, L)
    shifts : ndarray, shape (n, 2)
        ``(x, y)`` translation in pixels of each image's content: positive x
        moves content towards larger column index.

    Returns
    -------
    ndarray, shape (n, L, L), float32
    """
    box = images.shape[-1]
    freq = np.fft.fftfreq(box)
    shifts = np.asarray(shifts, dtype=np.float64).reshape(-1, 2)
    ramp_x = np.exp(-2j * np.pi * shifts[:, 0, None] * freq[None, :])
    ramp_y = np.exp(-2j * np.pi * shifts[:, 1, None] * freq[None, :])
    ramp = ramp_y[:, :, None] * ramp_x[:, None, :]
    if box % 2 == 0:
        # The Nyquist row/column has no partner of opposite sign: keep it real.
        ramp[:, box // 2, :] = ramp[:, box // 2, :].real
        ramp[:, :, box // 2] = ramp[:, :, box // 2].real
    return np.fft.ifft2(np.fft.fft2(images) * ramp).real.astype(np.float32)
