"""Readers: LIDC-IDRI XML on the real 069.xml, LUNA16 csv and MetaImage volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.annotations import (
    lidc_consensus,
    load_dicom_series,
    load_mhd,
    read_lidc_xml,
    read_luna16_annotations,
)


@pytest.fixture(scope="module")
def lidc_small(shared_data: Path) -> Path:
    (xml,) = sorted(shared_data.glob("lidc-small/LIDC-IDRI-0001/*/*/069.xml"))
    return xml.parent


def test_lidc_xml_reads_four_readers_and_their_marks(lidc_small: Path) -> None:
    readings = read_lidc_xml(lidc_small / "069.xml")
    assert len({r.reader for r in readings}) == 4
    big = [r for r in readings if r.kind == "nodule"]
    assert len(big) == 4  # each reader contoured the one nodule of 3 mm or more
    assert all(r.malignancy in (4, 5) for r in big)
    assert any(r.kind == "small" for r in readings)
    assert any(r.kind == "non-nodule" for r in readings)
    assert all(len(roi.xy_px) > 2 for r in big for roi in r.rois)


def test_lidc_consensus_places_the_nodule_where_the_readme_says(lidc_small: Path) -> None:
    ct = load_dicom_series(lidc_small)
    assert ct.volume_hu.shape == (16, 512, 512)
    assert ct.spacing_mm == pytest.approx((2.5, 0.703125, 0.703125))
    nodules = lidc_consensus(
        read_lidc_xml(lidc_small / "069.xml"), ct.origin_mm, ct.spacing_mm[1:], ct.spacing_mm[0]
    )
    top = nodules[0]
    assert top.kind == "nodule" and top.readers == 4
    assert top.centre_xyz_mm == pytest.approx((55.5, 85.6, -116.1), abs=1.5)
    assert top.extent_mm[:2] == pytest.approx((28.0, 34.0), abs=2.0)
    assert top.extent_mm[2] == pytest.approx(18.0, abs=3.0)
    assert 25.0 < top.diameter_mm < 40.0
    assert all(n.kind == "small" for n in nodules[1:])


def test_luna16_annotations_csv_groups_rows_by_series(tmp_path: Path) -> None:
    csv = tmp_path / "annotations.csv"
    csv.write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
        "1.2.3,-128.69,-175.31,-298.38,5.65\n1.2.3,103.78,-211.92,-227.12,4.22\n"
        "1.2.4,69.63,-140.94,876.37,5.79\n"
    )
    ann = read_luna16_annotations(csv)
    assert sorted(ann) == ["1.2.3", "1.2.4"]
    assert ann["1.2.3"][0].centre_xyz_mm == (-128.69, -175.31, -298.38)
    assert ann["1.2.3"][1].diameter_mm == 4.22


def test_mhd_volume_loads_with_spacing_origin_and_flips_undone(tmp_path: Path) -> None:
    vol = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)  # z, y, x
    vol.tofile(tmp_path / "a.raw")
    (tmp_path / "a.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "TransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = -10 -20 -30\n"
        "ElementSpacing = 0.7 0.8 2.5\nDimSize = 4 3 2\nElementType = MET_SHORT\n"
        "ElementDataFile = a.raw\n"
    )
    ct = load_mhd(tmp_path / "a.mhd")
    assert np.array_equal(ct.volume_hu, vol)
    assert ct.spacing_mm == (2.5, 0.8, 0.7)
    assert ct.origin_mm == (-10.0, -20.0, -30.0)
    (tmp_path / "b.mhd").write_text(
        (tmp_path / "a.mhd")
        .read_text()
        .replace("TransformMatrix = 1 0 0 0 1 0 0 0 1", "TransformMatrix = -1 0 0 0 1 0 0 0 1")
        .replace("ElementDataFile = a.raw", "ElementDataFile = a.raw")
    )
    flipped = load_mhd(tmp_path / "b.mhd")
    assert np.array_equal(flipped.volume_hu, vol[:, :, ::-1])
    assert flipped.origin_mm[0] == pytest.approx(-10.0 - 3 * 0.7)
