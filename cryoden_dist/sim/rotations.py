"""Uniform random rotations and viewing directions.

Convention (shared with :mod:`cryoden_dist.sim.projection`): the image of a
volume ``V`` under rotation ``R`` is ``image(x, y) = ∫ V(R (x, y, z)) dz``,
so the line of integration through pixel ``(0, 0)`` runs along ``R e_z``:
the **viewing direction is the third column** ``R[:, 2]`` of the matrix,
and the image axes ``x`` and ``y`` are the columns ``R[:, 0]`` and
``R[:, 1]`` in volume coordinates ``(x, y, z)``.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

__all__ = ["in_plane_rotation", "random_rotations", "viewing_angle", "viewing_directions"]


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n`` rotations uniformly (Haar measure) from SO(3).

    Parameters
    ----------
    n : int
        Number of rotations.
    rng : numpy.random.Generator
        Source of randomness; the result depends only on its state.

    Returns
    -------
    ndarray, shape (n, 3, 3), float64
        Rotation matrices.
    """
    return Rotation.random(n, rng=rng).as_matrix().reshape(n, 3, 3)


def in_plane_rotation(angle: float | np.ndarray) -> np.ndarray:
    """Rotation by ``angle`` (radians) about the ``z`` axis, ``[..., 3, 3]``.

    ``R @ in_plane_rotation(a)`` keeps the viewing direction of ``R`` and
    rotates the image: see :func:`cryoden_dist.sim.projection.project`.
    """
    angle = np.asarray(angle, dtype=np.float64)
    c, s = np.cos(angle), np.sin(angle)
    zero, one = np.zeros_like(angle), np.ones_like(angle)
    return np.stack(
        [np.stack([c, -s, zero], -1), np.stack([s, c, zero], -1), np.stack([zero, zero, one], -1)],
        axis=-2,
    )


def viewing_directions(rotations: np.ndarray) -> np.ndarray:
    """Unit viewing directions ``R[:, :, 2]`` (third columns), shape ``(n, 3)``."""
    return np.asarray(rotations, dtype=np.float64)[..., :, 2]


def viewing_angle(rotations_a: np.ndarray, rotations_b: np.ndarray, antipodal: bool = False) -> np.ndarray:
    """Angle in radians between the viewing directions of two sets of rotations.

    Parameters
    ----------
    rotations_a, rotations_b : ndarray, shape (..., 3, 3)
        Broadcastable stacks of rotation matrices.
    antipodal : bool
        Treat opposite directions as equal (``arccos |v_a . v_b|``): views
        along ``v`` and ``-v`` are mirror images of each other, which
        neighbour searches that allow reflections cannot tell apart.

    Returns
    -------
    ndarray
        Angles in ``[0, pi]`` (``[0, pi / 2]`` when ``antipodal``).
    """
    cosine = np.sum(viewing_directions(rotations_a) * viewing_directions(rotations_b), axis=-1)
    if antipodal:
        cosine = np.abs(cosine)
    return np.arccos(np.clip(cosine, -1.0, 1.0))
