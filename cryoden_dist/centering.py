"""Robust particle centering: sCM by rotational averaging, with CM and GM baselines.

After Heimowitz, Sharon & Singer, "Centering noisy images with application to
cryo-EM", SIAM J. Imaging Sci. 14:689 (2021). For every candidate centre ``p``
of a search window the image is averaged over rings around ``p``; the
cumulative ring sums ``u_p[r]`` (the mass within radius ``r + 1/2`` of ``p``,
``r = 0 .. R``) are normalised by ``E_max = max_p u_p[R]`` and the landscape

    L(p) = sum_r | u_p[r] / E_max - 1 |

is minimal where the particle's mass accumulates fastest around ``p``. When
``u_p[r] <= E_max`` (always true for a non-negative image) the landscape is
``R + 1 - sum_r u_p[r] / E_max``, and ``sum_r u_p[r]`` is the image correlated
with the cone ``(R + 1/2 - |x - p|)_+``; the gradient of that correlation
vanishes where the intensity-weighted unit vectors towards ``p`` cancel, the
defining property of the geometric median. So sCM is the paper's smooth,
noise-averaging surrogate of the geometric median of the particle's mass,
which is why the geometric median (Weiszfeld) is a baseline here, beside the
centre of mass.

Interpretations (documented choices, not in the paper's definition):

* Contrast: the mass must be non-negative. Each image's background is the mean
  of its corners (outside the inscribed disk) and is subtracted; the particle
  is made bright by multiplying with a *polarity* ``+1`` / ``-1``. Pure
  functions take ``polarity=None`` to pick the sign per image from the mean
  inside the particle disk; the :func:`center` stage decides it once for the
  whole stack (the sum of all disk means), because one contrast convention
  holds for a stack and a per-image sign flips on the noisiest images.
* Rings are anti-aliased: pixel weights are the fraction of the pixel's area
  (8 x 8 sub-samples) inside the disk of radius ``r + 1/2``. The cumulative
  ring sums telescope, so ``u_p[r]`` is the correlation with that disk.
* Disks that reach beyond the box see zeros (the background after
  subtraction), so the pure functions work for any search window; the stage
  still refuses ``search + radius > box // 2`` because there the landscape
  depends on pixels the detector never recorded for this particle.
* Sub-pixel refinement fits a 2-D quadratic (with the cross term) to the 3 x 3
  neighbourhood of the integer minimum; a minimum on the window border stays
  integer.
* Signed landscape: ``L(p) = sum_r (1 - u_p[r] / E_max)``, the paper's
  landscape wherever ``u_p[r] <= E_max`` (every non-negative image, the
  paper's setting). Real and filtered images are not non-negative after the
  background is subtracted: a dark rim around a bright particle (CTF or
  filtering halo, a neighbour's density) makes ``u_p[r] > E_max`` at inner
  radii, and the absolute value then *penalises* mass concentrated around
  ``p``, turning the minimum at the centre into a ring of minima around it.
  Measured (``benchmarks/centering.py``-style data, 300 views of the 70S map
  without CTF, radius 24, search 8): mean error against the true shifts
  3.57 px (noiseless) and 4.17 px (SNR 1/10) with the absolute value, 1.24
  and 2.58 px signed; 1.03 -> 0.95 px on the blob particles of the tests.

Shift convention: a centre ``(x, y)`` is where the particle's centre lies
relative to the box centre ``(L // 2, L // 2)``, in pixels, ``x`` along the
last axis; ``image.fourier_shift(images, -centres)`` re-centres the particles.

Stage layout (:func:`center`), inside the stack store::

    stack.zarr/centering/          attrs: params, polarity, convention
      shifts_px, shifts_A          float64 [n, 2]
      images, ctf/, metadata/      with apply: a particle stack of kind
                                   "centered" (``images_centered: true``)

With ``apply`` the group is a complete stack of the re-centred particles, so
``ParticleStack.open("stack.zarr/centering")`` and every command work on it.
Without ``apply`` it holds the shifts only and is deliberately not a stack:
there are no images to open, and export writes the shifts as origins of the
source stack instead.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import scipy.fft
import zarr

from .errors import InputError, OutputExistsError, ParameterError
from .image import centered_coordinates, disk_mask, fourier_shift
from .pipeline import begin_run, map_chunks, mark_complete, paths_overlap, record_command, run_chunks
from .stack import ATTRS_KEY, ParticleStack, is_cryoden_store

__all__ = [
    "GROUP",
    "KIND",
    "METHODS",
    "STAGE",
    "center",
    "center_of_mass",
    "centered_path",
    "check_centered_output",
    "check_geometry",
    "estimate_centers",
    "geometric_median",
    "mark_centered",
    "positive_contrast",
    "scm_centers",
    "scm_landscape",
    "stage_params",
    "stack_polarity",
]

log = logging.getLogger(__name__)

#: Centering methods: symmetric centre of mass, centre of mass, geometric median.
METHODS = ("scm", "cm", "gm")
#: Stage name: the key of the completion flags and of the stage record.
STAGE = "center"
#: The group of the stack store that holds the results (with apply, the re-centred stack).
GROUP = "centering"
#: ``kind`` of the re-centred stack.
KIND = "centered"
#: What ``shifts_px`` holds, recorded with the results.
CONVENTION = "(x, y) px of the particle centre relative to the box centre; images re-centred by -shift"
#: Sub-samples per pixel side used to anti-alias the ring masks.
SUPERSAMPLING = 8
#: Images per batch in :func:`scm_centers`: large enough for efficient matrix
#: products, small enough that the intermediate spectra stay in cache.
BATCH = 64


# ------------------------------------------------------------------ inputs
def check_geometry(box: int, radius: float, search: int | None = None, *, inside: bool = True) -> None:
    """Refuse a particle radius or search window that does not fit the box.

    Parameters
    ----------
    box : int
        Image side length ``L``.
    radius : float
        Particle radius ``R`` in pixels.
    search : int, optional
        Half-width ``S`` of the sCM search window in pixels; not checked when
        None (the CM and GM methods do not search).
    inside : bool
        Also require every ring disk of the window to lie inside the box,
        ``S + R <= L // 2`` (the stage's rule; the pure functions pad with
        background instead).

    Raises
    ------
    ParameterError
        If ``R`` is not in ``(0, L // 2]``, ``S < 1``, or ``inside`` and
        ``S + R > L // 2``.
    """
    half = box // 2
    if not 0 < radius <= half:
        raise ParameterError(f"--radius {radius} px must be in (0, {half}] for a box of {box} px (half the box)")
    if search is None:
        return
    if search < 1:
        raise ParameterError(f"--search {search} px must be at least 1")
    if inside and search + radius > half:
        most = int(np.floor(half - radius))
        fix = f"use --search {most} or less" if most >= 1 else "use a smaller --radius"
        raise ParameterError(
            f"--search {search} px with --radius {radius} px puts the ring disk outside the box of {box} px "
            f"(search + radius must be <= {half}); {fix}"
        )


def _as_stack(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected square images [n, L, L], got shape {images.shape}")
    return images


def positive_contrast(images: np.ndarray, radius: float, polarity: float | None = None) -> np.ndarray:
    """Background-subtracted images with a bright particle.

    Parameters
    ----------
    images : ndarray, shape (n, L, L)
    radius : float
        Particle radius in pixels: the disk whose mean decides the sign.
    polarity : {1, -1, None}
        Multiply by this sign; None picks it per image from the sign of the
        mean inside the disk.

    Returns
    -------
    ndarray, shape (n, L, L), float32
        ``polarity * (image - corner mean)``.
    """
    images = _as_stack(images)
    box = images.shape[-1]
    corners = ~disk_mask(box)
    background = images[:, corners].mean(axis=-1, dtype=np.float64)
    out = images.astype(np.float32) - background.astype(np.float32)[:, None, None]
    if polarity is None:
        sign = np.where(out[:, disk_mask(box, radius)].mean(axis=-1, dtype=np.float64) < 0, -1.0, 1.0)
    else:
        sign = np.full(len(out), float(np.sign(polarity) or 1.0))
    return out * sign.astype(np.float32)[:, None, None]


def _disk_mean_sum(images: np.ndarray, radius: float) -> float:
    """Sum over images of the background-subtracted mean inside the particle disk."""
    prepared = positive_contrast(images, radius, polarity=1.0)
    return float(prepared[:, disk_mask(images.shape[-1], radius)].mean(axis=-1, dtype=np.float64).sum())


def _bright_sign(disk_mean_sum: float) -> float:
    return -1.0 if disk_mean_sum < 0 else 1.0


def stack_polarity(images: np.ndarray, radius: float) -> float:
    """The one contrast sign that makes the particles of a stack bright.

    Parameters
    ----------
    images : ndarray, shape (n, L, L)
        All (or a representative sample of) the stack's images.
    radius : float
        Particle radius in pixels.

    Returns
    -------
    float
        ``+1`` if the summed background-subtracted disk means are
        non-negative, else ``-1``; pass it as ``polarity`` to the estimators.
    """
    return _bright_sign(_disk_mean_sum(_as_stack(images), radius))


# ---------------------------------------------------------------- sCM core
def _window_size(radius: float, search: int) -> tuple[int, int]:
    """Half-width ``K`` of the pixels any ring disk touches, and the FFT size ``N``.

    The anti-aliased disk of radius ``floor(R) + 1/2`` covers pixels up to
    ``floor(R)`` from its centre on each axis, so around any candidate within
    ``+-S`` it stays in the ``(2K + 1)``-pixel square, ``K = S + floor(R)``;
    ``N >= 2K + 1`` keeps the circular correlation free of wrap-around at the
    candidates.
    """
    half_width = int(search) + int(np.floor(radius))
    return half_width, scipy.fft.next_fast_len(2 * half_width + 1, real=True)


@functools.lru_cache(maxsize=8)
def _disk_operator(radius: float, search: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear operator from an image spectrum to the cumulative ring sums at the candidates.

    The cumulative ring sums for all candidates are correlations with
    anti-aliased disks, ``irfft2(rfft2(z) * conj(rfft2(disk_r)))`` sampled at
    the ``2S + 1`` candidate rows and columns. Only those ``(2S + 1)^2`` of
    the ``N^2`` outputs are needed, so the inverse transform is evaluated at
    them alone, as two matrix products; the disks are even, so their spectra
    are real. Cached: the operator is shared by every image of a stack.

    Returns
    -------
    rows : ndarray, shape (N // 2 + 1, N, (R + 1) * Q), complex64
        For each column frequency ``kx``: row frequency ``ky`` to
        ``(ring, candidate row)``, ``Q = 2S + 1``.
    columns : ndarray, shape (N // 2 + 1, Q), complex64
        Column frequency to candidate column, with the Hermitian weights and
        the ``1 / N^2`` of the inverse transform.
    """
    half_width, size = _window_size(radius, search)
    n_rings = int(np.floor(radius)) + 1
    offsets = np.fft.fftfreq(size, 1.0 / size)  # signed pixel offsets in FFT order
    sub = (np.arange(SUPERSAMPLING) + 0.5) / SUPERSAMPLING - 0.5
    fine = (offsets[:, None] + sub[None, :]).ravel()
    dist2 = fine[:, None] ** 2 + fine[None, :] ** 2
    disks = np.stack(
        [
            (dist2 <= (r + 0.5) ** 2).reshape(size, SUPERSAMPLING, size, SUPERSAMPLING).mean(axis=(1, 3))
            for r in range(n_rings)
        ]
    )
    spectra = scipy.fft.rfft2(disks).real  # [R + 1, N, H]
    candidates = half_width - search + np.arange(2 * search + 1)
    k_rows = np.arange(size)
    k_cols = np.arange(size // 2 + 1)
    to_rows = np.exp(2j * np.pi * np.outer(k_rows, candidates) / size)  # [N, Q]
    rows = spectra.transpose(2, 1, 0)[:, :, :, None] * to_rows[None, :, None, :]  # [H, N, R + 1, Q]
    hermitian = np.full(len(k_cols), 2.0)
    hermitian[0] = 1.0
    if size % 2 == 0:
        hermitian[-1] = 1.0
    columns = hermitian[:, None] * np.exp(2j * np.pi * np.outer(k_cols, candidates) / size) / size**2
    return (
        np.ascontiguousarray(rows.reshape(len(k_cols), size, -1), dtype=np.complex64),
        columns.astype(np.complex64),
    )


def _central_square(images: np.ndarray, half_width: int) -> np.ndarray:
    """The ``(2K + 1)``-pixel square around the box centre, zero outside the box."""
    box = images.shape[-1]
    centre = box // 2
    before = max(0, half_width - centre)
    after = max(0, half_width - (box - 1 - centre))
    if before or after:
        images = np.pad(images, ((0, 0), (before, after), (before, after)))
        centre += before
    window = slice(centre - half_width, centre + half_width + 1)
    return images[:, window, window]


def _cumulative_ring_sums(prepared: np.ndarray, radius: float, search: int) -> np.ndarray:
    """``u_p[r]`` for all candidates ``p``: shape ``[n, R + 1, 2S + 1, 2S + 1]`` (rows = y)."""
    half_width, size = _window_size(radius, search)
    rows, columns = _disk_operator(float(radius), int(search))
    n_cols, _, n_out = rows.shape
    n_side = 2 * search + 1
    spectra = scipy.fft.rfft2(_central_square(prepared, half_width), s=(size, size), workers=1)
    spectra = np.ascontiguousarray(spectra.transpose(2, 0, 1), dtype=np.complex64)  # [H, n, N]
    partial = np.matmul(spectra, rows)  # [H, n, (R + 1) * Q]: inverse along y at the candidate rows
    partial = partial.reshape(n_cols, -1).T  # [(n, R + 1, Q), H]
    sums = (partial @ columns).real  # inverse along x at the candidate columns
    return sums.reshape(len(prepared), n_out // n_side, n_side, n_side)


def _landscapes(prepared: np.ndarray, radius: float, search: int) -> np.ndarray:
    """sCM landscapes ``L(p)`` of background-subtracted bright-particle images, ``[n, Q, Q]``."""
    sums = _cumulative_ring_sums(prepared, radius, search)
    energy = sums[:, -1].reshape(len(sums), -1).max(axis=-1)
    # An image with no positive mass anywhere has no centre to find; a unit
    # scale keeps its landscape finite and its minimum wherever the noise puts it.
    energy = np.where(energy > 0, energy, 1.0)
    # Signed, not |u / E - 1| (see the module notes): equal for non-negative
    # images, and a dark halo cannot turn the centre into a local maximum.
    return (1.0 - sums / energy[:, None, None, None]).sum(axis=1)


def _refine_minimum(landscapes: np.ndarray) -> np.ndarray:
    """Sub-pixel ``(x, y)`` of each landscape's minimum in window indices.

    A 2-D quadratic through the 3 x 3 neighbourhood (central differences,
    cross term included, since an asymmetric particle's valley need not be
    aligned with the axes). Where the fitted Hessian is not positive
    definite each axis is refined alone; the step is limited to one pixel,
    the extent of the stencil.
    """
    n, side, _ = landscapes.shape
    flat = landscapes.reshape(n, -1).argmin(axis=-1)
    iy, ix = np.divmod(flat, side)
    position = np.stack([ix, iy], axis=-1).astype(np.float64)
    inner = (iy > 0) & (iy < side - 1) & (ix > 0) & (ix < side - 1)
    if not inner.any() or side < 3:
        return position
    idx = np.flatnonzero(inner)
    step = np.arange(-1, 2)
    patch = landscapes[idx[:, None, None], iy[idx, None, None] + step[:, None], ix[idx, None, None] + step]
    patch = patch.astype(np.float64)
    gx = (patch[:, 1, 2] - patch[:, 1, 0]) / 2
    gy = (patch[:, 2, 1] - patch[:, 0, 1]) / 2
    hxx = patch[:, 1, 2] - 2 * patch[:, 1, 1] + patch[:, 1, 0]
    hyy = patch[:, 2, 1] - 2 * patch[:, 1, 1] + patch[:, 0, 1]
    hxy = (patch[:, 2, 2] - patch[:, 2, 0] - patch[:, 0, 2] + patch[:, 0, 0]) / 4
    det = hxx * hyy - hxy * hxy
    definite = (hxx > 0) & (det > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        dx = np.where(definite, (hxy * gy - hyy * gx) / det, np.where(hxx > 0, -gx / hxx, 0.0))
        dy = np.where(definite, (hxy * gx - hxx * gy) / det, np.where(hyy > 0, -gy / hyy, 0.0))
    position[idx, 0] += np.clip(np.nan_to_num(dx), -1.0, 1.0)
    position[idx, 1] += np.clip(np.nan_to_num(dy), -1.0, 1.0)
    return position


def scm_landscape(image: np.ndarray, radius: float, search: int, polarity: float | None = None) -> np.ndarray:
    """The sCM landscape of one image, for plotting and inspection.

    Parameters
    ----------
    image : ndarray, shape (L, L)
    radius : float
        Particle radius ``R`` in pixels; rings ``r = 0 .. floor(R)``.
    search : int
        Half-width ``S`` of the window of candidate centres, in pixels.
    polarity : {1, -1, None}
        Contrast sign (see :func:`positive_contrast`).

    Returns
    -------
    ndarray, shape (2S + 1, 2S + 1), float32
        ``L(p)``; row ``i`` is ``y = i - S``, column ``j`` is ``x = j - S``.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"expected one image [L, L], got shape {image.shape}")
    check_geometry(image.shape[-1], radius, search, inside=False)
    return _landscapes(positive_contrast(image[None], radius, polarity), radius, search)[0]


def scm_centers(
    images: np.ndarray,
    radius: float,
    search: int = 8,
    subpixel: bool = True,
    polarity: float | None = None,
    batch: int = BATCH,
) -> np.ndarray:
    """Particle centres by the symmetric centre of mass (sCM).

    Parameters
    ----------
    images : ndarray, shape (n, L, L)
    radius : float
        Particle radius ``R`` in pixels, ``0 < R <= L // 2``.
    search : int
        Candidate centres are the integer offsets within ``+-search`` pixels
        of the box centre on each axis.
    subpixel : bool
        Refine the integer minimum with a quadratic fit.
    polarity : {1, -1, None}
        Contrast sign (see :func:`positive_contrast`); None decides per image.
    batch : int
        Images per batch (memory and speed only).

    Returns
    -------
    ndarray, shape (n, 2), float64
        ``(x, y)`` of each particle's centre relative to the box centre, in
        pixels.
    """
    images = _as_stack(images)
    search = int(search)
    check_geometry(images.shape[-1], radius, search, inside=False)
    centres = np.empty((len(images), 2))
    for start in range(0, len(images), batch):
        prepared = positive_contrast(images[start : start + batch], radius, polarity)
        landscapes = _landscapes(prepared, radius, search)
        if subpixel:
            centres[start : start + batch] = _refine_minimum(landscapes) - search
        else:
            iy, ix = np.divmod(landscapes.reshape(len(landscapes), -1).argmin(axis=-1), 2 * search + 1)
            centres[start : start + batch] = np.stack([ix, iy], axis=-1) - search
    return centres


# ---------------------------------------------------------------- baselines
def _mass(images: np.ndarray, radius: float, polarity: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative particle mass in the disk and the ``(x, y)`` pixel positions it sits at."""
    images = _as_stack(images)
    box = images.shape[-1]
    check_geometry(box, radius)
    inside = disk_mask(box, radius)
    y, x = centered_coordinates(box)
    positions = np.stack([x[inside], y[inside]], axis=-1)  # [P, 2]
    mass = np.clip(positive_contrast(images, radius, polarity)[:, inside], 0.0, None).astype(np.float64)
    return mass, positions


def _weighted_mean(weights: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``(x, y)`` means of ``positions [P, 2]`` under each row of ``weights [n, P]``; 0 where a row is all zero."""
    total = weights.sum(axis=-1, keepdims=True, dtype=np.float64)
    return np.divide(weights @ positions, total, out=np.zeros((len(weights), 2)), where=total > 0)


def center_of_mass(images: np.ndarray, radius: float, polarity: float | None = None) -> np.ndarray:
    """Particle centres as the centre of mass inside the particle disk.

    The mass is the background-subtracted, bright-particle image (see
    :func:`positive_contrast`) clipped at zero, within ``radius`` of the box
    centre.

    Parameters
    ----------
    images : ndarray, shape (n, L, L)
    radius : float
        Radius of the disk in pixels.
    polarity : {1, -1, None}
        Contrast sign; None decides per image.

    Returns
    -------
    ndarray, shape (n, 2), float64
        ``(x, y)`` relative to the box centre; ``(0, 0)`` for an image with
        no positive mass.
    """
    mass, positions = _mass(images, radius, polarity)
    return _weighted_mean(mass, positions)


def geometric_median(
    images: np.ndarray,
    radius: float,
    polarity: float | None = None,
    max_iter: int = 200,
    tol: float = 1e-5,
) -> np.ndarray:
    """Particle centres as the intensity-weighted geometric median of pixel positions.

    Weiszfeld iterations from the centre of mass, vectorised over images,
    with the same mass as :func:`center_of_mass`.

    Parameters
    ----------
    images : ndarray, shape (n, L, L)
    radius : float
        Radius of the disk in pixels.
    polarity : {1, -1, None}
        Contrast sign; None decides per image.
    max_iter : int
        Iteration limit.
    tol : float
        Stop when no centre moves by more than this many pixels.

    Returns
    -------
    ndarray, shape (n, 2), float64
        ``(x, y)`` relative to the box centre.
    """
    mass, positions = _mass(images, radius, polarity)
    centres = _weighted_mean(mass, positions)
    # float32 and batches that fit in cache: the distance evaluations are the
    # whole cost, and float32 keeps the centres to ~1e-5 px.
    mass, positions = mass.astype(np.float32), positions.astype(np.float32)
    for start in range(0, len(mass), BATCH):
        centre = centres[start : start + BATCH]  # a view: updated in place
        weights = mass[start : start + BATCH]
        active = np.arange(len(weights))
        for _ in range(max_iter):
            if not len(active):
                break
            dx = positions[:, 0] - centre[active, 0, None].astype(np.float32)
            dy = positions[:, 1] - centre[active, 1, None].astype(np.float32)
            # A centre on a pixel would divide by zero; a floor far below a
            # pixel only caps that pixel's pull (the usual Weiszfeld safeguard).
            distance = np.maximum(np.sqrt(dx * dx + dy * dy), 1e-6)
            updated = _weighted_mean(weights[active] / distance, positions)
            moved = np.abs(updated - centre[active]).max(axis=-1)
            centre[active] = updated
            active = active[moved > tol]
    return centres


def estimate_centers(
    images: np.ndarray, method: str, radius: float, search: int = 8, polarity: float | None = None
) -> np.ndarray:
    """Particle centres by ``method`` (one of :data:`METHODS`), ``(x, y)`` px, shape ``[n, 2]``."""
    if method == "scm":
        return scm_centers(images, radius, search, polarity=polarity)
    if method == "cm":
        return center_of_mass(images, radius, polarity)
    if method == "gm":
        return geometric_median(images, radius, polarity)
    raise ParameterError(f"--method {method!r} is not a centering method; choose one of {', '.join(METHODS)}")


# -------------------------------------------------------------------- stage
def centered_path(stack_path: str | Path) -> Path:
    """Where :func:`center` with ``apply=True`` puts the re-centred stack: ``STACK/centering``."""
    return Path(stack_path) / GROUP


def stage_params(method: str, radius: float, search: int, apply: bool) -> dict:
    """The parameters that determine the centering results (recorded, and compared on resume).

    The search window matters to sCM only; recording it for CM/GM would make
    a rerun with another ``search`` replace identical results.
    """
    return {
        "method": method,
        "radius": float(radius),
        "search": int(search) if method == "scm" else None,
        "apply": bool(apply),
    }


def _polarity_chunk(start: int, stop: int, store: str, radius: float) -> float:
    return _disk_mean_sum(zarr.open_group(store, mode="r")["images"][start:stop], radius)


def _center_chunk(
    start: int,
    stop: int,
    store: str,
    method: str,
    radius: float,
    search: int,
    polarity: float,
    pixel_size: float | None,
    apply: bool,
) -> dict[str, np.ndarray]:
    images = zarr.open_group(store, mode="r")["images"][start:stop]
    centres = estimate_centers(images, method, radius, search, polarity)
    out = {f"{GROUP}/shifts_px": centres}
    if pixel_size is not None:
        out[f"{GROUP}/shifts_A"] = centres * pixel_size
    if apply:
        out[f"{GROUP}/images"] = fourier_shift(images, -centres)
    return out


def _clear_centering(stack: ParticleStack) -> None:
    """Remove derived centering results, their completion flags and their stage record."""
    group = stack.group
    if GROUP in group:
        del group[GROUP]
    if "_done" in group and STAGE in group["_done"]:
        del group["_done"][STAGE]
    stages = dict(stack.info.get("stages", {}))
    if stages.pop(STAGE, None) is not None:
        stack.update_info(stages=stages)


def _create_centering(stack: ParticleStack, params: dict, polarity: float) -> None:
    """Create the empty results: the shift arrays, and with ``apply`` the re-centred stack around them.

    The group attributes ``params`` are written last, so a creation cut
    short does not pass for results to resume (the next run replaces it).
    """
    record = {"params": params, "polarity": polarity, "convention": CONVENTION}
    if params["apply"]:
        attrs = {"images_centered": True, "centering": {**record, "source": str(stack.path.resolve())}}
        if "images_ctf_state" in stack.info:  # a phase shift commutes with the CTF: the state carries over
            attrs["images_ctf_state"] = stack.info["images_ctf_state"]
        centred = ParticleStack.create_like(centered_path(stack.path), stack, kind=KIND, attrs=attrs)
        record_command(centred, STAGE, params)  # complete = False until every chunk is written
        group = centred.group
    else:
        group = stack.group.create_group(GROUP)
    n, chunk = stack.n, stack.chunk
    names = ["shifts_px"] + (["shifts_A"] if stack.pixel_size is not None else [])
    for name in names:
        group.create_array(name, shape=(n, 2), chunks=(chunk, 2), dtype="float64", fill_value=np.nan)
    group.attrs.update(record)


def _previous_params(stack: ParticleStack) -> dict | None:
    """Parameters of the centering results in the stack, None if there are none to resume.

    Results made with ``apply`` by an earlier layout (``centering/images``
    without the stack attributes) cannot be opened as a stack: they do not
    count, so they are replaced.
    """
    if GROUP not in stack.group:
        return None
    params = stack.group[GROUP].attrs.get("params")
    if params and params.get("apply") and not is_cryoden_store(centered_path(stack.path)):
        return None
    return params


def _finish(stack: ParticleStack, params: dict) -> None:
    """Mark the re-centred stack complete (the last step, also after an interruption just before it)."""
    if params["apply"]:
        centred = ParticleStack.open(centered_path(stack.path), mode="r+")
        if not centred.info.get("complete"):
            mark_complete(centred)


def center(
    stack_path: str | Path,
    *,
    radius: float,
    search: int = 8,
    method: str = "scm",
    apply: bool = False,
    client,
) -> ParticleStack:
    """Estimate (and optionally remove) each particle's offset from the box centre.

    Writes a ``centering/`` group into the stack; the input ``images`` are
    never modified:

    * ``centering/shifts_px`` float64 ``[n, 2]``: ``(x, y)`` of each
      particle's centre relative to the box centre, in pixels;
    * ``centering/shifts_A``: the same in Å (only when the pixel size is
      known);
    * with ``apply=True``, ``centering/`` is itself a particle stack (kind
      ``"centered"``, attribute ``images_centered: true``, the source's
      ``ctf/`` and ``metadata/`` copied) whose ``images`` are the particles
      re-centred with a Fourier phase shift by ``-shifts_px``:
      ``ParticleStack.open(centered_path(stack_path))`` opens it, and every
      command that reads a stack (denoise, evaluate, export...) takes it.

    Without ``apply`` the group holds only the shift arrays and is not a
    stack (no images to open). Results made with other parameters are
    replaced; a complete run with the same parameters is left as is; an
    interrupted one resumes.

    Parameters
    ----------
    stack_path : str or Path
        The particle stack (opened read-write).
    radius : float
        Particle radius in pixels.
    search : int
        sCM search half-width in pixels.
    method : {"scm", "cm", "gm"}
        Symmetric centre of mass, centre of mass or geometric median.
    apply : bool
        Also write the re-centred stack.
    client : distributed.Client
        Where the chunks are computed.

    Returns
    -------
    ParticleStack
        The source stack, with its ``centering/`` group.

    Raises
    ------
    InputError
        If the stack is missing, not a cryoden stack, or empty.
    ParameterError
        If the method is unknown or the radius / search window does not fit
        the box.
    """
    stack = ParticleStack.open(stack_path, mode="r+")
    n = stack.images.shape[0]
    if n == 0 or stack.n == 0:
        raise InputError(f"{stack.path}: the stack has no particles (images has shape {stack.images.shape})")
    if method not in METHODS:
        raise ParameterError(f"--method {method!r} is not a centering method; choose one of {', '.join(METHODS)}")
    check_geometry(stack.box, radius, search if method == "scm" else None)
    params = stage_params(method, radius, search, apply)

    previous = _previous_params(stack)
    if previous == params:
        stage_record = stack.info.get("stages", {}).get(STAGE, {})
        if stage_record.get("complete") and stage_record.get("params") == params:
            log.info("%s: centering with %s is already complete", stack.path, params)
            _finish(stack, params)
            return stack
        polarity = float(stack.group[GROUP].attrs["polarity"])  # resume with the sign the finished chunks used
    else:
        if GROUP in stack.group:
            log.info("%s: replacing centering made with %s", stack.path, stack.group[GROUP].attrs.get("params"))
        _clear_centering(stack)
        sums = map_chunks(
            client, _polarity_chunk, stack.chunk_bounds(), args=(str(stack.path), float(radius)), desc="polarity"
        )
        polarity = _bright_sign(sum(sums))
        _create_centering(stack, params, polarity)

    begin_run(stack)  # this centring's run-log entries get their own run number
    run_chunks(
        client,
        stack,
        STAGE,
        _center_chunk,
        args=(str(stack.path), method, float(radius), int(search), polarity, stack.pixel_size, bool(apply)),
        params=params,
    )
    _finish(stack, params)
    return stack


# ---------------------------------------------- outputs made from the centred stack
def check_centered_output(stack_path: str | Path, out: str | Path, params: dict, overwrite: bool) -> None:
    """Refuse an output of ``denoise --center`` that would be wrong to reuse.

    Run before centering. The denoise command recognises a finished output
    by its input path and method parameters, and the input is always
    ``STACK/centering``, whatever centring made it; the output therefore
    records the centering parameters (:func:`mark_centered`), and a finished
    output made from another centring of the stack is refused here instead
    of being returned as complete.

    Parameters
    ----------
    stack_path : path
        The stack to centre.
    out : path
        The output stack of the command.
    params : dict
        The centering parameters (:func:`stage_params`).
    overwrite : bool
        The output is replaced anyway (``--overwrite``): only the overlap is
        refused.

    Raises
    ------
    OutputExistsError
        If ``out`` is, contains or lies inside the stack (centering writes
        into it), or is a finished output of another centring.
    """
    out, stack_path = Path(out), Path(stack_path)
    if paths_overlap(out, stack_path):
        raise OutputExistsError(
            f"{out}: the output would overwrite or lie inside the input {stack_path}, which centering writes "
            "into; choose another --out path"
        )
    if overwrite or not is_cryoden_store(out):
        return
    info = dict(zarr.open_group(str(out), mode="r").attrs[ATTRS_KEY])
    source = (info.get("command") or {}).get("params", {}).get("input")
    made_from_centred = source == str(centered_path(stack_path).resolve())
    if made_from_centred and info.get("complete") and (info.get("centering") or {}).get("params") != params:
        made_with = (info.get("centering") or {}).get("params", "an unrecorded centring")
        raise OutputExistsError(
            f"{out}: made from another centring of {stack_path} ({made_with}); "
            "pass --overwrite to replace it, or choose another --out path"
        )


def mark_centered(stack_path: str | Path, centred_path: str | Path) -> None:
    """Record on a stack made from a re-centred stack that its images are centred, and how.

    Export then writes zero origins for it (see :mod:`cryoden_dist.io.export`).

    Parameters
    ----------
    stack_path : path
        The stack made from the re-centred one (opened read-write).
    centred_path : path
        The re-centred stack (:func:`centered_path`).
    """
    centering = ParticleStack.open(centred_path).info["centering"]
    ParticleStack.open(stack_path, mode="r+").update_info(images_centered=True, centering=centering)
