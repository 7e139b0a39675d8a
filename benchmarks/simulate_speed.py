"""Benchmark: simulate 10^4 images of the 70S ribosome map (65 px, 5 Å) with real CTFs and white noise.

Runs ``cryoden_dist.sim.simulate.simulate`` through a LocalCluster with 2
single-threaded worker processes and reports the wall time (target <= 30 s;
ASPIRE 0.14.3 takes ~180 s for the same job on this class of machine), the
worker-seconds spent per part (projection, CTF, noise), the time to write
the three image arrays from one process, and the time of a single-process
projection of all 10^4 images.

Usage::

    python benchmarks/simulate_speed.py [--n 10000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

N_IMAGES = 10_000
TARGET_S = 30.0
ASPIRE_S = 180.0
MAP = Path("volumes/aspire_clean70SRibosome_vol_65p.mrc")
CTF_TABLE = Path("metadata/ctf_tables/empiar10028_ctf_cryodrgn.npy")


def write_seconds(stack, directory: Path) -> float:
    """Time writing the stack's three image arrays into a fresh store with the same chunks (one process)."""
    import zarr

    arrays = {name: stack.group[name][:] for name in ("images", "truth/clean", "truth/clean_ctf")}
    group = zarr.open_group(str(directory / "write_only.zarr"), mode="w", zarr_format=3)
    started = time.perf_counter()
    for name, values in arrays.items():
        target = group.create_array(
            name, shape=values.shape, chunks=stack.group[name].chunks, dtype=values.dtype, compressors=None
        )
        target[:] = values
    return time.perf_counter() - started


def main() -> None:
    from _common import SHARED_DATA, write_result
    from distributed import Client

    from cryoden_dist.cluster import local_cluster
    from cryoden_dist.datasets import load_volume
    from cryoden_dist.sim.projection import project
    from cryoden_dist.sim.rotations import random_rotations
    from cryoden_dist.sim.simulate import simulate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=N_IMAGES)
    n = parser.parse_args().n

    volume = load_volume(SHARED_DATA / MAP).data
    rotations = random_rotations(n, np.random.default_rng(0))
    started = time.perf_counter()
    project(volume, rotations)
    single_process_projection = time.perf_counter() - started

    with (
        tempfile.TemporaryDirectory() as tmp,
        local_cluster(2, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        client.run(lambda: None)  # workers up before the clock starts
        started = time.perf_counter()
        stack = simulate(
            SHARED_DATA / MAP,
            Path(tmp) / "sim.zarr",
            n=n,
            snr=0.1,
            ctf_table=SHARED_DATA / CTF_TABLE,
            pixel_size=5.0,
            seed=0,
            client=client,
        )
        wall = time.perf_counter() - started
        info = stack.info
        write = write_seconds(stack, Path(tmp))

    workers = info["worker_seconds_last_run"]
    payload = {
        "n_images": n,
        "box": 65,
        "pixel_size": 5.0,
        "workers": 2,
        "chunk": info["chunk"],
        "wall_s": round(wall, 2),
        "stage_wall_s": info["stages"]["simulate"]["wall_s_last_run"],
        "worker_s": workers,
        "write_s_one_process": round(write, 2),
        "single_process_projection_s": round(single_process_projection, 2),
        "target_s": TARGET_S,
        "aspire_0.14.3_s": ASPIRE_S,
        "nufft": info["projection"],
    }
    row = (
        f"{n} x 65 px 70S + real CTF + white noise, 2 workers: {wall:.1f} s (target <= {TARGET_S:.0f} s, "
        f"ASPIRE ~{ASPIRE_S:.0f} s); worker-s projection {workers['projection']:.1f}, CTF {workers['ctf']:.1f}, "
        f"noise {workers['noise']:.1f}; write {write:.1f} s; 1-process projection {single_process_projection:.1f} s"
    )
    write_result("simulate_speed", payload, row)


if __name__ == "__main__":
    main()
