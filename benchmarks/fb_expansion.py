"""Fourier-Bessel expansion engines: throughput and accuracy on one core.

Compares, in one run on the same machine, the engines of :class:`cryoden_dist.basis.FBBasis` (``dense``
in float64 and float32, ``nufft`` at eps = 1e-6) and the ``fle_2d`` package (Marshall, Mickelsen & Singer
2023, eps = 1e-6) for ``expand`` (least squares), ``evaluate`` (synthesis) and ``evaluate_adjoint``, at
L = 65 and L = 128, on smooth random images (white noise low-passed to 0.35 cycles/pixel).

Accuracy is the relative l2 error against an exact reference:
* ours: the dense float64 engine (exact least squares), itself checked against direct ``scipy.special.jv``
  evaluation of 200 random basis functions (adjoint and synthesis);
* fle_2d (its own basis: radius ``ceil(L / 2)``, its own truncation): its dense matrix ``create_denseB`` at
  L = 65 (too large at L = 128: 9691 functions x 16384 pixels).

Threads are pinned to one (as in a Dask worker, one per core). The one-pass operations (adjoint, dense
expand, evaluate) run on ``--n`` images (2000) at L <= 96 and ``--n-large`` (400) at L = 128; the iterative
expands on fewer (NUFFT CG: 200 / 50 images; ``fle_2d.expand`` solves one image at a time by CG: 10); the
whole run took 172 s on a shared 2-core machine (``--n-large 200`` about halves the L = 128 part). Rates are
images per second. ``fle_2d`` imports ``joblib``
for an optional threaded path of ``create_denseB`` that is not used here; joblib is not a project
dependency, so a stand-in module is registered when it is missing.

Usage: ``python benchmarks/fb_expansion.py [--n 2000] [--n-large 400] [--boxes 65 128]``
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy.special  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from cryoden_dist.basis import FBBasis  # noqa: E402
from cryoden_dist.basis.fb import _disk_polar, _normalisation  # noqa: E402


def timed(function, *args):
    """``(result, seconds)`` of one call."""
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def relative_error(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(np.linalg.norm(estimate - truth) / np.linalg.norm(truth))


def test_images(box: int, n: int, seed: int = 0) -> np.ndarray:
    """Smooth random images: white noise low-passed to 0.35 cycles/pixel (band-limited, in no basis span)."""
    rng = np.random.default_rng(seed)
    noise = np.fft.fft2(rng.standard_normal((n, box, box)))
    freq = np.fft.fftfreq(box)
    keep = np.hypot(freq[:, None], freq[None, :]) <= 0.35
    return np.fft.ifft2(noise * keep).real


def rates(n: int, seconds: float) -> dict:
    return {"n": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 1)}


def bench_ours(box, images, engine, dtype, n_expand):
    """Build one FBBasis configuration and time its three operations; returns (basis, outputs, result)."""
    n_expand = min(n_expand, images.shape[0])
    basis, build_s = timed(lambda: FBBasis(box, eps=1e-6, dtype=dtype, engine=engine))
    adjoint, adjoint_s = timed(basis.evaluate_adjoint, images)
    coeffs, expand_s = timed(basis.expand, images[:n_expand])
    synthesis, evaluate_s = timed(basis.evaluate, coeffs)
    result = {
        "engine": engine,
        "dtype": np.dtype(dtype).name,
        "eps": 1e-6 if engine == "nufft" else None,
        "count": basis.count,
        "build_s": round(build_s, 2),
        "matrix_mib": round(basis.dense_bytes / 2**20, 1) if engine == "dense" else None,
        "adjoint": rates(images.shape[0], adjoint_s),
        "expand": rates(n_expand, expand_s),
        "evaluate": rates(n_expand, evaluate_s),
    }
    return basis, {"adjoint": adjoint, "coeffs": coeffs, "synthesis": synthesis}, result


def errors_against(reference: FBBasis, outputs: dict, basis: FBBasis, exact: dict) -> dict:
    """Relative errors of ``basis`` against the exact dense float64 outputs (on the same images)."""
    n_expand = outputs["coeffs"].shape[0]
    return {
        "adjoint": relative_error(outputs["adjoint"], exact["adjoint"]),
        "expand": relative_error(outputs["coeffs"], exact["coeffs"][:n_expand]),
        "evaluate": relative_error(basis.evaluate(exact["coeffs"][:n_expand]), exact["synthesis"][:n_expand]),
    }


def direct_check(basis: FBBasis, images: np.ndarray, seed: int = 0) -> dict:
    """Adjoint and synthesis of 200 random coefficients (Re parts) against direct ``scipy.special.jv``."""
    rng = np.random.default_rng(seed)
    columns = np.sort(rng.choice(basis.count, size=min(200, basis.count), replace=False))
    _, r, theta = _disk_polar(basis.box, basis.radius)
    k, zeros = basis.angular_frequency[columns], basis.bessel_zeros[columns]
    norm = _normalisation(k, zeros, basis.radius)
    matrix = norm * scipy.special.jv(k, np.outer(r, zeros / basis.radius)) * np.cos(np.outer(theta, k))
    sample = images[:50]
    weights = rng.standard_normal((4, columns.size))
    sparse = np.zeros((4, basis.count), dtype=complex)
    sparse[:, columns] = weights
    adjoint = basis.evaluate_adjoint(sample)[:, columns].real
    return {
        "adjoint_vs_jv": relative_error(adjoint, sample[:, basis.mask] @ matrix),
        "evaluate_vs_jv": relative_error(basis.evaluate(sparse)[:, basis.mask], weights @ matrix.T),
    }


def bench_fle(box, images, n_expand, with_accuracy):
    """fle_2d in real mode with eps = 1e-6, in batches of 250 images (its work arrays grow with the batch)."""
    if "joblib" not in sys.modules:
        try:
            import joblib  # noqa: F401
        except ImportError:
            stand_in = types.ModuleType("joblib")
            stand_in.Parallel = stand_in.delayed = None
            sys.modules["joblib"] = stand_in
    import fle_2d

    n_expand = min(n_expand, images.shape[0])
    fle, build_s = timed(fle_2d.FLEBasis2D, box, box, 1e-6)

    def batched(function, data):
        return np.concatenate([function(data[i : i + 250]) for i in range(0, data.shape[0], 250)])

    n = images.shape[0]
    adjoint, adjoint_s = timed(batched, fle.evaluate_t, images)
    synthesis, evaluate_s = timed(batched, fle.evaluate, adjoint)
    coeffs, expand_s = timed(lambda data: np.stack([fle.expand(image) for image in data]), images[:n_expand])
    result = {
        "engine": "fle_2d",
        "eps": 1e-6,
        "count": int(fle.ne),
        "radius_px": fle.L // 2,
        "build_s": round(build_s, 2),
        "adjoint": rates(n, adjoint_s),
        "expand": rates(n_expand, expand_s),
        "evaluate": rates(n, evaluate_s),
    }
    if with_accuracy:
        dense = fle.create_denseB()
        flat = images.reshape(n, -1)
        exact_coeffs = np.linalg.lstsq(dense, flat[:n_expand].T, rcond=None)[0].T
        result["errors"] = {
            "adjoint": relative_error(adjoint, flat @ dense),
            "expand": relative_error(coeffs, exact_coeffs),
            "evaluate": relative_error(synthesis.reshape(n, -1), adjoint @ dense.T),
        }
    return result


def run_box(box: int, n: int) -> list[dict]:
    """All engines at one box."""
    images = test_images(box, n)
    reference, exact, dense64 = bench_ours(box, images, "dense", np.float64, n)
    dense64["errors"] = {"reference": "exact least squares", **direct_check(reference, images)}
    results = [dense64]
    for engine, dtype, n_expand in (("dense", np.float32, n), ("nufft", np.float64, 200 if box <= 96 else 50)):
        basis, outputs, result = bench_ours(box, images, engine, dtype, n_expand)
        result["errors"] = errors_against(reference, outputs, basis, exact)
        results.append(result)
        del basis, outputs
    results.append(bench_fle(box, images, 10, with_accuracy=box <= 96))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="images at L <= 96")
    parser.add_argument("--n-large", type=int, default=400, help="images at L > 96 (fewer: the slow engines dominate)")
    parser.add_argument("--boxes", type=int, nargs="+", default=[65, 128])
    args = parser.parse_args()
    start = time.perf_counter()
    by_box = {}
    for box in args.boxes:
        by_box[str(box)] = run_box(box, args.n if box <= 96 else args.n_large)
        print(f"L = {box} done after {time.perf_counter() - start:.0f} s", file=sys.stderr)

    summary = []
    for box, results in by_box.items():
        parts = []
        for res in results:
            name = res["engine"] + ("-f32" if res.get("dtype") == "float32" else "")
            parts.append(
                f"{name} {res['expand']['images_per_s']:.0f}/{res['evaluate']['images_per_s']:.0f}"
                f"/{res['adjoint']['images_per_s']:.0f}"
            )
        summary.append(f"L={box}: " + ", ".join(parts))
    row = (
        f"FB expand/evaluate/adjoint images/s on 1 core (n={args.n}, {args.n_large} at L>96): "
        + "; ".join(summary)
        + "; default dense (target: 10^4 images at L=65 in a few s)"
    )
    payload = {
        "n": args.n,
        "n_large": args.n_large,
        "threads": 1,
        "results": by_box,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    write_result("fb_expansion", payload, row)


if __name__ == "__main__":
    main()
