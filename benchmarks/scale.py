"""Benchmark: ``cryoden`` end to end at 10^4 and 10^5 particles, on a LocalCluster and on the local SLURM.

For each particle count ``n`` the script runs the commands users run, each as its own ``cryoden`` process::

    cryoden simulate --volume 70S(65 px, 5 Å) --ctf-table EMPIAR-10028 --snr 0.05 --n N --out sim.zarr
    cryoden denoise sim.zarr --method METHOD --out METHOD.zarr          (mfvdm, spca-wiener)
    cryoden evaluate METHOD.zarr --truth sim.zarr --json

once on each backend:

* ``local``: ``--scheduler local --workers 2`` (a LocalCluster of 2 single-threaded worker processes);
* ``slurm``: ``--cluster slurm --jobs 2`` with a site profile of 1 core and 1 worker per job, through the
  single-node SLURM of ``../shared/slurm`` (started here if it is not running, and stopped again at the end).

The two backends run each command back to back (which one goes first alternates), so both see the same load
of this shared machine. Recorded per command: the end-to-end wall time; per stage (the stage records in the
output store, :func:`cryoden_dist.status.store_status`) the wall time and the recorded peak worker and driver
memory; and from this process, sampling ``/proc`` every ``SAMPLE_S`` seconds:

* the driver's peak RSS: the largest ``VmHWM`` of the ``cryoden`` process (the kernel's peak, which the
  stages reset at their start, so the samples plus the stage records cover the whole command);
* the largest worker's peak RSS (``VmHWM`` of every process the run started: the LocalCluster's worker
  processes, or the batch jobs' processes under ``slurmstepd``), and the peak of the run's total RSS (driver
  plus every worker-side process), with the peak RSS inside each stage's time window. A stage recorded from a
  plain clock (see :mod:`cryoden_dist.pipeline`) has no worker figure of its own; the sampled one is the
  measurement there.
* ``rusage_maxrss_bytes``: ``ru_maxrss`` of the ``cryoden`` process from ``wait4``, kept only as a cross-check:
  Linux folds into it the peaks of the children the process reaped (a LocalCluster's workers), and the stages'
  reset of the peak (``/proc/self/clear_refs``) resets it too, so it is neither the driver's alone nor its
  lifetime peak.

Also per command: ``cpu_s``, the CPU seconds of the driver and the worker-side processes (sampled
``utime + stime``); ``outside_stages_s``, the wall time not in any recorded stage (start-up, driver-side work
between stages, shut-down); and for SLURM ``workers_registered_s``, when each batch job's worker joined the
scheduler, counted from the command's start (from the job logs).

Then the SLURM overhead, SLURM / LocalCluster - 1 of the wall time (per command, per stage and per pipeline;
target <= 10 %) and of the CPU time, and whether the two runs' outputs are identical: every array of the
simulated and denoised stores (chunk flags and ``evaluation/`` included), compared block by block, and the
``evaluate`` JSON.

Reading the wall-time overhead on a shared machine: with the kernel's autogroup scheduling
(``/proc/sys/kernel/sched_autogroup_enabled``), CPU time is shared between *sessions*. A LocalCluster's workers
are in the session of the ``cryoden`` process; each batch job's worker has a session of its own (``slurmstepd``
makes one). When other sessions keep the cores busy, the SLURM run is given up to three shares against the
LocalCluster run's one, and its wall time can come out *shorter*. The CPU time and the workers' start-up
latency are not affected by this and are what the overhead is judged on there.

A command that runs longer than ``--timeout-min`` or whose driver or any worker process exceeds
``--stop-memory-gb`` is stopped; what it measured up to then (its completed stages) is kept, marked stopped.

Targets (issue 5): SLURM overhead <= 10 %; at n = 10^5 peak memory <= 8 GB and wall <= 12x that of 10^4.
Results for each ``n`` are merged into ``benchmarks/results/scale.json`` (a run of ``--n 100000`` keeps the
entry for 10^4 of an earlier run, each entry with its own date).

Usage: ``python benchmarks/scale.py [--n 10000 100000] [--backends local slurm] [--methods spca-wiener mfvdm]
[--quick] [--no-record] [--timeout-min 40] [--stop-memory-gb 8] [--workdir DIR] [--keep]``. ``--quick``: n = 2000,
printed only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
import zarr

try:
    from _common import REPO, RESULTS, SHARED_DATA, write_result
    from mfvdm_70s import CTF_TABLE, VOLUME
except ImportError:  # run as a module from the repository root
    from benchmarks._common import REPO, RESULTS, SHARED_DATA, write_result
    from benchmarks.mfvdm_70s import CTF_TABLE, VOLUME

SLURM_SCRIPTS = SHARED_DATA.parent / "slurm"
SLURMD_PID_FILE = Path("/run/slurmd.pid")
SLURMCTLD_PID_FILE = Path("/run/slurmctld.pid")

SNR = 0.05
PIXEL_SIZE_A = 5.0
BOX = 65
SEED = 0
WORKERS = 2
#: Per batch job: one single-threaded worker on one core, as a LocalCluster worker. Two jobs of 9 GiB fit the
#: node's advertised memory (at most 20000 MB, see ``start_slurm``); a LocalCluster worker's limit is half the RAM.
JOB_PROFILE = {"cores": 1, "processes": 1, "memory": "9GiB", "walltime": "02:00:00", "interface": "lo"}
#: Port 0: other runs on this machine may hold the default dashboard port; localhost keeps it private.
DASHBOARD = ("--dashboard-address", "127.0.0.1:0")
SAMPLE_S = 0.5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
POLL_S = 0.05
OVERHEAD_TARGET = 0.10
MEMORY_TARGET_BYTES = 8e9
WALL_RATIO_TARGET = 12.0
#: Rows compared at once when checking two stores (bounds the memory of the check).
COMPARE_BLOCK_BYTES = 256 * 2**20


# --------------------------------------------------------------------------------------------- processes
def _cryoden() -> list[str]:
    """The ``cryoden`` entry point of this environment (``python -m cryoden_dist.cli`` where none is installed)."""
    script = Path(sys.executable).parent / "cryoden"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cryoden_dist.cli"]


def _process_table() -> dict[int, tuple[int, str, float]]:
    """``{pid: (parent pid, command name, CPU seconds used so far)}`` of every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # exited meanwhile
                continue
            name, rest = stat.split("(", 1)[1].rsplit(")", 1)
            fields = rest.split()  # from field 3 (state) of proc_pid_stat(5): ppid, ..., utime 14, stime 15
            table[int(entry.name)] = (int(fields[1]), name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return table


def _descendants(roots: Sequence[int], table: dict[int, tuple[int, str, float]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, pending = set(), list(roots)
    while pending:
        for child in children.get(pending.pop(), []):
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def _memory(pid: int) -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of ``pid`` in bytes; zeros for a process that is gone."""
    values = {"VmRSS:": 0, "VmHWM:": 0}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key = line.split(":", 1)[0] + ":"
                if key in values:
                    values[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return values["VmRSS:"], values["VmHWM:"]


class RunSampler:
    """Peak memory and CPU time of a ``cryoden`` process and of the worker processes of its run, from ``/proc``.

    CPU time is the last sampled ``utime + stime`` of each process, so each process's last ``SAMPLE_S`` seconds
    may be missed. It does not depend on the share of the CPU the run gets, which the wall time does.

    Parameters
    ----------
    driver : int
        Pid of the ``cryoden`` process.
    batch_jobs : bool
        The workers run as SLURM jobs: the descendants of every ``slurmstepd`` (which detaches from ``slurmd``)
        are counted besides the driver's own; the SLURM of this benchmark runs no other jobs.
    """

    def __init__(self, driver: int, batch_jobs: bool = False) -> None:
        self.driver, self.batch_jobs = driver, batch_jobs
        self.samples: list[tuple[float, int, int, int]] = []  # (time, driver RSS, largest worker RSS, total RSS)
        self.driver_hwm = self.worker_hwm = 0
        self.cpu_s: dict[int, float] = {}  # per process of the run, the last sample

    def sample(self) -> tuple[int, int]:
        """Take one sample; return the driver's and the largest worker's RSS now."""
        table = _process_table()
        steps = [pid for pid, (_, name, _) in table.items() if name == "slurmstepd"] if self.batch_jobs else []
        workers = _descendants([self.driver, *steps], table) - {self.driver}
        for pid in workers | {self.driver}:
            if pid in table:
                self.cpu_s[pid] = table[pid][2]
        driver_rss, driver_hwm = _memory(self.driver)
        worker_memory = [_memory(pid) for pid in workers]
        largest = max((rss for rss, _ in worker_memory), default=0)
        self.driver_hwm = max(self.driver_hwm, driver_hwm)
        self.worker_hwm = max([self.worker_hwm, *(hwm for _, hwm in worker_memory)])
        self.samples.append((time.time(), driver_rss, largest, driver_rss + sum(rss for rss, _ in worker_memory)))
        return driver_rss, largest

    def window(self, start: float, stop: float) -> dict[str, int | None]:
        """Largest sampled RSS of the driver, of a worker and of the run in ``[start, stop]`` (epoch seconds)."""
        inside = np.array([s[1:] for s in self.samples if start <= s[0] <= stop]).reshape(-1, 3)
        if not len(inside):
            return {"sampled_driver_rss_bytes": None, "sampled_worker_rss_bytes": None, "sampled_total_rss_bytes": None}
        driver, worker, total = (int(v) for v in inside.max(axis=0))
        return {
            "sampled_driver_rss_bytes": driver,
            "sampled_worker_rss_bytes": worker,
            "sampled_total_rss_bytes": total,
        }


def run_command(
    args: Sequence[str],
    cwd: Path,
    batch_jobs: bool,
    timeout_s: float,
    stop_memory_bytes: float,
) -> tuple[dict[str, Any], RunSampler, str]:
    """Run ``cryoden ARGS`` in ``cwd`` while sampling its memory; stop it past the time or memory limit.

    Returns
    -------
    record : dict
        ``wall_s``, ``returncode``, ``stopped`` (None, or why it was stopped), ``rusage_maxrss_bytes``,
        ``load_average`` (1-minute load of this machine at the start and the end), ``stderr_tail``.
    sampler : RunSampler
    stdout : str
    """
    out, err = cwd / "command.out", cwd / "command.err"
    load_start = os.getloadavg()[0]
    started, started_epoch = time.perf_counter(), time.time()
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen([*_cryoden(), *args], cwd=cwd, stdout=stdout, stderr=stderr, start_new_session=True)
    sampler, stopped, sampled_at = RunSampler(process.pid, batch_jobs), None, -SAMPLE_S
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        # The exit is polled more often than memory is sampled, so the wall time is exact to POLL_S.
        if time.perf_counter() - sampled_at >= SAMPLE_S:
            sampled_at = time.perf_counter()
            driver_rss, worker_rss = sampler.sample()
            if stopped is None and max(driver_rss, worker_rss) > stop_memory_bytes:
                stopped = f"a process exceeded {stop_memory_bytes / 1e9:g} GB RSS"
            elif stopped is None and sampled_at - started > timeout_s:
                stopped = f"ran over {timeout_s / 60:g} min"
            if stopped is not None:
                os.killpg(process.pid, signal.SIGKILL)
        time.sleep(POLL_S)
    process.returncode = os.waitstatus_to_exitcode(status)
    record = {
        "started_epoch": started_epoch,
        "wall_s": round(time.perf_counter() - started, 2),
        "returncode": process.returncode,
        "stopped": stopped,
        "rusage_maxrss_bytes": usage.ru_maxrss * 1024,
        "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "stderr_tail": err.read_text(errors="replace")[-1500:] if process.returncode else None,
    }
    return record, sampler, out.read_text()


# ------------------------------------------------------------------------------------------------ stores
def store_report(store: Path, sampler: RunSampler) -> dict[str, Any]:
    """The parameters of the command that wrote ``store`` and each of its stages: the stage record (wall time,
    recorded peaks) and the peaks sampled in the stage's time window."""
    from cryoden_dist.status import store_status

    if not (store / "zarr.json").is_file():
        return {"stages": {}}
    status = store_status(store)
    stages, unfinished = {}, []
    for stage in status["stages"]:
        if stage["wall_s"] is None:  # started, never finished (a stopped run)
            unfinished.append(f"{stage['name']} ({stage['chunks_done']}/{stage['n_chunks']} chunks)")
            continue
        # started_at has 1 s resolution (truncated), hence the extra second at the end of the window.
        start = _dt.datetime.fromisoformat(stage["started_at"]).timestamp()
        stages[stage["name"]] = {
            "wall_s": stage["wall_s"],
            "n_chunks": stage["n_chunks"],
            "recorded_peak_worker_memory_bytes": stage["peak_worker_memory_bytes"],
            "recorded_peak_driver_memory_bytes": stage["peak_driver_memory_bytes"],
            **sampler.window(start, start + stage["wall_s"] + 1.0),
        }
    params = (status["command"] or {}).get("params") or {}
    return {"stages": stages, "unfinished_stages": unfinished, "params": params.get("params", params)}


def differing_arrays(a: Path, b: Path) -> list[str]:
    """Names of the arrays that differ between the Zarr stores ``a`` and ``b`` (or exist in one only).

    Arrays are read in blocks of rows (``COMPARE_BLOCK_BYTES``), so stores larger than memory can be compared;
    NaN equals NaN (per-image metrics of empty images).
    """
    arrays_a, arrays_b = _arrays(zarr.open_group(a, mode="r")), _arrays(zarr.open_group(b, mode="r"))
    different = sorted(set(arrays_a) ^ set(arrays_b))
    for name in sorted(set(arrays_a) & set(arrays_b)):
        x, y = arrays_a[name], arrays_b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            different.append(name)
            continue
        if x.ndim == 0:
            same = np.array_equal(x[...], y[...])
        else:
            row_bytes = max(1, int(np.prod(x.shape[1:])) * x.dtype.itemsize)
            step = max(1, COMPARE_BLOCK_BYTES // row_bytes)
            same = all(
                np.array_equal(x[i : i + step], y[i : i + step], equal_nan=x.dtype.kind in "fc")
                for i in range(0, x.shape[0], step)
            )
        if not same:
            different.append(name)
    return different


def _arrays(group: zarr.Group, prefix: str = "") -> dict[str, zarr.Array]:
    found = {}
    for name, member in group.members():
        if isinstance(member, zarr.Group):
            found.update(_arrays(member, f"{prefix}{name}/"))
        else:
            found[f"{prefix}{name}"] = member
    return found


# ------------------------------------------------------------------------------------------------- SLURM
def _pid(path: Path) -> int | None:
    """The pid in ``path`` if that process runs."""
    try:
        pid = int(path.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid


def start_slurm() -> dict[str, Any]:
    """Start the single-node SLURM of ``../shared/slurm`` unless it runs; say whether it was started here."""
    if _pid(SLURMCTLD_PID_FILE) is not None and _pid(SLURMD_PID_FILE) is not None:
        return {"started_here": False, "start_s": 0.0}
    physical_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    # The script's default RealMemory (20000 MB) drains the node on a smaller machine.
    memory_mb = min(20000, int(0.9 * physical_mb))
    started = time.perf_counter()
    run = subprocess.run(
        ["bash", str(SLURM_SCRIPTS / "start_slurm.sh"), str(memory_mb)],
        env={**os.environ, "FAKE_GPUS": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if run.returncode != 0:
        raise SystemExit(f"start_slurm.sh failed (exit {run.returncode}):\n{(run.stdout + run.stderr)[-3000:]}")
    return {"started_here": True, "start_s": round(time.perf_counter() - started, 1), "node_memory_mb": memory_mb}


def stop_slurm() -> None:
    """Cancel this user's jobs and stop the daemons that :func:`start_slurm` started."""
    subprocess.run(["scancel", "--user", str(os.getuid())], capture_output=True, timeout=60)
    subprocess.run(["bash", str(SLURM_SCRIPTS / "stop_slurm.sh")], capture_output=True, timeout=120)


def workers_registered_s(directory: Path, since: float, seen: set[str]) -> list[float]:
    """Seconds from ``since`` (epoch) until each new batch job's worker registered with the scheduler.

    Reads the job logs under ``directory/job-logs`` not in ``seen`` (which is updated): the first
    ``Registered to:`` line of each, stamped in local time by ``distributed``'s logger.
    """
    delays = []
    for path in sorted((directory / "job-logs").glob("*.err")):
        if path.name in seen:
            continue
        seen.add(path.name)
        for line in path.read_text(errors="replace").splitlines():
            if "Registered to:" in line:
                stamp = _dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                delays.append(round(stamp - since, 2))
                break
    return sorted(delays)


def backend_options(backend: str, directory: Path) -> list[str]:
    """``cryoden`` placement options of ``backend``; a SLURM site profile is written into ``directory``."""
    if backend == "local":
        return ["--scheduler", "local", "--workers", str(WORKERS), *DASHBOARD]
    profile = {
        **JOB_PROFILE,
        "log_directory": str(directory / "job-logs"),
        "local_directory": str(directory / "worker-space"),
    }
    path = directory / "site.yaml"
    path.write_text(yaml.safe_dump(profile))
    return ["--cluster", "slurm", "--jobs", str(WORKERS), "--cluster-profile", str(path), *DASHBOARD]


# ------------------------------------------------------------------------------------------------ driver
def pipeline_commands(method: str) -> dict[str, list[str]]:
    """``{label: cryoden arguments}`` of the denoise and evaluate steps of ``method`` (stores relative to cwd)."""
    return {
        f"denoise-{method}": ["denoise", "sim.zarr", "--method", method, "--out", f"{method}.zarr"],
        f"evaluate-{method}": ["evaluate", f"{method}.zarr", "--truth", "sim.zarr", "--json"],
    }


class Runner:
    """Runs the commands of one ``n`` on every backend, back to back, and collects what they measured."""

    def __init__(self, root: Path, backends: Sequence[str], timeout_s: float, stop_memory_bytes: float) -> None:
        self.backends, self.timeout_s, self.stop_memory_bytes = list(backends), timeout_s, stop_memory_bytes
        self.directories = {backend: root / backend for backend in backends}
        self.options = {}
        for backend, directory in self.directories.items():
            directory.mkdir(parents=True)
            self.options[backend] = backend_options(backend, directory)
        self.commands: dict[str, dict[str, dict]] = {backend: {} for backend in backends}
        self.job_logs_seen: set[str] = set()

    def succeeded(self, label: str) -> bool:
        """Whether ``label`` ran and exited 0 on every backend."""
        return all(self.commands[b].get(label, {}).get("returncode") == 0 for b in self.backends)

    def run(self, label: str, args: list[str], store: str | None) -> None:
        """Run one command on every backend (alternating which goes first) and record it."""
        order = self.backends if len(self.commands[self.backends[0]]) % 2 == 0 else self.backends[::-1]
        for backend in order:
            directory = self.directories[backend]
            code = package_digest()
            record, sampler, stdout = run_command(
                [*args, *self.options[backend]], directory, backend == "slurm", self.timeout_s, self.stop_memory_bytes
            )
            record["peak_driver_rss_bytes"] = sampler.driver_hwm or None
            record["peak_worker_rss_bytes"] = sampler.worker_hwm or None
            record["peak_total_rss_bytes"] = max((s[3] for s in sampler.samples), default=None)
            record["cpu_s"] = round(sum(sampler.cpu_s.values()), 1)
            record["package_digest"] = code
            record.update(store_report(directory / store, sampler) if store else {"stages": {}})
            _fold_stage_peaks(record)
            # Time the driver spent outside the recorded stages: start-up (cluster, workers), driver-side work
            # between stages, shut-down.
            record["outside_stages_s"] = round(
                record["wall_s"] - sum(s["wall_s"] for s in record["stages"].values()), 2
            )
            if backend == "slurm":
                record["workers_registered_s"] = workers_registered_s(
                    directory, record["started_epoch"], self.job_logs_seen
                )
            if record["stopped"] and backend == "slurm":  # its jobs outlive the killed scheduler
                subprocess.run(["scancel", "--user", str(os.getuid())], capture_output=True, timeout=60)
            if label.startswith("evaluate") and record["returncode"] == 0:
                record["metrics"] = {k: v for k, v in json.loads(stdout).items() if k not in ("stack", "truth")}
            self.commands[backend][label] = record
            print(
                f"  {backend:5s} {label:22s} {record['wall_s']:8.1f} s  driver "
                f"{_gb(record['peak_driver_rss_bytes'])}  worker {_gb(record['peak_worker_rss_bytes'])}  "
                f"rc {record['returncode']}" + (f"  STOPPED: {record['stopped']}" if record["stopped"] else ""),
                flush=True,
            )


def _fold_stage_peaks(record: dict) -> None:
    """The command's peaks include the stage records' (exact per-stage ``VmHWM``), which sampling may miss."""
    for key, recorded in (("peak_driver_rss_bytes", "driver"), ("peak_worker_rss_bytes", "worker")):
        values = [s[f"recorded_peak_{recorded}_memory_bytes"] for s in record["stages"].values()]
        record[key] = max([v for v in [record[key], *values] if v], default=None)


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e9:.2f} GB"


def run_n(n: int, methods: Sequence[str], backends: Sequence[str], root: Path, args) -> dict[str, Any]:
    """Simulate ``n`` particles and run every method on every backend; compare the backends' outputs."""
    runner = Runner(root, backends, args.timeout_min * 60, args.stop_memory_gb * 1e9)
    simulate = [
        "simulate",
        "--volume",
        str(VOLUME),
        "--n",
        str(n),
        "--snr",
        str(SNR),
        "--ctf-table",
        str(CTF_TABLE),
        "--pixel-size",
        str(PIXEL_SIZE_A),
        "--seed",
        str(SEED),
        "--out",
        "sim.zarr",
    ]
    print(f"n = {n}", flush=True)
    runner.run("simulate", simulate, "sim.zarr")
    for method in methods:
        (denoise, denoise_args), (evaluate, evaluate_args) = pipeline_commands(method).items()
        if runner.succeeded("simulate"):
            runner.run(denoise, denoise_args, f"{method}.zarr")
        if runner.succeeded(denoise):
            runner.run(evaluate, evaluate_args, None)
    result: dict[str, Any] = {"date": _dt.date.today().isoformat(), "code": code_version(), "commands": runner.commands}
    for key in ("wall_s", "cpu_s"):
        result[f"pipeline_{key}"] = {
            backend: {
                method: round(sum(commands[label][key] for label in ("simulate", *pipeline_commands(method))), 2)
                for method in methods
                if all(commands.get(label, {}).get("returncode") == 0 for label in pipeline_commands(method))
            }
            for backend, commands in runner.commands.items()
        }
    if set(backends) >= {"local", "slurm"}:
        result["slurm_overhead"] = overhead(runner.commands["local"], runner.commands["slurm"], result)
        result["identical"] = identical(runner, methods)
        result["package_changed_between_backends"] = code_changed(runner)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return result


def package_digest() -> str:
    """SHA-256 of the package's source files: the code a command ran (others may edit it between commands)."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "cryoden_dist").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def code_version() -> dict[str, Any]:
    """The commit of this checkout and the package files that differ from it (the code measured)."""

    def git(*args: str) -> str:
        run = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        return run.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "modified": git("status", "--porcelain", "cryoden_dist").splitlines()}


def _ratio(slurm: float, local: float) -> float:
    return round(slurm / local - 1.0, 4)


def overhead(local: dict, slurm: dict, result: dict) -> dict[str, Any]:
    """SLURM / LocalCluster - 1 of the wall time per command, stage and pipeline, and of the CPU time per command
    and pipeline (completed runs only)."""
    done = [
        label for label in local if label in slurm and local[label]["returncode"] == slurm[label]["returncode"] == 0
    ]
    walls, cpus = result["pipeline_wall_s"], result["pipeline_cpu_s"]
    return {
        "commands": {label: _ratio(slurm[label]["wall_s"], local[label]["wall_s"]) for label in done},
        "commands_cpu": {label: _ratio(slurm[label]["cpu_s"], local[label]["cpu_s"]) for label in done},
        "pipelines_cpu": {
            method: _ratio(cpus["slurm"][method], cpu)
            for method, cpu in cpus["local"].items()
            if method in cpus["slurm"]
        },
        "stages": {
            label: {
                stage: _ratio(slurm[label]["stages"][stage]["wall_s"], record["wall_s"])
                for stage, record in local[label]["stages"].items()
                if stage in slurm[label]["stages"] and record["wall_s"] > 0
            }
            for label in done
        },
        "pipelines": {
            method: _ratio(walls["slurm"][method], wall)
            for method, wall in walls["local"].items()
            if method in walls["slurm"]
        },
    }


def identical(runner: Runner, methods: Sequence[str]) -> dict[str, Any]:
    """Array-by-array equality of the two backends' stores, and equality of the evaluate metrics."""
    local, slurm = runner.directories["local"], runner.directories["slurm"]
    found: dict[str, Any] = {}
    for store in ["sim", *methods]:
        if (local / f"{store}.zarr").is_dir() and (slurm / f"{store}.zarr").is_dir():
            found[f"{store}.zarr"] = differing_arrays(local / f"{store}.zarr", slurm / f"{store}.zarr") or True
    for method in methods:
        label = f"evaluate-{method}"
        metrics = [runner.commands[backend].get(label, {}).get("metrics") for backend in ("local", "slurm")]
        if all(metrics):
            found[label] = metrics[0] == metrics[1]
    return found


def code_changed(runner: Runner) -> list[str]:
    """Commands whose package source differed between the backends' runs (their outputs need not agree)."""
    return sorted(
        label
        for label, record in runner.commands["local"].items()
        if record["package_digest"] != runner.commands["slurm"].get(label, {}).get("package_digest")
    )


def targets(results: dict[str, dict]) -> dict[str, bool | None]:
    """Whether each target of the issue is met (None where these results do not measure it)."""
    met: dict[str, bool | None] = {}
    for key, name in (("pipelines", "wall"), ("pipelines_cpu", "cpu")):
        overheads = [value for r in results.values() for value in r.get("slurm_overhead", {}).get(key, {}).values()]
        met[f"slurm_{name}_overhead_le_10pct"] = all(v <= OVERHEAD_TARGET for v in overheads) if overheads else None
    same = [value is True for r in results.values() for value in r.get("identical", {}).values()]
    met["slurm_output_identical_to_local"] = all(same) if same else None
    big, small = results.get("100000"), results.get("10000")
    if big is not None:
        commands = big["commands"].get("local", {}).values()
        met["n1e5_all_commands_completed"] = all(c["returncode"] == 0 for c in commands)
        peaks = [c.get(key) for c in commands for key in ("peak_driver_rss_bytes", "peak_worker_rss_bytes")]
        # Measured up to the stop where a command was stopped for its time; not met where stopped for memory.
        over = any("RSS" in (c["stopped"] or "") for c in commands)
        met["n1e5_peak_memory_le_8GB"] = not over and all(p is None or p <= MEMORY_TARGET_BYTES for p in peaks)
    if big is not None and small is not None:
        ratios = [
            big["pipeline_wall_s"]["local"][m] / wall if m in big["pipeline_wall_s"]["local"] else None
            for m, wall in small["pipeline_wall_s"]["local"].items()
        ]
        # None: a pipeline of 10^5 did not finish (stopped), so the ratio is unknown.
        known = [r for r in ratios if r is not None]
        if any(r > WALL_RATIO_TARGET for r in known):
            met["n1e5_wall_le_12x_n1e4"] = False
        else:
            met["n1e5_wall_le_12x_n1e4"] = True if known and len(known) == len(ratios) else None
    return met


def merged_results(fresh: dict[str, dict]) -> dict[str, dict]:
    """This run's results by ``n``, plus the other ``n`` of the previous ``scale.json`` (each with its date).

    A run of one backend only (``--backends slurm``) for an ``n`` the previous file has on the other backend
    joins that entry: the previous backend's commands are kept (with their own date and code under
    ``earlier_backends``) and the SLURM overhead is computed across the two runs; the outputs cannot be
    compared (the earlier stores are gone), so ``identical`` is not set.
    """
    previous_path = RESULTS / "scale.json"
    previous = json.loads(previous_path.read_text()).get("results", {}) if previous_path.is_file() else {}
    merged = {**{n: r for n, r in previous.items() if n not in fresh}, **fresh}
    for n, result in fresh.items():
        earlier = previous.get(n)
        if earlier is None or set(result["commands"]) & set(earlier["commands"]):
            continue
        joined = dict(result)
        joined["earlier_backends"] = {
            backend: {"date": earlier["date"], "code": earlier["code"]} for backend in earlier["commands"]
        }
        for key in ("commands", "pipeline_wall_s", "pipeline_cpu_s"):
            joined[key] = {**earlier[key], **result[key]}
        if set(joined["commands"]) >= {"local", "slurm"}:
            joined["slurm_overhead"] = overhead(joined["commands"]["local"], joined["commands"]["slurm"], joined)
        merged[n] = joined
    return merged


def summary_row(results: dict[str, dict], met: dict) -> str:
    """One line for docs/benchmarks.md."""
    parts = []
    for n, r in sorted(results.items(), key=lambda item: int(item[0])):
        for backend, walls in r["pipeline_wall_s"].items():
            commands = r["commands"][backend]
            slow = {label: c["wall_s"] for label, c in commands.items()}
            driver = max((c["peak_driver_rss_bytes"] or 0 for c in commands.values()), default=0)
            worker = max((c["peak_worker_rss_bytes"] or 0 for c in commands.values()), default=0)
            pipes = ", ".join(f"{m} {w:.0f} s" for m, w in walls.items())
            steps = ", ".join(f"{label} {wall:.0f}" for label, wall in slow.items())
            stopped = [
                f"{label} stopped ({c['stopped']}; unfinished: {', '.join(c.get('unfinished_stages', [])) or '-'})"
                for label, c in commands.items()
                if c["stopped"]
            ]
            parts.append(
                f"n={n} {backend}: pipelines {pipes or 'none complete'} ({steps} s); peak driver "
                f"{_gb(driver)}, worker {_gb(worker)}" + ("; " + "; ".join(stopped) if stopped else "")
            )
        if "slurm_overhead" in r:
            pipes = ", ".join(
                f"{m} wall {v:+.1%}, CPU {r['slurm_overhead']['pipelines_cpu'][m]:+.1%}"
                for m, v in r["slurm_overhead"]["pipelines"].items()
            )
            if "identical" in r:
                same = all(v is True for v in r["identical"].values())
                compared = f"outputs identical: {same}"
            else:
                compared = "outputs not compared (local run of an earlier invocation)"
            parts.append(f"n={n} SLURM vs local: {pipes}; {compared}")
    met_text = ", ".join(f"{name}: {value}" for name, value in met.items())
    return (
        f"70S 65 px, SNR {SNR}, EMPIAR-10028 CTFs; LocalCluster 2 workers vs SLURM 2 jobs x 1 core. "
        + "; ".join(parts)
        + f". Targets: {met_text}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000], help="particle counts")
    parser.add_argument("--backends", nargs="+", choices=("local", "slurm"), default=["local", "slurm"])
    parser.add_argument("--methods", nargs="+", default=["spca-wiener", "mfvdm"])
    parser.add_argument("--quick", action="store_true", help="smoke run: n = 2000 only, printed, not recorded")
    parser.add_argument("--timeout-min", type=float, default=40.0, help="stop a command running longer")
    parser.add_argument("--stop-memory-gb", type=float, default=8.0, help="stop a command whose process exceeds it")
    parser.add_argument("--workdir", type=Path, default=None, help="where the stores go (default a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    parser.add_argument("--no-record", action="store_true", help="print only; no JSON or docs row")
    args = parser.parse_args()
    ns = [2000] if args.quick else args.n

    slurm = start_slurm() if "slurm" in args.backends else None
    workdir = Path(tempfile.mkdtemp(prefix="cryoden_scale_", dir=args.workdir))
    try:
        fresh = {str(n): run_n(n, args.methods, args.backends, workdir / f"n{n}", args) for n in ns}
    finally:
        if slurm and slurm["started_here"]:
            stop_slurm()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    record = not (args.quick or args.no_record)
    results = merged_results(fresh) if record else fresh
    payload = {
        "snr": SNR,
        "box": BOX,
        "pixel_size_A": PIXEL_SIZE_A,
        "ctf": "EMPIAR-10028 table, white noise",
        "methods": args.methods,
        "local": f"LocalCluster, {WORKERS} worker processes x 1 thread",
        "slurm": f"{WORKERS} jobs, profile {JOB_PROFILE}" if slurm else None,
        "slurm_start": slurm,
        "memory_sampling": f"/proc every {SAMPLE_S} s, folded with the stage records (module docstring)",
        # The drivers' BLAS threads (unset: one per core) matter for their driver-side linear algebra.
        "blas_threads_environment": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
        "results": results,
        "targets_met": targets(results),
    }
    if not record:
        print(json.dumps(payload, indent=2))
        return
    write_result("scale", payload, summary_row({n: results[n] for n in fresh}, payload["targets_met"]))


if __name__ == "__main__":
    main()
