"""Benchmark of the MFVDM graph stages: FAISS nearest neighbours and rotational alignment of the pairs.

* kNN: n = 10^4 300-dimensional features, k = 50, of two kinds: isotropic
  random vectors (no structure: IVF's worst case) and noisy points of a smooth
  2-D manifold (images from viewing directions); exact flat search against
  IVF-Flat (nprobe tuned to recall 0.95, plus fixed-nprobe searches), recall@50
  of IVF measured against flat in the same run.
* Alignment: 10^4 images x 50 neighbours = 5 * 10^5 pairs (a quarter of them
  reflected nodes), 500 complex64 coefficients with k_max = 30; time with and
  without refinement, and the angle error of planted rotations at three SNRs.

Run: ``python benchmarks/knn_align.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import time

import numpy as np
from _common import write_result

from cryoden_dist.align import align_pairs, frequency_weights, rotate_coefficients
from cryoden_dist.knn import build_index, nearest_neighbors, prepare_features, search_parameter

N_IMAGES = 10_000
DIM = 300
K = 50
COUNT = 500
K_MAX = 30


def timed(function, *args, **kwargs):
    """Result, wall seconds and process CPU seconds (all threads) of one call; the machine is shared."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    hits = 0
    for start in range(0, len(found), 1000):  # bound the [rows, k, k] comparison
        block = (found[start : start + 1000, :, None] == exact[start : start + 1000, None, :]).any(axis=2)
        hits += int(block.sum())
    return hits / found.size


def random_features(rng) -> np.ndarray:
    """Isotropic Gaussian vectors: no structure at all, the worst case for IVF."""
    return rng.normal(size=(N_IMAGES, DIM)).astype(np.float32)


def manifold_features(rng) -> np.ndarray:
    """Features of images seen from random viewing directions: a smooth 2-D manifold in 300-d, plus noise.

    Feature m is ``m^-1/2 cos(omega_m . v + phase_m)`` of the viewing direction ``v`` on the sphere (a
    decaying spectrum, as for steerable-PCA coefficients), with white noise of 0.3 times the feature rms.
    """
    directions = rng.normal(size=(N_IMAGES, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    frequencies = 2.0 * rng.normal(size=(DIM, 3))
    amplitudes = np.arange(1, DIM + 1) ** -0.5
    features = np.cos(directions @ frequencies.T + rng.uniform(0, 2 * np.pi, DIM)) * amplitudes
    features += 0.3 * np.sqrt(np.mean(features**2)) * rng.normal(size=features.shape)
    return features.astype(np.float32)


def knn_benchmark(features: np.ndarray, sweep: tuple[int, ...]) -> dict:
    """Flat against IVF (nearest_neighbors end to end), the IVF build/tune share, and fixed-nprobe searches."""
    (exact, _), flat_s, flat_cpu = timed(nearest_neighbors, features, K, method="flat")
    (approx, _), ivf_s, ivf_cpu = timed(nearest_neighbors, features, K, method="ivf")
    index, build_s, _ = timed(build_index, features, "ivf", recall_k=K + 1)
    result = {
        "flat_total_s": round(flat_s, 3),
        "flat_cpu_s": round(flat_cpu, 3),
        "ivf_total_s": round(ivf_s, 3),
        "ivf_cpu_s": round(ivf_cpu, 3),
        "ivf_build_and_tune_s": round(build_s, 3),
        "ivf_tuned": search_parameter(index),
        "ivf_recall_at_50": round(recall(approx, exact), 4),
        "ivf_nprobe_sweep": [],
    }
    data = prepare_features(features)
    for nprobe in sweep:
        index.nprobe = nprobe
        (_, found), search_s, _ = timed(index.search, data, K + 1)
        own = found == np.arange(len(found))[:, None]
        found = np.take_along_axis(found, np.argsort(own, axis=1, kind="stable")[:, :K], axis=1)
        result["ivf_nprobe_sweep"].append(
            {"nprobe": nprobe, "search_s": round(search_s, 3), "recall_at_50": round(recall(found, exact), 4)}
        )
    return result


def fb_like_frequencies() -> np.ndarray:
    """COUNT angular frequencies 0..K_MAX, fewer radial indices at higher k (as in a Fourier-Bessel basis)."""
    share = np.arange(K_MAX + 1, 0, -1, dtype=np.float64)
    counts = np.floor(share / share.sum() * COUNT).astype(int)
    counts[: COUNT - counts.sum()] += 1
    return np.repeat(np.arange(K_MAX + 1), counts)


def random_coefficients(rng, n: int, frequencies: np.ndarray) -> np.ndarray:
    shape = (n, frequencies.size)
    coeffs = (rng.normal(size=shape) + 1j * rng.normal(size=shape)) * np.exp(-frequencies / 8)
    coeffs[:, frequencies == 0] = coeffs[:, frequencies == 0].real
    return coeffs.astype(np.complex64)


def planted_errors(rng, frequencies: np.ndarray, snr: float, n: int = 2000) -> dict:
    """Angle error (degrees) of ``n`` pairs (image, rotated image), both with white noise at ``snr``."""
    clean = random_coefficients(rng, n, frequencies)
    truth = rng.uniform(0, 2 * np.pi, n)
    weights = frequency_weights(frequencies)
    sigma = np.sqrt(np.mean((np.abs(clean) ** 2) @ weights) / snr / weights.sum() / 2)
    noisy = [
        c + sigma * (rng.normal(size=c.shape) + 1j * rng.normal(size=c.shape))
        for c in (clean, rotate_coefficients(clean, frequencies, truth))
    ]
    angles, correlations = align_pairs(np.concatenate(noisy), frequencies, np.arange(n), np.arange(n, 2 * n))
    errors = np.abs(np.degrees(np.angle(np.exp(1j * (angles - truth)))))
    return {
        "snr": snr,
        "median_deg": round(float(np.median(errors)), 4),
        "p90_deg": round(float(np.percentile(errors, 90)), 4),
        "max_deg": round(float(errors.max()), 4),
        "median_correlation": round(float(np.median(correlations)), 4),
    }


def align_benchmark(rng) -> dict:
    frequencies = fb_like_frequencies()
    coeffs = random_coefficients(rng, N_IMAGES, frequencies)
    i = np.repeat(np.arange(N_IMAGES), K)
    j = rng.integers(0, N_IMAGES, i.size) + N_IMAGES * (rng.random(i.size) < 0.25)
    _, refined_s, refined_cpu = timed(align_pairs, coeffs, frequencies, i, j)
    _, grid_s, _ = timed(align_pairs, coeffs, frequencies, i, j, refine=False)
    return {
        "pairs": int(i.size),
        "count": COUNT,
        "k_max": K_MAX,
        "dtype": "complex64",
        "time_s": round(refined_s, 3),
        "cpu_s": round(refined_cpu, 3),
        "pairs_per_s": round(i.size / refined_s),
        "time_without_refinement_s": round(grid_s, 3),
        "planted": [planted_errors(rng, frequencies, snr) for snr in (1e3, 1.0, 0.3)],
    }


def main() -> None:
    rng = np.random.default_rng(0)
    knn = {
        "n": N_IMAGES,
        "dim": DIM,
        "k": K,
        "random": knn_benchmark(random_features(rng), sweep=(1, 8, 32)),
        "manifold": knn_benchmark(manifold_features(rng), sweep=(1, 2, 4)),
    }
    align = align_benchmark(rng)
    high, low = align["planted"][0], align["planted"][1]
    random, manifold = knn["random"], knn["manifold"]
    row = (
        f"kNN n=1e4 d=300 k=50, random: flat {random['flat_total_s']:.1f} s, IVF {random['ivf_total_s']:.1f} s "
        f"(nprobe {random['ivf_tuned']['nprobe']}/{random['ivf_tuned']['nlist']}, "
        f"recall@50 {random['ivf_recall_at_50']:.3f}); manifold: flat {manifold['flat_total_s']:.1f} s, "
        f"IVF {manifold['ivf_total_s']:.1f} s incl. {manifold['ivf_build_and_tune_s']:.1f} s build "
        f"(nprobe {manifold['ivf_tuned']['nprobe']}, recall@50 {manifold['ivf_recall_at_50']:.3f}); "
        f"align 5e5 pairs (count 500, k_max 30): {align['time_s']:.1f} s ({align['cpu_s']:.1f} s CPU), "
        f"median error {high['median_deg']:.3f} deg at SNR 1000, {low['median_deg']:.2f} deg at SNR 1 "
        "(target: seconds; < 0.1 deg at high SNR)"
    )
    write_result("knn_align", {"knn": knn, "align": align}, row)


if __name__ == "__main__":
    main()
