"""``cryoden export``: a particle stack to ``NAME.mrcs`` + a RELION 3.1 ``NAME.star``.

The .mrcs is written chunk by chunk through a memory map
(:func:`mrcfile.new_mmap`), so the stack never has to fit in memory. Both
files are written under hidden temporary names in the output directory and
renamed at the end (the .mrcs first, then the .star that refers to it), so
an interrupted export leaves nothing that looks complete.

Floats are written with the shortest text that reads back as the same
float64, so ``ingest(export(stack))`` reproduces the stack's metadata and
CTF exactly (angles up to the degree <-> radian conversion, ~1 ulp).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile

from ..errors import InputError, OutputExistsError, ParameterError
from ..stack import ParticleStack
from .star import STAR_ANGLE_FIELDS, STAR_CTF_COLUMNS, format_star_float

__all__ = ["SHIFTS_ARRAY", "export", "images_centering", "optics_groups", "star_tables", "write_mrcs"]

log = logging.getLogger(__name__)

#: Per-particle centres [n, 2] (x, y) in pixels relative to the box centre, written by the centering stage.
SHIFTS_ARRAY = "centering/shifts_px"
#: CTF fields that RELION 3.1 keeps per optics group rather than per particle.
OPTICS_CTF_FIELDS = ("voltage", "cs", "amplitude_contrast")
ORIGIN_COLUMNS = ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginX", "rlnOriginY")
#: Longest chain of ``derived_from`` links followed to learn whether a stack's images are centred.
MAX_DERIVATION_DEPTH = 32


def optics_groups(keys: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Number the distinct rows of ``keys`` (1-based, in order of first appearance).

    Returns
    -------
    groups : ndarray of int64, shape (n,)
        Optics group of each particle.
    distinct : pandas.DataFrame
        One row per group, in group order.
    """
    groups = keys.groupby(list(keys.columns), sort=False, dropna=False).ngroup().to_numpy(dtype=np.int64) + 1
    return groups, keys.drop_duplicates().reset_index(drop=True)


def _metadata_columns(stack: ParticleStack, skip: set[str]) -> dict[str, np.ndarray | list[str]]:
    """The stack's ``metadata/`` arrays as star columns (text as str lists)."""
    if "metadata" not in stack.group:
        return {}
    columns: dict[str, np.ndarray | list[str]] = {}
    for name, array in sorted(stack.group["metadata"].arrays()):
        if name in skip:
            continue
        values = array[:]
        columns[name] = [str(v) for v in values.tolist()] if values.dtype.kind in "OTU" else values
    return columns


def images_centering(stack: ParticleStack) -> dict | None:
    """How the stack's images were re-centred, or None if they were not.

    The images are centred when the stack, or a stack it was derived from
    (following ``derived_from``: a denoised stack of a re-centred one), has
    the attribute ``images_centered``; the first stack of the chain that
    says either way decides. A link that cannot be opened ends the search
    (logged), as if the images were not centred.

    Returns
    -------
    dict or None
        That stack's ``centering`` record (method parameters, source), with
        ``"stack"``: the path of the stack that holds it.
    """
    current, seen = stack, set()
    while True:
        info = current.info
        if "images_centered" in info:
            return {**(info.get("centering") or {}), "stack": str(current.path)} if info["images_centered"] else None
        parent = info.get("derived_from")
        if not parent or Path(parent).resolve() in seen or len(seen) >= MAX_DERIVATION_DEPTH:
            return None
        seen.add(Path(parent).resolve())
        try:
            current = ParticleStack.open(parent)
        except InputError as exc:
            log.warning("%s: cannot tell whether the images are centred, its source is unreadable: %s", stack.path, exc)
            return None


def _origins(stack: ParticleStack) -> tuple[dict[str, np.ndarray], list[str]]:
    """rlnOriginX/YAngst for the stack's images and the star comment lines that explain them.

    * The stack has ``centering/shifts_px``: the centres found in *its*
      images. RELION's origin points the other way: the particle centre lies
      at ``box centre - origin`` (re-extraction moves the coordinate to
      ``rlnCoordinateX - rlnOriginX``), so ``origin = -shift × pixel size``.
    * Its images are re-centred (:func:`images_centering`): origin 0; the
      source's origins described the particles before re-centring and are
      superseded.
    * Otherwise: nothing (the ``metadata/`` origins are written back).
    """
    if stack.has(SHIFTS_ARRAY):
        shifts = np.asarray(stack.group[SHIFTS_ARRAY][:], dtype=np.float64)
        if shifts.shape != (stack.n, 2):
            raise InputError(
                f"{stack.path}: {SHIFTS_ARRAY} has shape {shifts.shape}, expected ({stack.n}, 2); "
                "rerun the centering stage that wrote it"
            )
        params = dict(stack.group[SHIFTS_ARRAY.rpartition("/")[0]].attrs).get("params")
        note = f"rlnOriginX/YAngst = -{SHIFTS_ARRAY} x pixel size" + (f" (cryoden center {params})" if params else "")
        return {
            "rlnOriginXAngst": -shifts[:, 0] * stack.pixel_size,
            "rlnOriginYAngst": -shifts[:, 1] * stack.pixel_size,
        }, [note]
    centering = images_centering(stack)
    if centering is None:
        return {}, []
    zero = np.zeros(stack.n)
    notes = [
        f"images re-centred by cryoden center {centering.get('params')} (recorded in {centering['stack']}):",
        "rlnOriginX/YAngst are 0 and supersede the source's origins; the removed shifts are "
        f"{centering.get('source', 'the source stack')}/{SHIFTS_ARRAY}",
    ]
    return {"rlnOriginXAngst": zero, "rlnOriginYAngst": zero.copy()}, notes


def star_tables(stack: ParticleStack, mrcs_name: str) -> dict[str, pd.DataFrame]:
    """The ``data_optics`` and ``data_particles`` tables of a stack (RELION 3.1).

    Parameters
    ----------
    stack : ParticleStack
    mrcs_name : str
        File name of the .mrcs, written relative to the .star
        (``rlnImageName`` ``000001@NAME.mrcs``).

    Returns
    -------
    dict
        ``{"optics": DataFrame, "particles": DataFrame}``.
    """
    n = stack.n
    particles: dict[str, object] = {"rlnImageName": [f"{i:06d}@{mrcs_name}" for i in range(1, n + 1)]}
    skip = {"rlnImageName", "rlnOpticsGroup"}
    if stack.has_ctf:
        ctf = stack.ctf_params()
        for field, column in STAR_CTF_COLUMNS.items():
            if field not in OPTICS_CTF_FIELDS:
                values = getattr(ctf, field)
                particles[column] = np.degrees(values) if field in STAR_ANGLE_FIELDS else values
        keys = pd.DataFrame({STAR_CTF_COLUMNS[f]: getattr(ctf, f) for f in OPTICS_CTF_FIELDS})
        keys["rlnImagePixelSize"] = ctf.pixel_size
        skip |= set(STAR_CTF_COLUMNS.values())
    else:
        keys = pd.DataFrame({"rlnImagePixelSize": np.full(n, stack.pixel_size, dtype=np.float64)})
    groups, optics = optics_groups(keys)
    particles["rlnOpticsGroup"] = groups
    origins, _ = _origins(stack)
    if origins:
        skip |= set(ORIGIN_COLUMNS)
    particles.update(_metadata_columns(stack, skip))
    particles.update(origins)
    number = np.arange(1, len(optics) + 1)
    optics.insert(0, "rlnOpticsGroupName", [f"opticsGroup{k}" for k in number])
    optics.insert(0, "rlnOpticsGroup", number)
    optics["rlnImageSize"] = stack.box
    optics["rlnImageDimensionality"] = 2
    return {"optics": optics, "particles": pd.DataFrame(particles)}


def write_mrcs(stack: ParticleStack, path: str | Path) -> None:
    """Write the images as a float32 MRC stack, one Zarr chunk at a time.

    The header voxel size is the stack's pixel size; the header statistics
    (min, max, mean, rms) are accumulated over the chunks.
    """
    n, box = stack.n, stack.box
    count = float(n) * box * box
    low, high, total, total_sq = np.inf, -np.inf, 0.0, 0.0
    with mrcfile.new_mmap(path, shape=(n, box, box), mrc_mode=2, overwrite=True) as mrc:
        mrc.set_image_stack()
        mrc.voxel_size = stack.pixel_size
        for start, stop in stack.chunk_bounds():
            block = np.asarray(stack.images[start:stop], dtype=np.float32)
            mrc.data[start:stop] = block
            low, high = min(low, float(block.min())), max(high, float(block.max()))
            wide = block.astype(np.float64)
            total += float(wide.sum())
            total_sq += float(np.einsum("ijk,ijk->", wide, wide))
        mean = total / count
        mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = low, high, mean
        mrc.header.rms = np.sqrt(max(total_sq / count - mean * mean, 0.0))


def _protected_paths(stack: ParticleStack) -> list[Path]:
    """Paths an export must never write to: the stack and the files it was made from."""
    info = stack.info
    named = [stack.path, *info.get("source_files", []), *info.get("image_files", [])]
    return [Path(p).resolve() for p in named]


def _check_targets(stack: ParticleStack, targets: list[Path], overwrite: bool) -> None:
    protected = _protected_paths(stack)
    for target in targets:
        resolved = target.resolve()
        for path in protected:
            if resolved == path or path in resolved.parents:
                raise OutputExistsError(
                    f"{target}: export would overwrite or write inside the input {path}; "
                    "choose another --out directory or --name"
                )
        if target.is_dir():
            raise OutputExistsError(f"{target}: exists and is a directory; choose another --out directory or --name")
        if target.exists() and not overwrite:
            raise OutputExistsError(
                f"{target}: output exists; pass --overwrite to replace it, or choose another --out directory or --name"
            )


def export(
    stack_path: str | Path, out_dir: str | Path, *, name: str = "particles", overwrite: bool = False
) -> tuple[Path, Path]:
    """Export a stack to ``out_dir/NAME.mrcs`` and a RELION 3.1 ``out_dir/NAME.star``.

    Parameters
    ----------
    stack_path : path
        A cryoden stack.
    out_dir : path
        Output directory (created if needed).
    name : str
        Base name of the two files.
    overwrite : bool
        Replace existing NAME.star/NAME.mrcs (never an input of the stack).

    Returns
    -------
    (Path, Path)
        The .star and .mrcs written.

    Notes
    -----
    ``data_optics`` has one group per distinct (voltage, Cs, amplitude
    contrast, pixel size); ``data_particles`` has ``rlnImageName``, the
    per-particle CTF (defocus, angles in degrees), ``rlnOpticsGroup`` and
    every ``metadata/`` column. A stack without CTF is written without CTF
    columns. If the stack has ``centering/shifts_px`` (particle centre
    relative to the box centre) they are written as
    ``rlnOriginXAngst/YAngst = -shift × pixel size`` (RELION's sign),
    replacing the origins in the metadata. A stack of re-centred images
    (``STACK/centering`` made by ``cryoden center --apply``, or a stack
    derived from one, see :func:`images_centering`) is written with origins
    0. Either way ``# cryoden:`` comment lines at the top of the .star say
    where the origins come from.
    """
    stack = ParticleStack.open(stack_path)
    if not name or name in (".", "..") or "/" in name or os.sep in name or any(c.isspace() for c in name):
        # the name ends up in rlnImageName, where whitespace would split the column
        raise ParameterError(f"--name {name!r}: give a plain file name without directories or spaces")
    if stack.info.get("complete") is False:
        raise InputError(
            f"{stack.path}: the stack is not complete (its command was interrupted); rerun that command to finish it"
        )
    if stack.pixel_size is None:
        raise InputError(f"{stack.path}: the stack has no pixel size; ingest it again with --pixel-size")
    out_dir = Path(out_dir)
    star_path, mrcs_path = out_dir / f"{name}.star", out_dir / f"{name}.mrcs"
    _check_targets(stack, [star_path, mrcs_path], overwrite)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir}: --out exists and is not a directory; choose a directory")
    tables = star_tables(stack, mrcs_path.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    temporary = {path: out_dir / f".{path.name}.{os.getpid()}.partial" for path in (mrcs_path, star_path)}
    try:
        write_mrcs(stack, temporary[mrcs_path])
        starfile.write(tables, temporary[star_path], float_format=format_star_float)
        _, notes = _origins(stack)
        if notes:  # where the origins come from, for the reader of the .star (parsers skip '#' lines)
            text = temporary[star_path].read_text()
            temporary[star_path].write_text("".join(f"# cryoden: {line}\n" for line in notes) + text)
        for final in (mrcs_path, star_path):
            os.replace(temporary[final], final)
    finally:
        for leftover in temporary.values():
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    log.info("wrote %s and %s (%d particles)", star_path, mrcs_path, stack.n)
    return star_path, mrcs_path
