"""Noise models for simulated particles: white Gaussian and real micrograph patches.

Real noise is cut from the empty regions of a micrograph: the micrograph is
resampled to the simulation's pixel size by Fourier cropping, windows
without particles are found by their low local variance after band-pass
filtering, and random patches are cut from them, each normalised to zero
mean and unit variance (optionally whitened first). Unwhitened patches keep
the micrograph's colour (its CTF-shaped, detector-shaped power spectrum),
which is what a denoiser meets on real data.

Every function that draws takes a :class:`numpy.random.Generator`, so the
result depends only on the generator's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.fft
from scipy import ndimage

from ..errors import InputError, ParameterError
from ..image import fourier_resample

__all__ = [
    "MicrographNoise",
    "NoiseSpec",
    "background_centres",
    "cut_patches",
    "draw_patch_choices",
    "load_micrograph",
    "local_lowpass_variance",
    "micrograph_noise_patches",
    "parse_noise_spec",
    "prepare_micrograph_noise",
    "white_noise",
]

#: Fraction of the candidate patch centres, those with the lowest local
#: band-passed variance, that count as background.
BACKGROUND_QUANTILE = 0.3
#: Background windows used to estimate the whitening filter (evenly spaced
#: over the candidates, so the filter does not depend on any generator).
WHITENING_SAMPLE = 1024


def white_noise(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Standard normal (zero mean, unit variance) float32 noise of ``shape``."""
    return rng.standard_normal(shape, dtype=np.float32)


# ------------------------------------------------------------- noise spec
@dataclass(frozen=True)
class NoiseSpec:
    """A parsed ``--noise`` value.

    Attributes
    ----------
    kind : str
        ``"white"`` or ``"micrograph"``.
    micrograph : Path or None
        The micrograph file (``kind == "micrograph"``).
    whiten : bool
        Whiten the micrograph patches.
    """

    kind: str
    micrograph: Path | None = None
    whiten: bool = False


def parse_noise_spec(spec: str) -> NoiseSpec:
    """Parse ``"white"``, ``"micrograph:FILE.mrc"`` or ``"micrograph:FILE.mrc:whiten"``.

    Raises
    ------
    ParameterError
        For any other value.
    """
    usage = "use 'white', 'micrograph:FILE.mrc' or 'micrograph:FILE.mrc:whiten'"
    if spec == "white":
        return NoiseSpec("white")
    kind, _, rest = spec.partition(":")
    if kind != "micrograph" or not rest:
        raise ParameterError(f"--noise {spec!r}: unknown noise model; {usage}")
    whiten = rest.endswith(":whiten")
    path = rest[: -len(":whiten")] if whiten else rest
    if not path:
        raise ParameterError(f"--noise {spec!r}: no micrograph file given; {usage}")
    return NoiseSpec("micrograph", Path(path), whiten)


def load_micrograph(path: str | Path) -> tuple[np.ndarray, float]:
    """Read a 2D micrograph and its pixel size from an MRC file.

    Returns
    -------
    micrograph : ndarray, shape (ny, nx), float32
    pixel_size : float
        From the header, in Å.

    Raises
    ------
    InputError
        If the file is missing, unreadable, not a single 2D image, or has no
        pixel size in its header.
    """
    from ..io.mrc import read_mrc_data

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such micrograph file; check the path given to --noise micrograph:FILE")
    data, pixel_size = read_mrc_data(path, "micrograph")
    if data is not None and data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data is None or data.ndim != 2:
        shape = None if data is None else data.shape
        raise InputError(f"{path}: expected one 2D micrograph, found data of shape {shape}")
    if not pixel_size > 0:
        raise InputError(
            f"{path}: the MRC header has no pixel size (voxel_size 0); write it into the header "
            "(e.g. with mrcfile: mrc.voxel_size = PX) so the micrograph can be resampled"
        )
    if not np.isfinite(data).all():
        raise InputError(f"{path}: the micrograph contains NaN or infinite values")
    return data, pixel_size


# ------------------------------------------------------------ resampling
# ------------------------------------------------------------ background
def local_lowpass_variance(micrograph: np.ndarray, box: int) -> np.ndarray:
    """Variance of the band-passed micrograph in a ``box`` window around each pixel.

    The band pass (Gaussian low pass with sigma ``box / 8`` minus one with
    sigma ``2 box``) keeps the scale of particles: the low pass removes the
    pixel noise that dominates raw variance everywhere, and subtracting the
    very low pass removes ice-thickness gradients over many boxes. A window
    holding a particle has high variance at that scale; empty ice has low.

    Parameters
    ----------
    micrograph : ndarray, shape (ny, nx)
    box : int
        Window side in pixels.

    Returns
    -------
    ndarray, shape (ny, nx), float64
    """
    image = np.asarray(micrograph, dtype=np.float64)
    band = ndimage.gaussian_filter(image, box / 8) - ndimage.gaussian_filter(image, 2 * box)
    mean = ndimage.uniform_filter(band, box)
    return np.maximum(ndimage.uniform_filter(band * band, box) - mean * mean, 0.0)


def background_centres(micrograph: np.ndarray, box: int, quantile: float = BACKGROUND_QUANTILE) -> np.ndarray:
    """Centres of the flattest ``box`` windows of a micrograph.

    A pixel qualifies if a ``box`` window centred on it (first pixel at
    ``centre - box // 2``) lies inside the micrograph and its
    :func:`local_lowpass_variance` is within the lowest ``quantile`` of all
    such windows.

    Returns
    -------
    ndarray, shape (m, 2), int64
        ``(y, x)`` centres, in row-major order.
    """
    ny, nx = micrograph.shape
    low, high_y, high_x = box // 2, ny - (box - box // 2), nx - (box - box // 2)
    if high_y < low or high_x < low:
        raise ValueError(f"micrograph of shape {micrograph.shape} is smaller than one {box} px window")
    variance = local_lowpass_variance(micrograph, box)[low : high_y + 1, low : high_x + 1]
    threshold = np.quantile(variance, quantile)
    rows, cols = np.nonzero(variance <= threshold)
    return np.stack([rows + low, cols + low], axis=1).astype(np.int64)


# --------------------------------------------------------------- patches
@dataclass(frozen=True)
class MicrographNoise:
    """A micrograph prepared for cutting noise patches.

    Attributes
    ----------
    micrograph : ndarray, shape (ny, nx), float32
        Resampled to ``pixel_size``.
    centres : ndarray, shape (m, 2), int64
        ``(y, x)`` centres of background windows.
    box : int
        Patch side length.
    pixel_size : float
        Pixel size of ``micrograph`` in Å after resampling (the requested
        one up to rounding of the micrograph's size).
    whitening : ndarray, shape (box, box // 2 + 1) or None
        ``1 / sqrt(mean patch power spectrum)`` in ``rfft2`` layout, zero at
        the zero frequency; None for coloured noise.
    augment : bool
        Rotate patches by a random multiple of 90° and flip them at random.
    """

    micrograph: np.ndarray
    centres: np.ndarray
    box: int
    pixel_size: float
    whitening: np.ndarray | None = None
    augment: bool = True


def prepare_micrograph_noise(
    micrograph: np.ndarray,
    micrograph_pixel_size: float,
    box: int,
    pixel_size: float,
    whiten: bool = False,
    augment: bool = True,
) -> MicrographNoise:
    """Resample a micrograph, find its background and (optionally) the whitening filter.

    Parameters
    ----------
    micrograph : ndarray, shape (ny, nx)
    micrograph_pixel_size : float
        Its pixel size in Å.
    box : int
        Patch side length in pixels at ``pixel_size``.
    pixel_size : float
        Simulation pixel size in Å; must not be finer than the micrograph's.
    whiten : bool
        Estimate the mean power spectrum of background patches (from up to
        :data:`WHITENING_SAMPLE` evenly spaced background windows) and
        divide it out of every patch.
    augment : bool
        See :class:`MicrographNoise`.

    Raises
    ------
    ParameterError
        If the micrograph is coarser than ``pixel_size`` or too small for a
        window.
    """
    if pixel_size < micrograph_pixel_size * (1 - 1e-6):
        raise ParameterError(
            f"the micrograph's pixel size {micrograph_pixel_size:.4g} Å is coarser than the simulation's "
            f"{pixel_size:.4g} Å; use a finer micrograph or a larger --pixel-size"
        )
    ratio = micrograph_pixel_size / pixel_size
    shape = tuple(max(1, int(round(size * ratio))) for size in micrograph.shape)
    resampled = fourier_resample(micrograph, shape)
    if min(shape) < 2 * box:
        raise ParameterError(
            f"the micrograph is only {shape[1]} x {shape[0]} px at {pixel_size:.4g} Å, too small to cut "
            f"{box} px noise patches from its background; use a larger micrograph or a smaller --box"
        )
    centres = background_centres(resampled, box)
    actual_pixel_size = micrograph_pixel_size * micrograph.shape[1] / shape[1]
    noise = MicrographNoise(resampled, centres, box, float(actual_pixel_size), None, augment)
    if not whiten:
        return noise
    sample = np.linspace(0, len(centres) - 1, min(len(centres), WHITENING_SAMPLE)).round().astype(np.int64)
    patches = _standardise(_windows(resampled, centres[sample], box))
    power = np.mean(np.abs(scipy.fft.rfft2(patches)) ** 2, axis=0)
    whitening = np.zeros_like(power)
    # The zero frequency is empty (patches have zero mean): leave it at zero.
    positive = power > power.max() * 1e-12
    positive[0, 0] = False
    whitening[positive] = 1.0 / np.sqrt(power[positive])
    return MicrographNoise(resampled, centres, box, float(actual_pixel_size), whitening.astype(np.float32), augment)


def draw_patch_choices(noise: MicrographNoise, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw which background window and which 90° rotation / flip each patch uses.

    Returns
    -------
    ndarray, shape (n, 3), int64
        Columns: index into ``noise.centres``, number of quarter turns
        (0-3), flip (0 or 1). Without augmentation the last two are zero.
    """
    choices = np.zeros((n, 3), dtype=np.int64)
    choices[:, 0] = rng.integers(0, len(noise.centres), size=n)
    if noise.augment:
        choices[:, 1] = rng.integers(0, 4, size=n)
        choices[:, 2] = rng.integers(0, 2, size=n)
    return choices


def cut_patches(noise: MicrographNoise, choices: np.ndarray) -> np.ndarray:
    """Cut, normalise, whiten and augment the patches described by ``choices``.

    Each patch is normalised to zero mean and unit variance (after whitening
    when the noise is whitened), then rotated and flipped.

    Parameters
    ----------
    noise : MicrographNoise
    choices : ndarray, shape (n, 3)
        From :func:`draw_patch_choices`.

    Returns
    -------
    ndarray, shape (n, box, box), float32
    """
    box = noise.box
    patches = _standardise(_windows(noise.micrograph, noise.centres[choices[:, 0]], box))
    if noise.whitening is not None:
        patches = scipy.fft.irfft2(scipy.fft.rfft2(patches) * noise.whitening, s=(box, box))
        patches = _standardise(patches)
    for turns in (1, 2, 3):
        selected = choices[:, 1] == turns
        patches[selected] = np.rot90(patches[selected], turns, axes=(1, 2))
    flipped = choices[:, 2] == 1
    patches[flipped] = patches[flipped, :, ::-1]
    return patches.astype(np.float32, copy=False)


def micrograph_noise_patches(
    micrograph: np.ndarray,
    micrograph_pixel_size: float,
    box: int,
    pixel_size: float,
    n: int,
    rng: np.random.Generator,
    whiten: bool = False,
) -> np.ndarray:
    """``n`` zero-mean, unit-variance noise patches from a micrograph's background.

    The micrograph is resampled to ``pixel_size`` by Fourier cropping
    (:func:`fourier_resample`), background windows are those with the lowest
    band-passed local variance (:func:`background_centres`), and each patch
    is cut at a random background centre, normalised, optionally whitened,
    and randomly rotated by a multiple of 90° and flipped
    (:func:`cut_patches`). The result depends only on the inputs and the
    state of ``rng``.

    Parameters
    ----------
    micrograph : ndarray, shape (ny, nx)
    micrograph_pixel_size : float
        Pixel size of ``micrograph`` in Å.
    box : int
        Patch side length.
    pixel_size : float
        Pixel size of the patches in Å.
    n : int
        Number of patches.
    rng : numpy.random.Generator
    whiten : bool
        Divide out the mean background power spectrum.

    Returns
    -------
    ndarray, shape (n, box, box), float32
    """
    noise = prepare_micrograph_noise(micrograph, micrograph_pixel_size, box, pixel_size, whiten=whiten)
    return cut_patches(noise, draw_patch_choices(noise, n, rng))


def _windows(image: np.ndarray, centres: np.ndarray, box: int) -> np.ndarray:
    """``box`` windows of ``image`` whose centre pixel ``box // 2`` is at ``centres``."""
    offsets = np.arange(box) - box // 2
    rows = centres[:, 0, None] + offsets
    cols = centres[:, 1, None] + offsets
    return image[rows[:, :, None], cols[:, None, :]].astype(np.float64)


def _standardise(patches: np.ndarray) -> np.ndarray:
    """Each patch to zero mean and unit variance."""
    patches = patches - patches.mean(axis=(-2, -1), keepdims=True)
    std = patches.std(axis=(-2, -1), keepdims=True)
    return patches / np.where(std > 0, std, 1.0)
