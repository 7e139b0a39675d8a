"""The ``evaluate`` command: compare a stack with the clean images of a simulation.

The estimate is the ``images`` array of the evaluated stack (a denoised
stack, or the simulation itself for the raw baseline); the reference is
``truth/clean`` of the simulation: the clean images *without* CTF. A
CTF-corrected estimate is therefore scored on what it should recover, and a
CTF-modulated one (raw images, a plain low-pass) pays for the CTF it keeps.

One Dask task per chunk computes the per-image metrics
(:mod:`cryoden_dist.metrics`) and the sums behind the stack-level values;
the per-image values are stored in the evaluated store under
``evaluation/`` and a JSON-able summary is returned.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .errors import InputError
from .metrics import (
    fourier_ring_correlation,
    frc_resolution,
    psnr,
    shell_frequencies,
    squared_error,
    squared_norm,
    ssim,
)
from .pipeline import map_chunks
from .stack import ParticleStack

__all__ = ["FRC_THRESHOLDS", "check_same_particles", "evaluate", "open_truth"]

log = logging.getLogger(__name__)

CLEAN = "truth/clean"
GROUP = "evaluation"
#: FRC criteria reported, by the suffix of their keys.
FRC_THRESHOLDS: dict[str, float] = {"0143": 0.143, "05": 0.5}


def open_truth(path: str | Path) -> ParticleStack:
    """Open a simulation store and check that it holds ``truth/clean``.

    Raises
    ------
    InputError
        If ``path`` is not a stack, or has no clean images.
    """
    truth = ParticleStack.open(path)
    if CLEAN not in truth.group:
        raise InputError(
            f"{path}: no '{CLEAN}' array (kind {truth.kind!r}); --truth must be a `cryoden simulate` output"
        )
    return truth


def check_same_particles(stack: ParticleStack, truth: ParticleStack) -> None:
    """Refuse to compare unfinished stacks, or stacks of different particles, box sizes or pixel sizes.

    Raises
    ------
    InputError
        Naming the store and the field that differs.
    """
    for store in (stack, truth):
        if store.info.get("complete") is False:
            name = (store.info.get("command") or {}).get("name")
            rerun = f"`cryoden {name}` with the same arguments" if name else "the command that made it"
            raise InputError(f"{store.path}: the store is not finished; rerun {rerun} to complete it")
    pairs = {"particles": (stack.n, truth.n), "box": (stack.box, truth.box)}
    if stack.pixel_size is not None and truth.pixel_size is not None:
        pairs["pixel size (Å)"] = (stack.pixel_size, truth.pixel_size)
    for field, (mine, theirs) in pairs.items():
        if not math.isclose(mine, theirs, rel_tol=1e-6):
            raise InputError(
                f"{stack.path}: {field} {mine} but the truth store {truth.path} has {theirs}; "
                "evaluate a stack made from that simulation"
            )


def _evaluate_chunk(start: int, stop: int, stack_path: str, truth_path: str, pixel_size: float | None) -> dict:
    """Per-image metrics of particles ``[start, stop)`` and the chunk's share of the stack sums."""
    estimate = zarr.open_group(stack_path, mode="r")["images"][start:stop]
    clean = zarr.open_group(truth_path, mode="r")[CLEAN][start:stop]
    finite = np.isfinite(estimate).all(axis=(1, 2))
    if not finite.all():
        bad = start + np.flatnonzero(~finite)
        raise InputError(
            f"{stack_path}: images of {bad.size} particles contain NaN or inf (first: particle {bad[0]}); "
            "the command that wrote them failed; recompute that stack"
        )
    frc = fourier_ring_correlation(estimate, clean)
    result = {
        "squared_error": squared_error(estimate, clean),
        "squared_norm": squared_norm(clean),
        "psnr": psnr(estimate, clean),
        "ssim": ssim(estimate, clean),
        "frc_sum": frc.sum(axis=0),
    }
    for suffix, threshold in FRC_THRESHOLDS.items():
        result[f"frc_{suffix}"] = (
            frc_resolution(frc, pixel_size, threshold, box=clean.shape[-1])
            if pixel_size is not None
            else np.full(stop - start, np.nan)
        )
    return result


def _finite_or_none(value: float) -> float | None:
    """JSON has no inf/nan: report them as null."""
    value = float(value)
    return value if math.isfinite(value) else None


def _median(values: np.ndarray) -> float | None:
    finite = values[~np.isnan(values)]
    return _finite_or_none(np.median(finite)) if finite.size else None


def _write_evaluation(stack: ParticleStack, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """Replace the ``evaluation/`` group of ``stack``; its attrs are written last, marking it complete."""
    group = stack.group
    if GROUP in group:
        del group[GROUP]
    evaluation = group.create_group(GROUP)
    for name, values in arrays.items():
        evaluation.create_array(name, shape=values.shape, chunks=values.shape, dtype="float64")[:] = values
    evaluation.attrs["cryoden"] = attrs


def evaluate(stack_path: str | Path, truth_path: str | Path, *, client) -> dict[str, Any]:
    """Score the images of a stack against the clean images of a simulation.

    Parameters
    ----------
    stack_path : path
        The stack to score (denoised, or the simulation itself for the raw
        baseline). Its ``evaluation/`` group is replaced by this run's
        per-image values; nothing else in it is touched.
    truth_path : path
        A ``cryoden simulate`` store holding ``truth/clean``.
    client : distributed.Client

    Returns
    -------
    dict
        JSON-able summary: ``n``; ``rel_mse`` (sum of squared errors over the
        sum of squared clean norms, see :func:`cryoden_dist.metrics.relative_mse`);
        ``mse`` (per pixel, over the stack); ``psnr`` (dB) and ``ssim`` (means
        of the per-image values, peak = the clean image's data range);
        ``frc_resolution_0143_A`` / ``frc_resolution_05_A`` (Å, of the mean
        per-image FRC curve) and the ``*_median`` of the per-image values;
        ``rel_error_median`` (median per-image relative squared error).
        Non-finite values (a perfect estimate's PSNR, a resolution never
        reached) are reported as ``None``.

    Raises
    ------
    InputError
        If the truth store has no clean images, the stores differ in
        particles, box or pixel size, or the estimate holds NaN/inf.
    """
    truth = open_truth(truth_path)
    stack = ParticleStack.open(stack_path, mode="r+")
    check_same_particles(stack, truth)
    pixel_size = truth.pixel_size if truth.pixel_size is not None else stack.pixel_size
    bounds = stack.chunk_bounds()
    parts = map_chunks(
        client,
        _evaluate_chunk,
        bounds,
        args=(str(stack.path), str(truth.path), pixel_size),
        desc="evaluate",
    )

    def joined(name: str) -> np.ndarray:
        return np.concatenate([part[name] for part in parts])

    error, norm = joined("squared_error"), joined("squared_norm")
    per_image = {
        "rel_error": np.divide(error, norm, out=np.full_like(error, np.nan), where=norm > 0),
        "mse": error / (stack.box * stack.box),
        "psnr": joined("psnr"),
        "ssim": joined("ssim"),
    }
    frc_mean = np.sum([part["frc_sum"] for part in parts], axis=0) / stack.n
    summary: dict[str, Any] = {
        "n": stack.n,
        "rel_mse": _finite_or_none(error.sum() / norm.sum()) if norm.sum() > 0 else None,
        "mse": _finite_or_none(per_image["mse"].mean()),
        "psnr": _finite_or_none(np.nanmean(per_image["psnr"])),
        "ssim": _finite_or_none(np.nanmean(per_image["ssim"])),
        "rel_error_median": _median(per_image["rel_error"]),
    }
    for suffix, threshold in FRC_THRESHOLDS.items():
        key = f"frc_resolution_{suffix}_A"
        per_image[key] = joined(f"frc_{suffix}")
        mean_resolution = (
            frc_resolution(frc_mean, pixel_size, threshold, box=stack.box) if pixel_size is not None else math.nan
        )
        summary[key] = _finite_or_none(mean_resolution)
        summary[f"{key}_median"] = _median(per_image[key])
    summary["stack"] = str(stack.path)
    summary["truth"] = str(truth.path)

    arrays = dict(per_image)
    arrays["frc_mean"] = frc_mean
    arrays["frc_shell_frequency"] = shell_frequencies(stack.box, pixel_size or 1.0)
    _write_evaluation(
        stack,
        arrays,
        {
            "truth": str(Path(truth.path).resolve()),
            "summary": summary,
            "definitions": {
                "rel_error": "||estimate - clean||^2 / ||clean||^2 per image (clean = truth/clean, CTF-free)",
                "mse": "mean squared error per pixel",
                "psnr": "dB, peak = max - min of the clean image",
                "ssim": "scikit-image structural_similarity, 7x7 window, data_range of the clean image",
                "frc_resolution_*_A": "Å where the per-image FRC first drops below 0.143 / 0.5 (inf: never above)",
                "frc_mean": "mean over images of the FRC per shell",
                "frc_shell_frequency": "shell frequency in 1/Å (cycles/pixel if the pixel size is unknown)",
            },
            "complete": True,
        },
    )
    log.info("evaluated %s against %s: rel_mse %s", stack.path, truth.path, summary["rel_mse"])
    return summary
