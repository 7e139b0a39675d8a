"""Montages of particle images (PNG), with matplotlib's Agg backend.

Every image gets its own contrast (its 0.5 to 99.5 percentiles mapped to
black and white): noisy, denoised and clean images differ by orders of
magnitude in scale and a shared grey scale would show only one of them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .errors import OutputExistsError, ParameterError
from .evaluate import CLEAN, check_same_particles, open_truth
from .pipeline import paths_overlap
from .stack import ParticleStack

__all__ = ["evenly_spaced", "montage", "montage_from_stores"]

#: Percentiles of each image mapped to black and white.
CONTRAST_PERCENTILES = (0.5, 99.5)


def evenly_spaced(n: int, count: int) -> np.ndarray:
    """``min(count, n)`` distinct particle indices spread evenly over ``0 .. n - 1``."""
    return np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64))


def _write_png_atomically(figure, path: Path, dpi: int) -> None:
    """Save to a temporary name beside ``path`` and rename, so no reader sees a half-written PNG."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        figure.savefig(temporary, format="png", dpi=dpi)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def montage(
    rows: Mapping[str, np.ndarray],
    path: str | Path,
    titles: Sequence[str] | None = None,
    *,
    cell_inches: float = 1.3,
    dpi: int = 100,
) -> Path:
    """Write a grid of images: one labelled row per entry of ``rows``.

    Parameters
    ----------
    rows : mapping of str to ndarray
        Row label -> images ``[m, L, L]`` (rows may differ in length and
        box size).
    path : path
        The PNG to write (replaced atomically if it exists).
    titles : sequence of str, optional
        Column titles, shown above the first row.
    cell_inches, dpi : float, int
        Size of one image cell and resolution of the PNG.

    Returns
    -------
    Path
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    rows = {label: np.asarray(images) for label, images in rows.items()}
    if not rows:
        raise ValueError("montage needs at least one row of images")
    rows = {label: images[None] if images.ndim == 2 else images for label, images in rows.items()}
    columns = max(images.shape[0] for images in rows.values())
    # Figure + Agg canvas instead of pyplot: no global state, safe in worker threads.
    figure = Figure(figsize=(cell_inches * columns + 0.6, cell_inches * len(rows) + 0.3), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for row, (label, images) in enumerate(rows.items()):
        for column in range(columns):
            ax = axes[row, column]
            ax.set_xticks([])
            ax.set_yticks([])
            if column >= images.shape[0]:
                ax.set_axis_off()
                continue
            image = images[column].astype(np.float64)
            low, high = np.percentile(image, CONTRAST_PERCENTILES)
            if high <= low:  # a flat image shows as mid-grey
                low, high = low - 1.0, low + 1.0
            ax.imshow(image, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            if column == 0:
                ax.set_ylabel(label, fontsize=9)
            if row == 0 and titles is not None and column < len(titles):
                ax.set_title(titles[column], fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_png_atomically(figure, path, dpi)
    return path


def _row_label(stack: ParticleStack) -> str:
    method = stack.info.get("method")
    return f"denoised ({method})" if method else stack.path.name


def montage_from_stores(
    path: str | Path,
    *,
    truth: str | Path | None = None,
    denoised: str | Path,
    n_images: int = 8,
) -> Path:
    """Montage of evenly spaced particles of a stack, with noisy and clean rows from a simulation.

    Parameters
    ----------
    path : path
        The PNG to write (must end in ``.png``; must not lie in an input store).
    truth : path, optional
        A ``cryoden simulate`` store: adds the rows "noisy" (its images) above
        and "clean" (``truth/clean``) below the stack's images.
    denoised : path
        The stack to show.
    n_images : int
        Particles (columns) to show.

    Raises
    ------
    ParameterError
        If ``path`` does not end in ``.png`` or ``n_images < 1``.
    OutputExistsError
        If ``path`` is, or lies inside, an input store, or is a directory.
    InputError
        If a store is not a stack, the truth has no clean images, or the
        stores hold different particles.
    """
    path = Path(path)
    for store in (denoised, truth):
        if store is not None and paths_overlap(path, Path(store)):
            raise OutputExistsError(f"{path}: would write into the input store {store}; choose another PNG path")
    if path.suffix.lower() != ".png":
        raise ParameterError(f"{path}: the montage is written as PNG; give a file name ending in .png")
    if n_images < 1:
        raise ParameterError(f"n_images = {n_images}: show at least one particle")
    if path.is_dir():
        raise OutputExistsError(f"{path}: is a directory; give a PNG file name")
    stack = ParticleStack.open(denoised)
    indices = evenly_spaced(stack.n, n_images)
    shown = _row_label(stack)
    if truth is None:
        rows = {shown: stack.images.oindex[indices]}
    else:
        simulation = open_truth(truth)
        check_same_particles(stack, simulation)
        if Path(denoised).resolve() == Path(truth).resolve():
            shown = "noisy (same store)"
        rows = {
            "noisy": simulation.images.oindex[indices],
            shown: stack.images.oindex[indices],
            "clean": simulation.group[CLEAN].oindex[indices],
        }
    return montage(rows, path, titles=[f"#{i}" for i in indices])
