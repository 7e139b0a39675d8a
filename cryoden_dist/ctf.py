"""Contrast transfer function, RELION conventions.

Units inside the package: defocus and Cs-derived lengths in Å, voltage in
kV, spherical aberration in mm, angles in radians, pixel size in Å. Degrees
appear only at I/O (``.star`` files store degrees).

The CTF of a weak-phase object with amplitude contrast ``Q`` is

.. math::

    \\mathrm{CTF}(s, \\alpha) = \\sin\\bigl(\\pi\\lambda\\,\\Delta f(\\alpha)\\,s^2
        - \\tfrac{\\pi}{2} C_s\\lambda^3 s^4 + \\varphi
        + \\arctan\\tfrac{Q}{\\sqrt{1-Q^2}}\\bigr),

    \\Delta f(\\alpha) = \\tfrac12(\\Delta f_U + \\Delta f_V)
        + \\tfrac12(\\Delta f_U - \\Delta f_V)\\cos 2(\\alpha - \\alpha_{ast}),

with positive defocus meaning underfocus. This is RELION's CTF (positive
first lobe); ``alpha`` is the angle of the frequency vector from the x axis
(last array axis).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import numpy as np
import scipy.sparse

from .image import centered_coordinates, frequency_grid

__all__ = [
    "CTF_FIELDS",
    "CTFParams",
    "apply_ctf",
    "ctf_images",
    "ctf_profiles",
    "ctf_ring_radii",
    "ctf_rings",
    "electron_wavelength",
    "phase_flip",
]

CTF_FIELDS: tuple[str, ...] = (
    "defocus_u",
    "defocus_v",
    "defocus_angle",
    "voltage",
    "cs",
    "amplitude_contrast",
    "phase_shift",
    "pixel_size",
)

CTF_UNITS: dict[str, str] = {
    "defocus_u": "angstrom",
    "defocus_v": "angstrom",
    "defocus_angle": "radian",
    "voltage": "kV",
    "cs": "mm",
    "amplitude_contrast": "fraction",
    "phase_shift": "radian",
    "pixel_size": "angstrom",
}


@dataclass(frozen=True)
class CTFParams:
    """Per-particle CTF parameters, each a float64 array of shape ``(n,)``.

    Attributes
    ----------
    defocus_u, defocus_v : ndarray
        Defocus along the major and minor axes in Å (positive: underfocus).
    defocus_angle : ndarray
        Astigmatism angle in radians, from the x axis.
    voltage : ndarray
        Acceleration voltage in kV.
    cs : ndarray
        Spherical aberration in mm.
    amplitude_contrast : ndarray
        Amplitude contrast fraction ``Q``.
    phase_shift : ndarray
        Phase-plate shift in radians.
    pixel_size : ndarray
        Pixel size in Å.
    """

    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    voltage: np.ndarray
    cs: np.ndarray
    amplitude_contrast: np.ndarray
    phase_shift: np.ndarray
    pixel_size: np.ndarray

    def __post_init__(self) -> None:
        arrays = {f.name: np.atleast_1d(np.asarray(getattr(self, f.name), dtype=np.float64)) for f in fields(self)}
        n = max(a.shape[0] for a in arrays.values())
        for name, value in arrays.items():
            if value.shape[0] == 1 and n > 1:
                value = np.repeat(value, n)
            object.__setattr__(self, name, value)

    def __len__(self) -> int:
        return self.defocus_u.shape[0]

    def __getitem__(self, index) -> CTFParams:
        return CTFParams(**{name: getattr(self, name)[index] for name in CTF_FIELDS})

    def as_dict(self) -> dict[str, np.ndarray]:
        """The parameters as a ``{field: array}`` dict (keys: ``CTF_FIELDS``)."""
        return {name: getattr(self, name) for name in CTF_FIELDS}


def electron_wavelength(voltage_kv: np.ndarray | float) -> np.ndarray:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    volts = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2642598 / np.sqrt(volts * (1.0 + 0.978466e-6 * volts))


def ctf_images(params: CTFParams, box: int, centered: bool = False, dtype=np.float32) -> np.ndarray:
    """Evaluate the CTF of every particle on its DFT grid.

    Parameters
    ----------
    params : CTFParams
        ``n`` particles' parameters.
    box : int
        Side length ``L`` of the images.
    centered : bool
        Return the grid in ``fftshift`` order (zero frequency at ``L // 2``)
        instead of plain FFT order.
    dtype : numpy dtype
        Output dtype.

    Returns
    -------
    ndarray, shape (n, L, L)
    """
    unit_s, angle = frequency_grid(box, 1.0, centered=centered)
    out = np.empty((len(params), box, box), dtype=dtype)
    wavelength = electron_wavelength(params.voltage)
    cs_angstrom = params.cs * 1e7
    q = np.clip(params.amplitude_contrast, 0.0, 0.999999)
    amplitude_phase = np.arctan2(q, np.sqrt(1.0 - q * q))
    cos2 = np.cos(2.0 * angle)
    sin2 = np.sin(2.0 * angle)
    for i in range(len(params)):
        s2 = (unit_s / params.pixel_size[i]) ** 2
        mean = 0.5 * (params.defocus_u[i] + params.defocus_v[i])
        half_diff = 0.5 * (params.defocus_u[i] - params.defocus_v[i])
        a = 2.0 * params.defocus_angle[i]
        # cos 2(alpha - a_ast) expanded, so the trig of the grid is computed once
        defocus = mean + half_diff * (cos2 * np.cos(a) + sin2 * np.sin(a))
        chi = (
            np.pi * wavelength[i] * defocus * s2
            - 0.5 * np.pi * cs_angstrom[i] * wavelength[i] ** 3 * s2 * s2
            + params.phase_shift[i]
            + amplitude_phase[i]
        )
        out[i] = np.sin(chi)
    return out


def apply_ctf(images: np.ndarray, ctf: np.ndarray) -> np.ndarray:
    """Multiply the Fourier transform of each image by its CTF.

    ``ctf`` is in plain FFT order, as returned by ``ctf_images``.
    """
    return np.fft.ifft2(np.fft.fft2(images) * ctf).real.astype(np.float32)


def phase_flip(images: np.ndarray, ctf: np.ndarray) -> np.ndarray:
    """Multiply the Fourier transform of each image by ``sign(CTF)``."""
    return apply_ctf(images, np.sign(ctf))


@functools.lru_cache(maxsize=8)
def ctf_rings(box: int, radius: float) -> tuple[np.ndarray, scipy.sparse.csr_matrix]:
    """The rings of equal radius of the centred DFT grid inside the disk, and the ring-averaging matrix.

    Parameters
    ----------
    box : int
    radius : float
        Pixels strictly inside (distance ``< radius`` from pixel ``L // 2``, the FB disk) belong to a ring.

    Returns
    -------
    ring : ndarray of int64, shape (L, L)
        Ring of each pixel (rings ordered by radius), -1 outside the disk.
    average : scipy.sparse.csr_matrix, shape (rings, L * L)
        ``average @ image.ravel()``: the mean of the image over each ring.
    """
    y, x = centered_coordinates(box)
    squared = (x * x + y * y).astype(np.int64)  # integer offsets: equal radii are equal integers
    inside = squared < radius * radius
    _, index = np.unique(squared[inside], return_inverse=True)
    ring = np.full((box, box), -1, dtype=np.int64)
    ring[inside] = index
    pixels = np.flatnonzero(inside.ravel())
    counts = np.bincount(index)
    average = scipy.sparse.csr_matrix((1.0 / counts[index], (index, pixels)), shape=(counts.size, box * box))
    return ring, average


def ctf_profiles(magnitude: np.ndarray, radius: float) -> np.ndarray:
    """Ring means of ``|H|`` on the centred DFT grid: its isotropic (``k = 0``) part on the pixel radii.

    Parameters
    ----------
    magnitude : ndarray, shape (n, L, L)
        ``|H|`` with the zero frequency at pixel ``L // 2`` (``np.fft.fftshift`` of :func:`ctf_images`).
    radius : float
        The FB disk radius: frequencies up to ``radius / L`` cycles per pixel.

    Returns
    -------
    ndarray of float32, shape (n, rings)
    """
    _, average = ctf_rings(magnitude.shape[-1], float(radius))
    return (average @ magnitude.reshape(magnitude.shape[0], -1).T).T.astype(np.float32)


def ctf_ring_radii(box: int, radius: float) -> np.ndarray:
    """Radius in pixels (of the centred DFT grid) of each ring of :func:`ctf_rings`, increasing.

    Parameters
    ----------
    box : int
    radius : float

    Returns
    -------
    ndarray of float64, shape (rings,)
    """
    y, x = centered_coordinates(box)
    squared = (x * x + y * y).astype(np.int64)
    return np.sqrt(np.unique(squared[squared < radius * radius]).astype(np.float64))
