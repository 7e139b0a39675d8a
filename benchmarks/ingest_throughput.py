"""Ingest throughput: ``cryoden ingest`` of a .star vs. reading its .mrcs with mrcfile alone.

Makes a 10^4-particle, box-128 stack of random images with random CTFs
(written as a cryoden stack, then exported to .mrcs + .star), then times in
the same run:

(a) reading the whole .mrcs into memory with :func:`mrcfile.open` (the
    floor: one process, no checks, no output);
(b) :func:`cryoden_dist.io.ingest.ingest` of the .star through a
    LocalCluster of 2 single-threaded workers (parse and validate the star,
    read every particle through a memory map, check for NaN/Inf, write the
    Zarr store). Cluster start-up (including importing the package on the
    workers, as a running cluster would have) is timed separately and excluded.

Both read from the page cache (the files were just written); ingest also
writes the 655 MB store, mrcfile does not. Rates use the median of the
repeats (the machine is shared, single timings vary 3x). Target:
ingest/mrcfile >= 0.5.

Run: ``python benchmarks/ingest_throughput.py [--n 10000] [--box 128]``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from cryoden_dist.ctf import CTFParams  # noqa: E402
from cryoden_dist.io.export import export  # noqa: E402
from cryoden_dist.io.ingest import ingest  # noqa: E402
from cryoden_dist.stack import ParticleStack  # noqa: E402

TARGET_RATIO = 0.5
PIXEL_SIZE = 1.5


def make_dataset(folder: Path, n: int, box: int, seed: int = 0) -> tuple[Path, Path]:
    """Write ``n`` random images with random CTFs as ``folder/bench.star`` + ``bench.mrcs``."""
    rng = np.random.default_rng(seed)
    stack = ParticleStack.create(folder / "simulated.zarr", n, box, PIXEL_SIZE, kind="simulation")
    for start, stop in stack.chunk_bounds():
        stack.images[start:stop] = rng.standard_normal((stop - start, box, box), dtype=np.float32)
    defocus = rng.uniform(8000.0, 30000.0, n)
    stack.write_ctf(
        CTFParams(
            defocus_u=defocus,
            defocus_v=defocus - rng.uniform(0.0, 500.0, n),
            defocus_angle=rng.uniform(-np.pi, np.pi, n),
            voltage=300.0,
            cs=2.7,
            amplitude_contrast=0.1,
            phase_shift=0.0,
            pixel_size=PIXEL_SIZE,
        )
    )
    star, mrcs = export(stack.path, folder, name="bench")
    shutil.rmtree(stack.path)
    return star, mrcs


def time_mrcfile_read(mrcs: Path) -> float:
    """Seconds to read the whole stack into memory with mrcfile."""
    started = time.perf_counter()
    with mrcfile.open(mrcs) as mrc:
        data = np.asarray(mrc.data)
        assert data.dtype == np.float32 and not isinstance(data, np.memmap)  # really in memory, not mapped
    return time.perf_counter() - started


def time_ingest(star: Path, out: Path, client) -> float:
    """Seconds for ``ingest`` of ``star`` into a new store ``out``."""
    started = time.perf_counter()
    stack = ingest([star], out, client=client)
    elapsed = time.perf_counter() - started
    assert stack.info["complete"]
    return elapsed


def main(n: int, box: int, repeats: int) -> dict:
    from distributed import Client

    from cryoden_dist.cluster import local_cluster

    folder = Path(tempfile.mkdtemp(prefix="cryoden_ingest_bench_"))
    try:
        started = time.perf_counter()
        star, mrcs = make_dataset(folder, n, box)
        os.sync()  # flush the dataset's writes so they do not throttle the timed ingest writes
        make_s = time.perf_counter() - started
        mrcfile_s = [time_mrcfile_read(mrcs) for _ in range(repeats)]

        started = time.perf_counter()
        with local_cluster(2, dashboard_address=None) as cluster:
            with Client(cluster) as client:
                client.wait_for_workers(2)
                # a running cluster has the package imported already: do it here, not in the first tasks
                client.run(importlib.import_module, "cryoden_dist.io.ingest")
                startup_s = time.perf_counter() - started
                ingest_s = []
                for i in range(repeats):
                    ingest_s.append(time_ingest(star, folder / f"ingested_{i}.zarr", client))
                    shutil.rmtree(folder / f"ingested_{i}.zarr")
                    # each timed ingest starts, like the first, with no writeback pending from the last one
                    os.sync()
        mrcfile_rate = n / float(np.median(mrcfile_s))
        ingest_rate = n / float(np.median(ingest_s))
        return {
            "n_particles": n,
            "box": box,
            "stack_bytes": mrcs.stat().st_size,
            "workers": 2,
            "repeats": repeats,
            "dataset_creation_s": round(make_s, 3),
            "cluster_startup_s": round(startup_s, 3),
            "mrcfile_read_s": [round(t, 3) for t in mrcfile_s],
            "ingest_s": [round(t, 3) for t in ingest_s],
            "mrcfile_particles_per_s": round(mrcfile_rate, 1),
            "ingest_particles_per_s": round(ingest_rate, 1),
            "ratio_ingest_over_mrcfile": round(ingest_rate / mrcfile_rate, 3),
            "ratio_best_over_best": round(min(mrcfile_s) / min(ingest_s), 3),
            "target_ratio": TARGET_RATIO,
            "meets_target": bool(ingest_rate / mrcfile_rate >= TARGET_RATIO),
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="particles")
    parser.add_argument("--box", type=int, default=128, help="box size in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each (rates use the median)")
    options = parser.parse_args()
    payload = main(options.n, options.box, options.repeats)
    row = (
        f"{payload['n_particles']} particles, box {payload['box']}: ingest {payload['ingest_particles_per_s']:.0f}/s "
        f"(2 workers, start-up {payload['cluster_startup_s']:.1f} s excluded) vs mrcfile read "
        f"{payload['mrcfile_particles_per_s']:.0f}/s (medians of {payload['repeats']}); ratio "
        f"{payload['ratio_ingest_over_mrcfile']:.2f} (best/best {payload['ratio_best_over_best']:.2f}; "
        f"target >= {TARGET_RATIO})"
    )
    write_result("ingest_throughput", payload, row)
