"""``cryoden ingest``: particle files in, one Zarr particle stack out.

Two phases:

1. On the driver, cheaply: parse every input into a per-particle table
   (:func:`plan_ingest`), resolve the image stacks, read their headers and
   check everything that can be checked without pixels: files exist,
   indices lie inside their stacks, no stack is truncated, boxes are square
   and equal, one pixel size for all particles. Nothing is written before
   these checks pass.
2. On the Dask cluster: one task per chunk of the output reads its
   particles (possibly from several stacks) through memory maps, reports
   NaN/Inf pixels (the driver then raises), optionally Fourier-crops to
   ``box``, and writes the chunk (:func:`read_particle_chunk` through
   :func:`cryoden_dist.pipeline.run_chunks`, so a killed run resumes).
"""

from __future__ import annotations

import datetime as _dt
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..ctf import CTF_FIELDS, CTFParams
from ..errors import CryodenError, InputError, ParameterError
from ..image import fourier_crop
from ..pipeline import mark_complete, prepare_output, record_command, run_chunks
from ..stack import ParticleStack, default_chunk
from . import ParticleTable
from .cryosparc import read_cs
from .mrc import StackHeader, read_images, read_mrc_table, read_stack_header
from .star import read_star

__all__ = [
    "IngestPlan",
    "ingest",
    "plan_ingest",
    "raise_on_nonfinite",
    "read_particle_chunk",
    "read_source",
    "resolve_image_file",
]

log = logging.getLogger(__name__)

#: Reader of each input type: ``reader(path, pixel_size) -> ParticleTable``.
READERS: dict[str, Callable[[Path, float | None], ParticleTable]] = {
    ".star": read_star,
    ".cs": read_cs,
    ".mrc": read_mrc_table,
    ".mrcs": read_mrc_table,
    ".st": read_mrc_table,
}
#: Where each input format keeps the pixel size (for error messages).
PIXEL_SIZE_FIELDS = {
    "relion-3.0": "rlnImagePixelSize or rlnDetectorPixelSize/rlnMagnification",
    "relion-3.1": "rlnImagePixelSize of data_optics",
    "cryosparc": "blob/psize_A",
    "mrc": "the header voxel size",
}
#: Pixel sizes closer than this (relative) are one pixel size: .star files
#: round to ~6 digits and .cs files store float32.
PIXEL_SIZE_RTOL = 1e-5
STRING_FILL = "None"


# ----------------------------------------------------------------- reading
def read_source(path: str | Path, pixel_size: float | None = None) -> ParticleTable:
    """Parse one input file (.star, .cs, .mrc/.mrcs) into a :class:`ParticleTable`.

    Raises
    ------
    InputError
        If the file does not exist, has an unknown type, or lists no particles.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such input file; check the path")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise InputError(f"{path}: unknown input type {path.suffix!r}; give .star, .cs, .mrc or .mrcs files")
    table = reader(path, pixel_size)
    if len(table) == 0:
        raise InputError(f"{path}: the file lists no particles; check that it is the right file")
    return table


def image_file_candidates(name: str, source_dir: Path, data_root: Path | None) -> list[Path]:
    """Where an image reference may point, in the order tried.

    ``data_root/name`` and ``data_root/basename`` first when a data root is
    given (cryoSPARC paths are relative to the project directory), then the
    same under the directory of the file that holds the reference.
    """
    relative = Path(name)
    roots = ([data_root] if data_root is not None else []) + [source_dir]
    candidates: list[Path] = []
    for root in roots:
        for candidate in (root / relative, root / relative.name):
            if candidate not in candidates:
                candidates.append(candidate)
    return candidates


def resolve_image_file(name: str, table: ParticleTable, data_root: Path | None) -> Path:
    """The existing stack file an image reference of ``table`` points to.

    Raises
    ------
    InputError
        Naming the reference, the field and every location tried.
    """
    tried = image_file_candidates(name, table.source.parent, data_root)
    for candidate in tried:
        if candidate.is_file():
            return candidate.resolve()
    raise InputError(
        f"{table.source}: image stack {name!r} ({table.image_field}) not found; tried "
        f"{', '.join(str(p) for p in tried)}; pass --data-root DIR (the directory the paths are relative to) "
        "or fix the paths in the file"
    )


# -------------------------------------------------------------- validation
@dataclass
class IngestPlan:
    """The validated per-particle table of an ingest (no pixels read yet).

    Attributes
    ----------
    tables : list of ParticleTable
        The parsed inputs, in order.
    files : list of Path
        The distinct image stacks (resolved).
    headers : list of StackHeader
        Their headers, same order.
    file_ids : ndarray of int32, shape (n,)
        Stack of each particle (index into ``files``).
    indices : ndarray of int64, shape (n,)
        0-based image index of each particle in its stack.
    box : int
        Side length of the input images.
    pixel_size : float
        Pixel size of the input images in Å.
    ctf : dict or None
        ``{field: float64 array}`` for every CTF field but pixel_size, or
        None when an input lacks CTF parameters.
    ctf_missing_reason : str or None
        Why there is no CTF (names files and fields).
    metadata : pandas.DataFrame
        Per-particle columns kept with the stack.
    """

    tables: list[ParticleTable]
    files: list[Path]
    headers: list[StackHeader]
    file_ids: np.ndarray
    indices: np.ndarray
    box: int
    pixel_size: float
    ctf: dict[str, np.ndarray] | None
    ctf_missing_reason: str | None
    metadata: pd.DataFrame

    @property
    def n(self) -> int:
        return int(self.indices.size)


def _locate(tables: Sequence[ParticleTable], row: int) -> tuple[ParticleTable, int]:
    """The input and its 0-based row that hold global particle ``row``."""
    ends = np.cumsum([len(t) for t in tables])
    which = int(np.searchsorted(ends, row, side="right"))
    start = int(ends[which - 1]) if which else 0
    return tables[which], row - start


def resolve_image_files(tables: Sequence[ParticleTable], data_root: Path | None) -> tuple[list[Path], np.ndarray]:
    """Resolve every distinct image reference once.

    Returns
    -------
    files : list of Path
        Distinct stacks, in order of first use.
    file_ids : ndarray of int32
        Per particle (all inputs concatenated), the index into ``files``.
    """
    ids_of: dict[Path, int] = {}
    per_table = []
    for table in tables:
        names, inverse = np.unique(table.particles["image_file"].to_numpy(dtype=str), return_inverse=True)
        local = [ids_of.setdefault(resolve_image_file(str(name), table, data_root), len(ids_of)) for name in names]
        per_table.append(np.asarray(local, dtype=np.int32)[inverse.ravel()])
    return list(ids_of), np.concatenate(per_table)


def check_boxes(headers: Sequence[StackHeader]) -> int:
    """The common square box size of all stacks.

    Raises
    ------
    InputError
        For a non-square stack or stacks of different box sizes.
    """
    for header in headers:
        if header.ny != header.nx:
            raise InputError(
                f"{header.path}: images are {header.ny}x{header.nx} pixels (header ny, nx), not square; "
                "re-extract the particles with a square box"
            )
    first = headers[0]
    for header in headers[1:]:
        if header.nx != first.nx:
            raise InputError(
                f"{header.path}: box {header.nx} (header nx) differs from box {first.nx} of {first.path}; "
                "ingest stacks of one box size together (re-extract them at one size, or ingest them separately)"
            )
    return first.nx


def check_indices(
    tables: Sequence[ParticleTable], files: Sequence[Path], headers: Sequence[StackHeader], file_ids, indices
) -> None:
    """Check every image index lies inside its stack (header ``nz``)."""
    counts = np.array([h.n for h in headers], dtype=np.int64)
    outside = (indices < 0) | (indices >= counts[file_ids])
    if outside.any():
        row = int(np.argmax(outside))
        table, local = _locate(tables, row)
        path, index = files[file_ids[row]], int(indices[row])
        raise InputError(
            f"{table.source}: particle {local + 1} ({table.image_field}) refers to image {index + 1} of {path}, "
            f"which holds {counts[file_ids[row]]} images (header nz); fix the index or the stack path"
        )


def common_pixel_size(tables: Sequence[ParticleTable]) -> float:
    """The one pixel size (Å) of all particles.

    Raises
    ------
    InputError
        If a particle has no pixel size, or the pixel sizes differ.
    """
    sizes = np.concatenate([t.particles["pixel_size"].to_numpy(dtype=np.float64) for t in tables])
    unknown = ~(np.isfinite(sizes) & (sizes > 0))
    if unknown.any():
        table, local = _locate(tables, int(np.argmax(unknown)))
        raise InputError(
            f"{table.source}: no pixel size for particle {local + 1} "
            f"({PIXEL_SIZE_FIELDS[table.format]} missing or 0); pass --pixel-size in Å"
        )
    reference = float(sizes[0])
    differs = np.abs(sizes / reference - 1.0) > PIXEL_SIZE_RTOL
    if differs.any():
        row = int(np.argmax(differs))
        table, local = _locate(tables, row)
        raise InputError(
            f"{table.source}: particle {local + 1} has pixel size {sizes[row]:g} Å "
            f"({PIXEL_SIZE_FIELDS[table.format]}) but particle 1 of {tables[0].source} has {reference:g} Å; "
            "ingest particles of one pixel size together (separate runs, or rescale them first)"
        )
    return reference


def combine_ctf(tables: Sequence[ParticleTable]) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """All particles' CTF fields (pixel size aside), or None and the reason."""
    missing = [t.ctf_missing for t in tables if t.ctf_missing]
    if missing:
        return None, "; ".join(missing)
    fields = [name for name in CTF_FIELDS if name != "pixel_size"]
    return {
        name: np.concatenate([t.particles[name].to_numpy(dtype=np.float64) for t in tables]) for name in fields
    }, None


def _absent_column(template: pd.Series, n: int) -> np.ndarray:
    """Values for ``n`` particles of an input that lacks the column ``template``.

    Integers get 0 (RELION's "unset" for class numbers, subsets and
    counters) so that they stay integers: a NaN would turn a column such as
    cryoSPARC's 64-bit ``uid`` into float64 and corrupt it.
    """
    if pd.api.types.is_bool_dtype(template) or pd.api.types.is_integer_dtype(template):
        return np.zeros(n, dtype=template.dtype if pd.api.types.is_integer_dtype(template) else np.int64)
    if pd.api.types.is_numeric_dtype(template):
        return np.full(n, np.nan)
    return np.full(n, STRING_FILL, dtype=object)


def combine_metadata(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate per-particle metadata of several inputs (union of the columns).

    A column absent from an input is filled with 0 (integers), NaN (other
    numbers) or ``"None"`` (text); text columns come out as str.
    """
    templates: dict[str, pd.Series] = {}
    for frame in frames:
        for name in frame.columns:
            templates.setdefault(name, frame[name])
    completed = [
        frame.assign(**{n: _absent_column(t, len(frame)) for n, t in templates.items() if n not in frame.columns})
        for frame in frames
    ]
    merged = pd.concat(completed, ignore_index=True, sort=False)[list(templates)]
    for name in merged.columns:
        column = merged[name]
        if pd.api.types.is_bool_dtype(column):
            merged[name] = column.astype(np.int64)
        elif not pd.api.types.is_numeric_dtype(column):
            merged[name] = column.where(column.notna(), STRING_FILL).astype(str)
    return merged


def plan_ingest(
    inputs: Sequence[str | Path], *, pixel_size: float | None = None, data_root: str | Path | None = None
) -> IngestPlan:
    """Parse and validate the inputs of an ingest without reading pixels.

    Parameters
    ----------
    inputs : sequence of paths
        .star, .cs, .mrc/.mrcs files; their particles are concatenated in order.
    pixel_size : float, optional
        Pixel size in Å where an input gives none (overrides MRC headers).
    data_root : path, optional
        Directory that relative image paths are resolved against first.

    Raises
    ------
    InputError
        For anything wrong with the inputs (see the module docstring).
    """
    if not inputs:
        raise InputError("no input files; give one or more .star, .cs, .mrc or .mrcs files")
    if pixel_size is not None and not pixel_size > 0:
        raise ParameterError(f"--pixel-size {pixel_size}: give the pixel size in Å, a positive number")
    if data_root is not None:
        data_root = Path(data_root)
        if not data_root.is_dir():
            raise InputError(f"{data_root}: --data-root is not a directory; give the directory the image paths are in")
    tables = [read_source(path, pixel_size) for path in inputs]
    files, file_ids = resolve_image_files(tables, data_root)
    headers = [read_stack_header(path) for path in files]
    box = check_boxes(headers)
    indices = np.concatenate([t.particles["image_index"].to_numpy(dtype=np.int64) for t in tables])
    check_indices(tables, files, headers, file_ids, indices)
    ctf, reason = combine_ctf(tables)
    return IngestPlan(
        tables=tables,
        files=files,
        headers=headers,
        file_ids=file_ids,
        indices=indices,
        box=box,
        pixel_size=common_pixel_size(tables),
        ctf=ctf,
        ctf_missing_reason=reason,
        metadata=combine_metadata([t.metadata for t in tables]),
    )


def check_box(box: int | None, input_box: int) -> int:
    """The output box: ``box`` if given (downsampling only), else the input box."""
    if box is None:
        return input_box
    if box < 2:
        raise ParameterError(f"--box {box}: the output box must be at least 2 pixels")
    if box > input_box:
        raise ParameterError(
            f"--box {box} is larger than the input box {input_box}; ingest only downsamples: "
            f"choose --box <= {input_box}"
        )
    return int(box)


# ------------------------------------------------------------------ pixels
def read_particle_chunk(
    start: int,
    stop: int,
    files: Sequence[str],
    file_ids: np.ndarray,
    indices: np.ndarray,
    box: int,
    crop_box: int | None,
) -> dict[str, np.ndarray]:
    """Stage kernel: the images of particles ``[start, stop)``.

    Parameters
    ----------
    start, stop : int
        Particle range of the chunk.
    files : sequence of str
        The distinct image stacks.
    file_ids, indices : ndarray
        Per particle, its stack (index into ``files``) and 0-based image index.
    box : int
        Input box size.
    crop_box : int or None
        Fourier-crop to this box.

    Returns
    -------
    dict
        ``{"images": float32 array (stop - start, L, L), "_nonfinite": rows,
        "_incomplete": bool}``: the particles (global 0-based rows) with NaN or
        Inf pixels are reported to the driver rather than raised here, so the
        user gets one clear error instead of a worker traceback in the log, and
        such a chunk is left unflagged (``run_chunks``) so a resumed store never
        completes with them.
    """
    ids = file_ids[start:stop]
    wanted = indices[start:stop]
    used = np.unique(ids)
    if used.size == 1:  # the common case: no gather, no second copy
        images = read_images(files[used[0]], wanted)
    else:
        images = np.empty((stop - start, box, box), dtype=np.float32)
        for file_id in used:
            rows = np.flatnonzero(ids == file_id)
            images[rows] = read_images(files[file_id], wanted[rows])
    finite = np.isfinite(images).all(axis=(1, 2))
    if crop_box is not None:
        images = fourier_crop(images, crop_box)
    bad = start + np.flatnonzero(~finite)
    return {"images": images, "_nonfinite": bad, "_incomplete": bool(bad.size)}


def raise_on_nonfinite(plan: IngestPlan, results: Sequence[dict]) -> None:
    """Raise for particles with NaN/Inf pixels (their chunks were left unflagged by the kernel).

    Raises
    ------
    InputError
        Naming the stack file, the 1-based image, the input row and the fix.
    """
    bad = np.sort(np.concatenate([np.asarray(r["_nonfinite"], dtype=np.int64) for r in results] or [[]]))
    if bad.size == 0:
        return
    row = int(bad[0])
    table, local = _locate(plan.tables, row)
    path, index = plan.files[plan.file_ids[row]], int(plan.indices[row])
    raise InputError(
        f"{path}: image {index + 1} has NaN or Inf pixel values (particle {local + 1} of {table.source}; "
        f"{bad.size} such particle(s) in all); remove them from the input or re-extract them"
    )


# ------------------------------------------------------------------- store
def metadata_array(column: pd.Series) -> np.ndarray:
    """A metadata column as the array stored in Zarr (int64/uint64, float64 or str)."""
    if pd.api.types.is_unsigned_integer_dtype(column):
        return column.to_numpy(dtype=np.uint64)
    if pd.api.types.is_integer_dtype(column):
        return column.to_numpy(dtype=np.int64)
    if pd.api.types.is_numeric_dtype(column):
        return column.to_numpy(dtype=np.float64)
    return column.to_numpy(dtype=str)


def write_particle_tables(stack: ParticleStack, plan: IngestPlan) -> None:
    """Write the per-particle CTF and metadata arrays (overwriting: safe on resume)."""
    if plan.ctf is not None:
        stack.write_ctf(CTFParams(**plan.ctf, pixel_size=np.full(plan.n, stack.pixel_size)))
    for name in plan.metadata.columns:
        values = metadata_array(plan.metadata[name])
        dtype = str if values.dtype.kind == "U" else values.dtype
        array = stack.group.create_array(
            f"metadata/{name}", shape=values.shape, chunks=values.shape, dtype=dtype, overwrite=True
        )
        array[:] = values


def provenance(plan: IngestPlan) -> dict:
    """Attributes recording where a stack came from."""
    from .. import __version__

    return {
        "source_files": [str(t.source.resolve()) for t in plan.tables],
        "input_format": [t.format for t in plan.tables],
        "image_files": [str(path) for path in plan.files],
        "optics": [{**row, "source": str(t.source.resolve())} for t in plan.tables for row in t.optics],
        "source_box": plan.box,
        "source_pixel_size": plan.pixel_size,
        "cryoden_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _create_store(out: Path, plan: IngestPlan, box: int, chunk: int | None, params: dict) -> ParticleStack:
    attrs = provenance(plan)
    if plan.ctf_missing_reason:
        attrs["ctf_missing_reason"] = plan.ctf_missing_reason
    stack = ParticleStack.create(
        out,
        plan.n,
        box,
        plan.pixel_size * plan.box / box,
        kind="stack",
        # Chunks sized by the input box bound the memory a task reads, also when cropping.
        chunk=chunk or default_chunk(plan.box, plan.n),
        with_ctf=plan.ctf is not None,
        attrs=attrs,
    )
    record_command(stack, "ingest", params)
    return stack


def ingest(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    box: int | None = None,
    pixel_size: float | None = None,
    data_root: str | Path | None = None,
    chunk: int | None = None,
    overwrite: bool = False,
    client,
) -> ParticleStack:
    """Ingest particle files into a Zarr particle stack.

    Parameters
    ----------
    inputs : sequence of paths
        RELION .star (3.0, 3.1+), cryoSPARC .cs, bare .mrc/.mrcs; concatenated in order.
    out : path
        The new stack (.zarr).
    box : int, optional
        Fourier-crop the images to this box; the pixel size scales by ``L / box``.
    pixel_size : float, optional
        Pixel size in Å where an input gives none (and for bare stacks,
        instead of the header voxel size).
    data_root : path, optional
        Directory that relative image paths are resolved against first
        (the cryoSPARC project directory).
    chunk : int, optional
        Particles per Zarr chunk (and per Dask task).
    overwrite : bool
        Replace an existing output made otherwise.
    client : distributed.Client
        Where the chunks are read.

    Returns
    -------
    ParticleStack
        Images, CTF (when all inputs have it; otherwise ``ctf_missing_reason``
        in the attributes), metadata columns and provenance.

    Raises
    ------
    InputError, ParameterError, OutputExistsError
        For bad inputs or a refused output; a fresh output that fails is removed.
    """
    out = Path(out)
    if chunk is not None and chunk < 1:
        raise ParameterError(f"--chunk {chunk}: give a positive number of particles per chunk")
    plan = plan_ingest(inputs, pixel_size=pixel_size, data_root=data_root)
    out_box = check_box(box, plan.box)
    params = {
        "inputs": [str(Path(p).resolve()) for p in inputs],
        "box": out_box,
        "pixel_size": pixel_size,
        "data_root": None if data_root is None else str(Path(data_root).resolve()),
        "chunk": chunk,
    }
    sources = [t.source for t in plan.tables] + list(plan.files)
    state = prepare_output(out, "ingest", params, inputs=sources, overwrite=overwrite)
    if state == "complete":
        log.info("%s is already complete", out)
        return ParticleStack.open(out)
    try:
        stack = _create_store(out, plan, out_box, chunk, params) if state == "new" else ParticleStack.open(out, "r+")
        write_particle_tables(stack, plan)
        crop_box = out_box if out_box != plan.box else None
        args = ([str(path) for path in plan.files], plan.file_ids, plan.indices, plan.box, crop_box)
        results = run_chunks(client, stack, "ingest", read_particle_chunk, args=args, params={"box": out_box})
        raise_on_nonfinite(plan, results)
        mark_complete(stack)
    except CryodenError:
        # A fresh store that failed holds nothing worth resuming: remove it so
        # it cannot be mistaken for a result. A resumed store is kept.
        if state == "new" and out.exists():
            shutil.rmtree(out)
        raise
    return stack
