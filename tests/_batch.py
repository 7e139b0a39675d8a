"""Real batch schedulers on this machine, for integration tests.

The single-node SLURM and Son of Grid Engine come from ``../shared/slurm`` and
``../shared/sge`` beside the repository: their start scripts install the Debian
packages (as root, through apt), configure and start the daemons; their stop
scripts stop them by pid file or by the scheduler's own shutdown command.
:func:`running` wraps one such pair for a pytest fixture: it skips (saying why)
where the scheduler cannot run here, starts it from a clean state, and stops it
again afterwards so no daemon outlives the tests.

:func:`store_arrays` reads every array of a Zarr store, so two runs of a
command can be compared array by array.
"""

from __future__ import annotations

import getpass
import glob
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# First start installs the packages (about a minute from nothing, 15-30 s with a warm apt cache).
START_TIMEOUT_S = 600


@dataclass(frozen=True)
class BatchSystem:
    """How to start, stop and diagnose one of the schedulers of ``../shared``."""

    name: str
    start_script: Path
    stop_script: Path
    #: A program the packages install: absent means the start script must reach apt.
    daemon: str
    #: Pid file of the controller daemon (the file may outlive it).
    controller_pid_file: Path
    #: Cancels every job of a user (the scheduler is private to the tests).
    cancel_all: tuple[str, ...]
    #: Glob patterns of the daemons' own logs.
    logs: tuple[str, ...]


SLURM = BatchSystem(
    "SLURM",
    SHARED / "slurm" / "start_slurm.sh",
    SHARED / "slurm" / "stop_slurm.sh",
    daemon="slurmctld",
    controller_pid_file=Path("/run/slurmctld.pid"),
    cancel_all=("scancel", "--user"),
    logs=("/var/log/slurm/*.log",),
)
SGE = BatchSystem(
    "SGE",
    SHARED / "sge" / "start_sge.sh",
    SHARED / "sge" / "stop_sge.sh",
    daemon="sge_qmaster",
    controller_pid_file=Path("/var/spool/gridengine/qmaster/qmaster.pid"),
    cancel_all=("qdel", "-u"),
    logs=("/var/spool/gridengine/qmaster/messages", "/var/spool/gridengine/execd/*/messages"),
)


def unavailable_reason(system: BatchSystem) -> str | None:
    """Why ``system`` cannot be started on this machine, or None if it can be tried."""
    if not system.start_script.is_file():
        return f"{system.start_script} not found: clone the project next to its shared/ folder"
    if os.geteuid() != 0:
        return f"{system.name} daemons are started as root by {system.start_script.name}; these tests are not root"
    if shutil.which(system.daemon) is None and shutil.which("apt-get") is None:
        return f"{system.name} is not installed ({system.daemon} not found) and there is no apt-get to install it"
    return None


def daemon_logs(system: BatchSystem, lines: int = 40) -> str:
    """The last ``lines`` lines of each of the scheduler's own logs, for failure messages."""
    parts = []
    for pattern in system.logs:
        for path in sorted(glob.glob(pattern)):
            tail = Path(path).read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(parts) or f"(no {system.name} logs at {', '.join(system.logs)})"


def controller_running(system: BatchSystem) -> bool:
    """Whether the process named by the controller's pid file is alive."""
    try:
        os.kill(int(system.controller_pid_file.read_text().split()[0]), 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def stop(system: BatchSystem) -> None:
    """Cancel the tests' jobs, then stop the daemons (a no-op where none runs)."""
    # Only a running controller can cancel anything (scancel retries for 18 s when there is none).
    if controller_running(system):
        # A worker job left behind by a failed test would outlive the daemons otherwise.
        subprocess.run([*system.cancel_all, getpass.getuser()], capture_output=True, timeout=60)
    subprocess.run(["bash", str(system.stop_script)], capture_output=True, timeout=120)


def running(system: BatchSystem, env: Mapping[str, str] | None = None, args: Sequence[str] = ()) -> Iterator[float]:
    """Generator for a fixture: start ``system`` (``args`` to its start script), yield its start-up seconds, stop it.

    Skips when :func:`unavailable_reason` says so or when apt could not install
    the packages; fails with the script's output and the daemon logs when the
    installed scheduler does not come up.
    """
    reason = unavailable_reason(system)
    if reason is not None:
        pytest.skip(reason)
    installed = shutil.which(system.daemon) is not None
    # Daemons left running (by an earlier, interrupted session) keep their old configuration:
    # the start script would reuse them, so stop them first and start from the scripts' settings.
    stop(system)
    started = time.perf_counter()
    try:
        run = subprocess.run(
            ["bash", str(system.start_script), *args],
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        stop(system)
        pytest.fail(f"{system.start_script} did not finish in {START_TIMEOUT_S} s\n{daemon_logs(system)}")
    output = (run.stdout + run.stderr)[-3000:]
    if run.returncode != 0:
        stop(system)
        if not installed and shutil.which(system.daemon) is None:
            pytest.skip(f"apt could not install {system.name} (exit {run.returncode}): {output[-500:]}")
        pytest.fail(f"{system.start_script} failed (exit {run.returncode}):\n{output}\n{daemon_logs(system)}")
    try:
        yield time.perf_counter() - started
    finally:
        stop(system)


def node_memory_mb(limit_mb: int = 20000) -> int:
    """Memory a single-node scheduler may advertise: ``limit_mb`` or 90 % of this machine's, the smaller."""
    physical_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return min(limit_mb, int(0.9 * physical_mb))


def write_profile(directory: Path) -> Path:
    """A small site profile: one single-worker job per core, logs and spill space under ``directory``."""
    profile = {
        "cores": 1,
        "processes": 1,
        "memory": "2GB",
        "walltime": "00:15:00",
        "interface": "lo",  # scheduler and workers on one machine
        "log_directory": str(directory / "job-logs"),
        "local_directory": str(directory / "worker-space"),
    }
    path = directory / "site.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def job_logs(directory: Path) -> dict[str, str]:
    """Text of the batch jobs' output files that :func:`write_profile` sends to ``directory``."""
    return {path.name: path.read_text(errors="replace") for path in sorted((directory / "job-logs").iterdir())}


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the Zarr store at ``path``, keyed by its path inside the store."""
    arrays: dict[str, np.ndarray] = {}
    pending = [("", zarr.open_group(path, mode="r"))]
    while pending:
        prefix, group = pending.pop()
        for name, member in group.members():
            if isinstance(member, zarr.Group):
                pending.append((f"{prefix}{name}/", member))
            else:
                arrays[f"{prefix}{name}"] = member[...]
    return arrays
