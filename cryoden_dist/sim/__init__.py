"""Ground-truth simulation: phantom, SO(3) rotations, Fourier-slice projection, noise, ``simulate``."""

from .phantom import phantom_projections, phantom_volume
from .projection import project
from .rotations import random_rotations, viewing_angle, viewing_directions

__all__ = [
    "phantom_projections",
    "phantom_volume",
    "project",
    "random_rotations",
    "viewing_angle",
    "viewing_directions",
]
