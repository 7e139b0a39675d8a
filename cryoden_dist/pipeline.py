"""Stages: chunked, resumable computations that write into a stack store.

A stage is a *kernel* ``kernel(start, stop, *args) -> {name: array}`` that
computes particles ``[start, stop)``. :func:`run_chunks` submits one Dask
task per chunk; each task writes its arrays into the store and then sets its
completion flag ``_done/<stage>[i]``. A rerun skips flagged chunks, so a
killed run resumes where it stopped, and a stage is marked complete in the
store's attributes only after every chunk is written.

:func:`prepare_output` decides what to do with an output path that exists:
resume it (same command, same parameters, not finished), leave it (already
complete), replace it (``overwrite``), or refuse.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .errors import OutputExistsError
from .stack import ATTRS_KEY, ParticleStack, is_cryoden_store

__all__ = [
    "gather_in_order",
    "map_chunks",
    "mark_complete",
    "paths_overlap",
    "prepare_output",
    "record_command",
    "record_stage",
    "run_chunks",
]

log = logging.getLogger(__name__)

Kernel = Callable[..., Mapping[str, np.ndarray]]


def _jsonable(value: Any) -> Any:
    """Parameters as they round-trip through JSON attributes (for comparison)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def paths_overlap(a: Path, b: Path) -> bool:
    """True if ``a`` and ``b`` are the same path or one contains the other."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def prepare_output(
    out: str | Path,
    command: str,
    params: Mapping[str, Any],
    inputs: Sequence[str | Path] = (),
    overwrite: bool = False,
) -> str:
    """Check an output store path before a command writes to it.

    Parameters
    ----------
    out : path
        The output store.
    command : str
        Name of the command that writes it (``"ingest"``, ``"simulate"``...).
    params : mapping
        Everything that determines the output. A store made by the same
        command with equal parameters is resumed, never mixed with another.
    inputs : sequence of paths
        The user's inputs; the output may not be, contain, or lie inside
        any of them.
    overwrite : bool
        Replace an existing cryoden store made otherwise.

    Returns
    -------
    str
        ``"new"`` (nothing there), ``"resume"`` (same command, unfinished)
        or ``"complete"`` (same command, already finished).

    Raises
    ------
    OutputExistsError
        If the output exists and may not be reused or replaced.
    """
    out = Path(out)
    for source in inputs:
        if paths_overlap(out, Path(source)):
            raise OutputExistsError(
                f"{out}: the output would overwrite or contain the input {source}; choose another --out path"
            )
    if not out.exists():
        return "new"
    if is_cryoden_store(out):
        record = zarr.open_group(str(out), mode="r").attrs[ATTRS_KEY]
        same = record.get("command") == {"name": command, "params": _jsonable(params)}
        if same and not overwrite:
            return "complete" if record.get("complete") else "resume"
    if not overwrite:
        raise OutputExistsError(
            f"{out}: output exists (made by another command or with other parameters); "
            "pass --overwrite to replace it, or choose another --out path"
        )
    if not (out.is_dir() and (out / "zarr.json").is_file()):
        raise OutputExistsError(
            f"{out}: exists and is not a Zarr store, so --overwrite will not delete it; choose another --out path"
        )
    log.info("removing %s (--overwrite)", out)
    shutil.rmtree(out)
    return "new"


def record_command(stack: ParticleStack, command: str, params: Mapping[str, Any]) -> None:
    """Store the command and parameters that made ``stack`` (for resume checks)."""
    stack.update_info(command={"name": command, "params": _jsonable(params)}, complete=False)


def mark_complete(stack: ParticleStack) -> None:
    """Mark the whole store complete (last step of a command)."""
    stack.update_info(complete=True)


def _done_flags(group: zarr.Group, stage: str, n_chunks: int) -> zarr.Array:
    name = f"_done/{stage}"
    if name in group:
        flags = group[name]
        if flags.shape == (n_chunks,):
            return flags
        del group[name]
    # One Zarr chunk per flag: concurrent tasks never write the same object.
    return group.create_array(name, shape=(n_chunks,), chunks=(1,), dtype="uint8", fill_value=0)


def _run_chunk(kernel: Kernel, store: str, stage: str, index: int, start: int, stop: int, args: tuple) -> dict:
    group = zarr.open_group(store, mode="r+")
    result = kernel(start, stop, *args)
    returned = {}
    for name, values in result.items():
        if name.startswith("_"):
            returned[name] = values
        else:
            group[name][start:stop] = values
    if not returned.get("_incomplete", False):
        group[f"_done/{stage}"][index] = 1
    return returned


def _progress(futures: list, desc: str):
    """Yield futures as they finish, with a progress bar on stderr."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    with tqdm(total=len(futures), desc=desc, unit="chunk", file=sys.stderr, disable=None) as bar:
        for future in as_completed(futures):
            bar.update(1)
            yield future


def gather_in_order(client, futures: list, desc: str) -> list:
    """Wait for ``futures`` with a progress bar; return their results in order.

    The first failed task's exception is re-raised here and the remaining
    futures are cancelled.
    """
    try:
        for future in _progress(futures, desc):
            if future.status == "error":
                future.result()  # re-raises the task's exception here
        return client.gather(futures)
    except BaseException:
        client.cancel(futures)
        raise


def run_chunks(
    client,
    stack: ParticleStack,
    stage: str,
    kernel: Kernel,
    args: tuple = (),
    bounds: Sequence[tuple[int, int]] | None = None,
    params: Mapping[str, Any] | None = None,
) -> list[dict]:
    """Run ``kernel`` over the chunks of ``stack``, writing its outputs.

    Parameters
    ----------
    client : distributed.Client
        Where the tasks run.
    stack : ParticleStack
        The output store; every array the kernel returns must exist in it
        with the particle axis first.
    stage : str
        Stage name: the key of its completion flags and attribute record.
    kernel : callable
        ``kernel(start, stop, *args) -> {name: array}``; names starting with
        ``_`` are returned to the caller instead of written. A kernel that
        returns ``"_incomplete": True`` (bad input found in its chunk) leaves
        the chunk's flag unset, so the stage is not recorded complete and a
        rerun computes the chunk again.
    args : tuple
        Extra kernel arguments, sent to the workers once.
    bounds : sequence of (start, stop), optional
        Chunk ranges; default the image chunks of ``stack``.
    params : mapping, optional
        Parameters recorded in the stage's attribute record.

    Returns
    -------
    list of dict
        The ``_``-prefixed values of the chunks computed in this run.
    """
    bounds = list(bounds or stack.chunk_bounds())
    flags = _done_flags(stack.group, stage, len(bounds))
    done = flags[:]
    pending = [i for i in range(len(bounds)) if not done[i]]
    started = time.perf_counter()
    if len(pending) < len(bounds):
        log.info(
            "stage %s: %d of %d chunks already done, computing %d",
            stage,
            len(bounds) - len(pending),
            len(bounds),
            len(pending),
        )
    results: list[dict] = []
    if pending:
        [shared_args] = client.scatter([args], broadcast=True)
        futures = [
            client.submit(
                _run_chunk,
                kernel,
                str(stack.path),
                stage,
                i,
                *bounds[i],
                shared_args,
                key=f"{stage}-chunk-{i}-{stack.path.name}-{time.time_ns()}",
            )
            for i in pending
        ]
        results = gather_in_order(client, futures, stage)
    record_stage(
        stack,
        stage,
        params or {},
        started,
        complete=bool(flags[:].all()),
        n_chunks=len(bounds),
        chunks_computed_last_run=len(pending),
    )
    return results


def record_stage(
    stack: ParticleStack, stage: str, params: Mapping[str, Any], started: float, complete: bool = True, **extra: Any
) -> None:
    """Write a stage's record into the store's attributes.

    Parameters
    ----------
    stack : ParticleStack
        The store.
    stage : str
        Stage name.
    params : mapping
        The parameters that made the stage's outputs.
    started : float
        ``time.perf_counter()`` when this run of the stage began.
    complete : bool
        Whether all the stage's outputs are written.
    **extra
        More JSON-able entries (chunk counts...).
    """
    stages = dict(stack.info.get("stages", {}))
    previous = stages.get(stage, {})
    stages[stage] = {
        "params": _jsonable(params),
        "complete": complete,
        **extra,
        "wall_s_last_run": round(time.perf_counter() - started, 3),
        "runs": int(previous.get("runs", 0)) + 1,
    }
    stack.update_info(stages=stages)


def map_chunks(
    client, kernel: Callable[..., Any], bounds: Sequence[tuple[int, int]], args: tuple = (), desc: str = "map"
) -> list:
    """Run ``kernel(start, stop, *args)`` for each chunk and return the results in order.

    For reductions (statistics over a stack) that write nothing.
    """
    [shared_args] = client.scatter([args], broadcast=True)
    futures = [client.submit(_call_kernel, kernel, start, stop, shared_args, pure=False) for start, stop in bounds]
    return gather_in_order(client, futures, desc)


def _call_kernel(kernel, start, stop, args):
    return kernel(start, stop, *args)
