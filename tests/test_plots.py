"""Montages: layout, atomic PNG writes, refusals, and the plot / evaluate --png commands."""

from __future__ import annotations

import numpy as np
import pytest
from _synthetic import make_simulation
from click.testing import CliRunner
from matplotlib.image import imread

from cryoden_dist.cli import main
from cryoden_dist.denoise import denoise
from cryoden_dist.errors import InputError, OutputExistsError, ParameterError
from cryoden_dist.plots import evenly_spaced, montage, montage_from_stores

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return make_simulation(tmp_path_factory.mktemp("sim") / "sim.zarr", n=40, box=48, snr=1.0, chunk=16)


def _runs(busy: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate([[0], busy.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def _tile_spans(png: np.ndarray) -> list[tuple[int, int]]:
    """Pixel-row spans of the rows of image tiles: runs of rows mostly covered by non-white pixels."""
    grey = png[..., :3].mean(axis=-1)
    return _runs((grey < 0.95).mean(axis=1) > 0.4)


def _first_tile(png: np.ndarray, rows: tuple[int, int]) -> np.ndarray:
    """Grey pixels inside the frame of the first tile of a row of tiles."""
    grey = png[rows[0] : rows[1], :, :3].mean(axis=-1)
    start, stop = _runs((grey < 0.95).mean(axis=0) > 0.9)[0]
    return grey[3:-3, start + 3 : stop - 3]


def _tile_rows(png: np.ndarray) -> int:
    return len(_tile_spans(png))


def test_evenly_spaced():
    np.testing.assert_array_equal(evenly_spaced(100, 5), [0, 25, 50, 74, 99])
    np.testing.assert_array_equal(evenly_spaced(3, 8), [0, 1, 2])
    np.testing.assert_array_equal(evenly_spaced(1, 8), [0])


def test_montage_writes_one_tile_row_per_entry(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(4, 32, 32))
    rows = {"a": noise, "b": 1e3 * noise + 50, "c": np.zeros((4, 32, 32))}
    path = montage(rows, tmp_path / "sub" / "m.png", titles=["1", "2", "3", "4"])
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.png"]  # no temporary file left
    image = imread(path)
    assert image.shape[1] > image.shape[0]  # 4 columns, 3 rows
    spans = _tile_spans(image)
    assert len(spans) == 3
    # per-image contrast: the same noise scaled by 1000 and offset looks the same; the zero row is flat
    spread = [_first_tile(image, span).std() for span in spans]
    # Gaussian noise between its 0.5 and 99.5 percentiles spans grey levels with std ~ 1 / 5.2
    assert spread[0] > 0.15
    assert spread[1] == pytest.approx(spread[0], abs=1e-3)
    assert spread[2] == 0


def test_montage_from_stores_rows_and_refusals(sim, client, tmp_path):
    denoised = denoise(sim.path, tmp_path / "w.zarr", method="wiener", client=client)
    path = montage_from_stores(tmp_path / "m.png", truth=sim.path, denoised=denoised.path, n_images=6)
    image = imread(path)
    assert _tile_rows(image) == 3  # noisy, denoised, clean
    only = montage_from_stores(tmp_path / "only.png", denoised=denoised.path, n_images=6)
    assert _tile_rows(imread(only)) == 1
    assert imread(only).shape[0] < image.shape[0]

    with pytest.raises(OutputExistsError, match="input store"):
        montage_from_stores(sim.path / "m.png", truth=sim.path, denoised=denoised.path)
    with pytest.raises(OutputExistsError, match="input store"):
        montage_from_stores(denoised.path, denoised=denoised.path)
    with pytest.raises(ParameterError, match=r"\.png"):
        montage_from_stores(tmp_path / "m.jpg", denoised=denoised.path)
    with pytest.raises(InputError, match="`cryoden simulate` output"):
        montage_from_stores(tmp_path / "x.png", truth=denoised.path, denoised=denoised.path)
    assert not (tmp_path / "x.png").exists()


def test_cli_plot_and_evaluate_png(sim, scheduler_address, tmp_path):
    runner = CliRunner()
    out = tmp_path / "lp.zarr"
    assert (
        runner.invoke(
            main, ["denoise", str(sim.path), "--method", "lowpass", "--out", str(out), "--scheduler", scheduler_address]
        ).exit_code
        == 0
    )
    plot = runner.invoke(
        main, ["plot", str(out), "--truth", str(sim.path), "--out", str(tmp_path / "p.png"), "--n", "5"]
    )
    assert plot.exit_code == 0, plot.output
    assert _tile_rows(imread(tmp_path / "p.png")) == 3
    png = tmp_path / "e.png"
    result = runner.invoke(
        main,
        ["evaluate", str(out), "--truth", str(sim.path), "--png", str(png), "--json", "--scheduler", scheduler_address],
    )
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    refused = runner.invoke(main, ["plot", str(out), "--out", str(out / "inside.png")])
    assert refused.exit_code == 2 and "input store" in refused.output
