"""Shared fixtures: the real data in ../shared/data and one Dask cluster per session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository (real cryo-EM files)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}: clone the project next to its shared/ folder")
    return SHARED_DATA


@pytest.fixture(scope="session")
def dask_cluster():
    """A real distributed LocalCluster (2 single-threaded worker processes) for the whole session."""
    from cryoden_dist.cluster import local_cluster

    with local_cluster(2, dashboard_address=":0") as cluster:
        yield cluster


@pytest.fixture()
def client(dask_cluster):
    """A client of the session cluster."""
    from distributed import Client

    with Client(dask_cluster) as c:
        yield c


@pytest.fixture()
def scheduler_address(dask_cluster) -> str:
    """Address to pass as ``--scheduler`` so CLI tests reuse the session cluster."""
    return dask_cluster.scheduler_address
