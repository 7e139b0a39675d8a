"""Readers of .star, .cs and .mrc/.mrcs files, on the real files in ../shared/data (no cluster)."""

from __future__ import annotations

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryoden_dist.errors import InputError
from cryoden_dist.io.cryosparc import read_cs
from cryoden_dist.io.mrc import read_images, read_mrc_table, read_stack_header
from cryoden_dist.io.star import parse_image_names, read_star, read_star_blocks

STAR_FILES = [
    "particles/aspire_sample/sample_particles_relion30.star",
    "particles/aspire_sample/sample_particles_relion31.star",
    "particles/aspire_sample/sample_relion_data.star",
    "particles/cryodrgn_empiar10076/empiar_10076_7.star",
    "particles/cryodrgn_relion31/relion31.star",
    "particles/cryodrgn_relion31/relion31.v2.star",
    "particles/cryojax_trpv1/trpv1_small_stack.fixed.star",
    "particles/cryojax_trpv1/trpv1_small_stack.star",
    "metadata/star_examples/FinalRefinement-OriginalParticles-PfCRT.star",
    "metadata/star_examples/relion31.6opticsgroups.star",
    "metadata/star_examples/relion5.star",
]

# Pixel sizes as documented in shared/data/README.md (or written in the files).
PIXEL_SIZES = {
    "particles/cryodrgn_empiar10076/empiar_10076_7.star": 5 * 1e4 / 38168,  # 1.31 Å
    "particles/cryodrgn_relion31/relion31.star": 2.806,
    "particles/cryodrgn_relion31/relion31.v2.star": 2.806,
    "particles/cryojax_trpv1/trpv1_small_stack.fixed.star": 4.88,
    "particles/aspire_sample/sample_particles_relion30.star": 5 * 1e4 / 37369.207031,
    "particles/aspire_sample/sample_particles_relion31.star": 1.4,
    "metadata/star_examples/relion5.star": 0.89,
}


def test_star_files_are_listed_completely(shared_data):
    on_disk = {str(p.relative_to(shared_data)) for p in shared_data.glob("particles/*/*.star")}
    on_disk |= {str(p.relative_to(shared_data)) for p in shared_data.glob("metadata/star_examples/*.star")}
    assert on_disk == set(STAR_FILES)


@pytest.mark.parametrize("name", STAR_FILES)
def test_every_star_parses_with_ctf_in_package_units(shared_data, name):
    path = shared_data / name
    table = read_star(path)
    particles, optics = read_star_blocks(path)
    raw = starfile.read(path, always_dict=True)
    assert len(table) == len(particles) == len(table.metadata) > 0
    assert table.format == ("relion-3.1" if "optics" in raw else "relion-3.0")
    assert (table.particles["image_index"] >= 0).all()
    np.testing.assert_array_equal(
        table.metadata["rlnImageOriginalName"],
        particles["rlnImageOriginalName"] if "rlnImageOriginalName" in particles else particles["rlnImageName"],
    )
    if "rlnAmplitudeContrast" not in particles and (optics is None or "rlnAmplitudeContrast" not in optics):
        # the PfCRT refinement star has no amplitude contrast: no CTF, and the reason names the column
        assert not table.has_ctf
        assert "rlnAmplitudeContrast" in table.ctf_missing and str(path) in table.ctf_missing
        assert "rlnDefocusU" in table.metadata  # an incomplete CTF is kept as metadata, not lost
        return
    assert table.has_ctf
    # angles: degrees in the file, radians inside
    np.testing.assert_allclose(table.particles["defocus_angle"], np.radians(particles["rlnDefocusAngle"]), rtol=1e-15)
    np.testing.assert_array_equal(table.particles["defocus_u"], particles["rlnDefocusU"])
    assert np.all(np.abs(table.particles["defocus_angle"]) <= np.pi)
    # consumed columns are not duplicated in the metadata
    assert not {"rlnImageName", "rlnDefocusU", "rlnOpticsGroup", "rlnVoltage"} & set(table.metadata.columns)


@pytest.mark.parametrize("name", sorted(PIXEL_SIZES))
def test_pixel_sizes_as_documented(shared_data, name):
    sizes = read_star(shared_data / name).particles["pixel_size"].to_numpy()
    np.testing.assert_allclose(sizes, PIXEL_SIZES[name], rtol=1e-12)


def test_empiar10076_pixel_size_from_detector_and_magnification(shared_data):
    sizes = read_star(shared_data / "particles/cryodrgn_empiar10076/empiar_10076_7.star").particles["pixel_size"]
    assert abs(sizes.iloc[0] - 1.31) < 1e-4


def test_optics_groups_are_merged_per_particle(shared_data):
    path = shared_data / "metadata/star_examples/relion31.6opticsgroups.star"
    table = read_star(path)
    particles, optics = read_star_blocks(path)
    by_group = optics.set_index("rlnOpticsGroup")
    groups = particles["rlnOpticsGroup"]
    np.testing.assert_array_equal(table.particles["pixel_size"], by_group.loc[groups, "rlnImagePixelSize"])
    np.testing.assert_array_equal(table.particles["cs"], by_group.loc[groups, "rlnSphericalAberration"])
    assert set(np.unique(table.particles["pixel_size"])) == {1.24, 1.25}
    assert len(table.optics) == 6 and table.optics[0]["rlnOpticsGroupName"] == "opticsGroup5"
    assert isinstance(table.optics[0]["rlnOpticsGroup"], int)  # JSON-safe


def test_table_order_does_not_matter(shared_data):
    first = read_star(shared_data / "particles/cryodrgn_relion31/relion31.star")
    second = read_star(shared_data / "particles/cryodrgn_relion31/relion31.v2.star")
    pd.testing.assert_frame_equal(first.particles, second.particles)
    pd.testing.assert_frame_equal(first.metadata, second.metadata)
    assert first.optics == second.optics


def test_relion30_origins_become_angstrom(shared_data):
    path = shared_data / "particles/aspire_sample/sample_particles_relion30.star"
    table = read_star(path)
    raw = starfile.read(path)
    pixel = 5 * 1e4 / 37369.207031
    np.testing.assert_allclose(table.metadata["rlnOriginXAngst"], raw["rlnOriginX"] * pixel, rtol=1e-15)
    assert "rlnOriginX" not in table.metadata


def test_names_read_as_text(shared_data):
    # empiar_10076_7.star has micrograph names "1".."7": kept as text, not numbers
    table = read_star(shared_data / "particles/cryodrgn_empiar10076/empiar_10076_7.star")
    assert table.metadata["rlnMicrographName"].tolist() == [str(i) for i in range(1, 8)]


def test_parse_image_names(tmp_path):
    files, indices = parse_image_names(pd.Series(["000001@a.mrcs", "12@sub/b.mrcs", "single.mrc"]), tmp_path)
    assert files.tolist() == ["a.mrcs", "sub/b.mrcs", "single.mrc"]
    assert indices.tolist() == [0, 11, 0]
    for bad in ["0@a.mrcs", "x@a.mrcs", "1.5@a.mrcs", "3@"]:
        with pytest.raises(InputError, match="particle 2: _rlnImageName .* INDEX@STACK"):
            parse_image_names(pd.Series(["1@a.mrcs", bad]), tmp_path / "p.star")


CS_FILES = [
    "particles/cryodrgn_empiar10076/empiar_10076_7.cs",
    "metadata/star_examples/cryosparc_P12_J24_001_particles.cs",
]


@pytest.mark.parametrize("name", CS_FILES)
def test_cs_files_parse(shared_data, name):
    path = shared_data / name
    records = np.load(path)
    table = read_cs(path)
    assert table.has_ctf and table.format == "cryosparc"
    np.testing.assert_array_equal(table.particles["image_index"], records["blob/idx"])
    np.testing.assert_array_equal(table.particles["defocus_angle"], records["ctf/df_angle_rad"].astype(np.float64))
    np.testing.assert_array_equal(table.particles["pixel_size"], records["blob/psize_A"].astype(np.float64))
    assert table.metadata["uid"].dtype == np.uint64
    np.testing.assert_array_equal(table.metadata["uid"], records["uid"])


def test_cs_and_star_describe_the_same_particles(shared_data):
    folder = shared_data / "particles/cryodrgn_empiar10076"
    star, cs = read_star(folder / "empiar_10076_7.star"), read_cs(folder / "empiar_10076_7.cs")
    np.testing.assert_array_equal(star.particles["image_index"], cs.particles["image_index"])
    # the .cs stores float32: equal to float32 precision
    for field in ["defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast", "pixel_size"]:
        np.testing.assert_allclose(cs.particles[field], star.particles[field], rtol=1e-6, err_msg=field)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # mrcfile on relion31.mrcs (no MAP id string)
def test_mrc_headers_and_reads(shared_data):
    for name, shape in [
        ("particles/cryodrgn_relion31/relion31.mrcs", (5, 256, 256)),  # no MAP id string: read leniently
        ("particles/cryodrgn_empiar10076/empiar_10076_7.mrc", (7, 320, 320)),
        ("particles/cryojax_trpv1/trpv1_small_stack.mrcs", (10, 48, 48)),
    ]:
        path = shared_data / name
        header = read_stack_header(path)
        assert (header.n, header.ny, header.nx) == shape
        with mrcfile.open(path, permissive=True) as mrc:
            data = np.asarray(mrc.data)
        np.testing.assert_array_equal(read_images(path, np.arange(1, 4)), data[1:4])
        np.testing.assert_array_equal(read_images(path, np.array([4, 0, 2])), data[[4, 0, 2]])
    assert read_stack_header(shared_data / "particles/cryojax_trpv1/trpv1_small_stack.mrcs").voxel_size == 4.88


def test_bare_stack_pixel_size(shared_data):
    stack = shared_data / "particles/cryojax_trpv1/trpv1_small_stack.mrcs"
    table = read_mrc_table(stack)
    assert len(table) == 10 and not table.has_ctf
    assert (table.particles["pixel_size"] == 4.88).all()
    assert (read_mrc_table(stack, pixel_size=2.0).particles["pixel_size"] == 2.0).all()
    with pytest.raises(InputError, match="--pixel-size"):
        read_mrc_table(shared_data / "particles/aspire_sample/sample.mrcs")  # header voxel size 0
