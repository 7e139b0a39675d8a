"""Benchmark: ASPIRE 0.14.3's CWF and RIR class averages against ours, on the identical simulated images.

ASPIRE is GPL: it is never a dependency of cryoden_dist and none of its code is copied. This script installs
``aspire==0.14.3`` into its own venv (``benchmarks/.aspire-venv``, git-ignored) and runs
``benchmarks/_aspire_worker.py`` there as a separate process; the two sides exchange ``.npy``/``.npz`` files in a
temporary folder.

Per SNR:

1. Our simulator makes ``n`` projections of the 70S map (65 px, 5 Å) with CTFs from the EMPIAR-10028 table and
   white noise (the same call as ``benchmarks/mfvdm_70s.py``, so ``--ours`` reuses that store).
2. ASPIRE gets the noisy images and every particle's CTF parameters and builds its own ``CTFFilter`` objects.
   ASPIRE's CTF is minus RELION's (``sqrt(1-a^2) sin(chi) - a cos(chi)`` with ``chi = pi/2 Cs lambda^3 s^4 -
   pi lambda df s^2``), so it is handed ``-images``: the same data in its convention, whose CTF-corrected
   estimates are then our clean images with no sign change. The script asserts that ASPIRE's filters evaluated
   on its grid equal ``-ctf_images`` (RELION convention) and that ASPIRE's ``Image.filter`` of clean images equals
   ``-apply_ctf`` of ours, for particles of the run and for strongly astigmatic CTFs that test the angle.
3. ASPIRE runs (a) CWF: ``DenoiserCov2D(src, basis=FFBBasis2D(L), var_noise=true noise variance).denoise`` on
   the raw (not phase-flipped) source; (b) ``RIRClass2D(n_nbor=10)`` + ``ClassAvgSource(...,
   TopClassSelector(), BFTAverager2D(...))`` on the phase-flipped source (ASPIRE's class-averaging pipeline).
4. Every output is written into a stack and scored by :func:`cryoden_dist.evaluate.evaluate` against the clean
   CTF-free images (rel_mse, PSNR, SSIM, FRC). Class ``i`` of ``TopClassSelector`` is the class whose reference
   (column 0 of the class table) is image ``i``, and BFTAverager2D aligns the average to that reference, so the
   average of class ``i`` is scored against clean image ``i`` for every ``i``.
5. Neighbour accuracy of RIR's classes (the 9 neighbours besides the reference; reflected neighbours against the
   antipodal viewing direction), as :func:`cryoden_dist.denoise_mfvdm.neighbor_accuracy`.
6. With ``--ours`` (default), ``benchmarks/mfvdm_70s.run_snr`` denoises the same store with our methods.

Usage: ``python benchmarks/aspire_compare.py [--n 10000] [--snr 0.05 0.01] [--no-ours] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    from _common import REPO, scratch_cluster, write_result
    from mfvdm_70s import CTF_TABLE, VOLUME, run_snr
except ImportError:  # run as a module from the repository root
    from benchmarks._common import REPO, scratch_cluster, write_result
    from benchmarks.mfvdm_70s import CTF_TABLE, VOLUME, run_snr

ASPIRE_VERSION = "0.14.3"
VENV = REPO / "benchmarks" / ".aspire-venv"
WORKER = Path(__file__).resolve().with_name("_aspire_worker.py")
PIXEL_SIZE = 5.0
#: ASPIRE's CTFFilter is minus the RELION-convention CTF of cryoden_dist.ctf (asserted on every run).
ASPIRE_CTF_SIGN = -1.0
#: Tolerances of the convention check: largest |CTF difference| on the grid, relative error of filtered images.
#: ASPIRE's electron wavelength constants differ from ours in the 5th digit, a phase error of ~1e-4 rad.
GRID_TOLERANCE, FILTERED_TOLERANCE = 2e-3, 1e-3
#: Strongly astigmatic CTFs (U, V in Å, angle in rad) that make an error in the astigmatism angle visible.
ASTIGMATIC_CHECKS = ((20000.0, 12000.0, 0.0), (20000.0, 12000.0, 0.7), (15000.0, 25000.0, -1.2))
#: Particles of the run whose CTFs are checked too.
CHECK_PARTICLES = 4
N_NBOR = 10


# ------------------------------------------------------------------------------------------ the ASPIRE venv
def venv_python() -> Path:
    return VENV / "bin" / "python"


def aspire_installed() -> bool:
    """Whether the venv's Python imports ASPIRE at the pinned version."""
    if not venv_python().exists():
        return False
    with tempfile.TemporaryDirectory(prefix="aspire_probe_") as scratch:  # ASPIRE makes a logs/ folder in its cwd
        probe = subprocess.run(
            [str(venv_python()), "-c", "import aspire; print(aspire.__version__)"],
            capture_output=True,
            text=True,
            cwd=scratch,
            env=isolated_environment(),
        )
    return probe.returncode == 0 and probe.stdout.strip() == ASPIRE_VERSION


def isolated_environment() -> dict[str, str]:
    """Our environment less anything that would let the ASPIRE process import our venv's packages."""
    return {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def candidate_interpreters() -> list[str]:
    """``python3`` first, then every other ``/usr/bin/python3.X``."""
    found = [shutil.which("python3") or sys.executable]
    found += sorted(str(path) for path in Path("/usr/bin").glob("python3.*") if path.name[8:].isdigit())
    return list(dict.fromkeys(found))


def ensure_aspire_venv() -> Path:
    """Create ``benchmarks/.aspire-venv`` with ``aspire==0.14.3`` unless it is there already.

    Raises
    ------
    RuntimeError
        With pip's last lines for every interpreter tried, if none installs it.
    """
    if aspire_installed():
        return venv_python()
    failures = []
    for interpreter in candidate_interpreters():
        shutil.rmtree(VENV, ignore_errors=True)
        print(f"creating {VENV} with {interpreter} and installing aspire=={ASPIRE_VERSION}", flush=True)
        steps = (
            [interpreter, "-m", "venv", str(VENV)],
            [str(venv_python()), "-m", "pip", "install", f"aspire=={ASPIRE_VERSION}"],
        )
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, env=isolated_environment())
            if done.returncode != 0:
                failures.append(f"{' '.join(step)}: {done.stdout[-800:]}{done.stderr[-800:]}")
                break
        else:
            if aspire_installed():
                return venv_python()
            failures.append(f"{interpreter}: aspire installed but does not import at version {ASPIRE_VERSION}")
    shutil.rmtree(VENV, ignore_errors=True)
    raise RuntimeError(f"could not install aspire=={ASPIRE_VERSION} into {VENV}:\n" + "\n".join(failures))


# ------------------------------------------------------------------------------------------- hand-over
def check_params(sim):
    """CTFs of the convention check: the first particles of the run, then strongly astigmatic ones."""
    from cryoden_dist.ctf import CTFParams

    first = sim.ctf_params(slice(0, CHECK_PARTICLES))
    astigmatic = np.array(ASTIGMATIC_CHECKS)
    count = len(ASTIGMATIC_CHECKS)
    synthetic = CTFParams(
        defocus_u=astigmatic[:, 0],
        defocus_v=astigmatic[:, 1],
        defocus_angle=astigmatic[:, 2],
        voltage=np.full(count, 300.0),
        cs=np.full(count, 2.7),
        amplitude_contrast=np.full(count, 0.07),
        phase_shift=np.zeros(count),
        pixel_size=np.full(count, sim.pixel_size),
    )
    return CTFParams(
        **{name: np.concatenate([first.as_dict()[name], synthetic.as_dict()[name]]) for name in first.as_dict()}
    )


def hand_over(folder: Path, sim, steps: list[str], seed: int) -> dict:
    """Write the images (in ASPIRE's sign), CTF parameters and run parameters for the worker."""
    params = sim.ctf_params()
    if np.any(params.phase_shift != 0):
        raise RuntimeError(f"{sim.path}: phase shifts are not supported by ASPIRE's CTFFilter")
    if not np.allclose(params.pixel_size, sim.pixel_size):
        raise RuntimeError(f"{sim.path}: per-particle pixel sizes differ from the stack's")
    checks = check_params(sim)
    check_clean = sim.group["truth/clean"][: len(checks)]
    fields = ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast")
    arrays = {name: getattr(params, name) for name in fields}
    arrays.update({f"check_{name}": getattr(checks, name) for name in fields})
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(
        folder / "inputs.npz",
        images=(ASPIRE_CTF_SIGN * sim.images[:]).astype(np.float32),
        check_clean=check_clean,
        **arrays,
    )
    run = {
        "pixel_size": sim.pixel_size,
        "noise_variance": sim.info["noise_variance"],
        "n_nbor": N_NBOR,
        "seed": seed,
        "steps": steps,
    }
    (folder / "params.json").write_text(json.dumps(run))
    return {"checks": checks, "check_clean": check_clean}


def run_worker(folder: Path) -> dict:
    """Run the worker in the ASPIRE venv; its report plus the whole process's wall time."""
    started = time.perf_counter()
    done = subprocess.run(
        [str(venv_python()), str(WORKER), str(folder)],
        capture_output=True,
        text=True,
        cwd=folder,
        env=isolated_environment(),
    )
    if done.returncode != 0:
        raise RuntimeError(f"the ASPIRE worker failed ({done.returncode}):\n{done.stderr[-4000:]}")
    report = json.loads((folder / "report.json").read_text())
    report["process_wall_s"] = round(time.perf_counter() - started, 2)
    return report


def verify_ctf_convention(folder: Path, checks, check_clean: np.ndarray) -> dict:
    """Assert ASPIRE's CTFs and filtered images equal ours times :data:`ASPIRE_CTF_SIGN`; the measured errors."""
    from cryoden_dist.ctf import apply_ctf, ctf_images

    box = check_clean.shape[-1]
    grids = np.load(folder / "check_grids.npy")
    ours = ASPIRE_CTF_SIGN * ctf_images(checks, box, centered=True, dtype=np.float64)
    grid_error = float(np.abs(grids - ours).max())
    filtered = np.load(folder / "check_filtered.npy")
    expected = ASPIRE_CTF_SIGN * apply_ctf(check_clean, ctf_images(checks, box, dtype=np.float64))
    filtered_error = float(np.linalg.norm(filtered - expected) / np.linalg.norm(expected))
    opposite_error = float(np.abs(grids + ours).max())
    if grid_error > GRID_TOLERANCE or filtered_error > FILTERED_TOLERANCE:
        raise AssertionError(
            f"ASPIRE's CTF does not match {ASPIRE_CTF_SIGN:+.0f} x ours: grid max error {grid_error:.2e}, "
            f"filtered images relative error {filtered_error:.2e} (with the opposite sign: {opposite_error:.2e})"
        )
    return {
        "aspire_ctf_equals": f"{ASPIRE_CTF_SIGN:+.0f} x cryoden_dist.ctf.ctf_images (RELION convention)",
        "particles_checked": CHECK_PARTICLES,
        "astigmatic_ctfs_checked": [list(ctf) for ctf in ASTIGMATIC_CHECKS],
        "grid_max_abs_error": grid_error,
        "filtered_images_rel_error": filtered_error,
        "grid_max_abs_error_opposite_sign": opposite_error,
    }


# ------------------------------------------------------------------------------------------- scoring
def score_images(images: np.ndarray, sim, path: Path, label: str, client) -> dict:
    """Write ``images`` into a stack for the particles of ``sim`` and evaluate it as ``cryoden evaluate`` does."""
    from cryoden_dist.evaluate import evaluate
    from cryoden_dist.pipeline import mark_complete
    from cryoden_dist.stack import ParticleStack

    stack = ParticleStack.create_like(path, sim, kind="denoised", attrs={"method": label})
    stack.images[:] = images.astype(np.float32)
    mark_complete(stack)
    summary = evaluate(stack.path, sim.path, client=client)
    return {key: summary[key] for key in ("rel_mse", "psnr", "ssim", "frc_resolution_0143_A")}


def rir_neighbor_accuracy(classes: np.ndarray, reflections: np.ndarray, rotations: np.ndarray) -> dict:
    """Viewing-direction accuracy of the neighbours in RIR's classes, the reference itself left out."""
    from cryoden_dist.denoise_mfvdm import neighbor_accuracy

    n = rotations.shape[0]
    nodes = classes[:, 1:] + n * reflections[:, 1:].astype(np.int64)
    accuracy = {
        f"{degrees}deg": round(neighbor_accuracy(nodes, rotations, np.deg2rad(degrees)), 4) for degrees in (10, 20)
    }
    accuracy["reference_is_column_0"] = float(np.mean(classes[:, 0] == np.arange(n)))
    return accuracy


def run_snr_aspire(client, root: Path, n: int, snr: float, seed: int) -> dict:
    """Simulate (the store ``mfvdm_70s.run_snr`` uses), run ASPIRE on it, verify the CTF convention and score."""
    from cryoden_dist.evaluate import evaluate
    from cryoden_dist.sim.simulate import simulate

    # The same call as mfvdm_70s.run_snr, so that --ours finds this store complete and reuses it.
    sim = simulate(VOLUME, root / f"sim_{snr}.zarr", n=n, snr=snr, pixel_size=PIXEL_SIZE, ctf_table=CTF_TABLE,
                   seed=seed, client=client)  # fmt: skip
    folder = root / f"aspire_{snr}"
    handed = hand_over(folder, sim, ["cwf", "rir"], seed)
    report = run_worker(folder)
    result = {
        "noise_variance": sim.info["noise_variance"],
        "aspire": report,
        "ctf_convention_check": verify_ctf_convention(folder, handed["checks"], handed["check_clean"]),
        "rel_mse": {"raw": evaluate(sim.path, sim.path, client=client)["rel_mse"]},
        "metrics": {},
    }
    outputs = {
        "aspire-cwf": np.load(folder / "cwf.npy"),
        "aspire-rir-class-average": np.load(folder / "rir_averages.npy"),
    }
    for label, images in outputs.items():
        result["metrics"][label] = score_images(images, sim, root / f"{label}_{snr}.zarr", label, client)
        result["rel_mse"][label] = result["metrics"][label]["rel_mse"]
    result["neighbor_accuracy"] = {
        f"aspire_rir_{key}": value
        for key, value in rir_neighbor_accuracy(
            np.load(folder / "rir_classes.npy"),
            np.load(folder / "rir_reflections.npy"),
            sim.group["truth/rotations"][:],
        ).items()
    }
    shutil.rmtree(folder)
    print(f"SNR {snr}: raw {result['rel_mse']['raw']:.4f}, ASPIRE {json.dumps(result['rel_mse'])} "
          f"{json.dumps(report['wall_s'])}", flush=True)  # fmt: skip
    return result


def merge_ours(result: dict, ours: dict, root: Path, snr: float) -> None:
    """Add our methods' rel_mse, neighbour accuracy and wall times from ``mfvdm_70s.run_snr``.

    Our neighbour lists hold 50 neighbours, nearest first (the initial kNN by feature distance, MFVDM's by
    affinity); their first ``N_NBOR - 1`` are scored too, to compare with RIR's classes at the same size. The
    stores read are those ``run_snr`` wrote under ``root``.
    """
    from cryoden_dist.denoise_mfvdm import neighbor_accuracy
    from cryoden_dist.stack import ParticleStack

    for label, value in ours["rel_mse"].items():
        result["rel_mse"].setdefault(label, value)
    accuracy = result["neighbor_accuracy"]
    accuracy.update({f"ours_{key}": value for key, value in ours["neighbor_accuracy"].items()})
    rotations = ParticleStack.open(root / f"sim_{snr}.zarr").group["truth/rotations"][:]
    group = ParticleStack.open(root / f"mfvdm_{snr}.zarr").group
    final = f"round{group.attrs['cryoden']['params'].get('rounds', 1)}/graph/neighbors"
    arrays = {"initial": "features/neighbors", "mfvdm": "mfvdm/neighbors"}
    if final in group:
        arrays["final"] = final
    for name, array in arrays.items():
        nearest = group[array][:, : N_NBOR - 1]
        for degrees in (10, 20):
            value = neighbor_accuracy(nearest, rotations, np.deg2rad(degrees))
            accuracy[f"ours_{name}_top{N_NBOR - 1}_{degrees}deg"] = round(value, 4)
    result["ours_wall_s"] = ours["wall_s"]
    result["ours_stages_s"] = ours["stages_s"]


def targets(results: dict) -> dict:
    """The issue's targets against ASPIRE (None where this run does not measure them)."""
    met: dict[str, bool | None] = {}
    for snr, r in results.items():
        errors = r["rel_mse"]
        if "mfvdm" not in errors:
            continue
        cwf = errors["aspire-cwf"]
        met[f"snr_{snr}_mfvdm_le_0.6x_aspire_cwf"] = errors["mfvdm"] <= 0.6 * cwf
        met[f"snr_{snr}_mfvdm_lowest"] = errors["mfvdm"] <= min(
            v for k, v in errors.items() if not k.startswith("mfvdm")
        )
        spca_time, cwf_time = r["ours_wall_s"]["spca-wiener"], r["aspire"]["wall_s"]["cwf_total"]
        met[f"snr_{snr}_spca_wiener_5x_faster_than_cwf_at_le_rel_mse"] = (
            spca_time * 5 <= cwf_time and errors["spca-wiener"] <= cwf
        )
    return met


def table_row(payload: dict) -> str:
    parts = []
    for snr, r in payload["results"].items():
        errors = ", ".join(f"{label} {value:.3f}" for label, value in r["rel_mse"].items())
        times = r["aspire"]["wall_s"]
        accuracy = r["neighbor_accuracy"]
        part = (
            f"SNR {snr}: rel_mse {errors}; ASPIRE CWF {times['cwf_total']:.0f} s, RIR+BFT {times['rir_total']:.0f} s "
            f"({r['aspire']['distinct_ctf_filters']} CTFs); 9 nearest within 10 deg: ASPIRE RIR "
            f"{accuracy['aspire_rir_10deg']:.3f}"
        )
        if "ours_wall_s" in r:
            ours = r["ours_wall_s"]
            part += (
                f", ours initial {accuracy['ours_initial_top9_10deg']:.3f} (all 50: "
                f"{accuracy['ours_initial_10deg']:.3f}), mfvdm {accuracy['ours_mfvdm_top9_10deg']:.3f} (all 50: "
                f"{accuracy['ours_mfvdm_10deg']:.3f}); "
                f"ours spca-wiener {ours['spca-wiener']:.0f} s, class-average {ours['class-average']:.0f} s, "
                f"mfvdm {ours['mfvdm']:.0f} s"
            )
        parts.append(part)
    met = ", ".join(f"{name}: {value}" for name, value in payload["targets_met"].items())
    load = payload["load_average_1_5_15min"]
    return (
        f"vs ASPIRE {ASPIRE_VERSION}, identical images: 70S 65 px, n={payload['n']}, EMPIAR-10028 CTFs. "
        + "; ".join(parts)
        + (f". Targets: {met}" if met else "")
        + f". Shared machine: 1-min load average {load['start'][0]:.1f} at start, {load['end'][0]:.1f} at end, "
        f"{payload['total_wall_s']:.0f} s in all"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="particles (10^4 in the issue)")
    parser.add_argument("--snr", type=float, nargs="+", default=[0.05, 0.01])
    parser.add_argument(
        "--ours",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run our methods (benchmarks/mfvdm_70s.run_snr) on the same images",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: n=500, SNR 0.05, no JSON or docs row")
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes, one thread each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-record", action="store_true", help="print only; no JSON or docs row")
    args = parser.parse_args()
    if args.quick:
        args.n, args.snr, args.no_record = 500, [0.05], True

    load_before = os.getloadavg()
    started = time.perf_counter()
    ensure_aspire_venv()
    install_s = round(time.perf_counter() - started, 1)
    results = {}
    with scratch_cluster(args.workers, "aspire_compare_") as (tmp, client):
        for snr in args.snr:
            result = run_snr_aspire(client, tmp, args.n, snr, args.seed)
            if args.ours:
                merge_ours(result, run_snr(client, tmp, args.n, snr, args.seed), tmp, snr)
            results[str(snr)] = result
    payload = {
        "n": args.n,
        "box": 65,
        "pixel_size_A": PIXEL_SIZE,
        "workers": args.workers,
        "aspire_version": ASPIRE_VERSION,
        "aspire_venv_setup_s": install_s,
        "data": "our simulator (benchmarks/mfvdm_70s.py settings): 70S map, EMPIAR-10028 CTFs, white noise, no shifts",
        "aspire_input": "-images (ASPIRE's CTF is minus RELION's), per-particle CTFFilter from our CTF parameters",
        "aspire_cwf": "DenoiserCov2D(src, basis=FFBBasis2D(L), var_noise=true noise variance).denoise[:], raw source",
        "aspire_rir": (
            f"src.phase_flip(); RIRClass2D(n_nbor={N_NBOR}, fspca 400, bispectrum 300, legacy PCA/bispectrum, sklearn "
            "kNN) + ClassAvgSource(TopClassSelector(), BFTAverager2D(FFBBasis2D(L)))"
        ),
        "class_average_scoring": (
            "TopClassSelector keeps every class in source order; class i's reference (column 0) is image i and "
            "BFTAverager2D aligns its average to that reference, so average i is scored against clean image i"
        ),
        "rir_neighbor_accuracy": (
            "columns 1.. of RIR's class table (the reference left out), reflected neighbours scored against the "
            "antipodal viewing direction (cryoden_dist.denoise_mfvdm.neighbor_accuracy)"
        ),
        "rel_mse": "cryoden_dist.evaluate.evaluate against truth/clean (CTF-free), stack sum of squared errors / norms",
        "load_average_1_5_15min": {"start": load_before, "end": os.getloadavg()},
        "total_wall_s": round(time.perf_counter() - started, 1),
        "results": results,
        "targets_met": targets(results),
    }
    if args.no_record:
        print(json.dumps(payload, indent=2, default=str))
        print(table_row(payload))
        return
    write_result("aspire_compare", payload, table_row(payload))


if __name__ == "__main__":
    main()
