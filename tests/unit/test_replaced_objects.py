"""What a replacing result retracts (pipelines.outputs.replaced): every earlier object of the
study, the heatmap and key images included, but not the rejection notes nor the objects that are
written again under the same UID."""

from __future__ import annotations

import pytest
from pydicom import Dataset

from dicom_node.results import (
    KEY_OBJECT_SELECTION,
    PARAMETRIC_MAP,
    SEGMENTATION_STORAGE,
    ModelIdentity,
    ObjectKind,
    ResultObject,
    ResultSet,
)
from pipelines.outputs import replaced

pytestmark = pytest.mark.unit


def _object(kind: ObjectKind, sop_class: str, uid: str) -> ResultObject:
    return ResultObject(kind, "OT", sop_class, uid, "1.2.9", "1.2.3", f"results/j/1/{uid}.dcm")


def test_the_earlier_heatmap_is_replaced_with_the_other_objects_and_notes_stay() -> None:
    earlier = ResultSet(
        "job-1",
        "1.2.3",
        "1.2.3.4",
        ModelIdentity("NoduleAI", "1"),
        (),
        0,
        (
            _object(ObjectKind.SEG, SEGMENTATION_STORAGE, "1.2.3.100"),
            _object(ObjectKind.HEATMAP, PARAMETRIC_MAP, "1.2.3.101"),
            _object(ObjectKind.REJECTION, KEY_OBJECT_SELECTION, "1.2.3.102"),
        ),
        "results/j/1/fhir.json",
        0,
        "cpu",
    )
    again = Dataset()
    again.SOPInstanceUID = "1.2.3.100"  # the same SEG written again: not retracted
    assert [o.sop_instance_uid for o in replaced([earlier], [again])] == ["1.2.3.101"]
    assert [o.kind for o in replaced([earlier], [])] == [ObjectKind.SEG, ObjectKind.HEATMAP]
