"""The `cryoden` command as a user runs it: a real subprocess, a real local cluster."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from cryoden_dist.cli import main


def _cryoden(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cryoden_dist.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_default_local_cluster_prints_dashboard_and_info_describes_the_store(tmp_path):
    out = tmp_path / "sim.zarr"
    run = _cryoden(
        "simulate", "--volume", "phantom", "--n", "24", "--snr", "1", "--box", "33", "--workers", "1",
        "--dashboard-address", "127.0.0.1:0", "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "Dask dashboard: http://127.0.0.1:" in run.stderr
    assert "Traceback" not in run.stderr and "INFO distributed" not in run.stderr
    info = _cryoden("info", str(out))
    assert info.returncode == 0
    assert "particles   24   box 33" in info.stdout and "complete    True" in info.stdout
    record = json.loads(_cryoden("info", str(out), "--json").stdout)
    assert record["kind"] == "simulation" and record["n"] == 24 and record["complete"] is True


def test_errors_are_one_line_without_traceback(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["info", str(tmp_path / "missing.zarr")])
    assert result.exit_code == 2
    assert result.output.count("cryoden: error:") == 1 and "Traceback" not in result.output
    assert "missing.zarr" in result.output
    result = runner.invoke(main, ["simulate", "--volume", "phantom", "--n", "4", "--snr", "1",
                                  "--scheduler", "not-an-address", "--out", str(tmp_path / "x.zarr")])  # fmt: skip
    assert result.exit_code == 2 and "--scheduler" in result.output
    assert not (tmp_path / "x.zarr").exists()


def test_debug_shows_the_traceback(tmp_path):
    run = _cryoden("--debug", "info", str(tmp_path / "missing.zarr"))
    assert run.returncode != 0 and "Traceback" in run.stderr and "InputError" in run.stderr


def test_methods_lists_the_registry():
    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0
    assert "wiener" in result.output and "lowpass" in result.output
