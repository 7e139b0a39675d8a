"""Simulated particle stacks with ground truth: ``cryoden simulate``.

A simulation projects a map along uniformly random directions
(:mod:`~cryoden_dist.sim.projection`), shifts each projection, modulates it
by a CTF, and adds noise scaled to a requested SNR. Clean images, the
CTF-modulated clean images, rotations and shifts are stored next to the
noisy images under ``truth/`` so denoisers can be evaluated.

SNR definition
--------------
``SNR = mean over particles of var(clean CTF-modulated image inside the
disk of radius L // 2) / noise variance``. The signal variance is measured
on a pilot of the first ``min(n, 512)`` particles (the same particles as in
the full run, so it is deterministic), then ``sigma^2 = signal_var / snr``.

Determinism
-----------
The output depends only on the inputs and ``seed``, never on the chunking
or the number of workers: all per-particle parameters (rotations, then
shifts, then CTFs) are drawn up front from ``numpy.random.default_rng(seed)``,
and particle ``i`` draws its noise from its own generator seeded by
``SeedSequence(seed, spawn_key=(i,))``, the ``i``-th child stream of the
seed.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..ctf import CTFParams, ctf_images
from ..errors import InputError, ParameterError
from ..image import disk_mask
from ..pipeline import mark_complete, prepare_output, record_command, run_chunks
from ..stack import ParticleStack, default_chunk
from .noise import (
    MicrographNoise,
    cut_patches,
    draw_patch_choices,
    load_micrograph,
    parse_noise_spec,
    prepare_micrograph_noise,
    white_noise,
)
from .projection import project_spectra, spectra_to_images
from .rotations import random_rotations

__all__ = [
    "CTF_TABLE_COLUMNS",
    "SNR_DEFINITION",
    "ParticleParameters",
    "balanced_chunk",
    "clean_images",
    "ctf_from_defocus_range",
    "ctf_from_table",
    "draw_parameters",
    "load_ctf_table",
    "particle_noise",
    "random_shifts",
    "signal_variance",
    "simulate",
]

log = logging.getLogger(__name__)

SNR_DEFINITION = (
    "mean over particles of var(clean CTF-modulated image inside the disk of radius L//2) / noise variance; "
    "signal variance measured on the first min(n, 512) particles"
)
#: Particles whose clean CTF-modulated images set the signal variance.
PILOT_SIZE = 512
#: NUFFT tolerance of the projections (single precision: ~2e-6 relative error).
PROJECTION_EPS = 1e-6
#: Columns of a cryoDRGN CTF table (``ctf.pkl`` saved as ``.npy``).
CTF_TABLE_COLUMNS = ("D", "px", "DefocusU", "DefocusV", "DefocusAngle", "Voltage", "Cs", "AmpContrast", "PhaseShift")
#: Microscope assumed with ``defocus_range``: 300 kV, Cs 2.7 mm, 10 % amplitude contrast.
DEFAULT_VOLTAGE, DEFAULT_CS, DEFAULT_AMPLITUDE_CONTRAST = 300.0, 2.7, 0.1
#: Defocus range in Å when neither a table nor a range is given.
DEFAULT_DEFOCUS_RANGE = (10000.0, 25000.0)
#: Largest ``|DefocusU - DefocusV|`` drawn with ``defocus_range``, in Å (the
#: real EMPIAR-10028 table has a 95th percentile of ~310 Å).
ASTIGMATISM_MAX = 400.0


# ---------------------------------------------------------------- CTFs
def load_ctf_table(path: str | Path) -> np.ndarray:
    """Read and check a cryoDRGN-style CTF table.

    Parameters
    ----------
    path : path
        ``.npy`` array ``[N, 9]`` with columns :data:`CTF_TABLE_COLUMNS`
        (defocus in Å, angles in degrees, voltage kV, Cs mm).

    Returns
    -------
    ndarray, shape (N, 9), float64

    Raises
    ------
    InputError
        If the file is missing or not a numeric ``[N, 9]`` array of valid
        values.
    """
    path = Path(path)
    columns = ", ".join(CTF_TABLE_COLUMNS)
    if not path.is_file():
        raise InputError(f"{path}: no such CTF table; give a .npy array [N, 9] ({columns}) to --ctf-table")
    try:
        table = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{path}: not a .npy array ({exc}); convert a cryoDRGN ctf.pkl with numpy.save(path, pickle.load(f))"
        ) from None
    if table.ndim != 2 or table.shape[1] != len(CTF_TABLE_COLUMNS) or table.shape[0] < 1:
        raise InputError(f"{path}: CTF table has shape {table.shape}; expected [N, 9] with columns {columns}")
    if not np.issubdtype(table.dtype, np.number):
        raise InputError(f"{path}: CTF table has dtype {table.dtype}; expected numbers ({columns})")
    table = table.astype(np.float64)
    checks = {
        "DefocusU": table[:, 2] > 0,
        "DefocusV": table[:, 3] > 0,
        "DefocusAngle": np.isfinite(table[:, 4]),
        "Voltage": table[:, 5] > 0,
        "Cs": table[:, 6] >= 0,
        "AmpContrast": (table[:, 7] >= 0) & (table[:, 7] < 1),
        "PhaseShift": np.isfinite(table[:, 8]),
    }
    for column, valid in checks.items():
        valid &= np.isfinite(table[:, CTF_TABLE_COLUMNS.index(column)])
        if not valid.all():
            row = int(np.argmin(valid))
            value = table[row, CTF_TABLE_COLUMNS.index(column)]
            raise InputError(f"{path}: row {row}: {column} = {value} is not valid; fix or drop that row")
    return table


def ctf_from_table(table: np.ndarray, n: int, rng: np.random.Generator, pixel_size: float) -> CTFParams:
    """Draw ``n`` rows uniformly, with replacement, from a CTF table.

    The rows' defocus U/V, astigmatism angle, voltage, Cs, amplitude
    contrast and phase shift are used (degrees converted to radians); their
    box and pixel size are not: every CTF gets the simulation's
    ``pixel_size``.
    """
    rows = table[rng.integers(0, table.shape[0], size=n)]
    return CTFParams(
        defocus_u=rows[:, 2],
        defocus_v=rows[:, 3],
        defocus_angle=np.deg2rad(rows[:, 4]),
        voltage=rows[:, 5],
        cs=rows[:, 6],
        amplitude_contrast=rows[:, 7],
        phase_shift=np.deg2rad(rows[:, 8]),
        pixel_size=np.full(n, float(pixel_size)),
    )


def ctf_from_defocus_range(
    defocus_range: tuple[float, float], n: int, rng: np.random.Generator, pixel_size: float
) -> CTFParams:
    """Random CTFs: mean defocus uniform in ``defocus_range`` (Å), random astigmatism.

    300 kV, Cs 2.7 mm, amplitude contrast 0.1, no phase shift; the
    astigmatism ``DefocusU - DefocusV`` is uniform in ``[0, 400]`` Å and its
    angle uniform in ``[-pi/2, pi/2)``.
    """
    mean = rng.uniform(defocus_range[0], defocus_range[1], size=n)
    astigmatism = rng.uniform(0.0, ASTIGMATISM_MAX, size=n)
    angle = rng.uniform(-np.pi / 2, np.pi / 2, size=n)
    return CTFParams(
        defocus_u=mean + astigmatism / 2,
        defocus_v=np.maximum(mean - astigmatism / 2, 1.0),
        defocus_angle=angle,
        voltage=np.full(n, DEFAULT_VOLTAGE),
        cs=np.full(n, DEFAULT_CS),
        amplitude_contrast=np.full(n, DEFAULT_AMPLITUDE_CONTRAST),
        phase_shift=np.zeros(n),
        pixel_size=np.full(n, float(pixel_size)),
    )


# ---------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParticleParameters:
    """Everything drawn per particle before any image is made.

    Attributes
    ----------
    rotations : ndarray, shape (n, 3, 3)
    shifts : ndarray, shape (n, 2)
        ``(x, y)`` in pixels.
    ctf : CTFParams or None
    """

    rotations: np.ndarray
    shifts: np.ndarray
    ctf: CTFParams | None


def random_shifts(n: int, max_shift: float, rng: np.random.Generator) -> np.ndarray:
    """``(x, y)`` shifts uniform in the disk of radius ``max_shift`` pixels, shape ``(n, 2)``."""
    radius = max_shift * np.sqrt(rng.uniform(size=n))
    angle = rng.uniform(0.0, 2 * np.pi, size=n)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)


def draw_parameters(
    n: int,
    seed: int,
    *,
    max_shift: float,
    pixel_size: float,
    ctf_table: np.ndarray | None = None,
    defocus_range: tuple[float, float] | None = None,
    with_ctf: bool = True,
) -> ParticleParameters:
    """Draw rotations, shifts and CTFs from ``default_rng(seed)``, in that order.

    Rotations and shifts therefore do not depend on the CTF options. With
    ``with_ctf`` and neither a table nor a range, the defocus range is
    :data:`DEFAULT_DEFOCUS_RANGE`.
    """
    rng = np.random.default_rng(seed)
    rotations = random_rotations(n, rng)
    shifts = random_shifts(n, max_shift, rng)
    ctf = None
    if with_ctf and ctf_table is not None:
        ctf = ctf_from_table(ctf_table, n, rng, pixel_size)
    elif with_ctf:
        ctf = ctf_from_defocus_range(defocus_range or DEFAULT_DEFOCUS_RANGE, n, rng, pixel_size)
    return ParticleParameters(rotations, shifts, ctf)


# --------------------------------------------------------------- images
def clean_images(
    volume: np.ndarray,
    parameters: ParticleParameters,
    start: int,
    stop: int,
    box: int | None = None,
    eps: float = PROJECTION_EPS,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Shifted projections and their CTF-modulated versions for particles ``start:stop``.

    Parameters
    ----------
    volume : ndarray, shape (L, L, L)
    parameters : ParticleParameters
        All particles' parameters (CTF pixel size: the images').
    start, stop : int
        Particle range.
    box : int, optional
        Image size ``<= L`` (the projections Fourier-cropped); default ``L``.
    eps : float
        NUFFT tolerance.

    Returns
    -------
    clean : ndarray, shape (k, L, L), float32
        Shifted projections, no CTF.
    clean_ctf : ndarray, shape (k, L, L), float32
        The same with the CTF applied (``clean`` itself without CTF).
    seconds : dict
        Time spent in ``projection`` and ``ctf``.
    """
    box = box or volume.shape[0]
    started = time.perf_counter()
    spectra = project_spectra(volume, parameters.rotations[start:stop], box, eps=eps)
    shifts = parameters.shifts[start:stop]
    clean = spectra_to_images(spectra, shifts)
    projected = time.perf_counter()
    clean_ctf = clean
    if parameters.ctf is not None:
        # The CTF multiplies the same shifted spectrum: equal to
        # ctf.apply_ctf(clean, ctf_images(...)) without another forward FFT.
        transfer = ctf_images(parameters.ctf[start:stop], box)
        clean_ctf = spectra_to_images(spectra, shifts, filters=transfer)
    return clean, clean_ctf, {"projection": projected - started, "ctf": time.perf_counter() - projected}


def signal_variance(clean_ctf: np.ndarray) -> float:
    """Mean over images of the variance inside the disk of radius ``L // 2``."""
    inside = clean_ctf[:, disk_mask(clean_ctf.shape[-1])].astype(np.float64)
    return float(np.mean(np.var(inside, axis=1)))


def particle_noise(noise: MicrographNoise | None, seed: int, start: int, stop: int, box: int) -> np.ndarray:
    """Unit-variance noise of particles ``start:stop``, each from its own stream.

    Particle ``i`` uses ``default_rng(SeedSequence(seed, spawn_key=(i,)))``,
    so its noise does not depend on which chunk it is computed in.

    Parameters
    ----------
    noise : MicrographNoise or None
        Micrograph patches, or None for white Gaussian noise.
    seed : int
    start, stop : int
        Particle range.
    box : int

    Returns
    -------
    ndarray, shape (stop - start, box, box), float32
    """
    streams = [np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,))) for i in range(start, stop)]
    if noise is None:
        return np.stack([white_noise((box, box), rng) for rng in streams])
    return cut_patches(noise, np.concatenate([draw_patch_choices(noise, 1, rng) for rng in streams]))


def _simulate_chunk(
    start: int,
    stop: int,
    volume: np.ndarray,
    box: int,
    parameters: ParticleParameters,
    noise: MicrographNoise | None,
    noise_std: float,
    seed: int,
) -> dict[str, Any]:
    """Kernel: project, shift, apply the CTF and add noise for particles ``start:stop``."""
    clean, clean_ctf, seconds = clean_images(volume, parameters, start, stop, box)
    started = time.perf_counter()
    images = clean_ctf + np.float32(noise_std) * particle_noise(noise, seed, start, stop, box)
    seconds["noise"] = time.perf_counter() - started
    return {"images": images, "truth/clean": clean, "truth/clean_ctf": clean_ctf, "_seconds": seconds}


# ------------------------------------------------------------- command
@dataclass(frozen=True)
class _Setup:
    """Validated inputs of a simulation."""

    volume: np.ndarray
    box: int
    volume_source: str
    map_pixel_size: float
    pixel_size: float
    parameters: ParticleParameters
    noise: MicrographNoise | None
    noise_record: dict[str, Any]
    ctf_source: str | None
    inputs: list[Path]


def _check_parameters(n, snr, max_shift, seed, with_ctf, ctf_table, defocus_range) -> None:
    if n < 1:
        raise ParameterError(f"--n {n}: need at least one particle")
    if not snr > 0:
        raise ParameterError(f"--snr {snr}: the SNR must be positive")
    if max_shift < 0:
        raise ParameterError(f"--max-shift {max_shift}: must be >= 0")
    if seed < 0:
        raise ParameterError(f"--seed {seed}: must be >= 0")
    if not with_ctf and (ctf_table is not None or defocus_range is not None):
        raise ParameterError("--no-ctf was given together with --ctf-table or --defocus-range; drop one of them")
    if ctf_table is not None and defocus_range is not None:
        raise ParameterError("--ctf-table and --defocus-range both given; CTFs come from one of them, drop the other")
    if defocus_range is not None:
        low, high = defocus_range
        if not 0 < low <= high:
            raise ParameterError(f"--defocus-range {low} {high}: need 0 < low <= high (Å, positive is underfocus)")


def _setup(volume, n, *, seed, ctf_table, defocus_range, with_ctf, noise, max_shift, pixel_size, box) -> _Setup:
    """Read and check every input; nothing is written."""
    from ..datasets import load_volume

    spec = parse_noise_spec(noise)
    table = load_ctf_table(ctf_table) if ctf_table is not None else None
    loaded = load_volume(volume, box=box)
    map_pixel_size = pixel_size if pixel_size is not None else loaded.pixel_size
    if map_pixel_size is None:
        raise InputError(
            f"{volume}: the map's header has no pixel size (0); pass --pixel-size in Å "
            "(5 for the shared 70S ribosome map)"
        )
    data, map_box = loaded.data, loaded.data.shape[0]
    box = box or map_box
    if box > map_box:
        raise ParameterError(f"--box {box} is larger than the map ({map_box} voxels); use --box <= {map_box}")
    output_pixel_size = map_pixel_size * map_box / box
    if not max_shift < box / 2:
        raise ParameterError(f"--max-shift {max_shift}: must be smaller than half the box ({box / 2} px)")
    inputs = [] if loaded.source == "phantom" or loaded.source.startswith("registry:") else [Path(volume)]
    if ctf_table is not None:
        inputs.append(Path(ctf_table))
    noise_model, noise_record = None, {"model": "white"}
    if spec.kind == "micrograph":
        micrograph, micrograph_pixel_size = load_micrograph(spec.micrograph)
        noise_model = prepare_micrograph_noise(
            micrograph, micrograph_pixel_size, box, output_pixel_size, whiten=spec.whiten
        )
        inputs.append(spec.micrograph)
        noise_record = {
            "model": "micrograph",
            "micrograph": str(spec.micrograph.resolve()),
            "micrograph_pixel_size": micrograph_pixel_size,
            "resampled_pixel_size": noise_model.pixel_size,
            "whiten": spec.whiten,
            "background_positions": len(noise_model.centres),
            "patches": "zero mean, unit variance each; random 90-degree turns and flips",
        }
    parameters = draw_parameters(
        n,
        seed,
        max_shift=max_shift,
        pixel_size=output_pixel_size,
        ctf_table=table,
        defocus_range=defocus_range,
        with_ctf=with_ctf,
    )
    if not with_ctf:
        ctf_source = None
    elif table is not None:
        ctf_source = f"table:{Path(ctf_table).resolve()}"
    else:
        low, high = defocus_range or DEFAULT_DEFOCUS_RANGE
        ctf_source = (
            f"defocus uniform in [{low}, {high}] Å, {DEFAULT_VOLTAGE:g} kV, Cs {DEFAULT_CS:g} mm, "
            f"Q {DEFAULT_AMPLITUDE_CONTRAST:g}, astigmatism <= {ASTIGMATISM_MAX:g} Å"
        )
    return _Setup(
        data,
        box,
        loaded.source,
        float(map_pixel_size),
        float(output_pixel_size),
        parameters,
        noise_model,
        noise_record,
        ctf_source,
        inputs,
    )


def balanced_chunk(n: int, box: int, workers: int = 1) -> int:
    """Particles per chunk: about :func:`~cryoden_dist.stack.default_chunk`, in equal chunks.

    The number of chunks is rounded up to a multiple of ``workers`` and the
    particles split evenly, so no worker is left with a long last chunk
    (10^4 particles of 65 px on 2 workers: 6 chunks of 1667, not 5 of 1985
    and one of 75). Only the store layout depends on it, never the values.
    """
    n_chunks = math.ceil(n / default_chunk(box, n))
    n_chunks = min(n, math.ceil(n_chunks / workers) * workers)
    return math.ceil(n / n_chunks)


def _create_store(out: Path, setup: _Setup, n: int, chunk: int | None, attrs: dict[str, Any]) -> ParticleStack:
    box = setup.box
    with_ctf = setup.parameters.ctf is not None
    if not with_ctf:
        attrs = {**attrs, "ctf_missing_reason": "simulated without CTF (--no-ctf)"}
    stack = ParticleStack.create(
        out, n, box, setup.pixel_size, kind="simulation", chunk=chunk, with_ctf=with_ctf, attrs=attrs
    )
    for name in ("truth/clean", "truth/clean_ctf"):
        stack.group.create_array(
            name, shape=(n, box, box), chunks=(stack.chunk, box, box), dtype="float32", fill_value=0.0, compressors=None
        )
    stack.group.create_array("truth/rotations", shape=(n, 3, 3), dtype="float64")[:] = setup.parameters.rotations
    stack.group.create_array("truth/shifts", shape=(n, 2), dtype="float64")[:] = setup.parameters.shifts
    if with_ctf:
        stack.write_ctf(setup.parameters.ctf)
    return stack


def simulate(
    volume: str | Path,
    out: str | Path,
    *,
    n: int,
    snr: float,
    ctf_table: str | Path | None = None,
    defocus_range: tuple[float, float] | None = None,
    with_ctf: bool = True,
    noise: str = "white",
    max_shift: float = 0.0,
    pixel_size: float | None = None,
    box: int | None = None,
    seed: int = 0,
    chunk: int | None = None,
    overwrite: bool = False,
    client,
) -> ParticleStack:
    """Simulate noisy CTF-modulated projections of a map into a stack, with ground truth.

    Parameters
    ----------
    volume : str or Path
        ``"phantom"``, a registry name (:data:`cryoden_dist.datasets.MAPS`)
        or a cubic ``.mrc`` map.
    out : path
        Output store (``.zarr``).
    n : int
        Number of particles.
    snr : float
        Target SNR: mean over particles of var(clean CTF-modulated image
        inside the disk of radius ``L // 2``) / noise variance, the signal
        variance measured on the first ``min(n, 512)`` particles.
    ctf_table : path, optional
        cryoDRGN CTF table ``.npy`` ``[N, 9]``; rows drawn uniformly with
        replacement (their box and pixel size are ignored).
    defocus_range : (float, float), optional
        Uniform mean defocus range in Å when there is no table, with 300 kV,
        Cs 2.7 mm, amplitude contrast 0.1 and random astigmatism up to
        400 Å; default 10000-25000 Å.
    with_ctf : bool
        Modulate the images by CTFs.
    noise : str
        ``"white"`` (Gaussian), ``"micrograph:FILE.mrc"`` (background patches
        of a real micrograph, coloured) or ``"micrograph:FILE.mrc:whiten"``.
    max_shift : float
        Shifts uniform in the disk of this radius in pixels.
    pixel_size : float, optional
        Voxel size of the map in Å, overriding its header (default: the
        header's; 5 Å for the phantom).
    box : int, optional
        Image size. With a map larger than ``box`` the projections are
        Fourier-cropped to it (same field of view, pixel size
        ``L / box`` times the map's); the phantom is sampled at ``box``
        (default 65).
    seed : int
        Seed of every random draw; the output depends on nothing else.
    chunk : int, optional
        Particles per Zarr chunk; default :func:`balanced_chunk` for the
        client's workers.
    overwrite : bool
        Replace an existing output made otherwise.
    client : distributed.Client

    Returns
    -------
    ParticleStack
        ``images`` (noisy), ``truth/clean`` (shifted projections),
        ``truth/clean_ctf``, ``truth/rotations``, ``truth/shifts`` and
        ``ctf/``; attributes ``snr``, ``snr_definition``,
        ``noise_variance``, ``noise``, ``volume``, ``seed``...

    Raises
    ------
    InputError, ParameterError, OutputExistsError
        For bad inputs (before anything is written) or a refused output.
    """
    out = Path(out)
    _check_parameters(n, snr, max_shift, seed, with_ctf, ctf_table, defocus_range)
    setup = _setup(
        volume,
        n,
        seed=seed,
        ctf_table=ctf_table,
        defocus_range=defocus_range,
        with_ctf=with_ctf,
        noise=noise,
        max_shift=max_shift,
        pixel_size=pixel_size,
        box=box,
    )
    params = {
        "volume": str(volume),
        "n": n,
        "snr": snr,
        "ctf_table": None if ctf_table is None else str(ctf_table),
        "defocus_range": None if defocus_range is None else list(defocus_range),
        "with_ctf": with_ctf,
        "noise": noise,
        "max_shift": max_shift,
        "pixel_size": pixel_size,
        "box": box,
        "seed": seed,
        "chunk": chunk,
    }
    state = prepare_output(out, "simulate", params, inputs=setup.inputs, overwrite=overwrite)
    if state == "complete":
        return ParticleStack.open(out)
    if state == "new":
        pilot = min(n, PILOT_SIZE)
        _, pilot_ctf, _ = clean_images(setup.volume, setup.parameters, 0, pilot, setup.box)
        signal = signal_variance(pilot_ctf)
        attrs = {
            "snr": snr,
            "snr_definition": SNR_DEFINITION,
            "signal_variance": signal,
            "noise_variance": signal / snr,
            "pilot_particles": pilot,
            "noise": setup.noise_record,
            "volume": setup.volume_source,
            "map_pixel_size": setup.map_pixel_size,
            "ctf_source": setup.ctf_source,
            "max_shift": max_shift,
            "seed": seed,
            "projection": f"Fourier slice, finufft type-2 eps {PROJECTION_EPS}, Nyquist disk |k| < L/2",
        }
        try:
            workers = max(1, len(client.nthreads()))
            stack = _create_store(out, setup, n, chunk or balanced_chunk(n, setup.box, workers), attrs)
            record_command(stack, "simulate", params)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)  # never leave a half-made store behind
            raise
    else:
        stack = ParticleStack.open(out, mode="r+")
    noise_std = float(np.sqrt(stack.info["noise_variance"]))
    results = run_chunks(
        client,
        stack,
        "simulate",
        _simulate_chunk,
        args=(setup.volume, setup.box, setup.parameters, setup.noise, noise_std, seed),
        params={"noise_std": noise_std},
    )
    seconds: dict[str, float] = {}
    for result in results:
        for part, value in result["_seconds"].items():
            seconds[part] = seconds.get(part, 0.0) + value
    stack.update_info(worker_seconds_last_run={part: round(value, 3) for part, value in seconds.items()})
    mark_complete(stack)
    log.info("simulated %d particles into %s (noise variance %.4g)", n, out, stack.info["noise_variance"])
    return stack
