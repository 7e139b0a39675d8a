"""``export``: .mrcs + RELION 3.1 .star, and the round trip ingest(export(ingest(x))) == ingest(x)."""

from __future__ import annotations

import hashlib
import shutil

import mrcfile
import numpy as np
import pytest
import starfile
from test_ingest import ASPIRE, EMPIAR, RELION31, TRPV1_MRCS, TRPV1_STAR, assert_same_particles, mrc_data

from cryoden_dist.centering import center, centered_path
from cryoden_dist.denoise import denoise
from cryoden_dist.errors import InputError, OutputExistsError
from cryoden_dist.io.export import SHIFTS_ARRAY, export
from cryoden_dist.io.ingest import ingest
from cryoden_dist.io.star import read_star_blocks
from cryoden_dist.stack import ParticleStack

#: Angles go radians -> degrees (export) -> radians (ingest); each conversion rounds once, so the
#: result may differ from the original by an ulp or two: bit-equality is impossible, 1e-13 relative is tight.
ANGLE_RTOL = 1e-13

ROUND_TRIP_INPUTS = {
    "relion31": [f"{RELION31}/relion31.star"],
    "trpv1": [TRPV1_STAR],
    "aspire30": [f"{ASPIRE}/sample_particles_relion30.star"],
    "aspire31_two_optics_groups": [f"{ASPIRE}/sample_particles_relion31.star"],
    "cryosparc": [f"{EMPIAR}/empiar_10076_7.cs"],
    "star_plus_cs": [f"{EMPIAR}/empiar_10076_7.star", f"{EMPIAR}/empiar_10076_7.cs"],
    "bare_mrcs_no_ctf": [TRPV1_MRCS],
}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", sorted(ROUND_TRIP_INPUTS))
def test_round_trip(shared_data, tmp_path, client, case):
    inputs = [shared_data / name for name in ROUND_TRIP_INPUTS[case]]
    first = ingest(inputs, tmp_path / "first.zarr", client=client, chunk=4)
    star, mrcs = export(first.path, tmp_path / "out", name="p")
    second = ingest([star], tmp_path / "second.zarr", client=client, chunk=4)
    assert_same_particles(first, second, angle_rtol=ANGLE_RTOL)
    assert second.info["input_format"] == ["relion-3.1"]


def test_round_trip_of_a_downsampled_stack(shared_data, tmp_path, client):
    first = ingest([shared_data / TRPV1_STAR], tmp_path / "first.zarr", box=30, client=client)
    star, _ = export(first.path, tmp_path / "out")
    second = ingest([star], tmp_path / "second.zarr", client=client)
    assert second.pixel_size == 4.88 * 48 / 30
    assert_same_particles(first, second, angle_rtol=ANGLE_RTOL)


def test_exported_files_are_relion31(shared_data, tmp_path, client):
    stack = ingest([shared_data / f"{ASPIRE}/sample_particles_relion31.star"], tmp_path / "s.zarr", client=client)
    star, mrcs = export(stack.path, tmp_path / "out", name="aspire")
    assert (star.name, mrcs.name) == ("aspire.star", "aspire.mrcs")
    blocks = starfile.read(star, always_dict=True)
    assert list(blocks) == ["optics", "particles"]
    optics, particles = blocks["optics"], blocks["particles"]
    assert list(optics.columns) == [
        "rlnOpticsGroup",
        "rlnOpticsGroupName",
        "rlnVoltage",
        "rlnSphericalAberration",
        "rlnAmplitudeContrast",
        "rlnImagePixelSize",
        "rlnImageSize",
        "rlnImageDimensionality",
    ]
    # one optics group per distinct (voltage, Cs, Q, pixel size): 300 kV then 200 kV
    assert optics["rlnVoltage"].tolist() == [300.0, 200.0] and optics["rlnImageSize"].tolist() == [200, 200]
    assert particles["rlnOpticsGroup"].tolist() == [1] * 8 + [2] * 9
    assert particles["rlnImageName"].iloc[0] == "000001@aspire.mrcs"
    assert particles["rlnImageName"].iloc[-1] == "000017@aspire.mrcs"
    source = starfile.read(shared_data / f"{ASPIRE}/sample_particles_relion31.star")["particles"]
    np.testing.assert_allclose(particles["rlnDefocusAngle"], source["rlnDefocusAngle"], rtol=1e-14)
    np.testing.assert_array_equal(particles["rlnAngleRot"], source["rlnAngleRot"])
    with mrcfile.open(mrcs) as mrc:
        data = np.array(mrc.data)
        assert mrc.data.dtype == np.float32 and mrc.is_image_stack()
        assert float(mrc.voxel_size.x) == pytest.approx(1.4, rel=1e-7)
        assert mrc.header.dmin == data.min() and mrc.header.dmax == data.max()
        assert float(mrc.header.dmean) == pytest.approx(data.mean(dtype=np.float64), rel=1e-6)
        assert float(mrc.header.rms) == pytest.approx(data.std(dtype=np.float64), rel=1e-6)
    np.testing.assert_array_equal(data, mrc_data(shared_data / f"{ASPIRE}/sample.mrcs"))
    # no temporary file is left next to the outputs
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["aspire.mrcs", "aspire.star"]


def test_floats_are_written_with_all_their_digits(shared_data, tmp_path, client):
    stack = ingest([shared_data / TRPV1_STAR], tmp_path / "s.zarr", client=client)
    values = np.random.default_rng(0).normal(size=stack.n) * 1e-7 + 1 / 3  # needs 17 significant digits
    stack.group.create_array("metadata/rlnTestValue", shape=(stack.n,), chunks=(stack.n,), dtype="float64")[:] = values
    star, _ = export(stack.path, tmp_path / "out")
    particles, _ = read_star_blocks(star)
    np.testing.assert_array_equal(particles["rlnTestValue"], values)
    assert repr(float(values[0])) in star.read_text()  # 17 significant digits, not starfile's default %.6f


def test_stack_without_ctf_exports_without_ctf_columns(shared_data, tmp_path, client):
    stack = ingest([shared_data / TRPV1_MRCS], tmp_path / "s.zarr", client=client)
    star, _ = export(stack.path, tmp_path / "out")
    particles, optics = read_star_blocks(star)
    assert not {"rlnDefocusU", "rlnDefocusAngle", "rlnVoltage"} & (set(particles.columns) | set(optics.columns))
    assert optics["rlnImagePixelSize"].tolist() == [4.88]
    again = ingest([star], tmp_path / "again.zarr", client=client)
    assert not again.has_ctf and f"{star} has no rlnDefocusU" in again.info["ctf_missing_reason"]


def test_centering_shifts_become_origins(shared_data, tmp_path, client):
    stack = ingest([shared_data / TRPV1_STAR], tmp_path / "s.zarr", client=client)
    shifts = np.column_stack([np.arange(10) * 0.5 - 2, np.linspace(-3, 3, 10)])
    stack.group.create_array(SHIFTS_ARRAY, shape=(10, 2), chunks=(10, 2), dtype="float64")[:] = shifts
    star, _ = export(stack.path, tmp_path / "out")
    particles, _ = read_star_blocks(star)
    # shifts_px: particle centre relative to the box centre; RELION's origin is the opposite vector, in Å
    np.testing.assert_array_equal(particles["rlnOriginXAngst"], -shifts[:, 0] * 4.88)
    np.testing.assert_array_equal(particles["rlnOriginYAngst"], -shifts[:, 1] * 4.88)
    assert list(particles.columns).count("rlnOriginXAngst") == 1
    # without shifts the origins of the source are written back
    plain, _ = export(ingest([shared_data / TRPV1_STAR], tmp_path / "p.zarr", client=client).path, tmp_path / "plain")
    source = starfile.read(shared_data / TRPV1_STAR)["particles"]
    np.testing.assert_array_equal(read_star_blocks(plain)[0]["rlnOriginXAngst"], source["rlnOriginXAngst"])


def test_centring_survives_export_and_ingest(shared_data, tmp_path, client):
    stack = ingest([shared_data / TRPV1_STAR], tmp_path / "s.zarr", client=client)
    source_origins = stack.group["metadata/rlnOriginXAngst"][:]
    assert np.abs(source_origins).min() > 0

    # shifts only: the stack's own images are off-centre by shifts_px, written as origins
    center(stack.path, radius=16, search=6, client=client)
    shifts = stack.group[SHIFTS_ARRAY][:]
    star, _ = export(stack.path, tmp_path / "shifted")
    again = ingest([star], tmp_path / "shifted.zarr", client=client)
    np.testing.assert_array_equal(again.group["metadata/rlnOriginXAngst"][:], -shifts[:, 0] * 4.88)
    np.testing.assert_array_equal(again.group["metadata/rlnOriginYAngst"][:], -shifts[:, 1] * 4.88)
    assert "# cryoden: rlnOriginX/YAngst = -centering/shifts_px x pixel size (cryoden center" in star.read_text()

    # re-centred images: origin 0, the source's origins superseded (and said so in the .star)
    center(stack.path, radius=16, search=6, apply=True, client=client)
    centred = ParticleStack.open(centered_path(stack.path))
    star, mrcs = export(centred.path, tmp_path / "centred")
    again = ingest([star], tmp_path / "centred.zarr", client=client)
    for axis in "XY":
        np.testing.assert_array_equal(again.group[f"metadata/rlnOrigin{axis}Angst"][:], np.zeros(10))
    assert "rlnOriginX/YAngst are 0 and supersede the source's origins" in star.read_text()
    np.testing.assert_array_equal(mrc_data(mrcs), centred.images[:])
    # the source keeps its off-centre images, so its origins stay -shift x pixel size
    shifted, _ = export(stack.path, tmp_path / "source")
    np.testing.assert_array_equal(read_star_blocks(shifted)[0]["rlnOriginXAngst"], -shifts[:, 0] * 4.88)

    # a stack derived from the centred one (denoised) has centred images too: create_like carries the mark
    denoised = denoise(centred.path, tmp_path / "d.zarr", method="lowpass", client=client)
    assert denoised.info["images_centered"] is True
    star, _ = export(denoised.path, tmp_path / "denoised")
    np.testing.assert_array_equal(read_star_blocks(star)[0]["rlnOriginYAngst"], np.zeros(10))


def test_existing_outputs_and_inputs_are_protected(shared_data, tmp_path, client):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("trpv1_small_stack.fixed.star", "trpv1_small_stack.mrcs"):
        shutil.copy(shared_data / "particles/cryojax_trpv1" / name, data / name)
    hashes = {p.name: sha256(p) for p in data.iterdir()}
    stack = ingest([data / "trpv1_small_stack.fixed.star"], tmp_path / "s.zarr", client=client)
    star, mrcs = export(stack.path, tmp_path / "out")
    with pytest.raises(OutputExistsError, match="particles.star: output exists; pass --overwrite"):
        export(stack.path, tmp_path / "out")
    stamp = star.stat().st_mtime_ns
    export(stack.path, tmp_path / "out", overwrite=True)
    assert star.stat().st_mtime_ns >= stamp
    # an input image stack is never replaced, even with overwrite
    with pytest.raises(OutputExistsError, match="overwrite or write inside the input"):
        export(stack.path, data, name="trpv1_small_stack", overwrite=True)
    with pytest.raises(OutputExistsError, match="overwrite or write inside the input"):
        export(stack.path, data, name="trpv1_small_stack.fixed", overwrite=True)
    with pytest.raises(OutputExistsError, match="inside the input"):
        export(stack.path, stack.path / "export")
    assert {p.name: sha256(p) for p in data.iterdir()} == hashes
    assert ParticleStack.open(stack.path).info["complete"]


def test_interrupted_export_leaves_nothing_that_looks_complete(shared_data, tmp_path, client):
    stack = ingest([shared_data / TRPV1_STAR], tmp_path / "s.zarr", client=client, chunk=4)
    # damage the last image chunk: the export fails after writing the first chunks of the .mrcs
    chunk_file = stack.path / "images" / "c" / "2" / "0" / "0"  # Zarr v3 key of chunk (2, 0, 0)
    assert chunk_file.is_file()
    chunk_file.write_bytes(b"broken")
    with pytest.raises(ValueError):  # zarr cannot decode a chunk of the wrong size
        export(stack.path, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_incomplete_stack_is_not_exported(shared_data, tmp_path, client):
    stack = ingest([shared_data / TRPV1_STAR], tmp_path / "s.zarr", client=client)
    stack.update_info(complete=False)  # as after a killed ingest
    with pytest.raises(InputError, match="not complete .*rerun"):
        export(stack.path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
