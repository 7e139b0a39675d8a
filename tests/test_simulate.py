"""`simulate`: ground truth that is what it claims (SNR, CTF, shifts), deterministic, resumable; and datasets."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
from click.testing import CliRunner

from cryoden_dist.cli import main
from cryoden_dist.ctf import apply_ctf, ctf_images
from cryoden_dist.datasets import MAPS, load_volume, sha256sum
from cryoden_dist.errors import InputError, ParameterError
from cryoden_dist.image import disk_mask, fourier_shift, radial_average
from cryoden_dist.pipeline import prepare_output
from cryoden_dist.sim.phantom import phantom_volume
from cryoden_dist.sim.projection import project
from cryoden_dist.sim.simulate import DEFAULT_DEFOCUS_RANGE, draw_parameters, simulate
from cryoden_dist.stack import ParticleStack

MAP_70S = "volumes/aspire_clean70SRibosome_vol_65p.mrc"
CTF_TABLE = "metadata/ctf_tables/empiar10028_ctf_cryodrgn.npy"
MICROGRAPH = "micrographs/bin4/epu2.9_example_bin4.mrc"


@pytest.fixture(scope="module")
def module_client(dask_cluster):
    from distributed import Client

    with Client(dask_cluster) as client:
        yield client


@pytest.fixture(scope="module")
def simulated(tmp_path_factory, module_client) -> ParticleStack:
    out = tmp_path_factory.mktemp("sim") / "phantom.zarr"
    return simulate("phantom", out, n=150, snr=0.3, max_shift=4.0, seed=11, chunk=40, client=module_client)


def measured_snr(stack: ParticleStack) -> float:
    """var(clean CTF-modulated image in the disk), averaged over particles, / var(noise)."""
    clean_ctf = stack.group["truth/clean_ctf"][:].astype(np.float64)
    noise = stack.images[:].astype(np.float64) - clean_ctf
    signal = np.mean(np.var(clean_ctf[:, disk_mask(stack.box)], axis=1))
    return float(signal / np.var(noise))


def relative_error(estimate: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(estimate - reference) / np.linalg.norm(reference))


def radial_spread(residual: np.ndarray) -> float:
    """max / min of the residual's mean radial power over rings 1 .. L//2."""
    power = radial_average(np.mean(np.abs(np.fft.fft2(residual)) ** 2, axis=0))[1:]
    return float(power.max() / power.min())


# ------------------------------------------------------------- phantom run
def test_store_holds_images_truth_and_provenance(simulated):
    stack = ParticleStack.open(simulated.path)
    assert (stack.n, stack.box, stack.pixel_size, stack.kind) == (150, 65, 5.0, "simulation")
    info = stack.info
    assert info["complete"] and info["stages"]["simulate"]["n_chunks"] == 4
    assert info["snr"] == 0.3 and "inside the disk of radius L//2" in info["snr_definition"]
    assert info["noise"] == {"model": "white"} and info["volume"] == "phantom" and info["seed"] == 11
    for name in ("images", "truth/clean", "truth/clean_ctf"):
        array = stack.group[name]
        assert array.shape == (150, 65, 65) and array.dtype == np.float32 and array.chunks == (40, 65, 65)
    assert stack.group["truth/rotations"].shape == (150, 3, 3)
    assert stack.group["truth/shifts"].shape == (150, 2)
    expected = draw_parameters(150, 11, max_shift=4.0, pixel_size=5.0)
    np.testing.assert_array_equal(stack.group["truth/rotations"][:], expected.rotations)
    ctf = stack.ctf_params()
    np.testing.assert_array_equal(ctf.defocus_u, expected.ctf.defocus_u)
    mean_defocus = (ctf.defocus_u + ctf.defocus_v) / 2
    assert mean_defocus.min() >= DEFAULT_DEFOCUS_RANGE[0] and mean_defocus.max() <= DEFAULT_DEFOCUS_RANGE[1]
    assert np.all(np.abs(ctf.defocus_angle) <= np.pi / 2) and np.all(ctf.pixel_size == 5.0)


def test_measured_snr_matches_the_request(simulated):
    # n < 512: the pilot is every particle, so only the noise variance is
    # estimated (relative std 0.2 % over 150 * 65^2 pixels); measured 0.2997
    assert measured_snr(simulated) == pytest.approx(0.3, rel=0.02)
    noise = simulated.images[:] - simulated.group["truth/clean_ctf"][:]
    assert np.var(noise) == pytest.approx(simulated.info["noise_variance"], rel=0.02)
    assert radial_spread(noise) < 1.2  # white: measured 1.08


def test_clean_ctf_is_the_ctf_applied_to_clean(simulated):
    clean = simulated.group["truth/clean"][:]
    expected = apply_ctf(clean, ctf_images(simulated.ctf_params(), simulated.box))
    # measured 5.2e-7: float32 rounding of two FFT round trips
    assert relative_error(simulated.group["truth/clean_ctf"][:], expected) < 1e-5


def test_clean_images_are_shifted_projections(simulated):
    rotations = simulated.group["truth/rotations"][:]
    shifts = simulated.group["truth/shifts"][:]
    radius = np.hypot(shifts[:, 0], shifts[:, 1])
    assert radius.max() <= 4.0 and radius.max() > 3.5  # uniform in the disk: the largest is near the edge
    expected = fourier_shift(project(phantom_volume(65), rotations), shifts)
    # measured 1.7e-7 (float32 rounding)
    assert relative_error(simulated.group["truth/clean"][:], expected) < 1e-5
    assert relative_error(simulated.group["truth/clean"][:], project(phantom_volume(65), rotations)) > 0.1


# ------------------------------------------------------- determinism/resume
def test_output_does_not_depend_on_chunking(tmp_path, module_client):
    common = dict(n=50, snr=1.0, box=33, max_shift=2.0, seed=3, client=module_client)
    one = simulate("phantom", tmp_path / "one.zarr", chunk=50, **common)
    many = simulate("phantom", tmp_path / "many.zarr", chunk=7, **common)
    for name in ("images", "truth/clean", "truth/clean_ctf", "truth/rotations", "truth/shifts", "ctf/defocus_u"):
        np.testing.assert_array_equal(one.group[name][:], many.group[name][:])
    assert one.info["noise_variance"] == many.info["noise_variance"]
    other = simulate("phantom", tmp_path / "other.zarr", chunk=50, **{**common, "seed": 4})
    assert not np.allclose(other.images[:], one.images[:])


def test_interrupted_run_resumes_to_the_same_store(tmp_path, module_client):
    args = dict(n=30, snr=2.0, box=33, seed=5, chunk=10, client=module_client)
    out = tmp_path / "s.zarr"
    stack = simulate("phantom", out, **args)
    finished = stack.images[:]
    # what a killed run leaves: one chunk unwritten, its flag unset, not complete
    stack.group["_done/simulate"][1] = 0
    stack.images[10:20] = 0
    stack.update_info(complete=False)
    params_state = prepare_output(out, "simulate", stack.info["command"]["params"])
    assert params_state == "resume"
    resumed = simulate("phantom", out, **args)
    np.testing.assert_array_equal(resumed.images[:], finished)
    assert resumed.info["stages"]["simulate"]["chunks_computed_last_run"] == 1


# ----------------------------------------------------- real data: map, CTFs
def test_70s_map_with_real_ctf_table(tmp_path, module_client, shared_data):
    table = np.load(shared_data / CTF_TABLE)
    stack = simulate(
        shared_data / MAP_70S,
        tmp_path / "ribo.zarr",
        n=80,
        snr=0.1,
        pixel_size=5.0,
        box=33,
        ctf_table=shared_data / CTF_TABLE,
        seed=2,
        client=module_client,
    )
    # Fourier-cropped 65 -> 33: same field of view, larger pixels
    assert stack.box == 33 and stack.pixel_size == pytest.approx(5.0 * 65 / 33)
    ctf = stack.ctf_params()
    # each particle's (DefocusU, DefocusV, angle in degrees) is a row of the table
    table_rows = set(map(tuple, table[:, 2:5].tolist()))
    drawn = np.stack([ctf.defocus_u, ctf.defocus_v, np.rad2deg(ctf.defocus_angle)], axis=1).astype(np.float32)
    assert all(tuple(row) in table_rows for row in drawn.tolist())
    assert len(set(map(tuple, drawn.tolist()))) > 70  # drawn at random from 105,247 rows
    assert np.all(ctf.voltage == 300) and np.all(ctf.cs == 2.0) and np.allclose(ctf.amplitude_contrast, 0.1)
    # the table's own pixel size (1.34 Å) is not used
    assert np.allclose(ctf.pixel_size, stack.pixel_size)
    assert measured_snr(stack) == pytest.approx(0.1, rel=0.03)  # measured 0.0998
    assert stack.info["map_pixel_size"] == 5.0 and stack.info["volume"].endswith(MAP_70S.split("/")[-1])


def test_micrograph_noise(tmp_path, module_client, shared_data):
    common = dict(n=64, snr=0.5, box=33, seed=1, client=module_client)
    coloured = simulate("phantom", tmp_path / "c.zarr", noise=f"micrograph:{shared_data / MICROGRAPH}", **common)
    whitened = simulate("phantom", tmp_path / "w.zarr", noise=f"micrograph:{shared_data / MICROGRAPH}:whiten", **common)
    for stack in (coloured, whitened):
        # patches have unit variance each and the pilot is every particle: measured 0.5000000
        assert measured_snr(stack) == pytest.approx(0.5, rel=0.01)
    assert coloured.info["noise"]["model"] == "micrograph" and whitened.info["noise"]["whiten"]
    coloured_noise = coloured.images[:] - coloured.group["truth/clean_ctf"][:]
    whitened_noise = whitened.images[:] - whitened.group["truth/clean_ctf"][:]
    # measured spreads (64 patches of 33 px): coloured 6.6, whitened 1.17
    assert radial_spread(coloured_noise) > 4
    assert radial_spread(whitened_noise) < 1.4
    # same seed, same particles: only the noise differs
    np.testing.assert_array_equal(coloured.group["truth/clean_ctf"][:], whitened.group["truth/clean_ctf"][:])


def test_without_ctf(tmp_path, module_client):
    stack = simulate("phantom", tmp_path / "plain.zarr", n=20, snr=2.0, box=33, with_ctf=False, client=module_client)
    assert not stack.has_ctf and "--no-ctf" in stack.info["ctf_missing_reason"] and stack.info["ctf_source"] is None
    np.testing.assert_array_equal(stack.group["truth/clean_ctf"][:], stack.group["truth/clean"][:])
    np.testing.assert_allclose(
        stack.group["truth/clean"][:], project(phantom_volume(33), stack.group["truth/rotations"][:])
    )
    assert measured_snr(stack) == pytest.approx(2.0, rel=0.03)


# ------------------------------------------------------------------- CLI
def test_cli_simulate_and_rerun(tmp_path, scheduler_address):
    out = tmp_path / "cli.zarr"
    args = ["simulate", "--volume", "phantom", "--n", "24", "--snr", "1", "--box", "33", "--max-shift", "2"]
    args += ["--out", str(out), "--scheduler", scheduler_address]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and ParticleStack.open(out).info["complete"]
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    changed = CliRunner().invoke(main, [*args[:-4], "--seed", "9", *args[-4:]])
    assert changed.exit_code == 2 and "--overwrite" in changed.output


def _invoke_error(tmp_path, scheduler_address, *options: str) -> str:
    out = tmp_path / "bad.zarr"
    result = CliRunner().invoke(
        main, ["simulate", "--n", "8", "--out", str(out), "--scheduler", scheduler_address, *options]
    )
    assert result.exit_code == 2, result.output
    assert not out.exists()  # nothing half-made is left behind
    return result.output


def test_cli_bad_inputs(tmp_path, scheduler_address, shared_data):
    non_cubic = tmp_path / "flat.mrc"
    with mrcfile.new(non_cubic) as mrc:
        mrc.set_data(np.zeros((10, 12, 12), dtype=np.float32))
        mrc.voxel_size = 2.0
    bad_table = tmp_path / "ctf.npy"
    np.save(bad_table, np.zeros((5, 7), dtype=np.float32))
    cases = {
        ("--volume", str(tmp_path / "missing.mrc"), "--snr", "1"): "no such map file",
        ("--volume", str(non_cubic), "--snr", "1"): "cubic",
        ("--volume", "phantom", "--snr", "1", "--ctf-table", str(bad_table)): "expected [N, 9]",
        ("--volume", "phantom", "--snr", "1", "--noise", "pink"): "unknown noise model",
        ("--volume", "phantom", "--snr", "0"): "Invalid value for '--snr'",
        ("--volume", str(shared_data / MAP_70S), "--snr", "1"): "--pixel-size",
        ("--volume", "phantom", "--snr", "1", "--no-ctf", "--defocus-range", "1e4", "2e4"): "--no-ctf",
    }
    for options, message in cases.items():
        output = _invoke_error(tmp_path, scheduler_address, *options)
        assert message in output, (options, output)
        if "Invalid value" not in message:  # click's own usage errors are not ours
            errors = [line for line in output.splitlines() if line.startswith("cryoden: error:")]
            assert len(errors) == 1 and output.endswith(errors[0] + "\n")  # one line, no traceback


def test_api_bad_inputs(tmp_path, module_client, shared_data):
    out = tmp_path / "x.zarr"
    with pytest.raises(ParameterError, match="--box"):
        simulate(shared_data / MAP_70S, out, n=4, snr=1, pixel_size=5, box=80, client=module_client)
    with pytest.raises(ParameterError, match="--snr"):
        simulate("phantom", out, n=4, snr=-1, client=module_client)
    with pytest.raises(ParameterError, match="--max-shift"):
        simulate("phantom", out, n=4, snr=1, box=33, max_shift=20, client=module_client)
    with pytest.raises(ParameterError, match="--box 8"):
        simulate("phantom", out, n=4, snr=1, box=8, client=module_client)
    with pytest.raises(ParameterError, match="--defocus-range"):
        simulate("phantom", out, n=4, snr=1, defocus_range=(2e4, 1e4), client=module_client)
    bad_rows = tmp_path / "neg.npy"
    table = np.load(shared_data / CTF_TABLE)[:10].copy()
    table[3, 2] = -5
    np.save(bad_rows, table)
    with pytest.raises(InputError, match="row 3: DefocusU"):
        simulate("phantom", out, n=4, snr=1, ctf_table=bad_rows, client=module_client)
    assert not out.exists()


# ------------------------------------------------------------- datasets
def test_registry_checksum_matches_the_shared_map(shared_data):
    entry = MAPS["ribosome70s_65"]
    assert sha256sum(shared_data / MAP_70S) == entry.sha256
    sums = dict(line.split()[::-1] for line in (shared_data / "SHA256SUMS").read_text().splitlines() if line)
    assert sums[f"./{MAP_70S}"] == entry.sha256
    assert "64ad0dd6" in entry.url and entry.url.endswith("clean70SRibosome_vol_65p.mrc")


def test_load_volume_resolves_phantom_and_paths(shared_data, tmp_path):
    phantom = load_volume("phantom")
    assert phantom.data.shape == (65, 65, 65) and phantom.pixel_size == 5.0 and phantom.source == "phantom"
    assert load_volume("phantom", box=33).data.shape == (33, 33, 33)
    ribosome = load_volume(shared_data / MAP_70S)
    assert ribosome.data.shape == (65, 65, 65) and ribosome.pixel_size is None  # header says 0
    with pytest.raises(InputError, match="no such map file"):
        load_volume(tmp_path / "nope.mrc")


def test_balanced_chunks_split_the_work_evenly():
    from cryoden_dist.sim.simulate import balanced_chunk
    from cryoden_dist.stack import default_chunk

    assert default_chunk(65, 10_000) == 1985  # 5 full chunks and one of 75 ...
    assert balanced_chunk(10_000, 65, workers=2) == 1667  # ... become 6 equal ones, 3 per worker
    for n, workers in [(10_000, 3), (150, 2), (7, 4), (1, 2)]:
        chunk = balanced_chunk(n, 65, workers)
        n_chunks = -(-n // chunk)
        assert chunk <= default_chunk(65, n) and (n_chunks % workers == 0 or n_chunks == n)
