"""MRC particle stacks: header checks and image reads through :mod:`mrcfile`.

Headers are read without the data (cheap, done on the driver for every
stack before anything is written); pixels are read through a memory map
(:func:`mrcfile.mmap`) by the workers, only the particles each chunk needs.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import mrcfile.utils
import numpy as np
import pandas as pd

from ..errors import InputError
from . import ParticleTable

__all__ = ["StackHeader", "open_stack", "read_images", "read_mrc_table", "read_stack_header"]

#: Extensions read as bare particle stacks.
MRC_SUFFIXES = (".mrc", ".mrcs", ".st")


@dataclass(frozen=True)
class StackHeader:
    """What the header of an MRC stack says about its images.

    Attributes
    ----------
    path : Path
    n : int
        Number of images (``nz``).
    ny, nx : int
        Image height and width in pixels.
    dtype : numpy.dtype
        Pixel type on disk.
    voxel_size : float
        Pixel size in Å from the header (0 when unset).
    """

    path: Path
    n: int
    ny: int
    nx: int
    dtype: np.dtype
    voxel_size: float


@contextlib.contextmanager
def _lenient():
    """Silence mrcfile's warnings for files it reads in permissive mode.

    Stacks written by common tools (e.g. cryoDRGN's relion31.mrcs) lack the
    ``MAP`` ID string or a machine stamp; they are still valid images, and
    the header fields that matter are checked explicitly instead.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def read_stack_header(path: str | Path) -> StackHeader:
    """Read and check the header of an MRC stack.

    Raises
    ------
    InputError
        If the file is missing or unreadable, has an unsupported pixel
        mode, or is shorter than its header says (a truncated copy).
    """
    path = Path(path)
    try:
        with _lenient(), mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
            header = mrc.header
            # float32 in the header: keep the shortest decimal it encodes (4.88, not 4.880000114)
            voxel_size = float(str(np.float32(mrc.voxel_size.x)))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable MRC file ({exc}); check the path and the file") from None
    if header is None:
        raise InputError(f"{path}: not a readable MRC file (no header); check the path and the file")
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    try:
        dtype = np.dtype(mrcfile.utils.data_dtype_from_header(header))
    except ValueError:
        raise InputError(
            f"{path}: unsupported MRC pixel mode {int(header.mode)} (header field MODE); "
            "convert the stack to float32 (mode 2)"
        ) from None
    if dtype.kind == "c":
        raise InputError(f"{path}: complex pixels (MRC mode {int(header.mode)}); particle stacks must be real images")
    if min(nx, ny, nz) < 1:
        raise InputError(f"{path}: header gives an empty stack (nx={nx}, ny={ny}, nz={nz}); check the file")
    expected = header.nbytes + int(header.nsymbt) + nx * ny * nz * dtype.itemsize
    size = os.path.getsize(path)
    if size < expected:
        raise InputError(
            f"{path}: file is {size} bytes but its header ({nz} images of {ny}x{nx} {dtype.name}) needs "
            f"{expected}; the stack is truncated: copy it again from the source"
        )
    return StackHeader(path=path, n=nz, ny=ny, nx=nx, dtype=dtype, voxel_size=voxel_size)


@contextlib.contextmanager
def open_stack(path: str | Path) -> Iterator[np.ndarray]:
    """Memory-map an MRC stack and yield its data as an ``(n, ny, nx)`` array."""
    with _lenient(), mrcfile.mmap(path, mode="r", permissive=True) as mrc:
        if mrc.data is None:
            raise InputError(f"{path}: the data block could not be mapped; check the file (truncated or corrupt?)")
        data = mrc.data
        yield data.reshape((-1,) + data.shape[-2:])


def read_images(path: str | Path, indices: np.ndarray) -> np.ndarray:
    """Read the images ``indices`` (0-based) of a stack as float32.

    A run of consecutive indices is read as one slice of the memory map,
    which is the common case (particles stored in stack order).
    """
    indices = np.asarray(indices, dtype=np.int64)
    with open_stack(path) as data:
        first = int(indices[0])
        if np.array_equal(indices, np.arange(first, first + indices.size)):
            block = data[first : first + indices.size]
        else:
            block = data[indices]
        return np.array(block, dtype=np.float32)


def read_mrc_table(path: str | Path, pixel_size: float | None = None) -> ParticleTable:
    """All images of a bare ``.mrc``/``.mrcs`` stack, without CTF.

    Parameters
    ----------
    path : path
        The stack.
    pixel_size : float, optional
        Pixel size in Å. It takes precedence over the header voxel size,
        which stacks often leave at 0 or 1.

    Raises
    ------
    InputError
        If neither the header nor ``pixel_size`` gives a pixel size.
    """
    path = Path(path)
    header = read_stack_header(path)
    size = pixel_size if pixel_size is not None else header.voxel_size
    if not size > 0:
        raise InputError(
            f"{path}: the MRC header has no pixel size (voxel size {header.voxel_size}); pass --pixel-size in Å"
        )
    indices = np.arange(header.n, dtype=np.int64)
    name = str(path.resolve())
    particles = pd.DataFrame(
        {"image_file": np.full(header.n, name, dtype=object), "image_index": indices, "pixel_size": float(size)}
    )
    metadata = pd.DataFrame({"rlnImageOriginalName": [f"{i + 1:06d}@{name}" for i in indices]})
    return ParticleTable(
        source=path,
        format="mrc",
        particles=particles,
        metadata=metadata,
        image_field="",
        ctf_missing=f"{path} is a bare image stack without CTF parameters",
    )


def read_mrc_data(path: str | Path, what: str = "MRC file") -> tuple[np.ndarray | None, float]:
    """The whole data block of an MRC file as float32, and its header pixel size.

    Parameters
    ----------
    path : path
        An existing ``.mrc`` file (a map, a micrograph).
    what : str
        What the file is, for the error message ("map", "micrograph").

    Returns
    -------
    data : ndarray or None
        The data (None for a header-only file).
    pixel_size : float
        The header voxel size along x in Å (0 when unset).

    Raises
    ------
    InputError
        If the file cannot be read as MRC.
    """
    try:
        with mrcfile.open(path) as mrc:
            data = None if mrc.data is None else np.asarray(mrc.data, dtype=np.float32)
            return data, float(mrc.voxel_size.x)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable MRC {what} ({exc})") from None
