"""Bad input through the CLI: one-line error naming file, field and fix; exit code 2; no traceback;
no store that looks complete; inputs unchanged."""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from click.testing import CliRunner

from cryoden_dist.cli import main
from cryoden_dist.errors import MissingCTFError
from cryoden_dist.stack import ParticleStack

TRPV1 = "particles/cryojax_trpv1"


# ----------------------------------------------------------------- helpers
def hashes(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def run(*args, scheduler: str | None = None):
    command = [str(a) for a in args]
    if scheduler:
        command += ["--scheduler", scheduler]
    return CliRunner().invoke(main, command)


def assert_clean_failure(result, out: Path | None, *needles: str) -> str:
    """Exit code 2, exactly one ``cryoden: error:`` line holding every needle, no traceback, no complete store."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("cryoden: error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    if out is not None and out.exists():
        assert not ParticleStack.open(out).info.get("complete")
    return errors[0]


@pytest.fixture()
def trpv1(shared_data, tmp_path) -> dict[str, Path]:
    """A private copy of the TRPV1 stack and its fixed star (to modify safely)."""
    folder = tmp_path / "data"
    folder.mkdir()
    star = shutil.copy(shared_data / TRPV1 / "trpv1_small_stack.fixed.star", folder / "particles.star")
    mrcs = shutil.copy(shared_data / TRPV1 / "trpv1_small_stack.mrcs", folder / "trpv1_small_stack.mrcs")
    return {"star": Path(star), "mrcs": Path(mrcs)}


def write_stack(path: Path, images: np.ndarray, voxel_size: float = 2.0) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile's header statistics of NaN/Inf test images
        with mrcfile.new(path, data=images.astype(np.float32), overwrite=True) as mrc:
            mrc.set_image_stack()
            mrc.voxel_size = voxel_size
    return path


def noise(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ------------------------------------------------------------------- tests
def test_missing_input_file(tmp_path, scheduler_address):
    out = tmp_path / "o.zarr"
    result = run("ingest", tmp_path / "nope.star", "--out", out, scheduler=scheduler_address)
    assert_clean_failure(result, out, "nope.star", "no such input file", "check the path")
    assert not out.exists()


def test_star_pointing_to_a_missing_stack(shared_data, tmp_path, scheduler_address):
    star = shared_data / TRPV1 / "trpv1_small_stack.star"  # the real broken reference ./batch_0_restacked.mrc
    before = hashes([star])
    out = tmp_path / "o.zarr"
    result = run("ingest", star, "--out", out, scheduler=scheduler_address)
    message = assert_clean_failure(result, out, str(star), "batch_0_restacked.mrc", "rlnImageName", "--data-root")
    assert "tried " + str(shared_data / TRPV1 / "batch_0_restacked.mrc") in message
    assert not out.exists() and hashes([star]) == before


def test_index_beyond_the_end_of_a_stack(trpv1, tmp_path, scheduler_address):
    text = trpv1["star"].read_text()
    assert "000010@trpv1_small_stack.mrcs" in text
    trpv1["star"].write_text(text.replace("000010@trpv1_small_stack.mrcs", "000011@trpv1_small_stack.mrcs"))
    before = hashes(trpv1.values())
    out = tmp_path / "o.zarr"
    result = run("ingest", trpv1["star"], "--out", out, scheduler=scheduler_address)
    assert_clean_failure(
        result, out, "particles.star: particle 10", "rlnImageName", "image 11", "holds 10 images", "fix the index"
    )
    assert not out.exists() and hashes(trpv1.values()) == before


def test_mixed_box_sizes(tmp_path, scheduler_address):
    small = write_stack(tmp_path / "small.mrcs", noise((3, 16, 16)))
    large = write_stack(tmp_path / "large.mrcs", noise((3, 20, 20)))
    before = hashes([small, large])
    out = tmp_path / "o.zarr"
    result = run("ingest", small, large, "--out", out, scheduler=scheduler_address)
    assert_clean_failure(result, out, "large.mrcs", "box 20", "differs from box 16", "one box size")
    assert not out.exists() and hashes([small, large]) == before


def test_non_square_stack(tmp_path, scheduler_address):
    stack = write_stack(tmp_path / "wide.mrcs", noise((3, 16, 20)))
    out = tmp_path / "o.zarr"
    result = run("ingest", stack, "--out", out, scheduler=scheduler_address)
    assert_clean_failure(result, out, "wide.mrcs", "16x20", "not square", "re-extract")
    assert not out.exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_pixels(tmp_path, scheduler_address, bad):
    images = noise((6, 16, 16))
    images[4, 7, 3] = bad
    stack = write_stack(tmp_path / "bad.mrcs", images)
    before = hashes([stack])
    out = tmp_path / "o.zarr"
    # chunk 2: the other chunks succeed, the store exists when the bad one fails, and must be removed
    result = run("ingest", stack, "--out", out, "--chunk", "2", scheduler=scheduler_address)
    assert_clean_failure(result, out, "bad.mrcs: image 5", "NaN or Inf", "particle 5 of", "remove them from the input")
    assert not out.exists() and hashes([stack]) == before


def test_nan_found_while_resuming_keeps_the_store_incomplete(tmp_path, scheduler_address):
    images = noise((6, 16, 16))
    stack = write_stack(tmp_path / "s.mrcs", images)
    out = tmp_path / "o.zarr"
    assert run("ingest", stack, "--out", out, "--chunk", "2", scheduler=scheduler_address).exit_code == 0
    # the run "was killed" before chunk 2, and meanwhile the stack got a NaN in that chunk
    store = ParticleStack.open(out, mode="r+")
    store.group["_done/ingest"][2] = 0
    store.update_info(complete=False)
    images[5, 0, 0] = np.nan
    write_stack(stack, images)
    result = run("ingest", stack, "--out", out, "--chunk", "2", scheduler=scheduler_address)
    assert_clean_failure(result, out, "s.mrcs: image 6", "NaN or Inf")
    store = ParticleStack.open(out)  # a resumed store is kept, but its bad chunk stays unfinished
    assert store.group["_done/ingest"][:].tolist() == [1, 1, 0] and not store.info["complete"]


def test_truncated_stack(trpv1, tmp_path, scheduler_address):
    size = trpv1["mrcs"].stat().st_size
    with trpv1["mrcs"].open("r+b") as handle:
        handle.truncate(size - 4000)
    before = hashes(trpv1.values())
    out = tmp_path / "o.zarr"
    result = run("ingest", trpv1["star"], "--out", out, scheduler=scheduler_address)
    assert_clean_failure(result, out, "trpv1_small_stack.mrcs", f"{size - 4000} bytes", "truncated", "copy it again")
    assert not out.exists() and hashes(trpv1.values()) == before


def test_missing_ctf_columns_ingest_without_ctf(trpv1, tmp_path, scheduler_address):
    blocks = starfile.read(trpv1["star"], always_dict=True)
    blocks["particles"] = blocks["particles"].drop(columns="rlnDefocusU")
    star = trpv1["star"].with_name("no_defocus.star")
    starfile.write(blocks, star)
    before = hashes([star, trpv1["mrcs"]])
    out = tmp_path / "o.zarr"
    result = run("ingest", star, "--out", out, scheduler=scheduler_address)
    assert result.exit_code == 0, result.output
    stack = ParticleStack.open(out)
    assert not stack.has_ctf and stack.info["complete"]
    assert stack.info["ctf_missing_reason"] == f"{star} has no rlnDefocusU"
    assert "metadata/rlnDefocusV" in stack.group  # the incomplete CTF columns are kept, not lost
    with pytest.raises(MissingCTFError, match="rlnDefocusU.*ingest a .star/.cs with CTF fields"):
        stack.ctf_params()
    assert hashes([star, trpv1["mrcs"]]) == before


def test_bare_stack_without_pixel_size(shared_data, tmp_path, scheduler_address):
    stack = shared_data / "particles/aspire_sample/sample.mrcs"  # header voxel size 0
    out = tmp_path / "o.zarr"
    result = run("ingest", stack, "--out", out, scheduler=scheduler_address)
    assert_clean_failure(result, out, "sample.mrcs", "voxel size", "--pixel-size")
    result = run("ingest", stack, "--out", out, "--pixel-size", "1.5", scheduler=scheduler_address)
    assert result.exit_code == 0 and ParticleStack.open(out).pixel_size == 1.5


def test_box_larger_than_the_input(trpv1, tmp_path, scheduler_address):
    out = tmp_path / "o.zarr"
    result = run("ingest", trpv1["star"], "--out", out, "--box", "64", scheduler=scheduler_address)
    assert_clean_failure(result, out, "--box 64", "larger than the input box 48", "--box <= 48")
    assert not out.exists()


def test_unknown_input_type(tmp_path, scheduler_address):
    notes = tmp_path / "notes.txt"
    notes.write_text("not particles")
    result = run("ingest", notes, "--out", tmp_path / "o.zarr", scheduler=scheduler_address)
    assert_clean_failure(result, tmp_path / "o.zarr", "notes.txt", "unknown input type", ".star, .cs, .mrc or .mrcs")


def test_existing_output(trpv1, tmp_path, scheduler_address):
    before = hashes(trpv1.values())
    out = tmp_path / "o.zarr"
    assert run("ingest", trpv1["star"], "--out", out, scheduler=scheduler_address).exit_code == 0
    # same command and parameters: already complete, nothing to do
    assert run("ingest", trpv1["star"], "--out", out, scheduler=scheduler_address).exit_code == 0
    # other parameters: refused without --overwrite, the store is untouched
    result = run("ingest", trpv1["star"], "--out", out, "--box", "32", scheduler=scheduler_address)
    assert_clean_failure(result, None, str(out), "output exists", "--overwrite")
    assert ParticleStack.open(out).box == 48 and ParticleStack.open(out).info["complete"]
    result = run("ingest", trpv1["star"], "--out", out, "--box", "32", "--overwrite", scheduler=scheduler_address)
    assert result.exit_code == 0 and ParticleStack.open(out).box == 32
    # something that is not a store is never deleted, even with --overwrite
    precious = tmp_path / "precious.zarr"
    precious.write_text("mine")
    result = run("ingest", trpv1["star"], "--out", precious, "--overwrite", scheduler=scheduler_address)
    assert_clean_failure(result, None, "precious.zarr", "not a Zarr store")
    assert precious.read_text() == "mine"
    assert hashes(trpv1.values()) == before


@pytest.mark.parametrize("where", ["the stack", "inside the stack", "the star", "the input folder"])
def test_output_over_an_input_is_refused(trpv1, scheduler_address, where):
    out = {
        "the stack": trpv1["mrcs"],
        "inside the stack": trpv1["mrcs"] / "o.zarr",
        "the star": trpv1["star"],
        "the input folder": trpv1["star"].parent,
    }[where]
    before = hashes(trpv1.values())
    result = run("ingest", trpv1["star"], "--out", out, "--overwrite", scheduler=scheduler_address)
    assert_clean_failure(result, None, "would overwrite or contain the input", "choose another --out")
    assert hashes(trpv1.values()) == before and sorted(os.listdir(trpv1["star"].parent)) == sorted(
        p.name for p in trpv1.values()
    )


def test_export_refuses_existing_files(trpv1, tmp_path, scheduler_address):
    out = tmp_path / "o.zarr"
    assert run("ingest", trpv1["star"], "--out", out, scheduler=scheduler_address).exit_code == 0
    assert run("export", out, "--out", tmp_path / "exp").exit_code == 0
    result = run("export", out, "--out", tmp_path / "exp")
    assert_clean_failure(result, None, "particles.star", "output exists", "--overwrite")
    assert run("export", out, "--out", tmp_path / "exp", "--overwrite").exit_code == 0
    before = hashes(trpv1.values())
    result = run("export", out, "--out", trpv1["mrcs"].parent, "--name", "trpv1_small_stack", "--overwrite")
    assert_clean_failure(result, None, "trpv1_small_stack.mrcs", "input", "choose another --out")
    assert hashes(trpv1.values()) == before
    result = run("export", tmp_path / "missing.zarr", "--out", tmp_path / "exp2")
    assert_clean_failure(result, None, "missing.zarr", "no such stack", "cryoden ingest")
