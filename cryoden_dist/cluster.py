"""Where stages run: one place that makes the Dask client.

``client_context(scheduler)`` yields a :class:`distributed.Client`:

* ``None`` or ``"local"``: a fresh :class:`distributed.LocalCluster`, one
  single-threaded worker process per core, dashboard bound to localhost;
* an address such as ``"tcp://10.0.0.5:8786"``: connect to a running
  scheduler (a cluster you started, or dask-jobqueue's);
* if the caller already has a client (a notebook), it is reused.

Batch-cluster profiles (SLURM, PBS, SGE through dask-jobqueue) plug in here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from .errors import ParameterError

__all__ = ["client_context", "default_workers"]

log = logging.getLogger(__name__)

DEFAULT_DASHBOARD = "127.0.0.1:8787"


def default_workers() -> int:
    """Number of worker processes for a local cluster: the usable cores."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def client_context(
    scheduler: str | None = None,
    n_workers: int | None = None,
    dashboard_address: str = DEFAULT_DASHBOARD,
    memory_limit: str = "auto",
    announce=print,
) -> Iterator:
    """Yield a Dask client for ``scheduler`` and close what was opened.

    Parameters
    ----------
    scheduler : str, optional
        ``None``/``"local"`` for a new LocalCluster, or a scheduler address.
    n_workers : int, optional
        Local worker processes; default one per core.
    dashboard_address : str
        ``host:port`` the local dashboard binds to (localhost by default,
        so it is not exposed to the network).
    memory_limit : str
        Memory limit per local worker (Dask syntax).
    announce : callable
        Called with a one-line message naming the dashboard URL.
    """
    from distributed import Client, LocalCluster, get_client

    if scheduler in (None, "local"):
        with contextlib.suppress(ValueError):
            existing = get_client()
            announce(f"Using the existing Dask client; dashboard: {existing.dashboard_link}")
            yield existing
            return
        cluster = LocalCluster(
            n_workers=n_workers or default_workers(),
            threads_per_worker=1,
            processes=True,
            dashboard_address=dashboard_address,
            memory_limit=memory_limit,
            # Worker-side "Compute Failed" warnings duplicate the one-line error the
            # driver prints for bad input; keep only errors from the workers.
            silence_logs=logging.ERROR,
        )
        client = Client(cluster)
        announce(f"Dask dashboard: {client.dashboard_link}")
        try:
            yield client
        finally:
            client.close()
            cluster.close()
        return
    if "://" not in scheduler and ":" not in scheduler:
        raise ParameterError(
            f"--scheduler {scheduler!r}: expected 'local' or a scheduler address such as tcp://HOST:8786"
        )
    try:
        client = Client(scheduler, timeout="20s")
    except OSError as exc:
        raise ParameterError(
            f"--scheduler {scheduler}: cannot reach the Dask scheduler ({exc}); check the address and that it runs"
        ) from None
    announce(f"Connected to {scheduler}; dashboard: {client.dashboard_link}")
    try:
        yield client
    finally:
        client.close()
