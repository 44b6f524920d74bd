"""Our own TID 1500 report reads back into the nodules it reports (a prior's findings are reused
from its SR instead of being detected again), and a comparison travels in the result document."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicom_node.results import (
    ModelIdentity,
    PriorComparison,
    PriorOutcome,
    ResolvedNodule,
    ResultSet,
)
from models.phantom import make_phantom, write_dicom_series
from pipelines.outputs import encode_results
from pipelines.sr import read_findings
from pipelines.volume import build_volume
from tests.nodule_fixtures import grid_mask_to_nodule

pytestmark = pytest.mark.unit

MODEL = ModelIdentity("noduleai-detector", "1.0.0")


def test_our_sr_reads_back_into_the_reported_measurements(tmp_path: Path) -> None:
    ph = make_phantom(
        11, shape=(32, 256, 256), spacing_mm=(2.0, 1.4, 1.4), n_nodules=2, fov_padding=False
    )
    paths = write_dicom_series(ph.volume_hu, ph.spacing_mm, tmp_path, 11, ph.origin_mm)
    volume = build_volume(paths)
    nodules = [grid_mask_to_nodule(ph.labels == n.label, volume) for n in ph.nodules]
    encoded = encode_results(paths, volume, nodules, MODEL)
    sr = next(ds for ds in encoded.datasets if ds.Modality == "SR")
    headers = {
        str(h.SOPInstanceUID): h for h in (dcmread(p, stop_before_pixels=True) for p in paths)
    }

    read = read_findings(sr, headers)

    assert len(read) == len(encoded.nodules) == 2
    for measured, reported in zip(read, encoded.nodules, strict=True):
        assert measured.volume_mm3 == pytest.approx(reported.volume_mm3, abs=0.1)
        assert measured.long_axis_mm == pytest.approx(reported.long_axis_mm, abs=0.01)
        assert measured.short_axis_mm == pytest.approx(reported.short_axis_mm, abs=0.01)
        assert measured.attenuation == reported.type
        # the outline's centre on its slice: within a slice and a pixel of the 3D centre
        offset = np.abs(np.array(measured.centre_mm) - np.array(reported.center_mm))
        assert offset[2] <= ph.spacing_mm[0] and max(offset[:2]) <= 2 * ph.spacing_mm[1], offset


def test_a_negative_report_reads_back_as_no_nodules(tmp_path: Path) -> None:
    ph = make_phantom(3, shape=(24, 128, 128), spacing_mm=(2.5, 2.8, 2.8), n_nodules=0)
    paths = write_dicom_series(ph.volume_hu, ph.spacing_mm, tmp_path, 3, ph.origin_mm)
    (sr,) = encode_results(paths, build_volume(paths), [], MODEL).datasets
    assert read_findings(sr, {}) == []


def test_the_comparison_survives_the_result_document() -> None:
    prior = PriorComparison(
        PriorOutcome.COMPARED,
        study_instance_uid="1.2.3",
        study_date="2025-01-02",
        interval_days=181.0,
        findings_from="report",
        rotation_deg=2.5,
        translation_mm=11.2,
        resolved=(ResolvedNodule((1.0, 2.0, 3.0), 120.5, 6.1),),
    )
    result = ResultSet("job", "1.2", "1.2.1", MODEL, (), 0, (), "f.json", 0, "onnx", prior=prior)
    assert ResultSet.from_json(result.to_json()).prior == prior
    baseline = PriorComparison.baseline("timeout", "no query response before the deadline")
    again = ResultSet.from_json({**result.to_json(), "prior": baseline.to_json()})
    assert again.prior == baseline
    older = {k: v for k, v in result.to_json().items() if k != "prior"}
    assert ResultSet.from_json(older).prior is None  # documents from before priors
