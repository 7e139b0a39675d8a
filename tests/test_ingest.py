"""``ingest`` on the real stacks in ../shared/data, through the session's Dask cluster."""

from __future__ import annotations

import warnings

import mrcfile
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from cryoden_dist.cli import main
from cryoden_dist.ctf import CTF_FIELDS
from cryoden_dist.errors import InputError
from cryoden_dist.image import fourier_crop
from cryoden_dist.io.ingest import ingest
from cryoden_dist.io.star import read_star
from cryoden_dist.stack import ParticleStack

EMPIAR = "particles/cryodrgn_empiar10076"
RELION31 = "particles/cryodrgn_relion31"
ASPIRE = "particles/aspire_sample"
TRPV1_STAR = "particles/cryojax_trpv1/trpv1_small_stack.fixed.star"
TRPV1_MRCS = "particles/cryojax_trpv1/trpv1_small_stack.mrcs"
ANGLES = ("defocus_angle", "phase_shift")


# ----------------------------------------------------------------- helpers
def mrc_data(path) -> np.ndarray:
    """All images of an MRC stack, read with mrcfile alone (the reference)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # relion31.mrcs has no MAP id string
        with mrcfile.open(path, permissive=True) as mrc:
            return np.array(mrc.data, dtype=np.float32)


def metadata_arrays(stack: ParticleStack) -> dict[str, np.ndarray]:
    if "metadata" not in stack.group:
        return {}
    return {name: array[:] for name, array in stack.group["metadata"].arrays()}


def all_arrays(group: zarr.Group, prefix: str = "") -> dict[str, np.ndarray]:
    """Every array of a Zarr group, recursively, by path."""
    arrays = {prefix + name: array[:] for name, array in group.arrays()}
    for name, sub in group.groups():
        arrays.update(all_arrays(sub, f"{prefix}{name}/"))
    return arrays


def assert_same_particles(a: ParticleStack, b: ParticleStack, *, angle_rtol: float = 0.0) -> None:
    """Images bit-identical; pixel size, CTF and metadata equal (angles to ``angle_rtol``)."""
    assert (a.n, a.box) == (b.n, b.box)
    np.testing.assert_array_equal(a.images[:], b.images[:])
    assert a.pixel_size == b.pixel_size
    assert a.has_ctf == b.has_ctf
    if a.has_ctf:
        ctf_a, ctf_b = a.ctf_params().as_dict(), b.ctf_params().as_dict()
        for name in CTF_FIELDS:
            if name in ANGLES and angle_rtol:
                np.testing.assert_allclose(ctf_b[name], ctf_a[name], rtol=angle_rtol, atol=0, err_msg=name)
            else:
                np.testing.assert_array_equal(ctf_b[name], ctf_a[name], err_msg=name)
    meta_a, meta_b = metadata_arrays(a), metadata_arrays(b)
    assert sorted(meta_a) == sorted(meta_b)
    for name, values in meta_a.items():
        assert values.dtype.kind == meta_b[name].dtype.kind, name
        np.testing.assert_array_equal(meta_b[name], values, err_msg=name)


def optics_without_source(stack: ParticleStack) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "source"} for row in stack.info["optics"]]


# ------------------------------------------------------------------- tests
STARS_WITH_IMAGES = [
    f"{ASPIRE}/sample_particles_relion30.star",
    f"{ASPIRE}/sample_particles_relion31.star",
    f"{ASPIRE}/sample_relion_data.star",
    f"{EMPIAR}/empiar_10076_7.star",
    f"{RELION31}/relion31.star",
    f"{RELION31}/relion31.v2.star",
    TRPV1_STAR,
]


@pytest.mark.parametrize("name", STARS_WITH_IMAGES)
def test_every_star_with_images_ingests(shared_data, tmp_path, client, name):
    stack = ingest([shared_data / name], tmp_path / "s.zarr", client=client, chunk=4)
    table = read_star(shared_data / name)
    stack_file = shared_data / name.rsplit("/", 1)[0] / table.particles["image_file"].iloc[0]
    np.testing.assert_array_equal(stack.images[:], mrc_data(stack_file)[table.particles["image_index"]])
    assert stack.has_ctf and stack.info["complete"] and stack.n == len(table)
    np.testing.assert_array_equal(stack.ctf_params().defocus_u, table.particles["defocus_u"])
    np.testing.assert_array_equal(stack.ctf_params().defocus_angle, table.particles["defocus_angle"])
    assert stack.pixel_size == table.particles["pixel_size"].iloc[0]


def test_star_and_cs_give_the_same_images_and_ctf(shared_data, tmp_path, client):
    star = ingest([shared_data / EMPIAR / "empiar_10076_7.star"], tmp_path / "star.zarr", client=client)
    cs = ingest([shared_data / EMPIAR / "empiar_10076_7.cs"], tmp_path / "cs.zarr", client=client, chunk=3)
    reference = mrc_data(shared_data / EMPIAR / "empiar_10076_7.mrc")
    np.testing.assert_array_equal(star.images[:], reference)
    np.testing.assert_array_equal(cs.images[:], reference)
    # the .cs file stores float32 (7 significant digits) where the star has decimal text
    for name, values in star.ctf_params().as_dict().items():
        np.testing.assert_allclose(cs.ctf_params().as_dict()[name], values, rtol=1e-6, err_msg=name)
    assert abs(star.pixel_size - 1.31) < 1e-4 and abs(cs.pixel_size - 1.31) < 1e-4
    np.testing.assert_allclose(star.ctf_params().defocus_angle, np.radians(5.28), rtol=1e-15)
    uids = np.load(shared_data / EMPIAR / "empiar_10076_7.cs")["uid"]
    np.testing.assert_array_equal(metadata_arrays(cs)["uid"], uids)
    info = star.info
    assert info["complete"] and info["input_format"] == ["relion-3.0"]
    assert info["source_files"] == [str((shared_data / EMPIAR / "empiar_10076_7.star").resolve())]
    assert info["cryoden_version"] and info["created"]
    assert cs.info["stages"]["ingest"]["n_chunks"] == 3


def test_relion31_table_order_gives_identical_stores(shared_data, tmp_path, client):
    first = ingest([shared_data / RELION31 / "relion31.star"], tmp_path / "a.zarr", client=client)
    second = ingest([shared_data / RELION31 / "relion31.v2.star"], tmp_path / "b.zarr", client=client)
    assert_same_particles(first, second)
    np.testing.assert_array_equal(first.images[:], mrc_data(shared_data / RELION31 / "relion31.mrcs"))
    assert optics_without_source(first) == optics_without_source(second)
    assert first.pixel_size == 2.806 and first.info["input_format"] == ["relion-3.1"]
    assert first.ctf_params().cs[0] == 0.01 and first.ctf_params().voltage[0] == 300.0


def test_aspire_relion30_and_relion31_stars(shared_data, tmp_path, client):
    old = ingest([shared_data / ASPIRE / "sample_particles_relion30.star"], tmp_path / "30.zarr", client=client)
    new = ingest([shared_data / ASPIRE / "sample_particles_relion31.star"], tmp_path / "31.zarr", client=client)
    np.testing.assert_array_equal(old.images[:], new.images[:])
    np.testing.assert_array_equal(old.images[:], mrc_data(shared_data / ASPIRE / "sample.mrcs"))
    ctf_old, ctf_new = old.ctf_params(), new.ctf_params()
    for name in ("defocus_u", "defocus_v", "defocus_angle", "cs", "amplitude_contrast", "phase_shift"):
        np.testing.assert_array_equal(getattr(ctf_old, name), getattr(ctf_new, name), err_msg=name)
    # 3.0: per-particle voltage; 3.1: two optics groups (300 kV, 200 kV); same assignment
    expected_kv = np.r_[np.full(8, 300.0), np.full(9, 200.0)]
    np.testing.assert_array_equal(ctf_old.voltage, expected_kv)
    np.testing.assert_array_equal(ctf_new.voltage, expected_kv)
    # the fixtures disagree on the pixel size: 5 µm / 37369.2 = 1.338 Å (3.0) vs rlnImagePixelSize 1.4 Å (3.1)
    assert old.pixel_size == pytest.approx(1.338, abs=1e-6) and new.pixel_size == 1.4
    # shared columns agree except particle 15, which the 3.1 fixture replaced by a copy of particle 14
    meta_old, meta_new = metadata_arrays(old), metadata_arrays(new)
    shared = sorted(set(meta_old) & set(meta_new) - {"rlnOriginXAngst", "rlnOriginYAngst"})
    assert {"rlnAngleRot", "rlnCoordinateX", "rlnMicrographName", "rlnImageOriginalName"} <= set(shared)
    keep = np.arange(17) != 14
    for name in shared:
        np.testing.assert_array_equal(meta_old[name][keep], meta_new[name][keep], err_msg=name)
    np.testing.assert_array_equal(meta_new["rlnAngleRot"][14], meta_new["rlnAngleRot"][13])


def test_trpv1_fixed_star(shared_data, tmp_path, client):
    stack = ingest([shared_data / TRPV1_STAR], tmp_path / "t.zarr", client=client)
    np.testing.assert_array_equal(stack.images[:], mrc_data(shared_data / TRPV1_MRCS))
    assert stack.pixel_size == 4.88 and stack.box == 48
    ctf = stack.ctf_params()
    np.testing.assert_allclose(ctf.defocus_angle, np.radians(53.749996), rtol=1e-15)
    np.testing.assert_array_equal(ctf.pixel_size, 4.88)
    meta = metadata_arrays(stack)
    assert meta["rlnAngleRot"][0] == -30.073301 and meta["rlnOriginXAngst"][0] == -8.149219
    assert meta["rlnRandomSubset"].dtype == np.int64
    assert stack.info["optics"][0]["rlnOpticsGroup"] == 7


@pytest.mark.parametrize("box", [32, 33])
def test_box_fourier_crops(shared_data, tmp_path, client, box):
    stack = ingest([shared_data / TRPV1_STAR], tmp_path / "c.zarr", box=box, client=client, chunk=4)
    original = mrc_data(shared_data / TRPV1_MRCS)
    assert stack.box == box
    assert stack.pixel_size == 4.88 * 48 / box
    np.testing.assert_array_equal(stack.ctf_params().pixel_size, stack.pixel_size)
    np.testing.assert_array_equal(stack.images[:], fourier_crop(original, box))
    # the mean of every image is preserved (to float32 rounding of the pixel values)
    scale = original.std(axis=(1, 2))
    error = np.abs(stack.images[:].mean(axis=(1, 2), dtype=np.float64) - original.mean(axis=(1, 2), dtype=np.float64))
    assert np.all(error < 1e-5 * scale)
    # and the images carry less high-frequency content only: low-pass versions agree
    np.testing.assert_allclose(fourier_crop(stack.images[:], 16), fourier_crop(original, 16), atol=1e-4 * scale.max())


def test_several_inputs_are_concatenated(shared_data, tmp_path, client):
    inputs = [shared_data / EMPIAR / "empiar_10076_7.star", shared_data / EMPIAR / "empiar_10076_7.cs"]
    stack = ingest(inputs, tmp_path / "both.zarr", client=client, chunk=5)
    assert stack.n == 14 and stack.info["input_format"] == ["relion-3.0", "cryosparc"]
    np.testing.assert_array_equal(stack.images[:7], stack.images[7:])
    meta = metadata_arrays(stack)
    uids = np.load(shared_data / EMPIAR / "empiar_10076_7.cs")["uid"]
    assert meta["uid"].dtype == np.uint64
    np.testing.assert_array_equal(meta["uid"], np.r_[np.zeros(7, np.uint64), uids])
    assert meta["rlnMicrographName"].tolist() == [str(i) for i in range(1, 8)] + ["None"] * 7


def test_resume_recomputes_only_unfinished_chunks(shared_data, tmp_path, client):
    out = tmp_path / "r.zarr"
    stack = ingest([shared_data / TRPV1_STAR], out, client=client, chunk=3)
    before = all_arrays(stack.group)
    created = stack.info["created"]
    # simulate a run killed during chunk 1: flag unset, pixels not written, store not complete
    stack.group["_done/ingest"][1] = 0
    stack.images[3:6] = 0
    stack.update_info(complete=False)
    resumed = ingest([shared_data / TRPV1_STAR], out, client=client, chunk=3)
    after = all_arrays(resumed.group)
    assert sorted(before) == sorted(after)
    for name, values in before.items():
        np.testing.assert_array_equal(after[name], values, err_msg=name)
    record = resumed.info["stages"]["ingest"]
    assert record["chunks_computed_last_run"] == 1 and record["n_chunks"] == 4 and record["runs"] == 2
    assert resumed.info["complete"] and resumed.info["created"] == created
    # a complete store is returned as is
    again = ingest([shared_data / TRPV1_STAR], out, client=client, chunk=3)
    assert again.info["stages"]["ingest"]["runs"] == 2


def test_data_root_resolves_cryosparc_project_paths(shared_data, tmp_path, client):
    project, job = tmp_path / "project", tmp_path / "exports"
    (project / "J5" / "imported").mkdir(parents=True)
    job.mkdir()
    (project / "J5" / "imported" / "particles.mrc").symlink_to(shared_data / EMPIAR / "empiar_10076_7.mrc")
    records = np.load(shared_data / EMPIAR / "empiar_10076_7.cs")
    moved = records.astype(records.dtype.descr[:1] + [("blob/path", "S40")] + records.dtype.descr[2:])
    moved["blob/path"] = b">J5/imported/particles.mrc"  # cryoSPARC's project-relative marker
    cs = job / "particles.cs"
    with cs.open("wb") as handle:  # np.save(path) would append .npy
        np.save(handle, moved)
    with pytest.raises(InputError, match="J5/imported/particles.mrc.*blob/path.*tried.*--data-root"):
        ingest([cs], tmp_path / "no_root.zarr", client=client)
    assert not (tmp_path / "no_root.zarr").exists()
    stack = ingest([cs], tmp_path / "root.zarr", data_root=project, client=client)
    np.testing.assert_array_equal(stack.images[:], mrc_data(shared_data / EMPIAR / "empiar_10076_7.mrc"))


def test_cli_ingest_and_export(shared_data, tmp_path, scheduler_address):
    runner = CliRunner()
    out = tmp_path / "cli.zarr"
    result = runner.invoke(
        main, ["ingest", str(shared_data / TRPV1_STAR), "--out", str(out), "--scheduler", scheduler_address]
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 10 particles, box 48, pixel size 4.88" in result.output
    result = runner.invoke(main, ["export", str(out), "--out", str(tmp_path / "exported"), "--name", "trpv1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "exported" / "trpv1.star").is_file() and (tmp_path / "exported" / "trpv1.mrcs").is_file()
    np.testing.assert_array_equal(mrc_data(tmp_path / "exported" / "trpv1.mrcs"), mrc_data(shared_data / TRPV1_MRCS))
    result = runner.invoke(main, ["info", str(out)])
    assert result.exit_code == 0 and "CTF         yes" in result.output
