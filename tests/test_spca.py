"""Steerable PCA: coefficient noise, Marchenko-Pastur thresholds, mergeable statistics, steerability, and the
``spca-wiener`` denoiser against the ``wiener`` baseline on phantom simulations with and without CTF."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
from _synthetic import make_simulation
from click.testing import CliRunner

from cryoden_dist.basis import FBBasis, dense_basis_matrix
from cryoden_dist.basis.spca import (
    SPCAStatistics,
    fit_spca,
    noise_covariance,
    project_stack,
    shrinkage_weights,
    spca_statistics,
    stack_statistics,
)
from cryoden_dist.cli import main
from cryoden_dist.ctf import ctf_images, phase_flip
from cryoden_dist.denoise import wiener_filter, wiener_model
from cryoden_dist.evaluate import evaluate
from cryoden_dist.image import radial_index
from cryoden_dist.metrics import relative_mse
from cryoden_dist.sim.simulate import simulate
from cryoden_dist.stack import ParticleStack

BOX = 33
NOISE_VARIANCE = 4.0


@pytest.fixture(scope="module")
def module_client(dask_cluster):
    from distributed import Client

    with Client(dask_cluster) as c:
        yield c


@pytest.fixture(scope="module")
def basis() -> FBBasis:
    return FBBasis(BOX, radius=BOX // 2 - 1)


@pytest.fixture(scope="module")
def noise_fit(basis):
    """Pure white noise: coefficients, statistics, exact noise covariance and the fitted sPCA."""
    rng = np.random.default_rng(0)
    images = rng.normal(0.0, np.sqrt(NOISE_VARIANCE), (2000, BOX, BOX))
    coeffs = basis.expand(images)
    stats = spca_statistics(coeffs, basis)
    exact = noise_covariance(basis)
    return coeffs, stats, exact, fit_spca(stats, basis, NOISE_VARIANCE, noise_cov=exact)


def test_coefficient_noise_is_sigma2_for_k0_and_2sigma2_for_k_positive(basis, noise_fit):
    _, stats, exact, _ = noise_fit
    n = stats.count
    for k in range(basis.k_max + 1):
        level = 1.0 if k == 0 else 2.0  # the sqrt(2) convention: Re and Im parts carry sigma^2 each
        empirical = stats.second_moments[k].real / n / NOISE_VARIANCE
        q = empirical.shape[0]
        # measured: mean diagonal within 1.5 % of the level (sampling error ~ sqrt(2 / (n q)))
        assert np.mean(np.diag(empirical)) == pytest.approx(level, rel=0.03 + 4 / np.sqrt(n * q))
        # the exact covariance [(A^T A)^{-1}]_kk: measured eigenvalues in [0.96, 1.0] * level
        values = np.linalg.eigvalsh(exact[k]) / level
        assert values.min() > 0.94 and values.max() < 1.01
        # the empirical covariance agrees with it up to sampling error (Frobenius ~ sqrt(q / n_k))
        samples = n if k == 0 else 2 * n
        error = np.linalg.norm(empirical - exact[k]) / np.linalg.norm(exact[k])
        assert error < 1.5 * np.sqrt(q / samples) + 0.02


def test_gram_spread_is_across_frequencies_not_within_blocks(basis, noise_fit):
    """The sampled basis' Gram eigenvalues spread by ~+-15 %, but within a frequency block only by ~2 %."""
    matrix = dense_basis_matrix(basis)
    gram_values = np.linalg.eigvalsh(matrix.T @ matrix)
    assert gram_values.min() < 0.92 and gram_values.max() > 1.08  # measured [0.89, 1.15] at L = 33
    _, _, exact, _ = noise_fit
    spread = [np.ptp(np.linalg.eigvalsh(block)) / np.diag(block).mean() for block in exact]
    assert max(spread) < 0.04  # measured 0.021


def _top_eigenvalue_over_edge(model, n: int, samples_per_image: int) -> float:
    """Median over blocks (q >= 5, k > 0) of the top eigenvalue over the edge for ``samples_per_image * n`` samples."""
    ratios = [
        values[0] / (model.noise_levels[k] * (1 + np.sqrt(values.size / (samples_per_image * n))) ** 2)
        for k, values in enumerate(model.eigenvalues)
        if k > 0 and values.size >= 5
    ]
    return float(np.median(ratios))


def test_marchenko_pastur_edges_on_pure_noise(noise_fit):
    _, stats, _, model = noise_fit
    n = stats.count
    for k, values in enumerate(model.eigenvalues):
        if values.size < 5:
            continue
        # measured: top eigenvalue / edge 0.93-1.02 (Tracy-Widom fluctuations around the edge)
        assert 0.88 < values[0] / model.thresholds[k] < 1.06
        lower = model.noise_levels[k] * (1 - np.sqrt(values.size / (n if k == 0 else 2 * n))) ** 2
        assert values[-1] / lower == pytest.approx(1.0, abs=0.1)  # measured 0.99-1.05
    # measured median 0.985
    assert 0.95 < _top_eigenvalue_over_edge(model, n, 2) < 1.02


def test_k_positive_blocks_have_2n_real_samples(basis, noise_fit):
    """With few images the edge depends visibly on the sample count: 2 n matches, n does not."""
    coeffs, _, exact, _ = noise_fit
    n = 300
    model = fit_spca(spca_statistics(coeffs[:n], basis), basis, NOISE_VARIANCE, noise_cov=exact)
    right, wrong = _top_eigenvalue_over_edge(model, n, 2), _top_eigenvalue_over_edge(model, n, 1)
    # measured over three seeds: 2 n gives 0.94-0.98, n gives 0.87-0.90 (an edge 8 % too high)
    assert 0.92 < right < 1.02
    assert wrong < right - 0.05


def test_noise_only_keeps_almost_nothing(basis, noise_fit):
    coeffs, _, _, model = noise_fit
    assert model.count <= 0.02 * basis.count  # measured: 2 of 231 dimensions, with weights 0.04
    assert all(np.all(model.weights_at(k) < 0.2) for k in range(model.k_max + 1))
    mean = np.zeros(basis.count)
    mean[basis.coefficients_at(0)] = model.mean
    denoised = model.denoise(coeffs)
    # measured 5e-5: everything is shrunk to the mean, which is the noise mean ~ sigma / sqrt(n)
    assert np.sum(np.abs(denoised - mean) ** 2) < 1e-3 * np.sum(np.abs(coeffs) ** 2)
    assert np.linalg.norm(model.mean) < 4 * np.sqrt(NOISE_VARIANCE * model.mean.size / len(coeffs))


def test_shrinkers():
    gamma = 0.04
    edge = (1 + np.sqrt(gamma)) ** 2
    x = np.linspace(0.5, 50, 2000)
    for shrinker in ("frobenius", "operator", "naive"):
        w = shrinkage_weights(x, gamma, shrinker)
        assert np.all(w[x <= edge] == 0) and np.all((w >= 0) & (w < 1))
        assert np.all(np.diff(w[x > edge]) > 0) and w[-1] > 0.9
    # Frobenius weights vanish continuously at the edge, the others do not
    assert shrinkage_weights(edge * (1 + 1e-9), gamma, "frobenius") < 1e-3
    assert shrinkage_weights(edge * (1 + 1e-9), gamma, "operator") > 0.1
    # operator: the population eigenvalue l maps back to the sample eigenvalue l + gamma l / (l - 1)
    w = shrinkage_weights(x, gamma, "operator")
    population = 1 / (1 - w[x > edge])
    np.testing.assert_allclose(population + gamma * population / (population - 1), x[x > edge], rtol=1e-9)


def test_statistics_of_three_chunks_merge_to_the_whole_stack(module_client, tmp_path):
    stack = make_simulation(tmp_path / "sim.zarr", n=96, box=BOX, chunk=32, snr=0.5, seed=3)
    assert stack.n_chunks == 3
    fb = FBBasis(BOX, radius=BOX // 2 - 1, dtype=np.float32)
    merged, noise_variance = stack_statistics(stack, module_client, fb, radius=15.0, flip=True)
    flipped = phase_flip(stack.images[:], ctf_images(stack.ctf_params(), BOX))
    whole = spca_statistics(fb.expand(flipped), fb)
    assert merged.count == whole.count == 96
    assert noise_variance == pytest.approx(stack.info["noise_variance"], rel=0.1)
    np.testing.assert_allclose(merged.mean_sum, whole.mean_sum, rtol=1e-5, atol=1e-6)
    for a, b in zip(merged.second_moments, whole.second_moments, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
        np.testing.assert_allclose(a, a.conj().T)  # Hermitian
    # the reduced coefficients of the whole stack, chunk by chunk on the cluster
    model = fit_spca(merged, fb, noise_variance)
    reduced = project_stack(stack, module_client, fb, model, flip=True)
    expected = model.project(fb.expand(flipped))
    assert reduced.shape == (96, model.count) and model.count > 0
    np.testing.assert_allclose(reduced, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    restored = SPCAStatistics.from_arrays(merged.to_arrays())
    for a, b in zip(restored.second_moments, merged.second_moments, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def phantom_fit(module_client, tmp_path_factory):
    """sPCA of a phantom simulation without CTF (SNR 1, box 33)."""
    path = tmp_path_factory.mktemp("phantom") / "sim.zarr"
    stack = simulate("phantom", path, n=400, snr=1.0, box=BOX, with_ctf=False, seed=5, client=module_client)
    fb = FBBasis(BOX, radius=BOX // 2 - 1)
    images = stack.images[:].astype(np.float64)
    model = fit_spca(spca_statistics(fb.expand(images), fb), fb, stack.info["noise_variance"])
    return fb, model, images, stack.group["truth/clean"][:].astype(np.float64)


def test_projection_is_steerable_and_reflection_conjugates(phantom_fit):
    fb, model, images, _ = phantom_fit
    assert 10 < model.count < 100  # the phantom's signal: measured 26 components
    b = model.project(fb.expand(images[:20]))
    k = model.angular_frequency
    # np.rot90 turns the content by alpha = -pi/2, so b_k -> b_k exp(-i k alpha) = b_k i^k
    turned = model.project(fb.expand(np.rot90(images[:20], axes=(1, 2))))
    np.testing.assert_allclose(turned, b * np.exp(1j * k * np.pi / 2), atol=1e-9 * np.abs(b).max())
    mirrored = model.project(fb.expand(images[:20, ::-1, :]))  # np.flipud: y -> -y
    np.testing.assert_allclose(mirrored, b.conj(), atol=1e-9 * np.abs(b).max())
    # the reduced coefficients reconstruct the denoised coefficients
    coeffs = fb.expand(images[:20])
    np.testing.assert_allclose(model.reconstruct(b), model.denoise(coeffs), atol=1e-9 * np.abs(coeffs).max())


def test_spca_denoising_recovers_the_clean_phantom(phantom_fit):
    fb, model, images, clean = phantom_fit
    denoised = fb.evaluate(model.denoise(fb.expand(images)))
    # measured: raw 1.11, denoised 0.026
    assert relative_mse(images, clean) > 0.8
    assert relative_mse(denoised, clean) < 0.05


def test_error_spectrum_predicts_the_error(phantom_fit):
    """The residual spectrum that sets the |H| deconvolution matches the measured error (in the basis' span)."""
    fb, model, images, clean = phantom_fit
    error = fb.evaluate(model.denoise(fb.expand(images))) - fb.evaluate(fb.expand(clean))
    shells = radial_index(fb.box).ravel()
    points = np.bincount(shells)
    measured = np.bincount(shells, weights=np.mean(np.abs(np.fft.fft2(error)) ** 2, axis=0).ravel()) / points
    predicted = model.error_spectrum(fb)
    # measured: total 1.17 x the prediction (the prediction ignores the signal below the edge); shells 1-6 agree
    # within 40 %, and the prediction falls off with the measured error
    assert 0.9 < np.sum(measured * points) / np.sum(predicted * points) < 1.5
    np.testing.assert_allclose(predicted[1:7], measured[1:7], rtol=0.5)
    assert predicted[1:7].min() > 10 * predicted[11:16].max()


# ------------------------------------------------------------------------------------- the denoise command
def _simulation(tmp_path_factory, client, name: str, with_ctf: bool) -> ParticleStack:
    kwargs = {"defocus_range": (10_000.0, 30_000.0)} if with_ctf else {"with_ctf": False}
    path = tmp_path_factory.mktemp(name) / "sim.zarr"
    return simulate("phantom", path, n=600, snr=0.1, box=49, seed=0, client=client, **kwargs)


def _denoise_cli(stack: ParticleStack, method: str, out, scheduler_address: str, *params: str):
    args = ["denoise", str(stack.path), "--method", method, "--out", str(out), "--scheduler", scheduler_address]
    for param in params:
        args += ["--param", param]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return ParticleStack.open(out)


def test_spca_wiener_beats_wiener_with_ctf(module_client, scheduler_address, tmp_path_factory):
    sim = _simulation(tmp_path_factory, module_client, "ctf", with_ctf=True)
    out = tmp_path_factory.mktemp("out")
    cwf = _denoise_cli(sim, "spca-wiener", out / "cwf.zarr", scheduler_address)
    flip = _denoise_cli(sim, "spca-wiener", out / "flip.zarr", scheduler_address, "ctf_model=flip")
    wiener = _denoise_cli(sim, "wiener", out / "wiener.zarr", scheduler_address)
    errors = {
        name: evaluate(s.path, sim.path, client=module_client)["rel_mse"]
        for name, s in (("raw", sim), ("cwf", cwf), ("flip", flip), ("wiener", wiener))
    }
    # measured on this seed: raw 1.34, wiener 0.265, spca-wiener flip 0.0457, cwf 0.0417
    assert errors["cwf"] < errors["flip"] < 0.5 * errors["wiener"]
    assert errors["cwf"] < 0.1
    for stack, model in ((cwf, "cwf"), (flip, "flip")):
        info = stack.info
        assert info["images_ctf_state"] == "corrected"
        assert info["params"] == {"radius": 23.0, "bandlimit": 0.5, "shrinker": "frobenius", "ctf_model": model}
        assert info["spca_noise_variance"] == pytest.approx(sim.info["noise_variance"], rel=0.05)
        assert 10 < info["spca_model"]["components"] < 150
    assert "signal_power" in flip.info["wiener_model"] and "wiener_model" not in cwf.info


def test_spca_wiener_without_ctf_beats_a_ctf_free_wiener_filter(module_client, scheduler_address, tmp_path_factory):
    sim = _simulation(tmp_path_factory, module_client, "noctf", with_ctf=False)
    out = tmp_path_factory.mktemp("out") / "spca.zarr"
    spca = _denoise_cli(sim, "spca-wiener", out, scheduler_address)
    assert spca.info["images_ctf_state"] == "none"
    # The `wiener` method needs CTF parameters; its filter with H = 1 is the CTF-free baseline.
    model = wiener_model(sim, module_client, radius=sim.box // 2)
    signal = np.asarray(model["signal_power"])[radial_index(sim.box)]
    transfer = wiener_filter(np.ones((1, sim.box, sim.box)), signal, model["noise_power"])
    baseline = scipy.fft.ifft2(scipy.fft.fft2(sim.images[:]) * transfer).real
    clean = sim.group["truth/clean"][:]
    spca_error = evaluate(spca.path, sim.path, client=module_client)["rel_mse"]
    # measured on this seed: raw 10.9, wiener (H = 1) 0.186, spca-wiener 0.064
    assert spca_error < 0.5 * relative_mse(baseline, clean)
    assert spca_error < 0.1


def test_spca_wiener_resumes_with_the_stored_model(module_client, tmp_path):
    from cryoden_dist.denoise import denoise

    sim = make_simulation(tmp_path / "sim.zarr", n=96, box=BOX, chunk=32, snr=0.5, seed=1)
    out = denoise(sim.path, tmp_path / "out.zarr", method="spca-wiener", client=module_client)
    first = out.images[:]
    # Simulate a run killed after its first chunk: clear the others and their flags.
    writable = ParticleStack.open(out.path, mode="r+")
    writable.group["_done/spca-wiener"][1:] = 0
    writable.images[32:] = 0
    writable.update_info(complete=False)
    again = denoise(sim.path, tmp_path / "out.zarr", method="spca-wiener", client=module_client)
    np.testing.assert_array_equal(again.images[:], first)
    assert again.info["stages"]["spca-wiener"]["chunks_computed_last_run"] == 2


def test_bad_parameters_are_one_line_errors(tmp_path, scheduler_address):
    sim = make_simulation(tmp_path / "sim.zarr", n=32, box=BOX, chunk=32, snr=0.5, seed=1)
    for param, word in (("shrinker=soft", "shrinker"), ("bandlimit=0.7", "bandlimit"), ("radius=40", "radius")):
        result = CliRunner().invoke(
            main,
            [
                "denoise",
                str(sim.path),
                "--method",
                "spca-wiener",
                "--out",
                str(tmp_path / "o.zarr"),
                "--param",
                param,
                "--scheduler",
                scheduler_address,
            ],
        )
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("cryoden: error:")]
        assert len(errors) == 1 and word in errors[0] and "Traceback" not in result.output
        assert not (tmp_path / "o.zarr").exists()
