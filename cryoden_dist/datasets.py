"""Volumes to simulate from: the built-in phantom, local maps and a registry of public maps.

:func:`load_volume` resolves a ``--volume`` value: ``"phantom"`` (see
:mod:`cryoden_dist.sim.phantom`), the path of an ``.mrc`` map, or the name
of a map in :data:`MAPS`, which :func:`fetch_map` downloads once with pooch
(checked against its SHA-256) into the user cache directory (override with
the ``CRYODEN_DATA_DIR`` environment variable).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError, ParameterError

__all__ = ["MAPS", "PHANTOM_PIXEL_SIZE", "LoadedVolume", "MapEntry", "fetch_map", "load_volume", "sha256sum"]

#: Pixel size in Å given to the phantom unless the user sets one.
PHANTOM_PIXEL_SIZE = 5.0
#: Default box of the phantom.
PHANTOM_BOX = 65


@dataclass(frozen=True)
class MapEntry:
    """A public map in the registry.

    Attributes
    ----------
    url : str
        Download address (pinned to a commit).
    sha256 : str
        Checksum of the file.
    pixel_size : float
        Pixel size in Å (from the map's source when its header has none).
    description : str
        What the map is and where it comes from (with its licence).
    """

    url: str
    sha256: str
    pixel_size: float
    description: str


MAPS: dict[str, MapEntry] = {
    "ribosome70s_65": MapEntry(
        url=(
            "https://raw.githubusercontent.com/ComputationalCryoEM/ASPIRE-Python/64ad0dd6/"
            "gallery/tutorials/data/clean70SRibosome_vol_65p.mrc"
        ),
        sha256="f9de03dd206be3bace4b1aa44feb72c052949f73d419d73bc99ff6b5c8f3256b",
        pixel_size=5.0,
        description=(
            "clean 70S ribosome, 65^3 voxels (header pixel size 0; 5 Å per its source), from ASPIRE-Python "
            "gallery/tutorials/data at commit 64ad0dd6 (GPL-3.0)"
        ),
    ),
}


@dataclass(frozen=True)
class LoadedVolume:
    """A cubic map ready to project.

    Attributes
    ----------
    data : ndarray, shape (L, L, L), float32
        Density indexed ``[z, y, x]``.
    pixel_size : float or None
        Voxel size in Å, None when the source does not give it.
    source : str
        ``"phantom"``, the file path, or ``"registry:NAME"``.
    """

    data: np.ndarray
    pixel_size: float | None
    source: str


def sha256sum(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_dir() -> Path:
    import pooch

    return Path(os.environ.get("CRYODEN_DATA_DIR") or pooch.os_cache("cryoden_dist"))


def fetch_map(name: str) -> Path:
    """Local path of the registry map ``name``, downloading it on first use.

    Raises
    ------
    InputError
        If ``name`` is not in :data:`MAPS` or the download fails.
    """
    import pooch

    if name not in MAPS:
        raise InputError(f"--volume {name!r}: not a registered map; known maps: {', '.join(sorted(MAPS))}")
    entry = MAPS[name]
    try:
        path = pooch.retrieve(
            entry.url,
            known_hash=f"sha256:{entry.sha256}",
            fname=f"{name}.mrc",
            path=_cache_dir(),
            progressbar=False,
        )
    except Exception as exc:  # noqa: BLE001 - network, HTTP and checksum errors alike
        raise InputError(
            f"--volume {name}: could not download {entry.url} ({type(exc).__name__}: {exc}); "
            "check the network, or download the file yourself and pass its path"
        ) from None
    return Path(path)


def _read_map(path: Path) -> tuple[np.ndarray, float | None]:
    from .io.mrc import read_mrc_data

    if not path.is_file():
        raise InputError(f"{path}: no such map file; give an .mrc path, 'phantom', or one of {', '.join(MAPS)}")
    data, pixel_size = read_mrc_data(path, "map")
    if data is None or data.ndim != 3 or len(set(data.shape)) != 1:
        shape = None if data is None else data.shape
        raise InputError(f"{path}: expected a cubic 3D map (L x L x L), found data of shape {shape}")
    if not np.isfinite(data).all():
        raise InputError(f"{path}: the map contains NaN or infinite values")
    return data, (pixel_size if pixel_size > 0 else None)


def load_volume(spec: str | Path, box: int | None = None) -> LoadedVolume:
    """Resolve a ``--volume`` value to a map.

    Parameters
    ----------
    spec : str or Path
        ``"phantom"``, a registry name (:data:`MAPS`) or an ``.mrc`` path.
    box : int, optional
        For the phantom only: the grid it is sampled on (default 65). Maps
        are returned at their own size.

    Returns
    -------
    LoadedVolume
        The phantom gets :data:`PHANTOM_PIXEL_SIZE`; a registry map its
        entry's pixel size; a file the pixel size in its header (None if 0).

    Raises
    ------
    InputError
        If the file is missing, unreadable, not cubic or not finite.
    ParameterError
        If the phantom's ``box`` is too small.
    """
    spec_text = str(spec)
    if spec_text == "phantom":
        from .sim.phantom import MIN_BOX, phantom_volume

        if box is not None and box < MIN_BOX:
            raise ParameterError(f"--box {box}: the phantom needs at least {MIN_BOX} px (smaller grids alias it)")
        return LoadedVolume(phantom_volume(box or PHANTOM_BOX), PHANTOM_PIXEL_SIZE, "phantom")
    if spec_text in MAPS:
        data, _ = _read_map(fetch_map(spec_text))
        return LoadedVolume(data, MAPS[spec_text].pixel_size, f"registry:{spec_text}")
    path = Path(spec_text)
    data, pixel_size = _read_map(path)
    return LoadedVolume(data, pixel_size, str(path.resolve()))
