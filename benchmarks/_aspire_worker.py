"""Run ASPIRE's CWF and RIR class averaging on images handed over in a folder; runs INSIDE the ASPIRE venv.

ASPIRE (GPL) is never imported by cryoden_dist: ``benchmarks/aspire_compare.py`` installs it into its own venv
(``benchmarks/.aspire-venv``) and starts this script there as a separate process. This file may import only
ASPIRE, numpy and the Python standard library; it calls ASPIRE's public API and contains none of its code.

Usage: ``python _aspire_worker.py FOLDER``. ``FOLDER/inputs.npz`` holds

* ``images`` ``[n, L, L]`` float32: the noisy images, already in ASPIRE's CTF sign convention;
* ``defocus_u``, ``defocus_v`` (Å), ``defocus_angle`` (rad), ``voltage`` (kV), ``cs`` (mm),
  ``amplitude_contrast`` (fraction) ``[n]``: per-particle CTF parameters, and the same fields prefixed
  ``check_`` for the CTFs whose filters are evaluated for the convention check;
* ``check_clean`` ``[k, L, L]``: clean images the ``check_`` filters are applied to;

and ``FOLDER/params.json`` holds ``pixel_size`` (Å), ``noise_variance``, ``n_nbor``, ``seed`` and ``steps``
(a subset of ``["cwf", "rir"]``). Outputs written to ``FOLDER``:

* ``check_grids.npy`` ``[k, L, L]``: each check filter evaluated on ASPIRE's centred frequency grid;
* ``check_filtered.npy`` ``[k, L, L]``: ``check_clean`` filtered by ASPIRE (``Image.filter``);
* ``cwf.npy``: ``DenoiserCov2D(src, basis=FFBBasis2D(L)).denoise`` of the raw (not phase-flipped) source;
* ``rir_averages.npy``, ``rir_classes.npy``, ``rir_reflections.npy``: ``ClassAvgSource(phase-flipped src,
  RIRClass2D(n_nbor), TopClassSelector(), BFTAverager2D)``: class ``i`` is the class of reference image ``i``
  (column 0 of the class table) and its average is aligned to image ``i``;
* ``report.json``: ASPIRE's version, the number of distinct CTF filters, and wall times in seconds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

#: The per-particle CTF fields handed over, in ASPIRE ``CTFFilter`` order (Å, Å, rad, kV, mm, fraction).
CTF_FIELDS = ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast")


def ctf_filters(arrays, prefix: str = ""):
    """ASPIRE CTF filters of the distinct parameter sets, and the index of each particle's filter."""
    from aspire.operators import CTFFilter

    table = np.column_stack([arrays[prefix + field] for field in CTF_FIELDS])
    unique, index = np.unique(table, axis=0, return_inverse=True)
    filters = [
        CTFFilter(voltage=v, defocus_u=du, defocus_v=dv, defocus_ang=angle, Cs=cs, alpha=q)
        for du, dv, angle, v, cs, q in unique
    ]
    return filters, index.ravel()


def convention_check(folder: Path, arrays, pixel_size: float) -> None:
    """Evaluate the check CTFs on ASPIRE's grid and apply them to clean images, for the caller to compare."""
    from aspire.image import Image

    filters, index = ctf_filters(arrays, "check_")
    box = arrays["check_clean"].shape[-1]
    grids = np.stack([filters[i].evaluate_grid(box, dtype=np.float64, pixel_size=pixel_size) for i in index])
    filtered = np.stack(
        [
            Image(clean[None].astype(np.float64), pixel_size=pixel_size).filter(filters[i]).asnumpy()[0]
            for clean, i in zip(arrays["check_clean"], index, strict=True)
        ]
    )
    np.save(folder / "check_grids.npy", grids)
    np.save(folder / "check_filtered.npy", filtered)


def run_cwf(source, box: int, noise_variance: float, seconds: dict) -> np.ndarray:
    """ASPIRE's CWF (Bhamre et al.) on the raw source with its CTFs, given the noise variance."""
    from aspire.basis import FFBBasis2D
    from aspire.denoising import DenoiserCov2D

    started = time.perf_counter()
    denoiser = DenoiserCov2D(source, basis=FFBBasis2D(box, dtype=source.dtype), var_noise=noise_variance)
    denoiser.build_denoiser()  # mean and CTF-aware covariance
    seconds["cwf_mean_covariance"] = time.perf_counter() - started
    started = time.perf_counter()
    denoised = denoiser.denoise[:].asnumpy()
    seconds["cwf_denoise"] = time.perf_counter() - started
    seconds["cwf_total"] = seconds["cwf_mean_covariance"] + seconds["cwf_denoise"]
    return denoised


def run_rir(source, box: int, n_nbor: int, seed: int, seconds: dict) -> tuple[np.ndarray, ...]:
    """RIR classification (n_nbor neighbours incl. the reference) and BFT class averages of every image.

    ASPIRE's class-averaging pipeline phase-flips the images first (its 0.14 default classifier settings:
    FSPCA 400 components, 300 bispectrum components, legacy PCA and bispectrum, sklearn kNN).
    """
    from aspire.basis import FFBBasis2D
    from aspire.classification import BFTAverager2D, RIRClass2D, TopClassSelector
    from aspire.denoising import ClassAvgSource

    started = time.perf_counter()
    flipped = source.phase_flip().cache()
    seconds["rir_phase_flip"] = time.perf_counter() - started
    classifier = RIRClass2D(
        flipped,
        fspca_components=400,
        bispectrum_components=300,
        n_nbor=n_nbor,
        large_pca_implementation="legacy",
        nn_implementation="sklearn",
        bispectrum_implementation="legacy",
        seed=seed,
    )
    averager = BFTAverager2D(composite_basis=FFBBasis2D(box, dtype=flipped.dtype), src=flipped)
    averages_source = ClassAvgSource(flipped, classifier, TopClassSelector(), averager)
    started = time.perf_counter()
    selection = np.asarray(averages_source.selection_indices)  # classifies, then selects (all, in order)
    seconds["rir_classify"] = time.perf_counter() - started
    if not np.array_equal(selection, np.arange(source.n)):
        raise RuntimeError("TopClassSelector did not keep every class in source order")
    started = time.perf_counter()
    averages = averages_source.images[:].asnumpy()
    seconds["rir_average"] = time.perf_counter() - started
    seconds["rir_total"] = seconds["rir_phase_flip"] + seconds["rir_classify"] + seconds["rir_average"]
    classes = np.asarray(averages_source.class_indices)
    reflections = np.asarray(averages_source.class_refl)
    return averages, classes, reflections


def main(folder: Path) -> None:
    import aspire
    from aspire.source import ArrayImageSource

    params = json.loads((folder / "params.json").read_text())
    arrays = np.load(folder / "inputs.npz")
    pixel_size = float(params["pixel_size"])
    images = arrays["images"]
    box = images.shape[-1]
    seconds: dict[str, float] = {}

    convention_check(folder, arrays, pixel_size)
    filters, index = ctf_filters(arrays)
    started = time.perf_counter()
    source = ArrayImageSource(images, pixel_size=pixel_size)
    # An ArrayImageSource starts with one identity filter; give it the particles' CTFs.
    source.unique_filters = filters
    source.filter_indices = index
    seconds["source"] = time.perf_counter() - started

    if "cwf" in params["steps"]:
        np.save(folder / "cwf.npy", run_cwf(source, box, float(params["noise_variance"]), seconds))
    if "rir" in params["steps"]:
        averages, classes, reflections = run_rir(source, box, int(params["n_nbor"]), int(params["seed"]), seconds)
        np.save(folder / "rir_averages.npy", averages)
        np.save(folder / "rir_classes.npy", classes)
        np.save(folder / "rir_reflections.npy", reflections)
    report = {
        "aspire_version": aspire.__version__,
        "n": int(images.shape[0]),
        "distinct_ctf_filters": len(filters),
        "wall_s": {name: round(value, 2) for name, value in seconds.items()},
    }
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
