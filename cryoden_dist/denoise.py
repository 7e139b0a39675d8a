"""The ``denoise`` command and the registry every denoising method plugs into.

A method is a :class:`Method` entry in :data:`METHODS`: its parameters and
their defaults, whether it needs CTF parameters, and a ``run`` function that
fills the ``images`` of a prepared output stack from a source stack, one
Dask task per chunk (:func:`cryoden_dist.pipeline.run_chunks`, so a killed
run resumes). :func:`denoise` does everything else: parameter checks, the
output store (per-particle CTF and metadata copied from the source), resume
and completion.

Baselines
---------
``lowpass``
    A radial raised-cosine low-pass filter at a resolution in Å. It ignores
    the CTF: the output keeps the CTF modulation of its input.
``wiener``
    A CTF-aware Wiener filter returning a CTF-free estimate, with a signal
    spectrum estimated from the stack itself (see :func:`wiener_model`).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import scipy.fft

from .basis.spca import CTF_MODELS, SHRINKERS, resolve_spca_wiener, run_spca_wiener
from .ctf import ctf_images
from .denoise_mfvdm import (
    CLASS_AVERAGE_DEFAULTS,
    MFVDM_DEFAULTS,
    resolve_class_average,
    resolve_mfvdm,
    run_class_average,
    run_mfvdm,
)
from .errors import CryodenError, InputError, ParameterError
from .image import frequency_grid, noise_variance_from_corners, radial_index
from .pipeline import map_chunks, mark_complete, prepare_output, record_command, run_chunks
from .stack import ParticleStack

__all__ = [
    "METHODS",
    "Method",
    "denoise",
    "parse_params",
    "raised_cosine_lowpass",
    "wiener_filter",
    "wiener_model",
]

log = logging.getLogger(__name__)

#: Values of the ``images_ctf_state`` attribute: the images carry the CTF
#: ("modulated"), had it undone ("corrected"), never had one ("none").
CTF_STATES = ("modulated", "corrected", "none")


@dataclass(frozen=True)
class Method:
    """A denoising method of the registry.

    Attributes
    ----------
    name : str
        The ``--method`` name.
    summary : str
        One line for ``cryoden methods``.
    needs_ctf : bool
        The method reads the particles' CTF parameters.
    defaults : mapping
        Every parameter the method accepts, with its default. A ``None``
        default is filled in from the stack by ``resolve``.
    run : callable
        ``run(source, target, params, client) -> None``: write
        ``target.images`` (through ``run_chunks``, for resume).
    resolve : callable, optional
        ``resolve(source, params) -> params``: fill stack-dependent defaults
        and check values (raise ParameterError) before any output is made.
    corrects_ctf : bool
        The output images are CTF-free estimates.
    """

    name: str
    summary: str
    needs_ctf: bool
    defaults: Mapping[str, Any]
    run: Callable[[ParticleStack, ParticleStack, dict, Any], None]
    resolve: Callable[[ParticleStack, dict], dict] | None = None
    corrects_ctf: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))


# --------------------------------------------------------------- parameters
_BOOLEANS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _coerce(text: str) -> bool | int | float | str:
    if text.lower() in _BOOLEANS:
        return _BOOLEANS[text.lower()]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_params(items: tuple[str, ...]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` items (``--param``) into a dict.

    Values become bool (true/false/yes/no/on/off), int, float, or else stay
    strings: ``("resolution=12", "falloff=2.5", "name=x")`` ->
    ``{"resolution": 12, "falloff": 2.5, "name": "x"}``.

    Raises
    ------
    ParameterError
        For an item without ``=``, with an empty or non-identifier key, or a
        key given twice.
    """
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ParameterError(f"--param {item!r}: expected KEY=VALUE with a name such as resolution=8")
        if key in params:
            raise ParameterError(f"--param {key}: given twice; keep one")
        params[key] = _coerce(value.strip())
    return params


def _check_type(method: Method, key: str, value: Any) -> Any:
    """``value`` as the type of the parameter's default (ints accepted for floats)."""
    default = method.defaults[key]
    if default is None or value is None:
        return value
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and (expected is bool) == isinstance(value, bool):
        return value
    raise ParameterError(
        f"--param {key}={value!r}: method {method.name} expects a {expected.__name__} (default {default!r})"
    )


def _positive(method: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ParameterError(f"--param {key}={value!r}: method {method} needs a positive number")
    return float(value)


def _pixel_size(source: ParticleStack, method: str) -> float:
    if source.pixel_size is None:
        raise InputError(
            f"{source.path}: method {method} needs the pixel size and the stack has none; "
            "ingest again with --pixel-size"
        )
    return float(source.pixel_size)


# ------------------------------------------------------------------ lowpass
def raised_cosine_lowpass(box: int, pixel_size: float, resolution: float, falloff: float) -> np.ndarray:
    """Radial raised-cosine low-pass filter on the DFT grid (plain FFT order).

    Parameters
    ----------
    box : int
        Image size ``L``.
    pixel_size : float
        Pixel size in Å.
    resolution : float
        Cutoff resolution in Å; the filter is 0.5 at the frequency
        ``1 / resolution``.
    falloff : float
        Width of the cosine edge in Fourier pixels (``1 / (L p)`` 1/Å each):
        the filter is 1 below ``cutoff - falloff / 2`` and 0 above
        ``cutoff + falloff / 2``.

    Returns
    -------
    ndarray, shape (L, L)
    """
    frequency, _ = frequency_grid(box, pixel_size)
    half_width = 0.5 * falloff / (box * pixel_size)
    start = 1.0 / resolution - half_width
    if half_width == 0:
        return (frequency <= start).astype(np.float64)
    ramp = np.clip((frequency - start) / (2 * half_width), 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * ramp))


def _filter_chunk(start: int, stop: int, source_path: str, half_plane_filter: np.ndarray) -> dict:
    """Multiply the Fourier transform of particles ``[start, stop)`` by a fixed filter."""
    images = ParticleStack.open(source_path).images[start:stop]
    box = images.shape[-1]
    filtered = scipy.fft.irfft2(scipy.fft.rfft2(images) * half_plane_filter, s=(box, box))
    return {"images": filtered.astype(np.float32)}


def _half_plane(full: np.ndarray) -> np.ndarray:
    """The ``rfft2`` columns of a filter given on the full, point-symmetric DFT grid."""
    return np.ascontiguousarray(full[..., : full.shape[-1] // 2 + 1])


def _resolve_lowpass(source: ParticleStack, params: dict) -> dict:
    pixel_size = _pixel_size(source, "lowpass")
    nyquist = 2.0 * pixel_size
    resolution = (
        4.0 * pixel_size if params["resolution"] is None else _positive("lowpass", "resolution", params["resolution"])
    )
    if resolution < nyquist:
        raise ParameterError(
            f"--param resolution={resolution}: finer than the Nyquist resolution {nyquist} Å of {source.path}; "
            f"use a value >= {nyquist}"
        )
    falloff = params["falloff"]
    if not (math.isfinite(falloff) and falloff >= 0):
        raise ParameterError(f"--param falloff={falloff}: the width of the edge in Fourier pixels must be >= 0")
    return {"resolution": resolution, "falloff": falloff}


def _run_lowpass(source: ParticleStack, target: ParticleStack, params: dict, client) -> None:
    full = raised_cosine_lowpass(source.box, _pixel_size(source, "lowpass"), params["resolution"], params["falloff"])
    run_chunks(client, target, "lowpass", _filter_chunk, args=(str(source.path), _half_plane(full)), params=params)


# ------------------------------------------------------------------- wiener
def _spectrum_chunk(start: int, stop: int, source_path: str, radius: float) -> dict:
    """Sums over particles ``[start, stop)`` of ``|Y|^2`` and ``|H|^2`` per DFT point, and of the corner variance."""
    source = ParticleStack.open(source_path)
    images = source.images[start:stop]
    data_power = np.square(np.abs(scipy.fft.fft2(images)))
    if source.has_ctf:
        ctf = ctf_images(source.ctf_params(slice(start, stop)), source.box)
        ctf_power = np.square(ctf).sum(axis=0, dtype=np.float64)
    else:  # H = 1: the spectra of a stack without CTF (a CTF-free Wiener baseline)
        ctf_power = np.full(data_power.shape[1:], float(stop - start))
    return {
        "count": stop - start,
        "data_power": data_power.sum(axis=0, dtype=np.float64),
        "ctf_power": ctf_power,
        "noise_variance_sum": noise_variance_from_corners(images, radius) * (stop - start),
    }


def wiener_model(source: ParticleStack, client, *, radius: float, noise_scale: float = 1.0) -> dict[str, Any]:
    """Estimate the spectra of the model ``Y = H X + N`` from the stack (one pass).

    Model: each image's Fourier transform is ``Y = H X + N`` with ``H`` the
    particle's CTF, ``X`` the CTF-free particle with a radially symmetric
    power spectrum ``P_X(s)`` (the same for all particles), and ``N`` white
    noise of pixel variance ``sigma^2``, so every coefficient of numpy's
    unnormalised FFT has noise power ``sigma_F^2 = L^2 sigma^2``. Averaging
    over particles and over each ring of the DFT grid,

        ``E|Y|^2(s) = P_X(s) E|H|^2(s) + sigma_F^2``,

    so ``P_X(s) = max(E|Y|^2(s) - sigma_F^2, 0) / E|H|^2(s)``. ``sigma^2`` is
    the variance of the pixels outside the particle disk (corners).

    Guards: a ring's excess power counts only when it exceeds three
    standard errors of the noise estimate (``3 sigma_F^2 / sqrt(N)`` for
    ``N`` coefficients in the ring), and ``E|H|^2`` is floored at 1e-3, so
    rings near common CTF zeros do not produce huge, noise-driven
    ``P_X`` (which would turn the filter into an inverse filter).

    Limits: the noise must be white (micrograph noise with a coloured
    spectrum is over-smoothed at low and under-smoothed at high frequency
    unless whitened first); the corners must be free of particle signal
    (``radius``); ``P_X`` is a stack average, not per particle.

    Parameters
    ----------
    source : ParticleStack
        Stack with CTF parameters (a stack without them is modelled with
        ``H = 1``).
    client : distributed.Client
    radius : float
        Particle radius in pixels; pixels outside it are noise.
    noise_scale : float
        Multiplies the estimated noise power (> 1 smooths more).

    Returns
    -------
    dict
        JSON-able: ``noise_variance`` (pixel), ``noise_power`` (``sigma_F^2``
        used by the filter), and per radial shell of the DFT grid (index =
        :func:`cryoden_dist.image.radial_index`, Nyquist corners included)
        ``data_power``, ``ctf_power`` and ``signal_power``.
    """
    parts = map_chunks(
        client, _spectrum_chunk, source.chunk_bounds(), args=(str(source.path), radius), desc="wiener spectra"
    )
    count = sum(part["count"] for part in parts)
    box = source.box
    shells = radial_index(box).ravel()
    points_per_shell = np.bincount(shells)

    def shell_mean(name: str) -> np.ndarray:
        total = np.sum([part[name] for part in parts], axis=0)
        return np.bincount(shells, weights=total.ravel()) / (points_per_shell * count)

    data_power, ctf_power = shell_mean("data_power"), shell_mean("ctf_power")
    noise_variance = sum(part["noise_variance_sum"] for part in parts) / count
    noise_power = noise_scale * box * box * noise_variance
    excess = data_power - noise_power
    significant = excess > 3.0 * noise_power / np.sqrt(points_per_shell * count)
    signal_power = np.where(significant, excess, 0.0) / np.maximum(ctf_power, 1e-3)
    return {
        "noise_variance": float(noise_variance),
        "noise_power": float(noise_power),
        "data_power": data_power.tolist(),
        "ctf_power": ctf_power.tolist(),
        "signal_power": signal_power.tolist(),
        "particles": int(count),
    }


def wiener_filter(ctf: np.ndarray, signal_power: np.ndarray, noise_power: float) -> np.ndarray:
    """Wiener filters ``H P_X / (H^2 P_X + sigma_F^2)`` (CTF real, so ``H* = H``).

    Parameters
    ----------
    ctf : ndarray, shape (n, L, L) or (n, L, L // 2 + 1)
    signal_power : ndarray, broadcastable to ``ctf``
        ``P_X`` on the same grid.
    noise_power : float
        ``sigma_F^2``.

    Returns
    -------
    ndarray like ``ctf``; 0 where the denominator is 0 (no signal, no noise).
    """
    numerator = ctf * signal_power
    denominator = ctf * numerator + noise_power
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def _wiener_chunk(start: int, stop: int, source_path: str, signal_power: np.ndarray, noise_power: float) -> dict:
    """CTF-free Wiener estimates of particles ``[start, stop)``."""
    source = ParticleStack.open(source_path)
    images = source.images[start:stop]
    box = source.box
    ctf = _half_plane(ctf_images(source.ctf_params(slice(start, stop)), box))
    signal_grid = _half_plane(signal_power[radial_index(box)]).astype(np.float32)
    spectrum = scipy.fft.rfft2(images) * wiener_filter(ctf, signal_grid, np.float32(noise_power))
    return {"images": scipy.fft.irfft2(spectrum, s=(box, box)).astype(np.float32)}


def _resolve_wiener(source: ParticleStack, params: dict) -> dict:
    if source.info.get("images_ctf_state") == "corrected":
        raise InputError(
            f"{source.path}: the images are already CTF-corrected; run wiener on the CTF-modulated stack instead"
        )
    radius = source.box // 2 if params["radius"] is None else _positive("wiener", "radius", params["radius"])
    if radius >= source.box / np.sqrt(2):
        raise ParameterError(
            f"--param radius={radius}: leaves no corner pixels for the noise estimate in a box of {source.box}; "
            f"use a radius below {source.box / np.sqrt(2):.1f} px"
        )
    return {"radius": float(radius), "noise_scale": _positive("wiener", "noise_scale", params["noise_scale"])}


def _run_wiener(source: ParticleStack, target: ParticleStack, params: dict, client) -> None:
    # The model is stored with the output, so a resumed run filters the
    # remaining chunks with exactly the spectra the first run used.
    model = target.info.get("wiener_model")
    if model is None:
        model = wiener_model(source, client, radius=params["radius"], noise_scale=params["noise_scale"])
        target.update_info(wiener_model=model)
    signal_power = np.asarray(model["signal_power"])
    run_chunks(
        client,
        target,
        "wiener",
        _wiener_chunk,
        args=(str(source.path), signal_power, model["noise_power"]),
        params=params,
    )


# ----------------------------------------------------------------- registry
METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            name="lowpass",
            summary="radial raised-cosine low-pass at a resolution in Å (resolution=4*pixel, falloff=3 px); CTF kept",
            needs_ctf=False,
            defaults={"resolution": None, "falloff": 3.0},
            run=_run_lowpass,
            resolve=_resolve_lowpass,
        ),
        Method(
            name="wiener",
            summary="CTF-aware Wiener filter, spectra estimated from the stack (white noise); CTF-free output",
            needs_ctf=True,
            defaults={"radius": None, "noise_scale": 1.0},
            run=_run_wiener,
            resolve=_resolve_wiener,
            corrects_ctf=True,
        ),
        Method(
            name="spca-wiener",
            summary=(
                "steerable PCA Wiener filter (radius=L//2-1 px, bandlimit=0.5, "
                f"shrinker={'|'.join(SHRINKERS)}); with CTF: ctf_model={'|'.join(CTF_MODELS)} (covariance Wiener "
                "filter with each particle's CTF, or phase flip + |H| deconvolution), CTF-free output"
            ),
            needs_ctf=False,
            defaults={"radius": None, "bandlimit": None, "shrinker": SHRINKERS[0], "ctf_model": CTF_MODELS[0]},
            run=run_spca_wiener,
            resolve=resolve_spca_wiener,
            # Corrected for CTF-modulated input; run_spca_wiener records the input's state for the others.
            corrects_ctf=True,
        ),
        Method(
            name="mfvdm",
            summary=(
                "multi-frequency vector diffusion maps (Fan & Zhao 2021): sPCA, bispectrum kNN, MFVDM neighbours "
                "and angles, graph filter (knn=50, k_max=10, m=50); with CTF: phase flip + effective-CTF correction"
            ),
            needs_ctf=False,
            defaults=MFVDM_DEFAULTS,
            run=run_mfvdm,
            resolve=resolve_mfvdm,
            # Corrected for CTF-modulated input; run_mfvdm records the input's state for the others.
            corrects_ctf=True,
        ),
        Method(
            name="class-average",
            summary=(
                "mean of each image and its knn=50 rotationally aligned bispectrum neighbours (sPCA coefficients); "
                "with CTF: phase flip + correction by the averaged |CTF|"
            ),
            needs_ctf=False,
            defaults=CLASS_AVERAGE_DEFAULTS,
            run=run_class_average,
            resolve=resolve_class_average,
            corrects_ctf=True,
        ),
    )
}


def _method(name: str) -> Method:
    if name not in METHODS:
        raise ParameterError(f"--method {name}: unknown method; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def _resolve_params(method: Method, source: ParticleStack, params: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(params) - set(method.defaults))
    if unknown:
        valid = ", ".join(method.defaults) or "none"
        raise ParameterError(f"--param {unknown[0]}: method {method.name} has no such parameter; valid: {valid}")
    merged = {key: _check_type(method, key, params.get(key, default)) for key, default in method.defaults.items()}
    return method.resolve(source, merged) if method.resolve else merged


def _output_ctf_state(method: Method, source: ParticleStack) -> str:
    if method.corrects_ctf:
        return "corrected"
    return source.info.get("images_ctf_state") or ("modulated" if source.has_ctf else "none")


def denoise(
    stack_path: str | Path,
    out: str | Path,
    *,
    method: str,
    params: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    client,
) -> ParticleStack:
    """Denoise a stack with a registered method into a new stack.

    Parameters
    ----------
    stack_path : path
        Source stack (never modified).
    out : path
        Output stack; an unfinished output of the same command and
        parameters is resumed, a finished one returned as is.
    method : str
        A key of :data:`METHODS`.
    params : mapping, optional
        Method parameters (see ``cryoden methods``); missing ones take
        their defaults.
    overwrite : bool
        Replace an existing output made otherwise.
    client : distributed.Client

    Returns
    -------
    ParticleStack
        The output, ``kind="denoised"``, with attrs ``method``, ``params``
        (the resolved values) and ``images_ctf_state``.

    Raises
    ------
    ParameterError
        Unknown method or parameter, or a bad value.
    MissingCTFError
        The method needs CTF parameters and the stack has none.
    OutputExistsError
        See :func:`cryoden_dist.pipeline.prepare_output`.
    """
    chosen = _method(method)
    source = ParticleStack.open(stack_path)
    if chosen.needs_ctf:
        source.ctf_params(slice(0, 1))  # raises MissingCTFError naming the stack
    resolved = _resolve_params(chosen, source, params or {})
    command = {"input": str(Path(stack_path).resolve()), "method": chosen.name, "params": resolved}
    if "centering" in source.info:  # two centrings of one stack are different inputs
        command["source_centering"] = source.info["centering"]
    state = prepare_output(out, "denoise", command, inputs=[stack_path], overwrite=overwrite)
    if state == "complete":
        log.info("%s is complete already (same input, method and parameters)", out)
        return ParticleStack.open(out)
    if state == "new":
        target = ParticleStack.create_like(
            out,
            source,
            kind="denoised",
            attrs={
                "method": chosen.name,
                "params": resolved,
                "images_ctf_state": _output_ctf_state(chosen, source),
            },
        )
        record_command(target, "denoise", command)
    else:
        target = ParticleStack.open(out, mode="r+")
    try:
        chosen.run(source, target, resolved, client)
    except CryodenError:
        if state == "new":
            shutil.rmtree(out, ignore_errors=True)  # a fresh output that failed on bad input is not left behind
        raise
    mark_complete(target)
    return target
