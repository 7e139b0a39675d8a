"""Shared plumbing for benchmark scripts: JSON results and the table in docs/benchmarks.md."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TABLE = REPO / "docs" / "benchmarks.md"
SHARED_DATA = REPO.parent / "shared" / "data"


def machine() -> str:
    """A short description of this machine (cores, memory, CPU model)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{mem_kb / 2**20:.0f} GiB"
    except OSError:
        mem = "?"
    return f"{len(os.sched_getaffinity(0))} cores, {mem}, {cpu}"


def write_result(name: str, payload: dict[str, Any], row: str) -> Path:
    """Write ``benchmarks/results/NAME.json`` and append a dated row to docs/benchmarks.md.

    Parameters
    ----------
    name : str
        Benchmark name (file stem).
    payload : dict
        Everything measured; date and machine are added.
    row : str
        One-line summary for the table (the measured figures and the target).
    """
    today = _dt.date.today().isoformat()
    payload = {"benchmark": name, "date": today, "machine": machine(), **payload}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    with TABLE.open("a") as table:
        table.write(f"| {today} | {name} | {row} | {payload['machine']} |\n")
    print(json.dumps(payload, indent=2, default=str))
    return path


@contextmanager
def scratch_cluster(workers: int, prefix: str) -> Iterator[tuple[Path, Any]]:
    """A temporary directory and a client of a LocalCluster with ``workers`` single-threaded processes."""
    from distributed import Client

    from cryoden_dist.cluster import local_cluster

    with (
        tempfile.TemporaryDirectory(prefix=prefix) as tmp,
        local_cluster(workers, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        yield Path(tmp), client
