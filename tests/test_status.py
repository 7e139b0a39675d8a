"""Per-stage monitoring in the run store and `cryoden status` (issue 5, item 5)."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from cryoden_dist.cli import main
from cryoden_dist.errors import InputError
from cryoden_dist.pipeline import (
    peak_rss_bytes,
    prepare_output,
    record_command,
    record_stage,
    reset_peak_rss,
    run_chunks,
    start_stage,
)
from cryoden_dist.stack import ParticleStack
from cryoden_dist.status import format_status, store_status

MiB = 2**20
#: Memory a test stage allocates (and touches) on purpose; far above the processes' own fluctuations.
ALLOCATED = 256 * MiB

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="per-stage peak RSS windows need /proc/self/clear_refs")


def _fill(start, stop, box, allocate):
    """Chunk kernel that first allocates and touches ``allocate`` bytes in the worker."""
    scratch = np.ones(allocate // 8)  # np.ones writes every page, so they all count in the RSS
    return {"images": np.full((stop - start, box, box), scratch.size > 0, dtype=np.float32)}


def _stack(path, n=12, chunk=4, command="test", params=None):
    stack = ParticleStack.create(path, n=n, box=4, pixel_size=1.0, chunk=chunk, with_ctf=False)
    record_command(stack, command, params or {})
    return stack


@linux_only
def test_peak_memory_of_each_stage_is_measured_over_that_stage_alone(tmp_path, client):
    stack = _stack(tmp_path / "s.zarr")
    run_chunks(client, stack, "big", _fill, args=(4, ALLOCATED))
    run_chunks(client, stack, "small", _fill, args=(4, 0))
    stages = stack.info["stages"]
    big, small = (stages[name]["peak_worker_memory_bytes_last_run"] for name in ("big", "small"))
    # the worker held the scratch array during "big"; the window was reset before "small"
    assert big > ALLOCATED and big - small > 0.8 * ALLOCATED
    assert stages["big"]["peak_memory_window_last_run"] == "stage"

    # a stage computed in the driver: its peak RSS, from start_stage to record_stage
    started = start_stage()
    scratch = np.ones(ALLOCATED // 8)
    del scratch
    record_stage(stack, "driver-big", {}, started)
    record_stage(stack, "driver-small", {}, start_stage())
    stages = stack.info["stages"]
    driver_big = stages["driver-big"]["peak_driver_memory_bytes_last_run"]
    assert driver_big - stages["driver-small"]["peak_driver_memory_bytes_last_run"] > 0.8 * ALLOCATED
    assert stages["driver-big"]["peak_worker_memory_bytes_last_run"] is None  # no client: no worker figure


def test_peak_rss_reads_this_process():
    reset_peak_rss()
    before = peak_rss_bytes()
    scratch = np.ones(ALLOCATED // 8)
    assert peak_rss_bytes() >= before + 0.8 * ALLOCATED
    del scratch


def test_stage_records_and_run_log_tell_what_each_run_computed(tmp_path, client):
    out = tmp_path / "s.zarr"
    stack = _stack(out)
    run_chunks(client, stack, "fill", _fill, args=(4, 0))
    started = time.perf_counter()  # a non-chunked stage timed with a plain clock
    record_stage(stack, "reduce", {"k": 1}, started)

    # a second run (resumed): one chunk to redo, the non-chunked stage not redone
    stack.group["_done/fill"][2] = 0
    stack.update_info(complete=False)
    assert prepare_output(out, "test", {}) == "resume"
    stack = ParticleStack.open(out, mode="r+")  # as a command does: the handle sees the new run number
    run_chunks(client, stack, "fill", _fill, args=(4, 0))
    run_chunks(client, stack, "fill", _fill, args=(4, 0))  # nothing left: neither a run nor a log entry

    info = stack.info
    assert info["runs"] == 2
    log = [(entry["run"], entry["stage"], entry.get("chunks_computed")) for entry in info["run_log"]]
    assert log == [(1, "fill", 3), (1, "reduce", None), (2, "fill", 1)]
    fill = info["stages"]["fill"]
    assert (fill["n_chunks"], fill["chunks_done_before_last_run"], fill["chunks_computed_last_run"]) == (3, 2, 1)
    assert fill["runs"] == 2 and fill["complete"] and fill["wall_s_last_run"] > 0
    assert fill["peak_worker_memory_bytes_last_run"] > 10 * MiB and fill["peak_driver_memory_bytes_last_run"] > 0
    reduce = info["stages"]["reduce"]
    assert reduce["peak_memory_window_last_run"] == "since previous record"
    assert reduce["peak_worker_memory_bytes_last_run"] is None and reduce["started_at_last_run"].endswith("+00:00")


def test_status_reports_stages_chunks_and_nested_stores(tmp_path, client):
    path = tmp_path / "run.zarr"
    stack = _stack(path, command="denoise", params={"method": "wiener"})
    run_chunks(client, stack, "done-stage", _fill, args=(4, 0))
    run_chunks(client, stack, "partial", _fill, args=(4, 0))
    stack.group["_done/partial"][0] = 0  # as a run killed during chunk 0 leaves it
    stages = stack.info["stages"]
    stages["partial"]["complete"] = False
    stack.update_info(stages=stages)
    stack.group.create_array("_done/unrecorded", shape=(5,), chunks=(1,), dtype="uint8", fill_value=0)[1] = 1
    nested = ParticleStack.create_like(path / "centering", stack, kind="centered")
    record_command(nested, "center", {"radius": 3})

    status = store_status(path)
    assert status["command"] == {"name": "denoise", "params": {"method": "wiener"}}
    assert status["complete"] is False and status["runs"] == 1
    by_name = {stage["name"]: stage for stage in status["stages"]}
    assert [by_name[name]["chunks_done"] for name in ("done-stage", "partial", "unrecorded")] == [3, 2, 1]
    assert [by_name[name]["complete"] for name in ("done-stage", "partial", "unrecorded")] == [True, False, False]
    assert by_name["unrecorded"]["n_chunks"] == 5 and by_name["unrecorded"]["runs"] == 0
    assert by_name["done-stage"]["peak_worker_memory_bytes"] > 0 and by_name["done-stage"]["wall_s"] > 0
    assert [entry["stage"] for entry in status["run_log"]] == ["done-stage", "partial"]
    [inner] = status["nested"]
    assert inner["path"] == str(path / "centering") and inner["command"]["name"] == "center"

    text = format_status(status)
    assert "cryoden denoise" in text and "method = wiener" in text and "complete   no" in text
    rows = {line.split()[0]: line.split()[1:4] for line in text.splitlines() if line.startswith("  ") and "/" in line}
    assert rows["partial"][:2] == ["no", "2/3"] and rows["done-stage"][:2] == ["yes", "3/3"]
    assert rows["unrecorded"][:2] == ["no", "1/5"]
    assert "nested store" in text and str(path / "centering") in text

    cli = CliRunner().invoke(main, ["status", str(path), "--json"])
    assert cli.exit_code == 0 and json.loads(cli.output) == status
    assert CliRunner().invoke(main, ["status", str(path)]).output.strip() == text


def test_status_of_a_path_that_is_not_a_store_is_a_one_line_error(tmp_path):
    (tmp_path / "plain").mkdir()
    for path, words in ((tmp_path / "missing.zarr", "no such store"), (tmp_path / "plain", "not a cryoden store")):
        with pytest.raises(InputError, match=words):
            store_status(path)
        result = CliRunner().invoke(main, ["status", str(path)])
        assert result.exit_code == 2 and result.output.count("\n") == 1
        assert result.output.startswith("cryoden: error: ") and str(path) in result.output and words in result.output
