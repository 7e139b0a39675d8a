"""Small synthetic "simulation" stores with known truth, for tests.

The particles are sums of a few Gaussian blobs (smooth, effectively band
limited, different for every particle) inside a disk of radius ``L / 4``, so
the image corners hold noise only. Each particle gets its own realistic CTF
(300 kV, Cs 2.7 mm, Q 0.1, defocus 1-3 µm, mild astigmatism); white Gaussian
noise is added at the requested SNR with the project's definition: the mean
over particles of var(clean CTF-modulated image in the disk of radius L // 2)
divided by the noise variance.

The store has the layout of a ``cryoden simulate`` output: ``images`` (noisy),
``truth/clean``, ``truth/clean_ctf``, ``ctf/<field>``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryoden_dist.ctf import CTFParams, apply_ctf, ctf_images
from cryoden_dist.image import centered_coordinates, disk_mask
from cryoden_dist.stack import ParticleStack

__all__ = ["blob_particles", "make_simulation", "random_ctf"]


def blob_particles(n: int, box: int, rng: np.random.Generator, blobs: int = 5) -> np.ndarray:
    """``n`` clean particles ``[n, L, L]``: positive Gaussian blobs within radius ``L / 4``."""
    y, x = centered_coordinates(box)
    radius = box / 4
    centre_r = radius * np.sqrt(rng.uniform(0, 1, (n, blobs, 1, 1)))
    centre_a = rng.uniform(0, 2 * np.pi, (n, blobs, 1, 1))
    cx, cy = centre_r * np.cos(centre_a), centre_r * np.sin(centre_a)
    width = rng.uniform(1.5, 3.5, (n, blobs, 1, 1))
    height = rng.uniform(0.5, 1.5, (n, blobs, 1, 1))
    particles = np.zeros((n, box, box), dtype=np.float32)
    for b in range(blobs):  # one blob at a time keeps memory at one [n, L, L] array
        distance2 = (x - cx[:, b]) ** 2 + (y - cy[:, b]) ** 2
        particles += (height[:, b] * np.exp(-distance2 / (2 * width[:, b] ** 2))).astype(np.float32)
    return particles


def random_ctf(n: int, pixel_size: float, rng: np.random.Generator) -> CTFParams:
    """Realistic per-particle CTFs: 300 kV, Cs 2.7 mm, Q 0.1, defocus 1-3 µm."""
    defocus = rng.uniform(10_000.0, 30_000.0, n)
    astigmatism = rng.uniform(0.0, 300.0, n)
    return CTFParams(
        defocus_u=defocus + astigmatism / 2,
        defocus_v=defocus - astigmatism / 2,
        defocus_angle=rng.uniform(0, np.pi, n),
        voltage=300.0,
        cs=2.7,
        amplitude_contrast=0.1,
        phase_shift=0.0,
        pixel_size=pixel_size,
    )


def make_simulation(
    path: str | Path,
    *,
    n: int = 96,
    box: int = 48,
    pixel_size: float = 4.0,
    snr: float | None = 0.1,
    seed: int = 0,
    chunk: int = 32,
    with_ctf: bool = True,
) -> ParticleStack:
    """Write a synthetic simulation store and return it.

    Parameters
    ----------
    path : path
        New store location.
    n, box, pixel_size : int, int, float
        Particles, image size, pixel size in Å.
    snr : float or None
        Signal-to-noise ratio; None for noise-free images.
    seed : int
        Seed of everything random.
    chunk : int
        Particles per chunk (small, so the stores have several chunks).
    with_ctf : bool
        Modulate by random CTFs (stored in ``ctf/``) or not (no ``ctf/``).
    """
    rng = np.random.default_rng(seed)
    clean = blob_particles(n, box, rng)
    if with_ctf:
        ctf = random_ctf(n, pixel_size, rng)
        clean_ctf = apply_ctf(clean, ctf_images(ctf, box))
    else:
        clean_ctf = clean.copy()
    noisy = clean_ctf.copy()
    noise_variance = 0.0
    if snr is not None:
        signal_variance = float(np.mean(clean_ctf[:, disk_mask(box)].var(axis=1)))
        noise_variance = signal_variance / snr
        noisy += rng.normal(0.0, np.sqrt(noise_variance), clean.shape).astype(np.float32)
    stack = ParticleStack.create(
        path,
        n,
        box,
        pixel_size,
        kind="simulation",
        chunk=chunk,
        with_ctf=with_ctf,
        attrs={"snr": snr, "noise_variance": noise_variance, "images_ctf_state": "modulated" if with_ctf else "none"},
    )
    stack.images[:] = noisy
    for name, values in (("truth/clean", clean), ("truth/clean_ctf", clean_ctf)):
        stack.group.create_array(name, shape=values.shape, chunks=(chunk, box, box), dtype="float32")[:] = values
    if with_ctf:
        stack.write_ctf(ctf)
    stack.update_info(complete=True)
    return stack
