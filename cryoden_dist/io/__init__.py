"""Particle-stack I/O: RELION ``.star``, cryoSPARC ``.cs`` and ``.mrc``/``.mrcs`` in, ``.mrcs`` + ``.star`` out.

The readers (:mod:`.star`, :mod:`.cryosparc`, :mod:`.mrc`) turn one input
file into a :class:`ParticleTable`: plain pandas tables in the package's
units, with image references still as written in the file. They touch no
pixels. :func:`cryoden_dist.io.ingest.ingest` resolves and validates the
references, then copies the pixels into a Zarr stack on the Dask cluster;
:func:`cryoden_dist.io.export.export` writes a stack back out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["ParticleTable", "json_records"]


@dataclass
class ParticleTable:
    """The particles of one input file, before any pixel is read.

    Attributes
    ----------
    source : Path
        The file that was parsed.
    format : str
        ``"relion-3.0"``, ``"relion-3.1"``, ``"cryosparc"`` or ``"mrc"``.
    particles : pandas.DataFrame
        One row per particle: ``image_file`` (str, the stack path as written
        in the source), ``image_index`` (int64, 0-based position in that
        stack), ``pixel_size`` (float64 Å, NaN where the source gives none)
        and the CTF fields of :data:`cryoden_dist.ctf.CTF_FIELDS` that the
        source provides (package units: Å, kV, mm, radians).
    metadata : pandas.DataFrame
        Other per-particle columns to keep (RELION names), same rows.
    image_field : str
        Name of the source field holding the image references, for error
        messages (``"rlnImageName"``, ``"blob/path"``...).
    optics : list of dict
        The source's optics table, if it has one (provenance).
    ctf_missing : str or None
        Why this source gives no complete CTF (naming the file and the
        missing fields); ``None`` when the CTF is complete.
    """

    source: Path
    format: str
    particles: pd.DataFrame
    metadata: pd.DataFrame
    image_field: str
    optics: list[dict[str, Any]] = field(default_factory=list)
    ctf_missing: str | None = None

    def __len__(self) -> int:
        return len(self.particles)

    @property
    def has_ctf(self) -> bool:
        """True when every CTF field is known for every particle."""
        return self.ctf_missing is None


def json_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows of ``frame`` as JSON-safe dicts (numpy scalars become Python scalars)."""
    return [
        {str(key): value.item() if isinstance(value, np.generic) else value for key, value in row.items()}
        for row in frame.to_dict(orient="records")
    ]
