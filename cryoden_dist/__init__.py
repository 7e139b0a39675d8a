"""cryoden_dist: distributed denoising of cryo-EM particle images."""

from .ctf import CTFParams
from .errors import CryodenError
from .stack import ParticleStack

__version__ = "0.1.0"

__all__ = ["CTFParams", "CryodenError", "ParticleStack", "__version__"]
