"""cryoSPARC ``.cs`` particle files (numpy record arrays).

A ``.cs`` file is a structured numpy array saved with :func:`numpy.save`.
Fields used: ``blob/path`` (stack path relative to the cryoSPARC project
directory), ``blob/idx`` (0-based image index), ``blob/psize_A`` and the
``ctf/*`` fields, already in package units (Å, kV, mm, radians).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from . import ParticleTable

__all__ = ["CS_CTF_FIELDS", "read_cs", "read_cs_records"]

#: cryoSPARC field of each CTF field (``ctf.CTF_FIELDS`` minus pixel_size); same units as the package.
CS_CTF_FIELDS: dict[str, str] = {
    "defocus_u": "ctf/df1_A",
    "defocus_v": "ctf/df2_A",
    "defocus_angle": "ctf/df_angle_rad",
    "voltage": "ctf/accel_kv",
    "cs": "ctf/cs_mm",
    "amplitude_contrast": "ctf/amp_contrast",
    "phase_shift": "ctf/phase_shift_rad",
}
CS_IMAGE_FIELDS = ("blob/path", "blob/idx")


def read_cs_records(path: str | Path) -> np.ndarray:
    """Load a .cs record array (no pickles) and check it has image references.

    Raises
    ------
    InputError
        If the file is not a numpy record array with ``blob/path`` and ``blob/idx``.
    """
    path = Path(path)
    try:
        records = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; check the input path") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a cryoSPARC .cs record array ({exc}); check the file") from None
    names = records.dtype.names or ()
    missing = [name for name in CS_IMAGE_FIELDS if name not in names]
    if missing or records.ndim != 1:
        raise InputError(
            f"{path}: no {', '.join(missing) or 'particle rows'} field in this .cs file; "
            "use the particles .cs of an extract/refine job (it has blob/path and blob/idx)"
        )
    return records


def _text(values: np.ndarray) -> np.ndarray:
    """cryoSPARC paths as str; a leading '>' (cryoSPARC's marker for project-relative paths) is dropped."""
    decoded = np.char.decode(values, "utf-8") if values.dtype.kind == "S" else values.astype(str)
    return np.char.lstrip(decoded.astype(str), ">").astype(object)


def read_cs(path: str | Path, pixel_size: float | None = None) -> ParticleTable:
    """Parse a cryoSPARC particle .cs file.

    Parameters
    ----------
    path : path
        The .cs file.
    pixel_size : float, optional
        Pixel size in Å used where the file has no (or a zero) ``blob/psize_A``.

    Returns
    -------
    ParticleTable
        Image references are relative to the cryoSPARC project directory.
        Metadata keeps ``uid`` and ``rlnImageOriginalName``.
    """
    path = Path(path)
    records = read_cs_records(path)
    names = set(records.dtype.names)
    files = _text(records["blob/path"])
    indices = records["blob/idx"].astype(np.int64)
    size = records["blob/psize_A"].astype(np.float64) if "blob/psize_A" in names else np.full(len(records), np.nan)
    if pixel_size is not None:
        size = np.where(np.isfinite(size) & (size > 0), size, float(pixel_size))
    ctf = {field: records[name].astype(np.float64) for field, name in CS_CTF_FIELDS.items() if name in names}
    missing = [name for name in CS_CTF_FIELDS.values() if name not in names]
    particles = pd.DataFrame({"image_file": files, "image_index": indices, "pixel_size": size, **ctf})
    metadata = pd.DataFrame({"rlnImageOriginalName": [f"{i + 1:06d}@{f}" for i, f in zip(indices, files, strict=True)]})
    if "uid" in names:
        metadata.insert(0, "uid", records["uid"].astype(np.uint64))
    return ParticleTable(
        source=path,
        format="cryosparc",
        particles=particles,
        metadata=metadata,
        image_field="blob/path",
        ctf_missing=f"{path} has no {', '.join(missing)}" if missing else None,
    )
