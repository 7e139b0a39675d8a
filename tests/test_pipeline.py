"""The stage runner: chunked writes, completion flags, resume, output checks."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cryoden_dist.errors import OutputExistsError
from cryoden_dist.pipeline import map_chunks, mark_complete, prepare_output, record_command, run_chunks
from cryoden_dist.stack import ParticleStack


def _ramp(start, stop, box, calls_dir):
    (calls_dir / f"{start}").touch()
    values = np.arange(start, stop, dtype=np.float32)[:, None, None]
    return {"images": np.broadcast_to(values, (stop - start, box, box)), "_sum": float(values.sum())}


def test_run_chunks_writes_every_chunk_and_resumes(tmp_path, client):
    out = tmp_path / "s.zarr"
    assert prepare_output(out, "test", {"a": 1}) == "new"
    stack = ParticleStack.create(out, n=10, box=4, pixel_size=1.0, chunk=3, with_ctf=False)
    record_command(stack, "test", {"a": 1})
    calls = tmp_path / "calls"
    calls.mkdir()
    results = run_chunks(client, stack, "ramp", _ramp, args=(4, calls))
    assert sorted(r["_sum"] for r in results) == sorted([3.0, 12.0, 21.0, 9.0])
    np.testing.assert_array_equal(stack.images[:, 0, 0], np.arange(10))
    assert stack.info["stages"]["ramp"]["complete"]

    # a killed run leaves some flags unset: only those chunks are recomputed
    stack.group["_done/ramp"][1] = 0
    stack.images[3:6] = -1
    for f in calls.iterdir():
        f.unlink()
    assert prepare_output(out, "test", {"a": 1}) == "resume"
    stack = ParticleStack.open(out, mode="r+")
    run_chunks(client, stack, "ramp", _ramp, args=(4, calls))
    assert sorted(p.name for p in calls.iterdir()) == ["3"]
    np.testing.assert_array_equal(stack.images[:, 0, 0], np.arange(10))
    log = [(entry["run"], entry["chunks_done_before"], entry["chunks_computed"]) for entry in stack.info["run_log"]]
    assert log == [(1, 0, 4), (2, 3, 1)]
    mark_complete(stack)
    assert prepare_output(out, "test", {"a": 1}) == "complete"


def test_prepare_output_refuses_and_overwrites(tmp_path):
    out = tmp_path / "s.zarr"
    stack = ParticleStack.create(out, n=2, box=4, pixel_size=1.0, with_ctf=False)
    record_command(stack, "test", {"a": 1})
    with pytest.raises(OutputExistsError, match="--overwrite"):
        prepare_output(out, "test", {"a": 2})
    assert prepare_output(out, "test", {"a": 2}, overwrite=True) == "new"
    assert not out.exists()
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "precious.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="not a Zarr store"):
        prepare_output(user_dir, "test", {}, overwrite=True)
    assert (user_dir / "precious.txt").exists()
    with pytest.raises(OutputExistsError, match="input"):
        prepare_output(user_dir / "out.zarr", "test", {}, inputs=[user_dir])


def test_map_chunks_returns_in_order(client):
    out = map_chunks(client, lambda a, b, k: (a, b, k), [(0, 2), (2, 5)], args=(7,))
    assert out == [(0, 2, 7), (2, 5, 7)]


def _ramp_rejecting_first_chunk(start, stop, box):
    return {"images": np.zeros((stop - start, box, box), np.float32), "_incomplete": start == 0}


def test_incomplete_chunk_stays_unflagged_and_stage_not_complete(tmp_path, client):
    stack = ParticleStack.create(tmp_path / "s.zarr", n=7, box=4, pixel_size=1.0, chunk=3, with_ctf=False)
    run_chunks(client, stack, "ramp", _ramp_rejecting_first_chunk, args=(4,))
    np.testing.assert_array_equal(stack.group["_done/ramp"][:], [0, 1, 1])
    assert stack.info["stages"]["ramp"]["complete"] is False
    run_chunks(client, stack, "ramp", _ramp_rejecting_first_chunk, args=(4,))
    assert stack.info["stages"]["ramp"]["chunks_computed_last_run"] == 1  # only the rejected chunk again


def _ramp_failing_at(start, stop, box, failing_start):
    if start == failing_start:
        raise RuntimeError("disk full")
    return {"images": np.full((stop - start, box, box), start, np.float32)}


def test_a_stage_whose_chunk_failed_is_recorded_incomplete_and_reruns_the_rest(tmp_path, client):
    out = tmp_path / "s.zarr"
    stack = ParticleStack.create(out, n=10, box=4, pixel_size=1.0, chunk=3, with_ctf=False)
    record_command(stack, "test", {})
    with pytest.raises(RuntimeError, match="disk full"):
        run_chunks(client, stack, "ramp", _ramp_failing_at, args=(4, 3))
    info = ParticleStack.open(out).info
    record = info["stages"]["ramp"]
    # recorded incomplete before any task ran; nothing of the run's end was written
    assert record["complete"] is False and record["started_at_last_run"] and "wall_s_last_run" not in record
    assert info["complete"] is False and info.get("run_log", []) == []
    # Chunks already running when chunk 1 failed may still finish and set their flags: let them settle.
    deadline = time.monotonic() + 30
    while any(client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    flags = stack.group["_done/ramp"][:]
    assert flags[1] == 0
    run_chunks(client, stack, "ramp", _ramp_failing_at, args=(4, -1))
    record = stack.info["stages"]["ramp"]
    assert record["complete"] and record["chunks_computed_last_run"] == np.count_nonzero(flags == 0)
    np.testing.assert_array_equal(stack.images[:, 0, 0], [0, 0, 0, 3, 3, 3, 6, 6, 6, 9])
