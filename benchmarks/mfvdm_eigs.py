"""Benchmark: top eigenpairs of the MFVDM matrices S_k, ARPACK (eigsh) against LOBPCG.

Graphs come from the random graph model of :func:`cryoden_dist.mfvdm.planted_graph`
(uniform rotations, K nearest viewing directions, 30 % outlier edges, with
reflections, so N = 2 n nodes). For each size and k = 1..3 the script times
``top_eigenpairs(S_k, m)`` with ``eigsh``, with ``lobpcg`` from a random block,
and with ``lobpcg`` warm-started from the previous frequency's eigenvectors
multiplied by the phases of ``u_1`` (``u_k(i) ~ u_{k-1}(i) exp(1j theta_i)`` on
a consistent graph), and records the largest residual ``|S u - lambda u|``.
Runs single-threaded (BLAS pinned to one thread), as in a Dask worker.

Usage: ``python benchmarks/mfvdm_eigs.py [--sizes 20000 200000] [--budget 30] [--no-record]``
(``--sizes`` are node counts N, default 2e4 only: on 2 shared cores one
N = 2e5 solve takes minutes; a method is dropped at a size once one of its
solves exceeded ``--budget`` seconds, which keeps the default run near 2 min).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from cryoden_dist.mfvdm import build_graph, normalized_connection, planted_graph, top_eigenpairs  # noqa: E402

try:
    from _common import write_result
except ImportError:  # run as a module from the repository root
    from benchmarks._common import write_result

METHODS = ("eigsh", "lobpcg", "lobpcg-warm")


def solve(S, m: int, method: str, tol: float, previous, first):
    """Time one eigensolve; ``previous``/``first`` are the eigenvectors of k - 1 and k = 1 (warm start)."""
    start = None
    if method == "lobpcg-warm":
        if previous is None:
            return None
        start = previous * np.exp(1j * np.angle(first[:, :1]))
    started = time.perf_counter()
    values, vectors = top_eigenpairs(S, m, method=method.split("-")[0], tol=tol, start=start)
    seconds = time.perf_counter() - started
    residual = float(np.max(np.linalg.norm(S @ vectors - vectors * values, axis=0)))
    return seconds, values, vectors, residual


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000], help="node counts N = 2 n")
    parser.add_argument("--neighbors", type=int, default=50)
    parser.add_argument("--m", type=int, default=50)
    parser.add_argument("--kmax", type=int, default=3)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--budget", type=float, default=30.0, help="seconds per solve before a method is dropped")
    parser.add_argument("--no-record", action="store_true", help="print only; do not write results or the table")
    args = parser.parse_args()

    runs = []
    for n_nodes in args.sizes:
        started = time.perf_counter()
        planted = planted_graph(n_nodes // 2, args.neighbors, outlier_fraction=0.3, angle_noise=0.05, seed=0)
        graph = build_graph(planted.neighbors, planted.angles, planted.weights)
        print(f"N={n_nodes}: {graph.n_edges} edges built in {time.perf_counter() - started:.1f} s", flush=True)
        dropped: set[str] = set()
        previous = first = None  # eigsh eigenvectors of k - 1 and of k = 1, for the warm start
        for k in range(1, args.kmax + 1):
            S, _ = normalized_connection(graph, k)
            reference, warm_from = None, previous
            for method in METHODS:
                if method in dropped:
                    continue
                result = solve(S, args.m, method, args.tol, warm_from, first)
                if result is None:
                    continue
                seconds, values, vectors, residual = result
                if method == "eigsh":
                    previous, first = vectors, vectors if first is None else first
                reference = values if reference is None else reference
                run = {
                    "n_nodes": n_nodes,
                    "n_edges": graph.n_edges,
                    "k": k,
                    "method": method,
                    "seconds": round(seconds, 3),
                    "max_residual": residual,
                    "lambda_1": float(values[0]),
                    "lambda_m": float(values[-1]),
                    "max_eigenvalue_difference_to_eigsh": float(np.max(np.abs(values - reference))),
                }
                runs.append(run)
                print(run, flush=True)
                if seconds > args.budget:
                    dropped.add(method)

    totals = {}
    for run in runs:
        key = (run["n_nodes"], run["method"])
        totals[key] = totals.get(key, 0.0) + run["seconds"]
    summary = {f"N={n} {method}": round(s, 2) for (n, method), s in totals.items()}
    row = (
        f"top {args.m} eigenpairs of S_k, k=1..{args.kmax}, K={args.neighbors}, tol={args.tol}, 1 thread, "
        f"total s: " + ", ".join(f"{key} {value}" for key, value in summary.items())
    )
    if args.no_record:
        print(row)
        return
    write_result("mfvdm_eigs", {"params": vars(args), "totals_s": summary, "runs": runs}, row)


if __name__ == "__main__":
    main()
