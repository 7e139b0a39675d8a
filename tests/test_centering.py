"""Particle centering: sCM (rotational averaging), centre of mass and geometric median.

The particles are sums of Gaussian blobs (a body and smaller lobes, like a
projection of a protein) built with their centre of mass at a known point,
so every error below is measured against that truth.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from click.testing import CliRunner

from cryoden_dist.centering import (
    center,
    center_of_mass,
    centered_path,
    geometric_median,
    positive_contrast,
    scm_centers,
    scm_landscape,
    stack_polarity,
)
from cryoden_dist.cli import main
from cryoden_dist.denoise import denoise
from cryoden_dist.errors import InputError, ParameterError
from cryoden_dist.evaluate import evaluate
from cryoden_dist.image import centered_coordinates, disk_mask, fourier_shift
from cryoden_dist.sim.simulate import simulate
from cryoden_dist.stack import ParticleStack

BOX = 65
RADIUS = 24
SEARCH = 8

# Measured on seed 7 below (n = 200, SNR 1/10, shifts uniform in +-6 px): sCM
# mean error 0.95 px (its noiseless bias against the centre of mass is 0.31 px
# of that), centre of mass 3.44 px, geometric median 2.45 px. The bounds keep
# about 30% margin.
SCM_MEAN_ERROR_BOUND = 1.25


def particles(rng, n, box, centres=None, body=6.4, lobes=8.0, lobe_width=(2.0, 4.0)) -> np.ndarray:
    """Asymmetric blob particles whose centre of mass is at ``centres`` (x, y) px from the box centre."""
    y, x = centered_coordinates(box)
    k = 5
    amp = np.concatenate([np.ones((n, 1)), rng.uniform(0.3, 0.8, (n, k - 1))], axis=1)
    width = np.concatenate([np.full((n, 1), body), rng.uniform(*lobe_width, (n, k - 1))], axis=1)
    pos = np.concatenate([np.zeros((n, 1, 2)), rng.uniform(-lobes, lobes, (n, k - 1, 2))], axis=1)
    mass = amp * width**2  # mass of a 2-D Gaussian blob, up to 2 pi
    pos -= (mass[:, :, None] * pos).sum(axis=1, keepdims=True) / mass.sum(axis=1)[:, None, None]
    if centres is not None:
        pos += centres[:, None, :]
    d2 = (x - pos[..., 0, None, None]) ** 2 + (y - pos[..., 1, None, None]) ** 2
    return (amp[..., None, None] * np.exp(-d2 / (2 * width[..., None, None] ** 2))).sum(axis=1)


def add_noise(rng, clean, snr) -> np.ndarray:
    """White noise at ``snr`` = variance of the clean images in the disk / noise variance."""
    signal = clean[:, disk_mask(clean.shape[-1])].var(axis=-1).mean()
    return (clean + rng.standard_normal(clean.shape) * np.sqrt(signal / snr)).astype(np.float32)


def error(estimate, truth) -> np.ndarray:
    return np.hypot(*(np.asarray(estimate) - truth).T)


@pytest.fixture(scope="module")
def noisy_set():
    rng = np.random.default_rng(7)
    n = 200
    truth = rng.uniform(-6, 6, (n, 2))
    return add_noise(rng, particles(rng, n, BOX, truth), snr=0.1), truth


# ------------------------------------------------------------- exact cases
@pytest.mark.parametrize("shift", [(3.0, -2.0), (2.3, -4.6), (-5.7, 3.1), (0.5, 0.25)])
def test_known_shift_of_noiseless_asymmetric_particles_is_recovered(shift):
    rng = np.random.default_rng(1)
    # compact particles, well inside the disk, so the CM and GM masks cut nothing
    clean = particles(rng, 6, BOX, body=4.0, lobes=5.0, lobe_width=(1.5, 2.5))
    shifts = np.tile(shift, (len(clean), 1))
    moved = fourier_shift(clean, shifts)
    integer = float(np.max(np.abs(np.subtract(shift, np.round(shift))))) == 0.0

    # measured worst errors: sCM 2e-5 px (integer shifts) and 0.010 px (sub-pixel); centre of mass 5e-6 px.
    # sCM finds a geometric-median-like centre, not the centre of mass of an
    # asymmetric particle; what must hold is that it moves with the particle.
    scm_moved = scm_centers(moved, 28, 8) - scm_centers(clean, 28, 8)
    np.testing.assert_allclose(scm_moved, shifts, atol=0.05 if not integer else 1e-3)
    if integer:
        np.testing.assert_array_equal(
            scm_centers(moved, 28, 8, subpixel=False) - scm_centers(clean, 28, 8, subpixel=False), shifts
        )
        # The weighted geometric median of pixel positions snaps towards pixel
        # centres (0.35 px off for these sharp lobes at sub-pixel shifts), so
        # it is exact only for whole-pixel shifts.
        gm_moved = geometric_median(moved, 28) - geometric_median(clean, 28)
        np.testing.assert_allclose(gm_moved, shifts, atol=1e-3)
    # the particles are built with their centre of mass at the shift
    np.testing.assert_allclose(center_of_mass(moved, 28), shifts, atol=1e-3)


def test_symmetric_particle_centre_and_shift_convention():
    y, x = centered_coordinates(BOX)
    blob = np.exp(-(x * x + y * y) / (2 * 5.0**2))[None]
    landscape = scm_landscape(blob[0], RADIUS, SEARCH)
    assert landscape.shape == (2 * SEARCH + 1, 2 * SEARCH + 1)
    assert np.unravel_index(landscape.argmin(), landscape.shape) == (SEARCH, SEARCH)

    # (x, y) = where the particle is; x is the last axis
    truth = np.array([[4.3, -2.6]])
    moved = fourier_shift(blob, truth)
    assert moved[0, BOX // 2 - 3, BOX // 2 + 4] > moved[0, BOX // 2 + 3, BOX // 2 - 4]
    for method in (scm_centers, center_of_mass, geometric_median):
        np.testing.assert_allclose(method(moved, RADIUS), truth, atol=0.02, err_msg=method.__name__)
    found = scm_centers(moved, RADIUS, SEARCH)
    np.testing.assert_allclose(fourier_shift(moved, -found), blob, atol=2e-3)


def test_contrast_and_batching_do_not_change_centres():
    rng = np.random.default_rng(3)
    truth = rng.uniform(-4, 4, (20, 2))
    images = add_noise(rng, particles(rng, 20, BOX, truth), snr=1.0)
    dark = 5.0 - 2.0 * images  # dark particles on a grey background
    bright = scm_centers(images, RADIUS, SEARCH)
    np.testing.assert_allclose(scm_centers(dark, RADIUS, SEARCH), bright, atol=1e-3)
    np.testing.assert_allclose(scm_centers(dark, RADIUS, SEARCH, polarity=-1), bright, atol=1e-3)
    np.testing.assert_allclose(scm_centers(images, RADIUS, SEARCH, batch=7), bright, atol=1e-4)  # float32 sums
    np.testing.assert_allclose(center_of_mass(dark, RADIUS), center_of_mass(images, RADIUS), atol=1e-4)
    assert stack_polarity(dark, RADIUS) == -1.0 and stack_polarity(images, RADIUS) == 1.0
    prepared = positive_contrast(dark, RADIUS)
    assert prepared[:, disk_mask(BOX, 10)].mean() > 0 > prepared[:, ~disk_mask(BOX)].mean() - 1e-3


# ------------------------------------------------------------------- noise
def test_scm_error_at_snr_one_tenth_is_below_measured_bound(noisy_set):
    images, truth = noisy_set
    scm_error = error(scm_centers(images, RADIUS, SEARCH), truth).mean()
    assert scm_error < SCM_MEAN_ERROR_BOUND


def test_scm_beats_centre_of_mass_and_geometric_median(noisy_set):
    images, truth = noisy_set
    scm_error = error(scm_centers(images, RADIUS, SEARCH), truth).mean()
    cm_error = error(center_of_mass(images, RADIUS), truth).mean()
    gm_error = error(geometric_median(images, RADIUS), truth).mean()
    # measured: 0.95 vs 3.44 (CM) and 2.45 (GM) px
    assert scm_error < 0.5 * cm_error
    assert scm_error < 0.6 * gm_error


# ------------------------------------------------------------------- stage
def _digest(array) -> str:
    return hashlib.sha256(np.ascontiguousarray(array[:]).tobytes()).hexdigest()


@pytest.fixture()
def shifted_stack(tmp_path):
    rng = np.random.default_rng(11)
    n, box = 60, 48
    truth = rng.uniform(-5, 5, (n, 2))
    clean = particles(rng, n, box, truth, body=4.5, lobes=6.0)
    images = 3.0 - add_noise(rng, clean, snr=0.5)  # dark particles on an offset background
    stack = ParticleStack.create(tmp_path / "s.zarr", n=n, box=box, pixel_size=2.5, chunk=20, with_ctf=False)
    stack.images[:] = images
    stack.group.create_array("metadata/rlnCoordinateX", shape=(n,), chunks=(n,), dtype="float64")[:] = (
        np.arange(n) * 7.0
    )
    return stack.path, truth


def test_center_stage_writes_shifts_and_recentred_images(shifted_stack, client):
    path, truth = shifted_stack
    before = _digest(ParticleStack.open(path).images)
    stack = center(path, radius=16, search=6, apply=True, client=client)

    shifts = stack.group["centering/shifts_px"][:]
    assert shifts.dtype == np.float64 and shifts.shape == (60, 2)
    # measured mean error 0.44 px at SNR 1/2 (box 48); the centre of mass errs by 1.98 px
    assert error(shifts, truth).mean() < 0.65
    np.testing.assert_allclose(stack.group["centering/shifts_A"][:], shifts * 2.5)
    recentred = stack.group["centering/images"]
    assert recentred.dtype == np.float32 and recentred.chunks == stack.images.chunks
    offset_in = np.hypot(*center_of_mass(stack.images[:], 16).T).mean()
    offset_out = np.hypot(*center_of_mass(recentred[:], 16).T).mean()
    assert offset_out < 0.25 * offset_in  # measured 0.14 px after, 2.14 px before
    assert _digest(stack.images) == before
    params = {"method": "scm", "radius": 16.0, "search": 6, "apply": True}
    record = stack.info["stages"]["center"]
    assert record["complete"] and record["params"] == params
    assert stack.group["centering"].attrs["polarity"] == -1.0

    # the re-centred particles are a stack of their own, for every command that opens one
    centred = ParticleStack.open(centered_path(path))
    assert (centred.kind, centred.n, centred.box, centred.pixel_size, centred.chunk) == ("centered", 60, 48, 2.5, 20)
    assert centred.info["images_centered"] and centred.info["complete"]
    assert centred.info["centering"]["params"] == params and centred.info["derived_from"] == str(path)
    np.testing.assert_array_equal(centred.images[:], recentred[:])
    np.testing.assert_array_equal(centred.group["shifts_px"][:], shifts)
    np.testing.assert_array_equal(centred.group["metadata/rlnCoordinateX"][:], np.arange(60) * 7.0)

    # same parameters, complete: nothing is recomputed
    center(path, radius=16, search=6, apply=True, client=client)
    assert ParticleStack.open(path).info["stages"]["center"]["runs"] == 1

    # an interrupted run (no stage record, one chunk flag unset, the centred stack unfinished) resumes that chunk only
    stages = stack.info["stages"]
    del stages["center"]
    stack.update_info(stages=stages)
    stack.group["_done/center"][1] = 0
    stack.group["centering/shifts_px"][20:40] = np.nan
    unfinished = ParticleStack.open(centered_path(path), mode="r+")
    unfinished.images[20:40] = 0.0
    unfinished.update_info(complete=False)
    stack = center(path, radius=16, search=6, apply=True, client=client)
    np.testing.assert_allclose(stack.group["centering/shifts_px"][:], shifts)
    np.testing.assert_array_equal(ParticleStack.open(centered_path(path)).images[:], recentred[:])
    assert stack.info["stages"]["center"]["chunks_computed_last_run"] == 1
    assert ParticleStack.open(centered_path(path)).info["complete"]

    # other parameters replace the results instead of mixing with them; without apply there are
    # no images, so the group holds the shifts only and is not a stack
    stack = center(path, radius=16, method="cm", client=client)
    assert "images" not in stack.group["centering"]
    assert stack.info["stages"]["center"]["params"]["method"] == "cm"
    np.testing.assert_allclose(stack.group["centering/shifts_px"][:], center_of_mass(stack.images[:], 16, -1.0))
    with pytest.raises(InputError, match="not a cryoden stack"):
        ParticleStack.open(centered_path(path))
    assert _digest(stack.images) == before


def test_methods_run_unchanged_on_the_recentred_stack(shifted_stack, tmp_path, client):
    path, _ = shifted_stack
    stack = center(path, radius=16, search=6, apply=True, client=client)
    shifts = stack.group["centering/shifts_px"][:]
    # denoise kernels reopen their source by path: here the nested store
    centred = denoise(centered_path(path), tmp_path / "c.zarr", method="lowpass", client=client)
    plain = denoise(path, tmp_path / "p.zarr", method="lowpass", client=client)
    assert centred.info["derived_from"] == str(centered_path(path))
    # a radial filter commutes with a Fourier shift: filtering the re-centred images equals
    # re-centring the filtered ones (measured max difference 1.7e-6 on images up to 3.9)
    np.testing.assert_allclose(centred.images[:], fourier_shift(plain.images[:], -shifts), atol=1e-5)


def test_center_stage_refuses_bad_input(shifted_stack, tmp_path):
    path, _ = shifted_stack
    with pytest.raises(ParameterError, match=r"--radius 30.*box of 48"):
        center(path, radius=30, client=None)
    with pytest.raises(ParameterError, match=r"--search 10.*<= 24.*--search 8 or less"):
        center(path, radius=16, search=10, client=None)
    with pytest.raises(ParameterError, match="--method"):
        center(path, radius=16, method="median", client=None)
    with pytest.raises(InputError, match="no such stack"):
        center(tmp_path / "missing.zarr", radius=16, client=None)

    empty = ParticleStack.create(tmp_path / "empty.zarr", n=1, box=48, pixel_size=1.0, with_ctf=False)
    del empty.group["images"]
    empty.group.create_array("images", shape=(0, 48, 48), chunks=(1, 48, 48), dtype="float32")
    empty.update_info(n=0)
    with pytest.raises(InputError, match="no particles"):
        center(empty.path, radius=16, client=None)
    assert "centering" not in ParticleStack.open(path).group


# ------------------------------------------------------------ denoise --center
def _scratch_stack(path, images: np.ndarray, pixel_size: float, clean: np.ndarray | None = None) -> ParticleStack:
    """A finished stack of ``images`` (and ``truth/clean``), to score with :func:`evaluate`."""
    n, box, _ = images.shape
    stack = ParticleStack.create(path, n=n, box=box, pixel_size=pixel_size, with_ctf=False)
    stack.images[:] = images
    if clean is not None:
        stack.group.create_array("truth/clean", shape=clean.shape, dtype="float32")[:] = clean
    stack.update_info(complete=True)
    return stack


def test_denoise_with_center_on_a_shifted_simulation(tmp_path, client, scheduler_address):
    sim = simulate("phantom", tmp_path / "sim.zarr", n=120, snr=1.0, max_shift=4, seed=3, client=client)
    scheduler = ["--scheduler", scheduler_address]
    plain = CliRunner().invoke(main, ["denoise", str(sim.path), "--out", str(tmp_path / "plain.zarr"), *scheduler])
    assert plain.exit_code == 0, plain.output
    out = tmp_path / "centred.zarr"
    args = ["denoise", str(sim.path), "--center", "24", "--out", str(out), *scheduler]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "centred 120 particles" in result.output and f"from {centered_path(sim.path)}" in result.output
    denoised = ParticleStack.open(out)
    assert denoised.info["derived_from"] == str(centered_path(sim.path)) and denoised.info["images_centered"]

    # What is measured, and why not "rel_mse against truth/clean": the clean images are the
    # projections shifted by truth/shifts, so a centred estimate is compared either after
    # shifting it back, or with centred clean images. And a reference-free centre of an
    # asymmetric particle is a property of its projection (sCM: a smoothed geometric median),
    # not of the volume's centre: on this phantom sCM's centre of the *noiseless* projections
    # lies 2.42 px (mean, measured) from the projected volume centre, varying with the view.
    truth, clean = sim.group["truth/shifts"][:], sim.group["truth/clean"][:]
    shifts = sim.group["centering/shifts_px"][:]
    noiseless = scm_centers(clean, 24, 8, polarity=sim.group["centering"].attrs["polarity"])
    # 1. the noise moves the centres little: measured 0.70 px from the noiseless sCM centres
    #    (SNR 1 with CTF); against truth/shifts 2.83 px, of which the 2.42 px above is the method's
    #    definition of the centre (the shifts themselves are 2.60 px on average)
    assert error(shifts, noiseless).mean() < 0.95
    assert error(shifts, truth).mean() < error(noiseless, truth).mean() + 0.6

    # 2. the output is in the centred frame: against the clean projections centred by sCM without
    #    noise, rel_mse 0.030 with --center and 0.22 without (measured). (Against the clean images
    #    centred on the volume's centre: 0.17 with, 0.15 without; that would score the 2.42 px
    #    between this phantom's sCM centre and its volume centre, not the centring.)
    reference = _scratch_stack(tmp_path / "ref.zarr", clean, sim.pixel_size, fourier_shift(clean, -noiseless))
    centred_score = evaluate(out, reference.path, client=client)["rel_mse"]
    plain_score = evaluate(tmp_path / "plain.zarr", reference.path, client=client)["rel_mse"]
    assert centred_score < 0.25 * plain_score

    # 3. centring costs the denoiser nothing: shifted back by the estimated shifts, the output scores
    #    against truth/clean as the plain run does (Wiener filtering commutes with shifts; measured
    #    rel_mse 0.020653 both, the spectra estimated on the centred stack differ slightly)
    back = _scratch_stack(tmp_path / "back.zarr", fourier_shift(denoised.images[:], shifts), sim.pixel_size)
    back_score = evaluate(back.path, sim.path, client=client)["rel_mse"]
    assert back_score < 1.01 * evaluate(tmp_path / "plain.zarr", sim.path, client=client)["rel_mse"]

    # rerun: complete, nothing recomputed; another centring does not pass the old output off as its own
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and ParticleStack.open(sim.path).info["stages"]["center"]["runs"] == 1
    other = CliRunner().invoke(main, [*args[:3], "20", *args[4:]])
    assert other.exit_code == 2 and "made from another centring" in other.output
    inside = CliRunner().invoke(main, [*args[:5], str(sim.path / "denoised.zarr"), *scheduler])
    assert inside.exit_code == 2 and "lie inside the input" in inside.output
    assert not (sim.path / "denoised.zarr").exists()
