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

Monitoring
----------
Every run of a stage is measured and written into the store's attributes
(:func:`record_stage`), so ``cryoden status`` can tell what happened:

* ``stages/<stage>``: ``params``, ``complete``, ``runs`` (how many runs
  computed some of it), ``n_chunks`` (chunked stages) and, for the last run
  that computed it, ``started_at_last_run`` (UTC, ISO 8601),
  ``wall_s_last_run``, ``chunks_computed_last_run``,
  ``chunks_done_before_last_run`` (flags already set when it began: done by
  an earlier, interrupted run), ``peak_worker_memory_bytes_last_run``,
  ``peak_driver_memory_bytes_last_run`` and ``peak_memory_window_last_run``.
* ``run_log``: one entry per stage per run that computed something,
  ``{run, stage, started_at, wall_s, chunks_computed, chunks_done_before,
  n_chunks, complete, peak_worker_memory_bytes, peak_driver_memory_bytes,
  peak_memory_window}``, appended in order; ``run`` numbers the runs of the
  command that writes the store (``runs`` in the attributes: 1 for the run
  that created it, one more each time :func:`prepare_output` resumes it), so
  the entries of a resumed run show which stages (and how many chunks) it
  had to recompute.

Peak memory is the peak resident set size (RSS) of a process over the
stage: ``peak_worker_memory_bytes`` the largest over the Dask worker
processes connected at the stage's end, ``peak_driver_memory_bytes`` that of
the process running the command (where non-chunked stages such as an
eigensolve on gathered arrays do their work). On Linux the kernel's peak RSS
(``VmHWM``) is reset when the stage starts (``/proc/self/clear_refs``), so it
covers the stage alone (window ``"stage"``); a stage recorded from a plain
``time.perf_counter()`` start instead of :func:`start_stage` gets the
driver's peak since the previous stage record (``"since previous record"``)
and no worker figure; where the peak cannot be reset it is the process's
lifetime peak (``"process"``). Worker processes that died during the stage
(and were replaced) are not counted; on a scheduler shared with other
clients the figure includes their tasks too.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .errors import InputError, OutputExistsError
from .stack import ATTRS_KEY, ParticleStack, is_cryoden_store

__all__ = [
    "StageStart",
    "begin_run",
    "check_resumable",
    "format_memory",
    "gather_in_order",
    "map_chunks",
    "mark_complete",
    "paths_overlap",
    "peak_rss_bytes",
    "prepare_output",
    "record_command",
    "record_stage",
    "reset_peak_rss",
    "run_chunks",
    "start_stage",
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
        ``"new"`` (nothing there), ``"resume"`` (same command, unfinished:
        counted as one more run in the store's ``runs``, :func:`begin_run`)
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
            if record.get("complete"):
                return "complete"
            begin_run(zarr.open_group(str(out), mode="r+"))
            return "resume"
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


def check_resumable(out: str | Path, command: str) -> None:
    """Refuse an explicit ``--resume`` when ``out`` holds no run of ``command`` to resume.

    Rerunning a command with the same output and parameters resumes it
    anyway (:func:`prepare_output`); ``--resume`` only makes a typo in the
    output path an error instead of a fresh run. Different parameters are
    refused later by :func:`prepare_output`.

    Raises
    ------
    InputError
        If ``out`` does not exist, is not a cryoden store, or was made by
        another command.
    """
    out = Path(out)
    if not out.exists():
        raise InputError(f"{out}: no such store, so there is nothing to resume; run the command without --resume")
    if not is_cryoden_store(out):
        raise InputError(
            f"{out}: not a cryoden store (no 'cryoden' attributes in zarr.json), so there is nothing to resume; "
            "pass the --out of the interrupted run"
        )
    made_by = (zarr.open_group(str(out), mode="r").attrs[ATTRS_KEY].get("command") or {}).get("name")
    if made_by != command:
        raise InputError(
            f"{out}: made by `cryoden {made_by}`, not `cryoden {command}`, so there is nothing to resume; "
            "pass the --out of the interrupted run"
        )


def begin_run(store: ParticleStack | zarr.Group) -> int:
    """Count one more run of the command that writes ``store``; return its number (1 for the first).

    The number labels the run's entries in the store's ``run_log``.
    """
    group = store.group if isinstance(store, ParticleStack) else store
    record = dict(group.attrs[ATTRS_KEY])
    record["runs"] = int(record.get("runs", 0)) + 1
    group.attrs[ATTRS_KEY] = record
    return record["runs"]


def record_command(stack: ParticleStack, command: str, params: Mapping[str, Any]) -> None:
    """Store the command and parameters that made ``stack`` (for resume checks); this is its first run."""
    stack.update_info(command={"name": command, "params": _jsonable(params)}, complete=False)
    begin_run(stack)


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
    resources: Mapping[str, float] | None = None,
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
    resources : mapping, optional
        Dask worker resources every chunk task needs, e.g. ``{"GPU": 1}``: the tasks then run only on workers
        started with ``--resources GPU=1`` (passed to ``submit``, which the scheduler honours).

    Returns
    -------
    list of dict
        The ``_``-prefixed values of the chunks computed in this run.
    """
    bounds = list(bounds or stack.chunk_bounds())
    flags = _done_flags(stack.group, stage, len(bounds))
    done = flags[:]
    pending = [i for i in range(len(bounds)) if not done[i]]
    counts = {"n_chunks": len(bounds), "chunks_done_before": len(bounds) - len(pending)}
    if counts["chunks_done_before"]:
        log.info(
            "stage %s: %d of %d chunks already done, computing %d",
            stage,
            counts["chunks_done_before"],
            len(bounds),
            len(pending),
        )
    started = start_stage(client if pending else None)
    results: list[dict] = []
    if pending:
        # Recorded before any task runs, so an interrupted stage reads as incomplete.
        _record_stage_start(stack, stage, params or {}, started, len(bounds))
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
                resources=resources,
            )
            for i in pending
        ]
        results = gather_in_order(client, futures, stage)
    record_stage(
        stack, stage, params or {}, started, complete=bool(flags[:].all()), chunks_computed=len(pending), **counts
    )
    return results


# ------------------------------------------------------------------------------------------------ monitoring
@dataclass(frozen=True)
class StageStart:
    """When and how a stage run began (:func:`start_stage`); pass it to :func:`record_stage`.

    Attributes
    ----------
    clock : float
        ``time.perf_counter()`` at the start.
    started_at : str
        The start as UTC ISO 8601.
    client : distributed.Client or None
        The client whose workers' peak RSS was reset, so it is read back at the end.
    window : str
        What the peak memory figures cover: ``"stage"`` or ``"process"`` (see the module docstring).
    """

    clock: float
    started_at: str
    client: Any = None
    window: str = "stage"


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process in bytes, since it started or since :func:`reset_peak_rss`.

    ``VmHWM`` from ``/proc/self/status`` on Linux, else ``getrusage``'s ``ru_maxrss`` (lifetime peak); None
    where neither exists.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, kB elsewhere


def reset_peak_rss() -> bool:
    """Restart this process's peak-RSS window at its current RSS; False where the system cannot.

    Linux (since 4.0): writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM`` and touches nothing else.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def start_stage(client=None) -> StageStart:
    """Begin measuring a stage: reset the peak RSS of this process and, with ``client``, of its workers.

    Parameters
    ----------
    client : distributed.Client, optional
        The client whose workers run the stage's tasks.

    Returns
    -------
    StageStart
    """
    windowed = reset_peak_rss()
    if client is not None:
        # A worker that cannot answer (dying, restarting) must not fail the stage; it is left out.
        windowed &= all(client.run(reset_peak_rss, on_error="ignore").values())
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return StageStart(time.perf_counter(), started_at, client, "stage" if windowed else "process")


def _peak_memory(started: StageStart) -> dict[str, Any]:
    """Peak RSS of the driver and of the workers since ``started``."""
    workers = None
    if started.client is not None:
        peaks = [peak for peak in started.client.run(peak_rss_bytes, on_error="ignore").values() if peak]
        workers = max(peaks) if peaks else None
    return {
        "peak_worker_memory_bytes": workers,
        "peak_driver_memory_bytes": peak_rss_bytes(),
        "peak_memory_window": started.window,
    }


def _record_stage_start(
    stack: ParticleStack, stage: str, params: Mapping[str, Any], started: StageStart, n_chunks: int
) -> None:
    stages = dict(stack.info.get("stages", {}))
    previous = stages.get(stage, {})
    stages[stage] = {
        "params": _jsonable(params),
        "complete": False,
        "n_chunks": n_chunks,
        "runs": int(previous.get("runs", 0)),
        "started_at_last_run": started.started_at,
    }
    stack.update_info(stages=stages)


def record_stage(
    stack: ParticleStack,
    stage: str,
    params: Mapping[str, Any],
    started: StageStart | float,
    complete: bool = True,
    *,
    n_chunks: int | None = None,
    chunks_done_before: int | None = None,
    chunks_computed: int | None = None,
    **extra: Any,
) -> None:
    """Write a stage's record into the store's attributes and append its run-log entry.

    Parameters
    ----------
    stack : ParticleStack
        The store.
    stage : str
        Stage name.
    params : mapping
        The parameters that made the stage's outputs.
    started : StageStart or float
        :func:`start_stage` when this run of the stage began (measures the workers' and the driver's peak
        memory over the stage), or a plain ``time.perf_counter()`` (driver memory only, since the previous
        stage record).
    complete : bool
        Whether all the stage's outputs are written.
    n_chunks, chunks_done_before, chunks_computed : int, optional
        Chunked stages: chunks in all, flagged done when this run began, and computed in this run. With
        ``chunks_computed=0`` nothing was computed: the record is refreshed but neither ``runs`` nor the run
        log changes.
    **extra
        More JSON-able entries of the stage record.
    """
    if not isinstance(started, StageStart):
        elapsed = timedelta(seconds=time.perf_counter() - started)
        started_at = (datetime.now(timezone.utc) - elapsed).isoformat(timespec="seconds")
        started = StageStart(started, started_at, None, "since previous record")
    info = stack.info
    stages = dict(info.get("stages", {}))
    previous = stages.get(stage, {})
    chunked = {} if n_chunks is None else {"n_chunks": n_chunks}
    record = {"params": _jsonable(params), "complete": complete, **chunked, **extra}
    record["runs"] = int(previous.get("runs", 0))
    if chunks_computed != 0:
        counts = {"chunks_computed": chunks_computed, "chunks_done_before": chunks_done_before}
        measured = {
            "started_at": started.started_at,
            "wall_s": round(time.perf_counter() - started.clock, 3),
            **{key: value for key, value in counts.items() if value is not None},
            **_peak_memory(started),
        }
        record["runs"] += 1
        record.update({f"{key}_last_run": value for key, value in measured.items()})
        entry = {"run": int(info.get("runs", 1)), "stage": stage, "complete": complete, **chunked, **measured}
        stack.update_info(stages={**stages, stage: record}, run_log=[*info.get("run_log", []), entry])
        log.info(
            "stage %s: %s in %.1f s; peak RSS %s (largest worker), %s (driver)",
            stage,
            "complete" if complete else "incomplete",
            measured["wall_s"],
            format_memory(measured["peak_worker_memory_bytes"]),
            format_memory(measured["peak_driver_memory_bytes"]),
        )
        # A stage recorded from a plain clock measures the driver since this point.
        reset_peak_rss()
    else:
        kept = {key: value for key, value in previous.items() if key.endswith("_last_run")}
        stack.update_info(stages={**stages, stage: {**kept, **record}})


def format_memory(value: int | None) -> str:
    """Bytes as whole MiB for people, ``"-"`` for an unmeasured figure."""
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


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
