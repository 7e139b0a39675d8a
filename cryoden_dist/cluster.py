"""Where stages run: one place that makes the Dask client.

``client_context(scheduler, cluster=...)`` yields a :class:`distributed.Client`:

* ``None`` or ``"local"``: a fresh :class:`distributed.LocalCluster`, one
  single-threaded worker process per core, dashboard bound to localhost;
* an address such as ``"tcp://10.0.0.5:8786"``: connect to a running
  scheduler (a cluster you started yourself);
* ``cluster="slurm" | "pbs" | "sge"``: a dask-jobqueue cluster whose workers
  run as batch jobs, configured by a YAML profile (the package's own
  ``cryoden_dist/profiles/<kind>.yaml`` or a user copy) plus overrides;
* if the caller already has a client (a notebook), it is reused.

The profile-to-keyword translation is the pure function :func:`jobqueue_kwargs`,
so it can be checked without a batch scheduler.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ParameterError

__all__ = [
    "BATCH_CLUSTERS",
    "PROFILE_KEYS",
    "WORKER_ENVIRONMENT",
    "client_context",
    "default_profile_path",
    "default_workers",
    "jobqueue_kwargs",
    "load_profile",
    "local_cluster",
    "make_jobqueue_cluster",
]

log = logging.getLogger(__name__)

DEFAULT_DASHBOARD = "127.0.0.1:8787"

#: Batch systems reachable through dask-jobqueue, by ``--cluster`` name.
BATCH_CLUSTERS = ("slurm", "pbs", "sge")

_INT_KEYS = ("cores", "processes")
_STR_KEYS = (
    "memory",
    "walltime",
    "queue",
    "account",
    "resource_spec",
    "local_directory",
    "log_directory",
    "interface",
    "shared_temp_directory",
)
_LIST_KEYS = ("job_extra_directives", "job_directives_skip", "job_script_prologue", "worker_extra_args")
#: Keys a profile (or ``overrides``) may set; each is a dask-jobqueue cluster argument.
PROFILE_KEYS = frozenset(_INT_KEYS + _STR_KEYS + _LIST_KEYS)

#: Environment of every worker process this module starts. Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_`` (so that
#: freed memory goes back to the OS), and setting any glibc malloc threshold turns off glibc's adaptive mmap
#: threshold: every temporary array above 128 KiB is then a fresh mmap whose pages are faulted in and zeroed on each
#: use. Fixing the mmap threshold at 32 MiB (where the adaptive one tops out) keeps the temporaries of a stage's
#: batches on the heap; trimming still returns the heap's free top. Measured on one 1667-image alignment chunk:
#: 3.8 s -> 2.7 s (as fast as outside Dask), +90 MiB resident per worker.
WORKER_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20)}

# What "one GPU per job" means in each batch system's own job-script language.
_GPU_DIRECTIVE = {"slurm": "--gres=gpu:1", "sge": "-l gpu=1"}


def default_workers() -> int:
    """Number of worker processes for a local cluster: the usable cores."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_profile_path(kind: str) -> Path:
    """Path of the profile shipped with the package for batch system ``kind``."""
    _check_kind(kind)
    return Path(str(resources.files("cryoden_dist") / "profiles" / f"{kind}.yaml"))


def _check_kind(kind: str) -> None:
    if kind not in BATCH_CLUSTERS:
        raise ParameterError(f"--cluster {kind!r}: expected one of local, {', '.join(BATCH_CLUSTERS)}")


def _validated(settings: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check names and types of profile settings; ``source`` names where they came from."""
    checked: dict[str, Any] = {}
    for key, value in settings.items():
        if key not in PROFILE_KEYS:
            raise ParameterError(f"{source}: unknown key {key!r}; allowed keys are {', '.join(sorted(PROFILE_KEYS))}")
        if value is None:
            checked[key] = None  # null: fall back to dask-jobqueue's default
        elif key in _INT_KEYS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParameterError(f"{source}: key {key!r} must be a positive integer, got {value!r}")
            checked[key] = value
        elif key in _LIST_KEYS:
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise ParameterError(f"{source}: key {key!r} must be a list of strings, got {value!r}")
            checked[key] = list(value)
        else:
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ParameterError(f"{source}: key {key!r} must be a string, got {value!r}")
            checked[key] = str(value)
    return checked


def load_profile(kind: str, profile: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read and validate a cluster profile YAML file.

    Parameters
    ----------
    kind : {"slurm", "pbs", "sge"}
        Batch system the profile is for.
    profile : path-like, optional
        User profile; default the package's ``profiles/<kind>.yaml``.

    Returns
    -------
    dict
        The profile's settings (keys from :data:`PROFILE_KEYS`).

    Raises
    ------
    ParameterError
        If the file is missing, is not YAML mapping, or has an unknown key or a wrongly typed value.
    """
    import yaml

    path = default_profile_path(kind) if profile is None else Path(profile)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ParameterError(
            f"--cluster-profile {path}: cannot read it ({exc.strerror or exc}); pass an existing YAML file"
        ) from None
    try:
        settings = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ParameterError(f"--cluster-profile {path}: not valid YAML{line}; fix the syntax") from None
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        raise ParameterError(
            f"--cluster-profile {path}: expected a mapping of key: value, got {type(settings).__name__}"
        )
    return _validated(settings, f"--cluster-profile {path}")


def jobqueue_kwargs(
    kind: str,
    profile: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    gpu: bool = False,
    security: bool = False,
) -> dict[str, Any]:
    """Keyword arguments for the dask-jobqueue cluster class of ``kind``.

    Parameters
    ----------
    kind : {"slurm", "pbs", "sge"}
        Batch system.
    profile : path-like, optional
        YAML profile; default the package's ``profiles/<kind>.yaml``.
    overrides : mapping, optional
        Settings that replace the profile's (same keys and types).
    gpu : bool
        Ask for one GPU per job and start the workers with the Dask resource
        ``GPU=1``, so only work submitted with ``resources={"GPU": 1}`` needs them.
    security : bool
        Encrypt scheduler-worker traffic with auto-generated TLS certificates.

    Returns
    -------
    dict
        Arguments for ``SLURMCluster``/``PBSCluster``/``SGECluster``; keys left
        ``null`` are omitted so dask-jobqueue's configuration applies.
    """
    _check_kind(kind)
    settings = load_profile(kind, profile)
    settings.update(_validated(overrides or {}, "cluster overrides"))
    kwargs = {key: value for key, value in settings.items() if value is not None}
    # Lists are copied so that adding GPU arguments never edits the caller's overrides.
    for key in _LIST_KEYS:
        if key in kwargs:
            kwargs[key] = list(kwargs[key])
    # The batch job's shell exports it; the nanny passes its environment on to the worker process.
    prologue = kwargs.setdefault("job_script_prologue", [])
    for name, value in WORKER_ENVIRONMENT.items():
        if not any(name in line for line in prologue):
            prologue.append(f"export {name}={value}")
    if gpu:
        if kind == "pbs":
            kwargs["resource_spec"] = _pbs_gpu_resource_spec(kwargs)
        elif _GPU_DIRECTIVE[kind] not in kwargs.get("job_extra_directives", []):
            kwargs["job_extra_directives"] = [*kwargs.get("job_extra_directives", []), _GPU_DIRECTIVE[kind]]
        kwargs["worker_extra_args"] = [*kwargs.get("worker_extra_args", []), "--resources", "GPU=1"]
    if kind == "sge" and "account" in kwargs:
        # Grid Engine calls the accounting string a project (#$ -P).
        kwargs["project"] = kwargs.pop("account")
    if security:
        kwargs["security"] = True
    return kwargs


def _pbs_gpu_resource_spec(kwargs: Mapping[str, Any]) -> str:
    """PBS ``select`` line asking for one GPU, built like dask-jobqueue's default one."""
    spec = kwargs.get("resource_spec")
    if spec is not None:
        return spec if "ngpus=" in spec else f"{spec}:ngpus=1"
    from dask.utils import parse_bytes
    from dask_jobqueue.pbs import pbs_format_bytes_ceil

    if "cores" not in kwargs or "memory" not in kwargs:
        raise ParameterError(
            "--cluster pbs --gpu-workers: the profile must set 'cores' and 'memory' (or 'resource_spec')"
        )
    memory = pbs_format_bytes_ceil(parse_bytes(kwargs["memory"]))
    return f"select=1:ncpus={kwargs['cores']}:ngpus=1:mem={memory}"


def make_jobqueue_cluster(kind: str, **kwargs: Any):
    """Create (without submitting any job) the dask-jobqueue cluster for ``kind``.

    Parameters
    ----------
    kind : {"slurm", "pbs", "sge"}
        Batch system.
    **kwargs
        Cluster arguments, usually from :func:`jobqueue_kwargs`.

    Returns
    -------
    dask_jobqueue.core.JobQueueCluster
        The cluster, its scheduler running in this process and no jobs yet.
    """
    _check_kind(kind)
    import dask_jobqueue

    if kwargs.get("security") is True:
        try:
            import cryptography  # noqa: F401  (needed by Security.temporary())
        except ImportError:
            raise ParameterError(
                "--tls: auto-generated certificates need the 'cryptography' package; pip install it"
            ) from None
    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster, "sge": dask_jobqueue.SGECluster}[kind]
    return cls(**kwargs)


def _scaling(
    kind: str, jobs: int | None, min_jobs: int | None, max_jobs: int | None
) -> tuple[str, dict[str, int], str]:
    """Check the job-count options; return the cluster method, its arguments and a description."""
    if jobs is not None and (min_jobs is not None or max_jobs is not None):
        raise ParameterError("--jobs conflicts with --min-jobs/--max-jobs: give a fixed count or an adaptive range")
    if jobs is not None:
        return "scale", {"jobs": jobs}, f"{jobs} {kind} job(s)"
    if max_jobs is None:
        raise ParameterError(f"--cluster {kind}: say how many batch jobs to run with --jobs N or --max-jobs N")
    minimum = 0 if min_jobs is None else min_jobs
    if minimum > max_jobs:
        raise ParameterError(f"--min-jobs {minimum} is larger than --max-jobs {max_jobs}")
    return "adapt", {"minimum_jobs": minimum, "maximum_jobs": max_jobs}, f"{minimum}-{max_jobs} {kind} job(s), adaptive"


def _check_batch_options(cluster: str | None, scheduler: str | None, used: Mapping[str, bool]) -> None:
    """Refuse option combinations that cannot both hold."""
    if cluster is not None and cluster != "local":
        _check_kind(cluster)
        if scheduler not in (None, "local"):
            raise ParameterError(
                f"--scheduler {scheduler} conflicts with --cluster {cluster}: use one (an address, or a batch cluster)"
            )
        return
    given = [name for name, is_given in used.items() if is_given]
    if given:
        raise ParameterError(f"{', '.join(given)} only apply to a batch cluster: add --cluster slurm|pbs|sge")


def local_cluster(n_workers: int | None = None, dashboard_address: str = DEFAULT_DASHBOARD, **kwargs: Any):
    """A :class:`distributed.LocalCluster` as the ``cryoden`` commands start it.

    One single-threaded worker process per core (the stages parallelise over
    tasks, BLAS stays single-threaded in each), with :data:`WORKER_ENVIRONMENT`.

    Parameters
    ----------
    n_workers : int, optional
        Worker processes; default one per core (:func:`default_workers`).
    dashboard_address : str
        ``host:port`` of the dashboard (``":0"`` for any free port).
    **kwargs
        More :class:`~distributed.LocalCluster` arguments (``memory_limit``, ``resources`` ...).

    Returns
    -------
    distributed.LocalCluster
    """
    import dask
    from distributed import LocalCluster

    # glibc reads its malloc settings when the process starts: they must be in the environment the nanny spawns
    # the worker with ("pre-spawn-environ"); LocalCluster's ``env`` is applied inside the running worker, too late.
    # A variable already in this process's environment wins (dask's rule for this setting).
    spawn_environment = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **WORKER_ENVIRONMENT}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": spawn_environment}):
        return LocalCluster(
            n_workers=n_workers or default_workers(),
            threads_per_worker=1,
            processes=True,
            dashboard_address=dashboard_address,
            **kwargs,
        )


@contextlib.contextmanager
def client_context(
    scheduler: str | None = None,
    n_workers: int | None = None,
    dashboard_address: str = DEFAULT_DASHBOARD,
    memory_limit: str = "auto",
    announce: Callable[[str], Any] = print,
    *,
    cluster: str | None = None,
    jobs: int | None = None,
    min_jobs: int | None = None,
    max_jobs: int | None = None,
    profile: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    gpu: bool = False,
    security: bool = False,
) -> Iterator:
    """Yield a Dask client for ``scheduler`` or ``cluster`` and close what was opened.

    Parameters
    ----------
    scheduler : str, optional
        ``None``/``"local"`` for a new LocalCluster, or a scheduler address.
    n_workers : int, optional
        Local worker processes; default one per core.
    dashboard_address : str
        ``host:port`` the dashboard binds to (localhost by default,
        so it is not exposed to the network; reach it through an SSH tunnel).
    memory_limit : str
        Memory limit per local worker (Dask syntax).
    announce : callable
        Called with a one-line message naming the dashboard URL.
    cluster : {None, "local", "slurm", "pbs", "sge"}
        Batch system whose jobs run the workers (through dask-jobqueue);
        ``None``/``"local"`` keeps the ``scheduler`` behaviour.
    jobs : int, optional
        Fixed number of batch jobs.
    min_jobs, max_jobs : int, optional
        Adaptive range of batch jobs (instead of ``jobs``).
    profile : path-like, optional
        YAML cluster profile; default the package's ``profiles/<cluster>.yaml``.
    overrides : mapping, optional
        Settings replacing the profile's.
    gpu : bool
        One GPU per job, workers tagged with the resource ``GPU=1``.
    security : bool
        TLS between scheduler and workers with auto-generated certificates.

    Raises
    ------
    ParameterError
        For conflicting options, a bad profile or an unreachable scheduler.
    """
    used = {
        "--jobs": jobs is not None,
        "--min-jobs": min_jobs is not None,
        "--max-jobs": max_jobs is not None,
        "--cluster-profile": profile is not None,
        "--gpu-workers": gpu,
        "--tls": security,
    }
    _check_batch_options(cluster, scheduler, used)
    if cluster in BATCH_CLUSTERS:
        with _batch_client(
            cluster, jobs, min_jobs, max_jobs, profile, overrides, gpu, security, dashboard_address, announce
        ) as client:
            yield client
        return

    from distributed import Client, get_client

    if scheduler in (None, "local"):
        with contextlib.suppress(ValueError):
            existing = get_client()
            announce(f"Using the existing Dask client; dashboard: {existing.dashboard_link}")
            yield existing
            return
        local = local_cluster(
            n_workers,
            dashboard_address=dashboard_address,
            memory_limit=memory_limit,
            # Worker-side "Compute Failed" warnings duplicate the one-line error the
            # driver prints for bad input; keep only errors from the workers.
            silence_logs=logging.ERROR,
        )
        client = Client(local)
        announce(f"Dask dashboard: {client.dashboard_link}")
        try:
            yield client
        finally:
            client.close()
            local.close()
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


def _dashboard_url(link: str, dashboard_address: str) -> str:
    """Dashboard URL at the host it was bound to.

    A jobqueue scheduler reports its dashboard at the scheduler's network
    address, but the dashboard listens where ``dashboard_address`` says
    (localhost by default), so the reported URL would not open.
    """
    from urllib.parse import urlsplit, urlunsplit

    host = dashboard_address.rpartition(":")[0].strip("[]")
    parts = urlsplit(link)
    if host in ("", "0.0.0.0", "::") or parts.port is None:
        return link
    return urlunsplit(parts._replace(netloc=f"{host}:{parts.port}"))


@contextlib.contextmanager
def _batch_client(
    kind: str,
    jobs: int | None,
    min_jobs: int | None,
    max_jobs: int | None,
    profile: str | os.PathLike | None,
    overrides: Mapping[str, Any] | None,
    gpu: bool,
    security: bool,
    dashboard_address: str,
    announce: Callable[[str], Any],
) -> Iterator:
    """Client on a dask-jobqueue cluster; the jobs are cancelled on exit."""
    from distributed import Client

    kwargs = jobqueue_kwargs(kind, profile, overrides, gpu=gpu, security=security)
    kwargs.setdefault("scheduler_options", {"dashboard_address": dashboard_address})
    # Checked before the scheduler starts, so a bad option costs nothing.
    method, scale_kwargs, description = _scaling(kind, jobs, min_jobs, max_jobs)
    batch = make_jobqueue_cluster(kind, **kwargs)
    try:
        getattr(batch, method)(**scale_kwargs)
        client = Client(batch, security=batch.security)
        dashboard = _dashboard_url(client.dashboard_link, dashboard_address)
        announce(f"Dask {kind} cluster ({description}); dashboard: {dashboard}")
        try:
            yield client
        finally:
            client.close()
    finally:
        batch.close()
