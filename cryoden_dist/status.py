"""What a run store holds: its command, whether it is complete, and the state of every stage.

:func:`store_status` reads only attributes and the per-chunk completion flags (``_done/<stage>``), never the
data arrays, so it is cheap on a store of any size and safe while a run is writing it. Stores nested inside
the store (``STACK/centering`` made by ``cryoden center --apply``) are reported with it. The meaning of each
stage field (wall time, peak worker and driver memory, runs, run log) is documented in
:mod:`cryoden_dist.pipeline`. ``cryoden status RUN.zarr [--json]`` prints it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import zarr

from .errors import InputError
from .pipeline import format_memory
from .stack import ATTRS_KEY, is_cryoden_store

__all__ = ["format_status", "store_status"]

_FLAGS = "_done"


def store_status(path: str | Path) -> dict[str, Any]:
    """The state of a cryoden store and of the stores nested in it.

    Parameters
    ----------
    path : path
        A store written by a cryoden command.

    Returns
    -------
    dict
        ``path``, ``kind``, ``n`` (particles), ``command`` (``{name, params}`` or None), ``complete``,
        ``runs`` (runs of the command that wrote it), ``stages`` (a list, in the order they were first
        recorded, then stages that have chunk flags but no record yet), ``run_log`` and ``nested`` (the
        same dict for each store inside it). Each stage: ``name``, ``complete``, ``chunks_done`` and
        ``n_chunks`` (from the completion flags; None for a stage without chunks), ``runs``,
        ``started_at``, ``wall_s``, ``peak_worker_memory_bytes``, ``peak_driver_memory_bytes`` (of the
        last run that computed it), ``params``.

    Raises
    ------
    InputError
        If ``path`` does not exist or is not a cryoden store.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such store; give the --out path of a cryoden command")
    if not is_cryoden_store(path):
        raise InputError(
            f"{path}: not a cryoden store (no 'cryoden' attributes in zarr.json); "
            "give the --out path of a cryoden command"
        )
    return _group_status(zarr.open_group(str(path), mode="r"), path)


def _group_status(group: zarr.Group, path: Path) -> dict[str, Any]:
    info = dict(group.attrs[ATTRS_KEY])
    flags = _chunk_flags(group)
    records = dict(info.get("stages") or {})
    names = [*records, *(name for name in flags if name not in records)]
    return {
        "path": str(path),
        "kind": info.get("kind"),
        "n": info.get("n"),
        "command": info.get("command"),
        "complete": bool(info.get("complete")),
        "runs": info.get("runs"),
        "stages": [_stage_status(name, records.get(name, {}), flags.get(name)) for name in names],
        "run_log": list(info.get("run_log") or []),
        "nested": [
            _group_status(sub, path / name)
            for name, sub in sorted(group.groups())
            if name != _FLAGS and ATTRS_KEY in sub.attrs
        ],
    }


def _chunk_flags(group: zarr.Group) -> dict[str, tuple[int, int]]:
    """``{stage: (chunks done, chunks)}`` from the completion flags."""
    if _FLAGS not in group:
        return {}
    counts = {}
    with warnings.catch_warnings():
        # A run creating a flag array right now has made its folder but not yet its zarr.json.
        warnings.filterwarnings("ignore", message="Object at .* is not recognized", category=UserWarning)
        arrays = list(group[_FLAGS].arrays())
    for name, flags in arrays:
        values = flags[:]
        counts[name] = (int(values.astype(bool).sum()), int(values.size))
    return counts


def _stage_status(name: str, record: dict, flags: tuple[int, int] | None) -> dict[str, Any]:
    done, total = flags if flags is not None else (None, record.get("n_chunks"))
    return {
        "name": name,
        "complete": bool(record.get("complete")),
        "chunks_done": done,
        "n_chunks": total,
        "runs": int(record.get("runs", 0)),
        "started_at": record.get("started_at_last_run"),
        "wall_s": record.get("wall_s_last_run"),
        "peak_worker_memory_bytes": record.get("peak_worker_memory_bytes_last_run"),
        "peak_driver_memory_bytes": record.get("peak_driver_memory_bytes_last_run"),
        "params": record.get("params"),
    }


def format_status(status: dict[str, Any], indent: str = "") -> str:
    """``status`` (:func:`store_status`) as the text ``cryoden status`` prints."""
    command = status["command"] or {}
    lines = [
        f"{indent}{status['path']}",
        f"{indent}  kind       {status['kind']}, {status['n']} particles",
        f"{indent}  command    " + (f"cryoden {command['name']}" if command else "(none recorded)"),
    ]
    for key, value in (command.get("params") or {}).items():
        lines.append(f"{indent}    {key} = {value}")
    lines.append(f"{indent}  complete   {'yes' if status['complete'] else 'no'}")
    lines.append(f"{indent}  runs       {status['runs'] if status['runs'] is not None else '-'}")
    if status["stages"]:
        header = f"{'stage':18s} {'complete':8s} {'chunks':>9s} {'wall s':>8s} {'peak worker':>12s} "
        lines.append(f"{indent}  {header}{'peak driver':>12s} {'runs':>4s}")
        for stage in status["stages"]:
            chunks = "-" if stage["chunks_done"] is None else f"{stage['chunks_done']}/{stage['n_chunks']}"
            wall = "-" if stage["wall_s"] is None else f"{stage['wall_s']:.2f}"
            unfinished = stage["started_at"] and stage["wall_s"] is None  # started, never recorded its end
            lines.append(
                f"{indent}  {stage['name']:18s} {'yes' if stage['complete'] else 'no':8s} {chunks:>9s} {wall:>8s} "
                f"{format_memory(stage['peak_worker_memory_bytes']):>12s} "
                f"{format_memory(stage['peak_driver_memory_bytes']):>12s} {stage['runs']:>4d}"
                + (f"  (last started {stage['started_at']}, not finished)" if unfinished else "")
            )
    if status["run_log"]:
        lines.append(f"{indent}  run log")
        for entry in status["run_log"]:
            chunks = entry.get("chunks_computed")
            lines.append(
                f"{indent}    run {entry.get('run')}  {entry.get('started_at')}  {entry.get('stage'):18s} "
                f"{entry.get('wall_s'):8.2f} s"
                + ("" if chunks is None else f"  computed {chunks}/{entry.get('n_chunks')} chunks")
                + f"  worker {format_memory(entry.get('peak_worker_memory_bytes'))}"
                + f"  driver {format_memory(entry.get('peak_driver_memory_bytes'))}"
            )
    for nested in status["nested"]:
        lines.append(f"{indent}  nested store:")
        lines.append(format_status(nested, indent + "    "))
    return "\n".join(lines)
