"""Runs survive the failures clusters have (issue 5, item 4).

(a) A worker process killed mid-stage is restarted by its nanny, its task is retried, and the output equals an
undisturbed run's. (b) A driver killed mid-run (with its local cluster) resumes by rerunning the same command:
only the unfinished chunks and stages are recomputed, as the store's run log shows, and the output equals an
undisturbed run's. (c) Until every chunk of a stage is written, neither the stage nor the store reads as complete.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import zarr
from click.testing import CliRunner

from cryoden_dist.cli import main
from cryoden_dist.denoise import denoise
from cryoden_dist.sim.simulate import simulate
from cryoden_dist.stack import ATTRS_KEY, ParticleStack
from cryoden_dist.status import store_status

# The tests read stores while a run writes them: a folder made an instant before its zarr.json is expected.
pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized")

#: The mfvdm run of tests (b) and (c): 240 phantom particles in 30 chunks, so every chunked stage has 30 tasks.
MFVDM_ARGS = ("--method", "mfvdm", "--param", "knn=10", "--param", "m=10")
KILL_TIMEOUT_S = 120


def _arrays(group: zarr.Group) -> dict[str, np.ndarray]:
    """Every array of a store except the completion flags, by path."""
    return {
        name: array[...]
        for name, array in group.members(max_depth=None)
        if isinstance(array, zarr.Array) and not name.startswith("_done")
    }


def _assert_same_arrays(store: Path, reference: Path) -> None:
    got, expected = _arrays(zarr.open_group(str(store), mode="r")), _arrays(zarr.open_group(str(reference), mode="r"))
    assert sorted(got) == sorted(expected)
    for name, values in expected.items():
        assert np.array_equal(got[name], values, equal_nan=True), name


def _poll(condition, what: str, alive, timeout: float = KILL_TIMEOUT_S):
    """Call ``condition()`` every 10 ms until it returns something truthy, while ``alive()``."""
    deadline = time.monotonic() + timeout
    error = None
    while time.monotonic() < deadline:
        try:
            found = condition()
        except Exception as exc:  # noqa: BLE001 - the store is being written (a half-written zarr.json...)
            found, error = None, exc
        if found:
            return found
        if not alive():
            pytest.fail(f"the run ended before {what} (last read error: {error!r})")
        time.sleep(0.01)
    pytest.fail(f"timed out waiting for {what} (last read error: {error!r})")


def _flag_counts(path: Path) -> dict[str, tuple[int, int]]:
    group = zarr.open_group(str(path), mode="r")
    if "_done" not in group:
        return {}
    return {name: (int(flags[:].sum()), flags.shape[0]) for name, flags in group["_done"].arrays()}


# ------------------------------------------------------------------------------------ (a) worker killed
def test_worker_killed_mid_stage_is_replaced_and_the_output_is_identical(tmp_path):
    from distributed import Client

    from cryoden_dist.cluster import local_cluster

    # Own cluster: killing one of its workers must not disturb the session cluster of the other tests.
    with (
        local_cluster(2, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        kwargs = {"n": 800, "snr": 0.1, "box": 49, "chunk": 20, "seed": 3, "client": client}
        out = tmp_path / "disturbed.zarr"
        pids = client.run(os.getpid)
        executor = ThreadPoolExecutor(1)
        run = executor.submit(simulate, "phantom", out, **kwargs)

        def busy_worker_mid_stage():
            done, total = _flag_counts(out).get("simulate", (0, 1))
            busy = [addr for addr, keys in client.processing().items() if any("simulate-chunk" in k for k in keys)]
            return busy[0] if 0 < done < total - 4 and busy else None

        victim = _poll(busy_worker_mid_stage, "a worker busy with a simulate chunk", alive=lambda: not run.done())
        os.kill(pids[victim], signal.SIGKILL)
        run.result(KILL_TIMEOUT_S)  # re-raises if the run failed
        executor.shutdown()

        stack = ParticleStack.open(out)
        record = stack.info["stages"]["simulate"]
        assert stack.info["complete"] and record["complete"] and record["runs"] == 1
        assert record["chunks_computed_last_run"] == record["n_chunks"] == 40
        # the nanny replaced the killed process
        client.wait_for_workers(2, timeout=60)
        assert pids[victim] not in client.run(os.getpid).values()

        reference = simulate("phantom", tmp_path / "undisturbed.zarr", **kwargs)
        _assert_same_arrays(out, reference.path)


# ------------------------------------------------------------------------------------ (b), (c) driver killed
@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, dask_cluster):
    """A `cryoden denoise --method mfvdm` subprocess killed (with its local cluster) in the middle of a stage.

    The kill comes once the first stage is complete and a later chunked stage has some but not all of its
    chunks flagged. Returns the input, the output left behind, a frozen copy of it, and the flag counts and
    complete stages at the kill.
    """
    from distributed import Client

    root = tmp_path_factory.mktemp("killed")
    sim = root / "sim.zarr"
    with Client(dask_cluster) as client:
        simulate("phantom", sim, n=240, snr=0.1, box=33, chunk=8, seed=5, client=client)
    out = root / "out.zarr"
    args = ["denoise", str(sim), *MFVDM_ARGS, "--out", str(out)]
    log = open(root / "driver.log", "w")  # noqa: SIM115 - kept open while the subprocess writes it
    driver = subprocess.Popen(
        [sys.executable, "-m", "cryoden_dist.cli", *args, "--workers", "1", "--dashboard-address", "127.0.0.1:0"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the driver and its workers die together
    )

    def mid_stage():
        stages = zarr.open_group(str(out), mode="r").attrs[ATTRS_KEY].get("stages", {})
        if not stages.get("coeffs", {}).get("complete"):
            return None
        # a margin of chunks still to do, so the stage is still unfinished when the kill lands
        return any(0 < done < total - 4 for done, total in _flag_counts(out).values())

    try:
        _poll(mid_stage, "a stage after coeffs with some chunks done", alive=lambda: driver.poll() is None)
        processes = psutil.Process(driver.pid).children(recursive=True)  # its scheduler's workers
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(60)
        log.close()
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, f"processes of the killed run still running: {alive}"
    # with every process of the run dead, the store no longer changes: read what it holds
    flags = _flag_counts(out)
    stages = zarr.open_group(str(out), mode="r").attrs[ATTRS_KEY]["stages"]
    partial = [name for name, (done, total) in flags.items() if 0 < done < total]
    assert partial, (root / "driver.log").read_text()
    frozen = root / "frozen.zarr"
    shutil.copytree(out, frozen)
    return {
        "sim": sim,
        "out": out,
        "args": args,
        "frozen": frozen,
        "flags": flags,
        "partial": partial[0],
        "complete_stages": sorted(name for name, record in stages.items() if record.get("complete")),
    }


def test_an_interrupted_stage_and_its_store_are_not_marked_complete(killed_run):
    frozen, partial, flags = killed_run["frozen"], killed_run["partial"], killed_run["flags"]
    info = ParticleStack.open(frozen).info
    assert info["complete"] is False
    # the interrupted stage: recorded (when it started) as incomplete, with part of its chunks flagged
    assert info["stages"][partial]["complete"] is False
    done, total = flags[partial]
    assert 0 < done < total
    # a stage recorded complete has every chunk written
    for name in killed_run["complete_stages"]:
        if name in flags:
            assert flags[name][0] == flags[name][1], name

    status = store_status(frozen)
    assert status["complete"] is False
    by_name = {stage["name"]: stage for stage in status["stages"]}
    assert (by_name[partial]["complete"], by_name[partial]["chunks_done"], by_name[partial]["n_chunks"]) == (
        False,
        done,
        total,
    )
    assert by_name["coeffs"]["complete"] and by_name["coeffs"]["wall_s"] > 0
    text = CliRunner().invoke(main, ["status", str(frozen)])
    assert text.exit_code == 0
    assert "complete   no" in text.output
    assert any(line.split()[:3] == [partial, "no", f"{done}/{total}"] for line in text.output.splitlines())
    as_json = CliRunner().invoke(main, ["status", str(frozen), "--json"])
    assert json.loads(as_json.output) == status


def test_rerun_after_the_driver_is_killed_recomputes_only_what_is_unfinished(
    killed_run, tmp_path, scheduler_address, client
):
    out, partial = killed_run["out"], killed_run["partial"]
    done_at_kill, total = killed_run["flags"][partial]
    resumed = CliRunner().invoke(main, [*killed_run["args"], "--resume", "--scheduler", scheduler_address])
    assert resumed.exit_code == 0, resumed.output

    info = ParticleStack.open(out).info
    assert info["complete"] is True and info["runs"] == 2
    second_run = {entry["stage"]: entry for entry in info["run_log"] if entry["run"] == 2}
    # stages complete at the kill are not recomputed ...
    for name in killed_run["complete_stages"]:
        assert name not in second_run and info["stages"][name]["runs"] == 1, name
    # ... the interrupted one computes only its unfinished chunks ...
    entry = second_run[partial]
    assert entry["chunks_done_before"] == done_at_kill and entry["chunks_computed"] == total - done_at_kill < total
    # ... and everything after it runs once, in this run
    assert all(record["complete"] for record in info["stages"].values())
    assert set(second_run) == set(info["stages"]) - set(killed_run["complete_stages"])

    reference = denoise(
        killed_run["sim"], tmp_path / "undisturbed.zarr", method="mfvdm", params={"knn": 10, "m": 10}, client=client
    )
    _assert_same_arrays(out, reference.path)


# ------------------------------------------------------------------------------------ --resume
def test_resume_is_refused_when_there_is_nothing_to_resume(tmp_path, killed_run):
    runner = CliRunner()
    missing = runner.invoke(main, ["denoise", str(killed_run["sim"]), "--out", str(tmp_path / "typo.zarr"), "--resume"])
    assert missing.exit_code == 2 and "nothing to resume" in missing.output and "typo.zarr" in missing.output
    assert not (tmp_path / "typo.zarr").exists()
    other = runner.invoke(main, ["denoise", str(tmp_path), "--out", str(killed_run["sim"]), "--resume"])
    assert other.exit_code == 2 and "made by `cryoden simulate`" in other.output
    both = runner.invoke(main, ["denoise", str(killed_run["sim"]), "--out", "x.zarr", "--resume", "--overwrite"])
    assert both.exit_code == 2 and "--resume and --overwrite" in both.output
    for result in (missing, other, both):
        assert result.output.count("\n") == 1 and "Traceback" not in result.output
