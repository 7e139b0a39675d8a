"""RELION ``.star`` particle files (3.0 without optics table, 3.1 and later with one).

Parsing is done by :mod:`starfile`; this module only normalises what it
returns into a :class:`~cryoden_dist.io.ParticleTable`: image references,
pixel size and CTF in package units (degrees become radians), and the
remaining per-particle columns kept under their RELION names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from ..errors import InputError
from . import ParticleTable, json_records

__all__ = [
    "STAR_ANGLE_FIELDS",
    "STAR_CTF_COLUMNS",
    "format_star_float",
    "parse_image_names",
    "read_star",
    "read_star_blocks",
    "star_pixel_size",
]

#: RELION column of each per-particle CTF field (``ctf.CTF_FIELDS`` minus pixel_size).
STAR_CTF_COLUMNS: dict[str, str] = {
    "defocus_u": "rlnDefocusU",
    "defocus_v": "rlnDefocusV",
    "defocus_angle": "rlnDefocusAngle",
    "voltage": "rlnVoltage",
    "cs": "rlnSphericalAberration",
    "amplitude_contrast": "rlnAmplitudeContrast",
    "phase_shift": "rlnPhaseShift",
}
#: CTF fields stored in degrees in .star files and in radians in the package.
STAR_ANGLE_FIELDS = ("defocus_angle", "phase_shift")
#: CTF fields with a default when the column is absent: data without a phase plate has no rlnPhaseShift.
STAR_CTF_DEFAULTS = {"phase_shift": 0.0}
#: Columns that hold names: read as text even when a value looks like a number (e.g. micrograph "1").
STAR_STRING_COLUMNS = [
    "rlnImageName",
    "rlnImageOriginalName",
    "rlnMicrographName",
    "rlnMicrographOriginalName",
    "rlnOpticsGroupName",
    "rlnMtfFileName",
    "rlnCtfImage",
    "rlnReconstructImageName",
]
#: Per-particle columns that ingest turns into images and pixel size (not kept as metadata).
STAR_IMAGE_COLUMNS = (
    "rlnImageName",
    "rlnOpticsGroup",
    "rlnImagePixelSize",
    "rlnDetectorPixelSize",
    "rlnMagnification",
    "rlnImageSize",
    "rlnImageDimensionality",
)
#: RELION 3.0 origins in pixels and the 3.1 columns in Å that replace them.
STAR_ORIGIN_COLUMNS = {"rlnOriginX": "rlnOriginXAngst", "rlnOriginY": "rlnOriginYAngst"}


def format_star_float(value: float) -> str:
    """Shortest text that reads back as the same float64 (for ``starfile.write``)."""
    return repr(float(value))


def read_star_blocks(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The particle table and the optics table (or None) of a .star file.

    The particle table is the block with an ``rlnImageName`` column
    (``data_particles`` in RELION 3.1+, any name in 3.0); the optics table
    is ``data_optics``. Blocks may come in any order.

    Raises
    ------
    InputError
        If the file cannot be parsed or has no particle table.
    """
    path = Path(path)
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=STAR_STRING_COLUMNS)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; check the input path") from None
    except Exception as exc:  # noqa: BLE001 - starfile raises many types for malformed text
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: not a readable STAR file ({first_line}); check the file") from None
    tables = {name: block for name, block in blocks.items() if isinstance(block, pd.DataFrame)}
    with_images = [name for name, block in tables.items() if "rlnImageName" in block.columns]
    if not with_images:
        raise InputError(
            f"{path}: no data block with an _rlnImageName column; a particle .star needs one "
            "(is this a micrograph or model .star?)"
        )
    particles = tables["particles"] if "particles" in with_images else tables[with_images[0]]
    return particles.reset_index(drop=True), tables.get("optics")


def merge_optics(particles: pd.DataFrame, optics: pd.DataFrame | None, source: Path) -> pd.DataFrame:
    """Per-particle table with each particle's optics-group columns joined on ``rlnOpticsGroup``."""
    if optics is None or optics.empty:
        return particles
    if "rlnOpticsGroup" not in optics.columns:
        raise InputError(f"{source}: data_optics has no _rlnOpticsGroup column; add it (RELION 3.1 format)")
    if "rlnOpticsGroup" not in particles.columns:
        if len(optics) != 1:
            raise InputError(
                f"{source}: data_particles has no _rlnOpticsGroup column but data_optics has {len(optics)} groups; "
                "add _rlnOpticsGroup to the particles"
            )
        particles = particles.assign(rlnOpticsGroup=optics["rlnOpticsGroup"].iloc[0])
    extra = ["rlnOpticsGroup"] + [c for c in optics.columns if c not in particles.columns]
    try:
        merged = particles.merge(
            optics[extra], on="rlnOpticsGroup", how="left", validate="many_to_one", indicator="_optics_found"
        )
    except pd.errors.MergeError:
        raise InputError(
            f"{source}: data_optics lists an _rlnOpticsGroup twice; make the group numbers unique"
        ) from None
    unmatched = merged["_optics_found"] == "left_only"
    if unmatched.any():
        row = int(np.argmax(unmatched.to_numpy()))
        group = merged["rlnOpticsGroup"].iloc[row]
        raise InputError(
            f"{source}: particle {row + 1} has _rlnOpticsGroup {group}, which data_optics does not define; "
            "add that group to data_optics or fix the particle"
        )
    return merged.drop(columns="_optics_found")


def parse_image_names(names: pd.Series, source: Path) -> tuple[np.ndarray, np.ndarray]:
    """Split RELION ``INDEX@STACK`` references.

    Parameters
    ----------
    names : pandas.Series of str
        ``rlnImageName`` values; ``INDEX`` is 1-based. A name without ``@``
        is a single-image file.
    source : Path
        The .star file (for error messages).

    Returns
    -------
    files : ndarray of object
        Stack paths as written.
    indices : ndarray of int64
        0-based image indices.
    """
    names = names.astype(str)
    has_at = names.str.contains("@", regex=False)
    parts = names.str.split("@", n=1, expand=True).reindex(columns=[0, 1])
    files = parts[1].where(has_at, names).to_numpy(dtype=object)
    numbers = pd.to_numeric(parts[0].where(has_at, "1"), errors="coerce").to_numpy(dtype=np.float64)
    valid = np.isfinite(numbers) & (numbers >= 1) & (numbers == np.round(numbers))
    valid &= np.array([bool(f) for f in files])
    if not valid.all():
        row = int(np.argmin(valid))
        raise InputError(
            f"{source}: particle {row + 1}: _rlnImageName {names.iloc[row]!r} is not INDEX@STACK "
            "with a 1-based INDEX; fix that entry"
        )
    return files, numbers.astype(np.int64) - 1


def star_pixel_size(table: pd.DataFrame, fallback: float | None = None) -> np.ndarray:
    """Per-particle pixel size in Å from the (optics-merged) star columns.

    ``rlnImagePixelSize`` if present, else ``rlnDetectorPixelSize`` [µm] ×
    1e4 / ``rlnMagnification`` (RELION 3.0), else ``fallback``; NaN where
    none is known.
    """
    n = len(table)
    if "rlnImagePixelSize" in table.columns:
        size = table["rlnImagePixelSize"].to_numpy(dtype=np.float64)
    elif {"rlnDetectorPixelSize", "rlnMagnification"} <= set(table.columns):
        detector_um = table["rlnDetectorPixelSize"].to_numpy(dtype=np.float64)
        size = detector_um * 1e4 / table["rlnMagnification"].to_numpy(dtype=np.float64)
    else:
        size = np.full(n, np.nan)
    if fallback is not None:
        size = np.where(np.isfinite(size) & (size > 0), size, float(fallback))
    return size


def star_ctf(table: pd.DataFrame) -> tuple[dict[str, np.ndarray], list[str]]:
    """CTF fields in package units from the (optics-merged) star columns.

    Returns
    -------
    ctf : dict
        ``{field: float64 array}`` for the fields present (angles in radians).
    missing : list of str
        RELION columns absent for a complete CTF.
    """
    ctf: dict[str, np.ndarray] = {}
    missing: list[str] = []
    for name, column in STAR_CTF_COLUMNS.items():
        if column in table.columns:
            values = table[column].to_numpy(dtype=np.float64)
        elif name in STAR_CTF_DEFAULTS:
            values = np.full(len(table), STAR_CTF_DEFAULTS[name])
        else:
            missing.append(column)
            continue
        ctf[name] = np.radians(values) if name in STAR_ANGLE_FIELDS else values
    return ctf, missing


def star_metadata(particles: pd.DataFrame, pixel_size: np.ndarray, ctf_complete: bool) -> pd.DataFrame:
    """Per-particle columns kept with the stack (written back on export).

    Image and pixel-size columns are dropped (the stack holds them); CTF
    columns are dropped only when the CTF was complete, so an incomplete
    CTF is not lost. RELION 3.0 origins in pixels become 3.1 origins in Å
    (as RELION's own conversion does), so they stay right after
    downsampling. The original image reference is kept as
    ``rlnImageOriginalName``.
    """
    drop = list(STAR_IMAGE_COLUMNS)
    if ctf_complete:
        drop += list(STAR_CTF_COLUMNS.values())
    metadata = particles.drop(columns=[c for c in drop if c in particles.columns])
    for pixels, angstrom in STAR_ORIGIN_COLUMNS.items():
        if pixels in metadata.columns:
            if angstrom not in metadata.columns:
                metadata[angstrom] = metadata[pixels].to_numpy(dtype=np.float64) * pixel_size
            metadata = metadata.drop(columns=pixels)
    if "rlnImageOriginalName" not in metadata.columns:
        metadata["rlnImageOriginalName"] = particles["rlnImageName"].astype(str).to_numpy()
    return metadata.reset_index(drop=True)


def read_star(path: str | Path, pixel_size: float | None = None) -> ParticleTable:
    """Parse a RELION particle .star file.

    Parameters
    ----------
    path : path
        RELION 3.0 (per-particle optics columns) or 3.1+ (``data_optics``
        table, in either order with ``data_particles``).
    pixel_size : float, optional
        Pixel size in Å used where the file gives none.

    Returns
    -------
    ParticleTable
        Image references are relative to the .star file's directory.
    """
    path = Path(path)
    particles, optics = read_star_blocks(path)
    merged = merge_optics(particles, optics, path)
    files, indices = parse_image_names(particles["rlnImageName"], path)
    size = star_pixel_size(merged, pixel_size)
    ctf, missing = star_ctf(merged)
    table = pd.DataFrame({"image_file": files, "image_index": indices, "pixel_size": size, **ctf})
    return ParticleTable(
        source=path,
        format="relion-3.0" if optics is None else "relion-3.1",
        particles=table,
        metadata=star_metadata(particles, size, ctf_complete=not missing),
        image_field="rlnImageName",
        optics=[] if optics is None else json_records(optics),
        ctf_missing=f"{path} has no {', '.join(missing)}" if missing else None,
    )
