"""Batch-cluster execution without batch daemons: profiles, rendered job scripts, GPU-tagged workers.

The jobqueue clusters here are real dask-jobqueue objects (their scheduler runs in
this process) that never submit a job; the job scripts they would submit are
rendered and read line by line.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from click.testing import CliRunner

from cryoden_dist.cli import main
from cryoden_dist.cluster import (
    BATCH_CLUSTERS,
    WORKER_ENVIRONMENT,
    client_context,
    default_profile_path,
    jobqueue_kwargs,
    load_profile,
    make_jobqueue_cluster,
)
from cryoden_dist.errors import ParameterError

SITE = {
    "queue": "gpu-short",
    "account": "cryo-lab",
    "cores": 4,
    "processes": 4,
    "memory": "16GB",
    "walltime": "02:30:00",
    "job_script_prologue": ["module load cuda/12.4", "source /opt/venv/bin/activate"],
}


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Run in a scratch directory: jobqueue clusters create their log directory on construction."""
    monkeypatch.chdir(tmp_path)


def _job_script(kind: str, **kwargs) -> list[str]:
    """Lines of the job script the jobqueue cluster would submit (no job is submitted)."""
    kwargs["scheduler_options"] = {"dashboard_address": "127.0.0.1:0"}
    cluster = make_jobqueue_cluster(kind, **kwargs)
    try:
        return cluster.job_script().splitlines()
    finally:
        cluster.close()


def _worker_command(lines: list[str]) -> str:
    (command,) = [line for line in lines if "distributed.cli.dask_worker" in line]
    return command


@pytest.mark.parametrize("kind", BATCH_CLUSTERS)
def test_packaged_profiles_load_and_overrides_replace_them(kind):
    profile = load_profile(kind)
    assert default_profile_path(kind).is_file()
    assert profile["cores"] == profile["processes"]  # one single-threaded worker per core
    kwargs = jobqueue_kwargs(kind, overrides={"memory": "64GB", "queue": "long"})
    assert kwargs["memory"] == "64GB" and kwargs["queue"] == "long"
    assert kwargs["walltime"] == profile["walltime"] and kwargs["cores"] == profile["cores"]
    assert None not in kwargs.values()  # nulls are left to dask-jobqueue's defaults
    assert "security" not in kwargs and "--resources" not in kwargs.get("worker_extra_args", [])
    assert jobqueue_kwargs(kind, security=True)["security"] is True


def test_user_profile_file_and_gpu_do_not_touch_the_overrides(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("cores: 2\nprocesses: 1\nmemory: 8GB\nworker_extra_args: [--lifetime, 50m]\n")
    overrides = {"job_extra_directives": ["--qos=high"]}
    kwargs = jobqueue_kwargs("slurm", profile=path, overrides=overrides, gpu=True)
    assert kwargs["cores"] == 2 and kwargs["processes"] == 1 and "walltime" not in kwargs
    assert kwargs["job_extra_directives"] == ["--qos=high", "--gres=gpu:1"]
    assert kwargs["worker_extra_args"] == ["--lifetime", "50m", "--resources", "GPU=1"]
    assert overrides == {"job_extra_directives": ["--qos=high"]}


def test_slurm_job_script_has_the_profile_and_gpu_lines():
    lines = _job_script("slurm", **jobqueue_kwargs("slurm", overrides=SITE, gpu=True))
    for directive in ("-p gpu-short", "-A cryo-lab", "-t 02:30:00", "--cpus-per-task=4", "--mem=15G", "--gres=gpu:1"):
        assert f"#SBATCH {directive}" in lines, directive
    # The module loads come before the worker starts.
    command = _worker_command(lines)
    assert lines.index("module load cuda/12.4") < lines.index(command)
    assert "--resources GPU=1" in command and "--nworkers 4" in command and "--nthreads 1" in command
    # The workers' malloc setting is exported before they start, once even if the profile has it too.
    (export,) = [line for line in lines if "MALLOC_MMAP_THRESHOLD_" in line]
    assert export == f"export MALLOC_MMAP_THRESHOLD_={WORKER_ENVIRONMENT['MALLOC_MMAP_THRESHOLD_']}"
    assert lines.index(export) < lines.index(command)
    own = {**SITE, "job_script_prologue": ["export MALLOC_MMAP_THRESHOLD_=1048576"]}
    assert jobqueue_kwargs("slurm", overrides=own)["job_script_prologue"] == own["job_script_prologue"]
    plain = _job_script("slurm", **jobqueue_kwargs("slurm", overrides=SITE))
    assert not any("--gres" in line for line in plain) and "--resources" not in _worker_command(plain)


def test_slurm_mem_per_gpu_sites_can_skip_the_mem_line():
    overrides = {**SITE, "job_directives_skip": ["--mem"], "job_extra_directives": ["--mem-per-gpu=40G"]}
    lines = _job_script("slurm", **jobqueue_kwargs("slurm", overrides=overrides, gpu=True))
    assert "#SBATCH --mem-per-gpu=40G" in lines and not any(line.startswith("#SBATCH --mem=") for line in lines)


def test_pbs_job_script_selects_cpus_memory_and_a_gpu():
    lines = _job_script("pbs", **jobqueue_kwargs("pbs", overrides=SITE, gpu=True))
    assert "#PBS -q gpu-short" in lines and "#PBS -A cryo-lab" in lines
    assert "#PBS -l walltime=02:30:00" in lines
    (select,) = [line for line in lines if line.startswith("#PBS -l select=")]
    assert select.startswith("#PBS -l select=1:ncpus=4:ngpus=1:mem=")
    assert "--resources GPU=1" in _worker_command(lines) and "module load cuda/12.4" in lines
    plain = _job_script("pbs", **jobqueue_kwargs("pbs", overrides=SITE))
    assert not any("ngpus" in line for line in plain)
    custom = jobqueue_kwargs("pbs", overrides={**SITE, "resource_spec": "select=1:ncpus=4:mem=16gb"}, gpu=True)
    assert custom["resource_spec"] == "select=1:ncpus=4:mem=16gb:ngpus=1"


def test_sge_job_script_has_queue_project_runtime_and_gpu():
    lines = _job_script("sge", **jobqueue_kwargs("sge", overrides=SITE, gpu=True))
    for directive in ("-q gpu-short", "-P cryo-lab", "-l h_rt=02:30:00", "-l gpu=1"):
        assert f"#$ {directive}" in lines, directive
    assert "--resources GPU=1" in _worker_command(lines) and "source /opt/venv/bin/activate" in lines


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cores: 4\ngpus: 2\n", "unknown key 'gpus'"),
        ("cores: four\n", "key 'cores' must be a positive integer"),
        ("job_script_prologue: module load x\n", "key 'job_script_prologue' must be a list of strings"),
        ("cores: [4\n", "not valid YAML"),
        ("- cores\n", "expected a mapping"),
    ],
)
def test_bad_profiles_name_the_file_and_the_key(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ParameterError, match=expected) as info:
        jobqueue_kwargs("slurm", profile=path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_profile_and_bad_overrides_are_parameter_errors(tmp_path):
    with pytest.raises(ParameterError, match="missing.yaml"):
        jobqueue_kwargs("pbs", profile=tmp_path / "missing.yaml")
    with pytest.raises(ParameterError, match="cluster overrides: unknown key 'walltme'"):
        jobqueue_kwargs("sge", overrides={"walltme": "01:00:00"})
    with pytest.raises(ParameterError, match="'lsf'"):
        jobqueue_kwargs("lsf")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"scheduler": "tcp://10.0.0.5:8786", "cluster": "slurm", "jobs": 2}, "conflicts with --cluster slurm"),
        ({"cluster": "slurm"}, "--jobs N or --max-jobs N"),
        ({"cluster": "pbs", "jobs": 2, "max_jobs": 4}, "--jobs conflicts with --min-jobs/--max-jobs"),
        ({"cluster": "sge", "min_jobs": 5, "max_jobs": 2}, "--min-jobs 5 is larger than --max-jobs 2"),
        ({"jobs": 3}, "--jobs only apply to a batch cluster"),
        ({"cluster": "local", "gpu": True}, "--gpu-workers only apply to a batch cluster"),
    ],
)
def test_conflicting_options_are_refused_before_anything_starts(options, expected):
    with pytest.raises(ParameterError, match=expected), client_context(announce=print, **options):
        pass


def test_adaptive_slurm_cluster_starts_its_scheduler_and_prints_the_dashboard():
    # Adaptive with zero minimum jobs and no work submits nothing, so no sbatch is needed.
    messages: list[str] = []
    with client_context(
        cluster="slurm", min_jobs=0, max_jobs=2, dashboard_address="127.0.0.1:0", announce=messages.append
    ) as client:
        assert client.scheduler_info()["workers"] == {}
        assert client.cluster.job_header.count("#SBATCH") >= 4
    (message,) = messages
    assert message.startswith("Dask slurm cluster (0-2 slurm job(s), adaptive); dashboard: http://127.0.0.1:")


def test_cli_refuses_conflicting_options_and_bad_profiles(tmp_path):
    runner = CliRunner()
    base = ["simulate", "--volume", "phantom", "--n", "4", "--snr", "1", "--out", str(tmp_path / "x.zarr")]
    result = runner.invoke(main, [*base, "--scheduler", "tcp://10.0.0.5:8786", "--cluster", "slurm", "--jobs", "2"])
    assert result.exit_code == 2 and "conflicts with --cluster slurm" in result.output
    bad = tmp_path / "site.yaml"
    bad.write_text("cores: 4\nwalltme: '01:00:00'\n")
    result = runner.invoke(main, [*base, "--cluster", "slurm", "--jobs", "2", "--cluster-profile", str(bad)])
    assert result.exit_code == 2 and str(bad) in result.output and "'walltme'" in result.output
    result = runner.invoke(main, [*base, "--gpu-workers"])
    assert result.exit_code == 2 and "--gpu-workers only apply to a batch cluster" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x.zarr").exists()


def _where(_: int) -> str:
    from distributed import get_worker

    return get_worker().address


def test_gpu_tagged_tasks_run_only_on_gpu_tagged_workers():
    from distributed import Client, Scheduler, Worker

    async def run() -> tuple[set[str], set[str], str, str]:
        async with Scheduler(port=0, dashboard_address=":0") as scheduler:
            async with (
                Worker(scheduler.address, nthreads=1, resources={"GPU": 1}) as gpu_worker,
                Worker(scheduler.address, nthreads=1) as cpu_worker,
                Client(scheduler.address, asynchronous=True) as client,
            ):
                tagged = await client.gather(client.map(_where, range(12), resources={"GPU": 1}, pure=False))
                untagged = await client.gather(client.map(_where, range(40, 52), pure=False))
                return set(tagged), set(untagged), gpu_worker.address, cpu_worker.address

    tagged, untagged, gpu_address, cpu_address = asyncio.run(run())
    assert tagged == {gpu_address}
    # The untagged tasks may go anywhere; the CPU worker exists and is usable.
    assert untagged <= {gpu_address, cpu_address} and gpu_address != cpu_address


def test_tls_gives_tls_workers_or_says_what_is_missing(tmp_path):
    kwargs = jobqueue_kwargs("slurm", overrides={**SITE, "shared_temp_directory": str(tmp_path)}, security=True)
    try:
        import cryptography  # noqa: F401
    except ImportError:
        with pytest.raises(ParameterError, match="--tls: .*'cryptography'"):
            make_jobqueue_cluster("slurm", **kwargs)
        return
    command = _worker_command(_job_script("slurm", **kwargs))
    assert " tls://" in command and "--tls-ca-file" in command


def _spawn_environment() -> dict[str, str]:
    """The environment the process was started with (what glibc read), not later ``os.environ`` changes."""
    entries = Path("/proc/self/environ").read_bytes().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in entries if b"=" in entry)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc to read a start environment")
def test_local_workers_start_with_the_malloc_setting():
    with client_context(n_workers=1, dashboard_address=":0", announce=print) as client:
        seen = client.run(_spawn_environment)
    (environment,) = seen.values()
    assert {name: environment.get(name) for name in WORKER_ENVIRONMENT} == WORKER_ENVIRONMENT
