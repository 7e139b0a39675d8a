"""The denoise command, its registry and the two baselines, on synthetic stores with known truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _synthetic import make_simulation
from click.testing import CliRunner

from cryoden_dist.cli import main
from cryoden_dist.ctf import ctf_images
from cryoden_dist.denoise import METHODS, Method, denoise, parse_params, raised_cosine_lowpass
from cryoden_dist.errors import MissingCTFError, ParameterError
from cryoden_dist.image import frequency_grid, radial_index
from cryoden_dist.metrics import relative_mse
from cryoden_dist.stack import ParticleStack


@pytest.fixture(scope="module")
def module_client(dask_cluster):
    from distributed import Client

    with Client(dask_cluster) as c:
        yield c


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """SNR 0.1, 96 particles, box 48, 4 Å pixels, three chunks."""
    return make_simulation(tmp_path_factory.mktemp("sim") / "sim.zarr", snr=0.1, seed=0)


@pytest.fixture(scope="module")
def wiener_out(sim, module_client, tmp_path_factory):
    return denoise(sim.path, tmp_path_factory.mktemp("w") / "w.zarr", method="wiener", client=module_client)


def _clean(stack: ParticleStack) -> np.ndarray:
    return stack.group["truth/clean"][:]


def test_wiener_beats_raw_and_lowpass_at_snr_01(sim, wiener_out, module_client, tmp_path):
    lowpass = denoise(sim.path, tmp_path / "lp.zarr", method="lowpass", client=module_client)
    clean = _clean(sim)
    raw_error = relative_mse(sim.images[:], clean)
    lowpass_error = relative_mse(lowpass.images[:], clean)
    wiener_error = relative_mse(wiener_out.images[:], clean)
    # measured on this seed: raw 2.05, lowpass (16 Å) 0.84, wiener 0.39
    assert raw_error > 1.8
    assert wiener_error < 0.5
    assert wiener_error < 0.25 * raw_error
    assert wiener_error < lowpass_error - 0.25
    assert lowpass_error < 0.5 * raw_error


def test_denoised_store_records_method_and_ctf_state(sim, wiener_out):
    info = wiener_out.info
    assert info["kind"] == "denoised"
    assert info["method"] == "wiener"
    assert info["params"] == {"radius": 24.0, "noise_scale": 1.0}
    assert info["images_ctf_state"] == "corrected"
    assert info["complete"] is True
    assert "truth" not in wiener_out.group  # the truth stays in the simulation
    np.testing.assert_array_equal(wiener_out.group["ctf/defocus_u"][:], sim.group["ctf/defocus_u"][:])
    model = info["wiener_model"]
    # the corner estimate finds the noise the simulation added (pixel variance)
    assert model["noise_variance"] == pytest.approx(sim.info["noise_variance"], rel=0.05)
    assert model["noise_power"] == pytest.approx(48 * 48 * model["noise_variance"])


def test_wiener_inverts_the_ctf_without_noise(module_client, tmp_path):
    sim = make_simulation(tmp_path / "clean.zarr", snr=None, n=64, seed=4)
    out = denoise(sim.path, tmp_path / "w.zarr", method="wiener", client=module_client)
    estimate, clean = np.fft.fft2(out.images[:]), np.fft.fft2(_clean(sim))
    ctf = ctf_images(sim.ctf_params(), sim.box)
    strong = np.abs(ctf) > 0.5
    # measured: 9e-8 of the clean energy where |H| > 0.5; the whole image 2e-6
    error = np.sum(np.abs(estimate - clean)[strong] ** 2) / np.sum(np.abs(clean)[strong] ** 2)
    assert error < 1e-4
    assert relative_mse(out.images[:], _clean(sim)) < 1e-3
    assert relative_mse(sim.images[:], _clean(sim)) > 0.3  # the CTF-modulated input is far from it


def test_lowpass_removes_power_above_the_cutoff(module_client, tmp_path):
    sim = make_simulation(tmp_path / "noctf.zarr", snr=1.0, n=40, seed=2, with_ctf=False)
    resolution, falloff = 16.0, 3.0
    out = denoise(
        sim.path,
        tmp_path / "lp.zarr",
        method="lowpass",
        params={"resolution": resolution, "falloff": falloff},
        client=module_client,
    )
    assert out.info["images_ctf_state"] == "none"
    shells = radial_index(sim.box)
    cutoff_shell = sim.box * sim.pixel_size / resolution  # 12 Fourier pixels
    power_in = (np.abs(np.fft.fft2(sim.images[:])) ** 2).sum(axis=0)
    power_out = (np.abs(np.fft.fft2(out.images[:])) ** 2).sum(axis=0)
    above = shells > cutoff_shell + falloff / 2
    below = shells < cutoff_shell - falloff / 2
    assert power_out[above].sum() < 1e-9 * power_in[above].sum()
    np.testing.assert_allclose(power_out[below], power_in[below], rtol=1e-4)
    edge = ~above & ~below
    assert 0.1 < power_out[edge].sum() / power_in[edge].sum() < 0.9


def test_raised_cosine_shape():
    filt = raised_cosine_lowpass(64, 2.0, resolution=8.0, falloff=4.0)
    radius = frequency_grid(64)[0] * 64  # in Fourier pixels
    assert np.all(filt[radius <= 14] == 1) and np.all(filt[radius >= 18] == 0)
    # 0.5 at the cutoff frequency 1/8 Å^-1 = shell 16
    assert filt[0, 16] == pytest.approx(0.5)
    assert np.all(np.diff(filt[0, :33]) <= 0)


def test_parse_params():
    assert parse_params(("resolution=12", "falloff=2.5", "flag=true", "off=No", "name=abc", "neg=-3")) == {
        "resolution": 12,
        "falloff": 2.5,
        "flag": True,
        "off": False,
        "name": "abc",
        "neg": -3,
    }
    assert parse_params(()) == {}
    for bad in (("resolution",), ("=3",), ("1x=2",), ("a=1", "a=2")):
        with pytest.raises(ParameterError, match="--param"):
            parse_params(bad)


def test_registry_errors(sim, module_client, tmp_path):
    out = tmp_path / "o.zarr"
    with pytest.raises(ParameterError, match="lowpass, wiener"):
        denoise(sim.path, out, method="bm3d", client=module_client)
    with pytest.raises(ParameterError, match="valid: resolution, falloff"):
        denoise(sim.path, out, method="lowpass", params={"sigma": 2}, client=module_client)
    with pytest.raises(ParameterError, match="expects a float"):
        denoise(sim.path, out, method="lowpass", params={"falloff": "wide"}, client=module_client)
    with pytest.raises(ParameterError, match="Nyquist"):
        denoise(sim.path, out, method="lowpass", params={"resolution": 4}, client=module_client)
    with pytest.raises(ParameterError, match="positive"):
        denoise(sim.path, out, method="wiener", params={"noise_scale": 0}, client=module_client)
    no_ctf = make_simulation(tmp_path / "noctf.zarr", n=8, with_ctf=False)
    with pytest.raises(MissingCTFError, match="noctf.zarr"):
        denoise(no_ctf.path, out, method="wiener", client=module_client)
    assert not out.exists()
    assert all(isinstance(m, Method) and m.name == name for name, m in METHODS.items())
    with pytest.raises(TypeError):
        METHODS["wiener"].defaults["radius"] = 3  # the registry's defaults are read-only


def test_denoise_resumes_an_interrupted_run(sim, wiener_out, module_client, tmp_path):
    out = tmp_path / "resume.zarr"
    first = denoise(sim.path, out, method="wiener", client=module_client)
    expected = first.images[:]
    np.testing.assert_array_equal(expected, wiener_out.images[:])
    # simulate a run killed during chunk 1: flag unset, chunk half written, store not complete
    first.group["_done/wiener"][1] = 0
    first.images[32:48] = 0
    first.update_info(complete=False)
    again = denoise(sim.path, out, method="wiener", client=module_client)
    np.testing.assert_array_equal(again.images[:], expected)
    assert again.info["stages"]["wiener"]["chunks_computed_last_run"] == 1
    assert again.info["complete"] is True
    # a finished output is returned untouched
    assert denoise(sim.path, out, method="wiener", client=module_client).info["stages"]["wiener"]["runs"] == 2


def test_cli_denoise_evaluate_methods(sim, scheduler_address, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.zarr"
    result = runner.invoke(
        main, ["denoise", str(sim.path), "--method", "wiener", "--out", str(out), "--scheduler", scheduler_address]
    )
    assert result.exit_code == 0, result.output
    assert "96 particles denoised with wiener" in result.output
    denoised = runner.invoke(
        main, ["evaluate", str(out), "--truth", str(sim.path), "--json", "--scheduler", scheduler_address]
    )
    assert denoised.exit_code == 0, denoised.output
    raw = runner.invoke(
        main, ["evaluate", str(sim.path), "--truth", str(sim.path), "--json", "--scheduler", scheduler_address]
    )
    assert raw.exit_code == 0, raw.output
    # stdout is one JSON object (the progress bar and dashboard line go to stderr)
    scores, raw_scores = json.loads(denoised.stdout), json.loads(raw.stdout)
    for key in ("rel_mse", "mse", "psnr", "ssim", "n", "frc_resolution_0143_A", "frc_resolution_05_A"):
        assert key in scores
    assert scores["rel_mse"] < 0.3 * raw_scores["rel_mse"]
    assert scores["psnr"] > raw_scores["psnr"] + 5

    listing = runner.invoke(main, ["methods"])
    assert listing.exit_code == 0
    assert [line.split()[0] for line in listing.output.splitlines()] == list(METHODS)

    bad = runner.invoke(
        main,
        [
            "denoise",
            str(sim.path),
            "--method",
            "nope",
            "--out",
            str(tmp_path / "x.zarr"),
            "--scheduler",
            scheduler_address,
        ],
    )
    assert bad.exit_code == 2
    assert "cryoden: error: --method nope: unknown method; choose one of lowpass, wiener" in bad.output
    bad_param = runner.invoke(
        main,
        [
            "denoise",
            str(sim.path),
            "--method",
            "lowpass",
            "--param",
            "resolution",
            "--out",
            str(tmp_path / "x.zarr"),
            "--scheduler",
            scheduler_address,
        ],
    )
    assert bad_param.exit_code == 2 and "KEY=VALUE" in bad_param.output
