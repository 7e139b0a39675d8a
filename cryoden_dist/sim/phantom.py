"""A built-in asymmetric 3D phantom made of anisotropic Gaussian blobs.

The phantom is a sum of :data:`N_BLOBS` Gaussian densities of varied sizes,
amplitudes and orientations at asymmetric positions, a small protein-like
density with no symmetry (so every viewing direction gives a different
image). Its geometry is defined in units of the half box, so
``phantom_volume(box)`` is the same object sampled on any grid.

Because the projection of a Gaussian is a Gaussian, the phantom's
projections are known in closed form (:func:`phantom_projections`), which
tests the Fourier-slice projector independently of any interpolation.

Coordinates follow :mod:`cryoden_dist.sim.projection`: a volume is indexed
``[z, y, x]``, the centre voxel is ``(L // 2, L // 2, L // 2)``, and a point
``u = (x, y, z)`` is in voxels from that centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from ..image import centered_coordinates

__all__ = ["MIN_BOX", "N_BLOBS", "PhantomBlobs", "phantom_blobs", "phantom_projections", "phantom_volume"]

#: Number of Gaussian blobs in the phantom.
N_BLOBS = 16
#: Seed of the generator that lays the blobs out: the phantom is a fixed object.
PHANTOM_SEED = 20240917
#: Blob centres lie within this radius (fraction of the half box).
CENTRE_RADIUS = 0.5
#: Range of the blobs' standard deviations along their axes (fraction of the half box).
#: The smallest, 0.065 * 32.5 = 2.1 voxels at box 65, keeps the sampled
#: volume band-limited to ~1e-8, so grid projections match the analytic ones.
SIGMA_RANGE = (0.065, 0.16)
#: Every blob's 4-sigma ellipsoid stays inside this radius (fraction of the half
#: box), so the box truncates less than exp(-8) of any blob.
SUPPORT_RADIUS = 0.95
#: Smallest box the phantom is sampled on: below it the smallest blobs alias.
MIN_BOX = 16


@dataclass(frozen=True)
class PhantomBlobs:
    """Parameters of the blobs, in units of the half box.

    Attributes
    ----------
    amplitudes : ndarray, shape (m,)
        Peak densities.
    centres : ndarray, shape (m, 3)
        ``(x, y, z)`` centres.
    covariances : ndarray, shape (m, 3, 3)
        Covariance matrices in ``(x, y, z)`` coordinates.
    """

    amplitudes: np.ndarray
    centres: np.ndarray
    covariances: np.ndarray

    def scaled(self, box: int) -> PhantomBlobs:
        """The same blobs in voxel units for a box of side ``box``."""
        half = box / 2
        return PhantomBlobs(self.amplitudes, self.centres * half, self.covariances * half * half)


def phantom_blobs() -> PhantomBlobs:
    """Lay out the phantom's blobs (deterministic: a fixed seed).

    Centres are uniform in the ball of radius :data:`CENTRE_RADIUS`; each blob
    has three independent axis lengths in :data:`SIGMA_RANGE` and a random
    orientation. A blob is redrawn until its 4-sigma ellipsoid lies inside
    :data:`SUPPORT_RADIUS`, which keeps the whole density away from the box
    edge. Amplitudes decrease with blob volume so that small blobs stay
    visible next to large ones.
    """
    rng = np.random.default_rng(PHANTOM_SEED)
    amplitudes, centres, covariances = [], [], []
    while len(centres) < N_BLOBS:
        direction = rng.standard_normal(3)
        centre = direction / np.linalg.norm(direction) * CENTRE_RADIUS * rng.uniform() ** (1 / 3)
        sigmas = rng.uniform(*SIGMA_RANGE, size=3)
        if np.linalg.norm(centre) + 4 * sigmas.max() > SUPPORT_RADIUS:
            continue
        axes = Rotation.random(rng=rng).as_matrix()
        centres.append(centre)
        covariances.append(axes @ np.diag(sigmas**2) @ axes.T)
        amplitudes.append(rng.uniform(0.5, 1.5) * (SIGMA_RANGE[0] ** 3 / np.prod(sigmas)) ** 0.3)
    return PhantomBlobs(np.array(amplitudes), np.array(centres), np.array(covariances))


def phantom_volume(box: int = 65) -> np.ndarray:
    """The phantom sampled on a ``box``-cubed grid.

    Parameters
    ----------
    box : int
        Side length ``L`` of the volume (at least 16: smaller grids alias the
        smallest blobs).

    Returns
    -------
    ndarray, shape (L, L, L), float32
        Density indexed ``[z, y, x]``, centred on voxel ``L // 2``.
    """
    if box < MIN_BOX:
        raise ValueError(f"phantom box {box} is too small; use at least {MIN_BOX} voxels")
    blobs = phantom_blobs().scaled(box)
    axis = np.arange(box, dtype=np.float64) - box // 2
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    points = np.stack([x, y, z], axis=-1)
    volume = np.zeros((box,) * 3, dtype=np.float64)
    for amplitude, centre, covariance in zip(blobs.amplitudes, blobs.centres, blobs.covariances, strict=True):
        offset = points - centre
        mahalanobis = np.einsum("...i,ij,...j->...", offset, np.linalg.inv(covariance), offset)
        volume += amplitude * np.exp(-0.5 * mahalanobis)
    return volume.astype(np.float32)


def phantom_projections(rotations: np.ndarray, box: int = 65) -> np.ndarray:
    """Exact line-integral projections of the phantom (Gaussian marginals).

    Uses the projection convention of :func:`cryoden_dist.sim.projection.project`,
    ``image(x, y) = ∫ V(R (x, y, z)) dz``: in image coordinates ``p = R^T u``
    a blob with centre ``mu`` and covariance ``S`` has centre ``R^T mu`` and
    covariance ``C = R^T S R``; integrating over ``z`` leaves a 2D Gaussian
    with covariance ``C_xy`` and weight ``sqrt(2 pi det C / det C_xy)``.

    Parameters
    ----------
    rotations : ndarray, shape (n, 3, 3)
        Rotation matrices.
    box : int
        Image side length ``L`` (the phantom is scaled to this box).

    Returns
    -------
    ndarray, shape (n, L, L), float64
        Projections in voxel-length units, centre pixel ``L // 2``.
    """
    rotations = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
    blobs = phantom_blobs().scaled(box)
    y, x = centered_coordinates(box)
    images = np.zeros((rotations.shape[0], box, box))
    for amplitude, centre, covariance in zip(blobs.amplitudes, blobs.centres, blobs.covariances, strict=True):
        means = np.einsum("nji,j->ni", rotations, centre)[:, :2]
        rotated = np.einsum("nji,jk,nkl->nil", rotations, covariance, rotations)
        planar = rotated[:, :2, :2]
        weight = amplitude * np.sqrt(2 * np.pi * np.linalg.det(rotated) / np.linalg.det(planar))
        inverse = np.linalg.inv(planar)
        dx = x[None] - means[:, 0, None, None]
        dy = y[None] - means[:, 1, None, None]
        quadratic = (
            inverse[:, 0, 0, None, None] * dx * dx
            + 2 * inverse[:, 0, 1, None, None] * dx * dy
            + inverse[:, 1, 1, None, None] * dy * dy
        )
        images += weight[:, None, None] * np.exp(-0.5 * quadratic)
    return images
