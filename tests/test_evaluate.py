"""The evaluate command: chunked metrics against truth/clean, the evaluation/ group, input checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _synthetic import make_simulation
from click.testing import CliRunner

from cryoden_dist.cli import main
from cryoden_dist.errors import InputError
from cryoden_dist.evaluate import evaluate
from cryoden_dist.metrics import fourier_ring_correlation, frc_resolution, psnr, relative_mse, ssim
from cryoden_dist.stack import ParticleStack


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    # box 33 (odd) and 3 Å pixels: the shell <-> resolution mapping must use the real box
    return make_simulation(tmp_path_factory.mktemp("sim") / "sim.zarr", n=50, box=33, pixel_size=3.0, snr=0.5, chunk=16)


def _copy_with_images(template: ParticleStack, path, images: np.ndarray) -> ParticleStack:
    stack = ParticleStack.create_like(path, template, kind="denoised", attrs={"method": "test"})
    stack.images[:] = images
    return stack


def test_raw_baseline_matches_the_metrics_on_the_whole_stack(sim, client):
    images_before = sim.images[:]
    summary = evaluate(sim.path, sim.path, client=client)
    clean = sim.group["truth/clean"][:]
    assert summary["n"] == 50
    assert summary["rel_mse"] == pytest.approx(relative_mse(images_before, clean), rel=1e-9)
    assert summary["psnr"] == pytest.approx(np.mean(psnr(images_before, clean)), rel=1e-9)
    assert summary["ssim"] == pytest.approx(np.mean(ssim(images_before, clean)), rel=1e-9)
    frc = fourier_ring_correlation(images_before, clean)
    assert summary["frc_resolution_0143_A"] == pytest.approx(frc_resolution(frc.mean(axis=0), 3.0, 0.143, box=33))
    assert summary["frc_resolution_05_A_median"] == pytest.approx(
        np.median(frc_resolution(frc, 3.0, 0.5, box=33)), rel=1e-9
    )
    assert summary["frc_resolution_05_A"] >= summary["frc_resolution_0143_A"] >= 2 * 3.0 * 33 / 32 - 1e-9
    json.dumps(summary, allow_nan=False)  # JSON-able, no inf/nan

    # per-image values are stored in evaluation/, the images are untouched
    stored = ParticleStack.open(sim.path)
    np.testing.assert_array_equal(stored.images[:], images_before)
    evaluation = stored.group["evaluation"]
    for name in ("rel_error", "mse", "psnr", "ssim", "frc_resolution_0143_A", "frc_resolution_05_A"):
        assert evaluation[name].shape == (50,)
    np.testing.assert_allclose(
        evaluation["rel_error"][:],
        np.sum((images_before - clean.astype(np.float64)) ** 2, axis=(1, 2))
        / np.sum(clean.astype(np.float64) ** 2, axis=(1, 2)),
        rtol=1e-9,
    )
    assert evaluation["frc_mean"].shape == (17,)
    attrs = evaluation.attrs["cryoden"]
    assert attrs["truth"] == str(sim.path.resolve())
    assert attrs["complete"] is True
    assert attrs["summary"]["rel_mse"] == summary["rel_mse"]


def test_perfect_and_zero_estimates(sim, client, tmp_path):
    clean = sim.group["truth/clean"][:]
    perfect = _copy_with_images(sim, tmp_path / "perfect.zarr", clean)
    summary = evaluate(perfect.path, sim.path, client=client)
    assert summary["rel_mse"] == 0.0 and summary["mse"] == 0.0
    assert summary["psnr"] is None  # inf, reported as null
    assert summary["ssim"] == pytest.approx(1.0)
    assert summary["frc_resolution_0143_A"] == pytest.approx(33 * 3.0 / 16)  # Nyquist: never below
    assert np.all(np.isinf(perfect.group["evaluation/psnr"][:]))

    zero = _copy_with_images(sim, tmp_path / "zero.zarr", np.zeros_like(clean))
    summary = evaluate(zero.path, sim.path, client=client)
    assert summary["rel_mse"] == pytest.approx(1.0)
    assert summary["frc_resolution_0143_A"] is None  # no correlation at any shell: inf


def test_a_new_evaluation_replaces_the_old_one(sim, client, tmp_path):
    clean = sim.group["truth/clean"][:]
    stack = _copy_with_images(sim, tmp_path / "half.zarr", 0.5 * clean)
    assert evaluate(stack.path, sim.path, client=client)["rel_mse"] == pytest.approx(0.25)
    stack.images[:] = 0.9 * clean
    assert evaluate(stack.path, sim.path, client=client)["rel_mse"] == pytest.approx(0.01, rel=1e-5)
    np.testing.assert_allclose(stack.group["evaluation/rel_error"][:], 0.01, rtol=1e-5)
    np.testing.assert_allclose(stack.images[:], 0.9 * clean)


def test_input_errors(sim, client, tmp_path):
    plain = ParticleStack.create(tmp_path / "plain.zarr", n=50, box=33, pixel_size=3.0, with_ctf=False)
    with pytest.raises(InputError, match=r"plain\.zarr.*truth/clean.*`cryoden simulate` output"):
        evaluate(sim.path, plain.path, client=client)
    other_n = make_simulation(tmp_path / "n.zarr", n=20, box=33, pixel_size=3.0)
    with pytest.raises(InputError, match="particles 50 but the truth store .* has 20"):
        evaluate(sim.path, other_n.path, client=client)
    other_box = make_simulation(tmp_path / "box.zarr", n=50, box=32, pixel_size=3.0)
    with pytest.raises(InputError, match="box 33 .* has 32"):
        evaluate(sim.path, other_box.path, client=client)
    broken = _copy_with_images(sim, tmp_path / "nan.zarr", sim.images[:])
    broken.images[20, 3, 3] = np.nan
    with pytest.raises(InputError, match=r"nan\.zarr: images of 1 particles contain NaN .*particle 20"):
        evaluate(broken.path, sim.path, client=client)
    assert "evaluation" not in broken.group
    broken.images[20, 3, 3] = 0
    broken.update_info(complete=False, command={"name": "denoise", "params": {}})
    with pytest.raises(InputError, match=r"nan\.zarr: the store is not finished; rerun `cryoden denoise`"):
        evaluate(broken.path, sim.path, client=client)
    with pytest.raises(InputError, match="no such stack"):
        evaluate(tmp_path / "missing.zarr", sim.path, client=client)


def test_cli_evaluate_raw_baseline(sim, scheduler_address):
    result = CliRunner().invoke(
        main, ["evaluate", str(sim.path), "--truth", str(sim.path), "--scheduler", scheduler_address]
    )
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert float(lines["rel_mse"]) > 0.5
    assert lines["n"] == "50"
    missing = CliRunner().invoke(
        main,
        ["evaluate", str(sim.path), "--truth", str(sim.path.parent / "nope.zarr"), "--scheduler", scheduler_address],
    )
    assert missing.exit_code == 2 and "no such stack" in missing.output
