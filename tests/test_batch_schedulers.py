"""`cryoden` through real batch schedulers: the single-node SLURM and SGE of ../shared.

The daemons are started once for this module (as root; skipped with the reason
where that cannot be done) and stopped at its end. Each ``--cluster slurm|sge``
command runs its Dask scheduler in the ``cryoden`` process and its workers as
batch jobs, configured by a small site profile passed with ``--cluster-profile``.
The outputs must equal those of the same commands on a LocalCluster bit for
bit: the kernels are deterministic functions of their chunk and arguments, and
reductions are gathered in chunk order, so which worker ran a task must not
matter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _batch import REPO, SGE, SLURM, daemon_logs, job_logs, node_memory_mb, running, store_arrays, write_profile

from cryoden_dist.cluster import (
    BATCH_CLUSTERS,
    WORKER_ENVIRONMENT,
    client_context,
    default_profile_path,
    jobqueue_kwargs,
)

pytestmark = pytest.mark.slow

# 600 particles of 33 px in 6 chunks: every stage has several chunks to spread over 2 jobs,
# and the module takes about 2 minutes on a quiet 2-core machine.
SIMULATE = [
    "simulate", "--volume", "phantom", "--n", "600", "--box", "33", "--snr", "0.5",
    "--defocus-range", "10000", "25000", "--seed", "3", "--chunk", "100",
]  # fmt: skip
COMMAND_TIMEOUT_S = 240
FAKE_GPUS = 2


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running single-node SLURM advertising 4 CPUs and 2 (fake) GPUs."""
    fake_devices = tmp_path_factory.mktemp("slurm-fake-gpus")
    env = {"FAKE_GPUS": str(FAKE_GPUS), "SLURM_CPUS": "4", "FAKEDEV_DIR": str(fake_devices)}
    # The script's default RealMemory (20000 MB) drains the node on a smaller machine.
    yield from running(SLURM, env, args=[str(node_memory_mb())])


@pytest.fixture(scope="module")
def sge():
    """A running single-node Son of Grid Engine (its slots are the machine's cores)."""
    yield from running(SGE)


def _cryoden(*args: str, system=None) -> subprocess.CompletedProcess:
    """Run the ``cryoden`` command in a fresh process (as a user would); fail with its stderr and the logs."""
    command = [sys.executable, "-m", "cryoden_dist.cli", *args]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"cryoden {' '.join(args)} ran over {COMMAND_TIMEOUT_S} s:\n{stderr[-4000:]}\n{_logs(system)}")
    if run.returncode != 0:
        pytest.fail(f"cryoden {' '.join(args)} exited {run.returncode}:\n{run.stderr[-4000:]}\n{_logs(system)}")
    return run


def _logs(system) -> str:
    """The scheduler's logs and those of the batch jobs submitted from this directory."""
    if system is None:
        return ""
    jobs = job_logs(Path.cwd()) if (Path.cwd() / "job-logs").is_dir() else {}
    return daemon_logs(system) + "".join(f"\n--- job log {name}\n{text[-2000:]}" for name, text in jobs.items())


def _pipeline(directory: Path, *where: str, system=None) -> dict:
    """simulate -> denoise --method mfvdm -> evaluate into ``directory``, with the placement options ``where``."""
    sim, den = directory / "sim.zarr", directory / "mfvdm.zarr"
    started = time.perf_counter()
    runs = [
        _cryoden(*SIMULATE, "--out", str(sim), *where, system=system),
        _cryoden("denoise", str(sim), "--method", "mfvdm", "--out", str(den), *where, system=system),
        _cryoden("evaluate", str(den), "--truth", str(sim), "--json", *where, system=system),
    ]
    metrics = json.loads(runs[-1].stdout)
    # The store paths differ between the two runs by construction; everything else must not.
    del metrics["stack"], metrics["truth"]
    return {
        "sim": sim,
        "den": den,
        "metrics": metrics,
        "stderr": [run.stderr for run in runs],
        "wall_s": time.perf_counter() - started,
    }


@pytest.fixture(scope="module")
def local_run(dask_cluster, tmp_path_factory) -> dict:
    """The reference: the same commands on the session's LocalCluster (2 worker processes)."""
    return _pipeline(tmp_path_factory.mktemp("local"), "--scheduler", dask_cluster.scheduler_address)


def _assert_same_stores(batch: Path, local: Path) -> None:
    """Every array of ``batch`` (images, CTF, truth, the MFVDM stages' outputs, chunk flags) equals ``local``'s."""
    expected, got = store_arrays(local), store_arrays(batch)
    assert sorted(got) == sorted(expected)
    different = [name for name in expected if not np.array_equal(got[name], expected[name])]
    assert different == [], f"{batch} differs from {local} in {different}"


def _batch_options(kind: str, jobs: int, profile: Path) -> list[str]:
    # Port 0: other runs on this machine may hold the default dashboard port.
    return ["--cluster", kind, "--jobs", str(jobs), "--cluster-profile", str(profile), "--dashboard-address", ":0"]


def _assert_workers_came_from_jobs(directory: Path, expected_jobs: int) -> None:
    """Each batch job wrote its log under ``directory`` and its worker joined the command's scheduler."""
    logs = job_logs(directory)
    workers = [text for text in logs.values() if "distributed.worker - INFO - -------" in text]
    assert len(workers) >= expected_jobs, f"expected {expected_jobs} worker job logs, got {sorted(logs)}"
    assert all("Registered to:" in text for text in workers)


def test_mfvdm_pipeline_on_slurm_jobs_equals_the_local_cluster_run(slurm, local_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # sbatch runs the jobs in the submitting directory
    profile = write_profile(tmp_path)
    batch = _pipeline(tmp_path, *_batch_options("slurm", 2, profile), system=SLURM)
    for stderr in batch["stderr"]:
        assert "Dask slurm cluster (2 slurm job(s)); dashboard: http://" in stderr
    # The jobqueue cluster has no workers but its batch jobs', so these ran every task.
    _assert_workers_came_from_jobs(tmp_path, expected_jobs=3 * 2)
    _assert_same_stores(batch["sim"], local_run["sim"])
    _assert_same_stores(batch["den"], local_run["den"])
    assert batch["metrics"] == local_run["metrics"]
    print(f"\nSLURM start {slurm:.1f} s; pipeline: SLURM {batch['wall_s']:.1f} s, local {local_run['wall_s']:.1f} s")


def _job_environment() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES", *WORKER_ENVIRONMENT)}


def _where(_: int) -> tuple[str, str | None]:
    """The worker a task ran on and the GPU it was given; short sleeps keep both GPU workers busy."""
    from distributed import get_worker

    time.sleep(0.05)
    return get_worker().address, os.environ.get("CUDA_VISIBLE_DEVICES")


def _submit_cpu_job(scheduler: str, profile: Path) -> str:
    """Submit one CPU-only worker job (the profile without --gpu-workers) to ``scheduler``; return its job id."""
    from dask_jobqueue.slurm import SLURMJob

    job = SLURMJob(scheduler=scheduler, name="cpu-only", **jobqueue_kwargs("slurm", profile))
    run = subprocess.run(["sbatch", "--parsable"], input=job.job_script(), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip().split(";")[0]


def _gres(job_ids: list[str]) -> dict[str, str]:
    """Generic resources SLURM allotted to each running job."""
    table = subprocess.run(
        ["squeue", "--noheader", "--jobs", ",".join(job_ids), "--format", "%i %b"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return dict(line.split(maxsplit=1) for line in table.splitlines())


def test_gpu_tagged_tasks_run_only_in_the_gpu_jobs_each_with_its_own_device(slurm, tmp_path, monkeypatch):
    import dask

    monkeypatch.chdir(tmp_path)
    # The batch jobs inherit this environment: their workers import this module to run its functions.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])))
    profile = write_profile(tmp_path)
    with client_context(
        cluster="slurm", jobs=FAKE_GPUS, gpu=True, profile=profile, dashboard_address=":0", announce=print
    ) as client:
        cpu_job = _submit_cpu_job(client.scheduler.address, profile)
        try:
            client.wait_for_workers(FAKE_GPUS + 1, timeout=120)
            workers = client.scheduler_info(n_workers=-1)["workers"]
            environment = client.run(_job_environment)
            gpu_workers = {address for address, worker in workers.items() if worker["resources"] == {"GPU": 1}}
            (cpu_worker,) = set(workers) - gpu_workers
            assert workers[cpu_worker]["resources"] == {} and environment[cpu_worker]["SLURM_JOB_ID"] == cpu_job

            # --gpu-workers reached SLURM: each GPU job holds one of the node's GPUs, a different one each.
            gpu_jobs = [environment[address]["SLURM_JOB_ID"] for address in gpu_workers]
            # The job script's malloc setting reached the GPU jobs' workers.
            for address in gpu_workers:
                assert all(environment[address][name] == value for name, value in WORKER_ENVIRONMENT.items())
            gres = _gres([*gpu_jobs, cpu_job])
            assert all(gres[job].endswith("gpu:1") for job in gpu_jobs) and "gpu" not in gres[cpu_job]
            devices = {environment[address]["CUDA_VISIBLE_DEVICES"] for address in gpu_workers}
            assert devices == {str(i) for i in range(FAKE_GPUS)}

            # Tagged at submission, and through dask.annotate around the compute call (the pattern
            # that dask 2026.8 honours): only the GPU jobs' workers run them, each with its own device.
            submitted = client.gather(client.map(_where, range(12), resources={"GPU": 1}, pure=False))
            with dask.annotate(resources={"GPU": 1}):
                computed = client.gather(
                    client.compute([dask.delayed(_where)(i, dask_key_name=f"gpu-{i}") for i in range(12)])
                )
            for placed in (submitted, computed):
                assert {address for address, _ in placed} == gpu_workers
                assert all(device == environment[address]["CUDA_VISIBLE_DEVICES"] for address, device in placed)
            # Untagged work may use the CPU-only job too.
            assert client.submit(_where, 0, workers=[cpu_worker], pure=False).result()[0] == cpu_worker
        finally:
            subprocess.run(["scancel", cpu_job], capture_output=True, timeout=60)


def test_simulate_on_sge_jobs_equals_the_local_cluster_run(sge, local_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # SGE jobs run with -cwd
    profile = write_profile(tmp_path)
    sim = tmp_path / "sim.zarr"
    started = time.perf_counter()
    run = _cryoden(*SIMULATE, "--out", str(sim), *_batch_options("sge", 1, profile), system=SGE)
    wall_s = time.perf_counter() - started
    assert "Dask sge cluster (1 sge job(s)); dashboard: http://" in run.stderr
    _assert_workers_came_from_jobs(tmp_path, expected_jobs=1)
    _assert_same_stores(sim, local_run["sim"])
    print(f"\nSGE start {sge:.1f} s; simulate on 1 SGE job {wall_s:.1f} s")


@pytest.mark.parametrize("kind", BATCH_CLUSTERS)
def test_deploy_profiles_are_the_packaged_ones(kind):
    # deploy/profiles/ links to the package's profiles, so there is one copy to keep up to date.
    link = REPO / "deploy" / "profiles" / f"{kind}.yaml"
    assert link.is_symlink() and not Path(os.readlink(link)).is_absolute()
    assert link.resolve() == (REPO / "cryoden_dist" / "profiles" / f"{kind}.yaml").resolve()
    assert link.read_bytes() == default_profile_path(kind).read_bytes()
