"""Deterministic result UIDs: same input, same UIDs; another instance set, new instances."""

from __future__ import annotations

import re

import pytest

from pipelines.uids import ResultUIDs, derive_uid

SERIES = "1.2.3.4"
INSTANCES = [f"1.2.3.4.{i}" for i in range(1, 6)]
UID_PATTERN = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")


def test_derived_uids_are_valid_2_25_uids_within_64_characters() -> None:
    uid = derive_uid("a", "b")
    assert UID_PATTERN.match(uid)
    assert len(uid) <= 64


def test_derive_uid_is_deterministic_and_separates_parts() -> None:
    assert derive_uid("a", "b") == derive_uid("a", "b")
    assert derive_uid("a", "bc") != derive_uid("ab", "c")


def test_reprocessing_the_same_instances_in_any_order_gives_identical_uids() -> None:
    first = ResultUIDs.create(SERIES, INSTANCES, "model 1.0")
    again = ResultUIDs.create(SERIES, reversed(INSTANCES), "model 1.0")
    for kind in ("seg", "sr", "gsps"):
        assert first.series_uid(kind) == again.series_uid(kind)
        assert first.instance_uid(kind) == again.instance_uid(kind)
    assert first.tracking_uid(0) == again.tracking_uid(0)


def test_late_instances_give_new_instance_uids_in_the_same_result_series() -> None:
    before = ResultUIDs.create(SERIES, INSTANCES[:-1], "model 1.0")
    after = ResultUIDs.create(SERIES, INSTANCES, "model 1.0")
    assert before.sr_instance_uid != after.sr_instance_uid
    assert before.seg_instance_uid != after.seg_instance_uid
    assert before.tracking_uid(0) != after.tracking_uid(0)
    assert before.sr_series_uid == after.sr_series_uid


def test_a_new_model_version_gives_new_series_and_instances() -> None:
    old = ResultUIDs.create(SERIES, INSTANCES, "model 1.0")
    new = ResultUIDs.create(SERIES, INSTANCES, "model 1.1")
    assert old.seg_series_uid != new.seg_series_uid
    assert old.seg_instance_uid != new.seg_instance_uid


def test_every_object_and_nodule_gets_a_distinct_uid() -> None:
    uids = ResultUIDs.create(SERIES, INSTANCES, "model 1.0")
    values = [uids.series_uid(k) for k in ("seg", "sr", "gsps")]
    values += [uids.instance_uid(k) for k in ("seg", "sr", "gsps")]
    values += [uids.tracking_uid(i) for i in range(3)]
    assert len(set(values)) == len(values)


def test_an_unknown_object_kind_is_refused() -> None:
    with pytest.raises(ValueError):
        ResultUIDs.create(SERIES, INSTANCES, "m").series_uid("rtstruct")


def test_derived_uids_are_pinned_so_a_namespace_change_fails() -> None:
    """Result UIDs already sit in PACSs: the namespace, the parts and their order are forever."""
    uids = ResultUIDs.create(
        "1.2.826.0.1.3680043.8.498.1",
        ["1.2.3.2", "1.2.3.1"],
        "NoduleAI lung nodule detector stage1_screen-1.3.0+stage2_refine-1.3.0",
    )
    assert derive_uid("a", "b") == "2.25.116694520647888482325817489136835004755"
    assert [uids.series_uid(kind) for kind in ("seg", "sr", "gsps")] == [
        "2.25.79675553795476958205873306721469560124",
        "2.25.238518095432171760295420011825744671882",
        "2.25.157801933357553727730905082829242474418",
    ]
    assert [uids.instance_uid(kind) for kind in ("seg", "sr", "gsps")] == [
        "2.25.106606104411163622283841237430408567148",
        "2.25.33978553976440705667252583313285371370",
        "2.25.80903282797483643453838473041564812794",
    ]
    assert [uids.tracking_uid(i) for i in (0, 1)] == [
        "2.25.103573866077312149494770724923019056066",
        "2.25.17485710067237704761367884713878110751",
    ]
