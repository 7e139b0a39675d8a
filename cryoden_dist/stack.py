"""The on-disk particle stack: a Zarr v3 group.

Layout (see ``docs/architecture.md``)::

    stack.zarr/
      images            float32 [n, L, L], chunked (c, L, L) along particles
      ctf/<field>       float64 [n] each, fields of ``ctf.CTF_FIELDS``
                        (present only when the source had CTF parameters)
      metadata/<col>    [n] per-particle columns kept from the source
                        (RELION names), written back on export
      truth/            simulated stacks only: clean, clean_ctf [n, L, L],
                        rotations [n, 3, 3], shifts [n, 2]
      _done/<stage>     uint8 [n_chunks], one Zarr chunk per flag: the
                        per-chunk completion records used for resume

Group attributes live under the single key ``"cryoden"``: format version,
``kind``, ``n``, ``box``, ``pixel_size``, ``chunk``, CTF state, provenance,
and one record per stage (its parameters and whether it is complete).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .ctf import CTF_FIELDS, CTF_UNITS, CTFParams
from .errors import InputError, MissingCTFError

__all__ = ["FORMAT_VERSION", "ParticleStack", "default_chunk", "is_cryoden_store"]

FORMAT_VERSION = 1
ATTRS_KEY = "cryoden"
#: Target bytes per image chunk: large enough for efficient I/O, small enough
#: that a worker holds a few chunks at once.
CHUNK_BYTES = 32 * 2**20


def default_chunk(box: int, n: int, itemsize: int = 4) -> int:
    """Particles per chunk so that a chunk of ``[c, L, L]`` is about 32 MiB."""
    return int(max(1, min(n, CHUNK_BYTES // (itemsize * box * box))))


def is_cryoden_store(path: str | Path) -> bool:
    """True if ``path`` is a Zarr group written by cryoden_dist."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        return False
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False
    return ATTRS_KEY in group.attrs


class ParticleStack:
    """A particle stack stored as a Zarr group.

    Use :meth:`open` for an existing store and :meth:`create` for a new one.

    Attributes
    ----------
    path : Path
        Location of the store.
    group : zarr.Group
        The underlying Zarr group.
    """

    def __init__(self, group: zarr.Group, path: str | Path):
        self.group = group
        self.path = Path(path)

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> ParticleStack:
        """Open an existing stack.

        Raises
        ------
        InputError
            If ``path`` does not exist or is not a cryoden stack.
        """
        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: no such stack; create one with `cryoden ingest` or `cryoden simulate`")
        if not is_cryoden_store(path):
            raise InputError(
                f"{path}: not a cryoden stack (no 'cryoden' attributes in zarr.json); "
                "make one with `cryoden ingest` or `cryoden simulate`"
            )
        group = zarr.open_group(str(path), mode=mode)
        stack = cls(group, path)
        if "images" not in group:
            raise InputError(
                f"{path}: the store has no 'images' array; it was not finished, rerun the command that made it"
            )
        return stack

    @classmethod
    def create(
        cls,
        path: str | Path,
        n: int,
        box: int,
        pixel_size: float | None,
        *,
        kind: str = "stack",
        chunk: int | None = None,
        with_ctf: bool = True,
        attrs: Mapping[str, Any] | None = None,
    ) -> ParticleStack:
        """Create an empty stack (images filled with zeros on read).

        Parameters
        ----------
        path : str or Path
            New store location; must not exist (callers check with
            :func:`cryoden_dist.pipeline.prepare_output`).
        n, box : int
            Number of particles and image side length.
        pixel_size : float or None
            Pixel size in Å.
        kind : str
            ``"stack"``, ``"simulation"`` or ``"denoised"``.
        chunk : int, optional
            Particles per chunk; default from :func:`default_chunk`.
        with_ctf : bool
            Create the ``ctf/`` arrays.
        attrs : mapping, optional
            Extra entries for the ``cryoden`` attributes (provenance...).
        """
        if n < 1:
            raise InputError(f"{path}: cannot create an empty stack (n = {n})")
        chunk = int(chunk or default_chunk(box, n))
        group = zarr.open_group(str(path), mode="w-", zarr_format=3)
        # Noisy float images barely compress; storing them raw keeps ingest
        # and every later read at disk speed.
        group.create_array(
            "images", shape=(n, box, box), chunks=(chunk, box, box), dtype="float32", fill_value=0.0, compressors=None
        )
        if with_ctf:
            for name in CTF_FIELDS:
                group.create_array(f"ctf/{name}", shape=(n,), chunks=(n,), dtype="float64", fill_value=np.nan)
        record = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "n": int(n),
            "box": int(box),
            "pixel_size": None if pixel_size is None else float(pixel_size),
            "chunk": chunk,
            "has_ctf": bool(with_ctf),
            "ctf_units": CTF_UNITS if with_ctf else None,
            "stages": {},
        }
        record.update(attrs or {})
        group.attrs[ATTRS_KEY] = record
        return cls(group, path)

    @classmethod
    def create_like(
        cls,
        path: str | Path,
        template: ParticleStack,
        *,
        kind: str,
        box: int | None = None,
        pixel_size: float | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> ParticleStack:
        """Create a stack for the same particles as ``template``.

        The per-particle ``ctf/`` and ``metadata/`` arrays are copied, so a
        derived stack (denoised, re-centred, downsampled) exports back to
        RELION with the particles' original metadata. ``box`` and
        ``pixel_size`` default to the template's.
        """
        info = template.info
        carried_keys = ("ctf_missing_reason", "source_files", "optics", "images_centered", "centering")
        carried = {key: info[key] for key in carried_keys if key in info}
        carried.update(attrs or {})
        carried["derived_from"] = str(template.path.resolve())
        stack = cls.create(
            path,
            template.n,
            box or template.box,
            pixel_size if pixel_size is not None else template.pixel_size,
            kind=kind,
            chunk=template.chunk if box in (None, template.box) else None,
            with_ctf=False,
            attrs=carried,
        )
        for group_name in ("ctf", "metadata"):
            if group_name not in template.group:
                continue
            for name, source in template.group[group_name].arrays():
                target = stack.group.create_array(
                    f"{group_name}/{name}", shape=source.shape, chunks=source.chunks, dtype=source.dtype
                )
                target[:] = source[:]
        stack.update_info(has_ctf=template.has_ctf, ctf_units=info.get("ctf_units"))
        if pixel_size is not None and stack.has_ctf:
            stack.group["ctf/pixel_size"][:] = pixel_size
        return stack

    # ------------------------------------------------------------ metadata
    @property
    def info(self) -> dict[str, Any]:
        """The ``cryoden`` attribute record (a copy)."""
        return dict(self.group.attrs[ATTRS_KEY])

    def update_info(self, **entries: Any) -> None:
        """Merge ``entries`` into the ``cryoden`` attribute record."""
        record = self.info
        record.update(entries)
        self.group.attrs[ATTRS_KEY] = record

    @property
    def n(self) -> int:
        return int(self.info["n"])

    @property
    def box(self) -> int:
        return int(self.info["box"])

    @property
    def pixel_size(self) -> float | None:
        return self.info.get("pixel_size")

    @property
    def chunk(self) -> int:
        return int(self.info["chunk"])

    @property
    def kind(self) -> str:
        return str(self.info["kind"])

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n / self.chunk)

    def chunk_bounds(self) -> list[tuple[int, int]]:
        """``(start, stop)`` particle ranges of the image chunks."""
        return [(i, min(i + self.chunk, self.n)) for i in range(0, self.n, self.chunk)]

    @property
    def images(self) -> zarr.Array:
        return self.group["images"]

    def to_dask(self, name: str = "images"):
        """The array ``name`` as a Dask array with the store's chunking."""
        import dask.array as da

        return da.from_zarr(self.group[name])

    # ----------------------------------------------------------------- CTF
    @property
    def has_ctf(self) -> bool:
        return bool(self.info.get("has_ctf")) and "ctf" in self.group

    def ctf_params(self, index: slice | np.ndarray = slice(None)) -> CTFParams:
        """CTF parameters of the particles ``index``.

        Raises
        ------
        MissingCTFError
            If the stack has no CTF parameters.
        """
        if not self.has_ctf:
            reason = self.info.get("ctf_missing_reason") or "the source had no CTF parameters"
            raise MissingCTFError(
                f"{self.path}: this step needs CTF parameters but the stack has none ({reason}); "
                "ingest a .star/.cs with CTF fields, or use a method that does not use the CTF"
            )
        return CTFParams(**{name: self.group[f"ctf/{name}"][index] for name in CTF_FIELDS})

    def write_ctf(self, params: CTFParams) -> None:
        """Write all particles' CTF parameters."""
        for name, values in params.as_dict().items():
            self.group[f"ctf/{name}"][:] = values

    # --------------------------------------------------------------- other
    def has(self, name: str) -> bool:
        """True if the group holds an array or subgroup ``name``."""
        return name in self.group

    def __repr__(self) -> str:
        return (
            f"ParticleStack({str(self.path)!r}, n={self.n}, box={self.box}, "
            f"pixel_size={self.pixel_size}, kind={self.kind!r})"
        )
