"""The Brock (PanCan) full model against examples worked by hand from the published
coefficients (McWilliams et al., NEJM 2013), and the header inputs it takes."""

from __future__ import annotations

import math

import pytest
from pydicom import Dataset

from pipelines.brock import BrockInputs, Patient, logit, nodule_risk, patient_of, probability

pytestmark = pytest.mark.unit


def _p(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_the_reference_person_has_only_the_intercept() -> None:
    """62-year-old man, one of 4 nodules, solid, 4 mm, lower zone: every term is 0."""
    inputs = BrockInputs(62, False, 4.0, "solid", False, 4)
    assert logit(inputs) == pytest.approx(-6.7892, abs=1e-6)
    assert probability(inputs) == pytest.approx(0.0011246, abs=1e-6)


def test_a_woman_of_70_with_a_15_mm_upper_part_solid_solitary_nodule() -> None:
    # age 0.0287 * 8 = 0.2296; female 0.6011;
    # size: (1.5) ** -0.5 = 0.8164966 - 1.5811388 = -0.7646422; * -5.3854 = 4.1179040;
    # part-solid 0.377; upper lobe 0.6581; count -0.0824 * (1 - 4) = 0.2472
    hand = -6.7892 + 0.2296 + 0.6011 + 4.1179040 + 0.377 + 0.6581 + 0.2472  # -0.5581960
    inputs = BrockInputs(70, True, 15.0, "part-solid", True, 1)
    assert logit(inputs) == pytest.approx(hand, abs=1e-5)
    assert probability(inputs) == pytest.approx(_p(hand), abs=1e-6)
    assert probability(inputs) == pytest.approx(0.3640, abs=5e-4)


def test_a_man_of_55_with_an_8_mm_lower_ground_glass_nodule_of_three() -> None:
    # age 0.0287 * -7 = -0.2009; male 0; size: 0.8 ** -0.5 = 1.1180340 - 1.5811388 =
    # -0.4631048; * -5.3854 = 2.4940047; non-solid -0.1276; lower 0; count -0.0824 * -1 = 0.0824
    hand = -6.7892 - 0.2009 + 2.4940047 - 0.1276 + 0.0824  # -4.5412953
    inputs = BrockInputs(55, False, 8.0, "ground-glass", False, 3)
    assert logit(inputs) == pytest.approx(hand, abs=1e-5)
    assert probability(inputs) == pytest.approx(0.010545, abs=2e-5)


def test_the_factors_assumed_absent_would_each_raise_the_risk() -> None:
    base = BrockInputs(65, True, 10.0, "solid", True, 2)
    for flag, coefficient in (
        ("family_history", 0.2961),
        ("emphysema", 0.2953),
        ("spiculation", 0.7729),
    ):
        raised = BrockInputs(**{**base.__dict__, flag: True})
        assert logit(raised) - logit(base) == pytest.approx(coefficient)


@pytest.mark.parametrize(
    ("header", "age", "female"),
    [
        ({"PatientAge": "065Y", "PatientSex": "F"}, 65.0, True),
        ({"PatientAge": "006M", "PatientSex": "M"}, 0.5, False),
        ({"PatientBirthDate": "19500615", "StudyDate": "20200614", "PatientSex": "M"}, 69.0, False),
        ({"PatientBirthDate": "19500615", "StudyDate": "20200615", "PatientSex": "F"}, 70.0, True),
        ({"PatientAge": "65", "PatientSex": "O"}, None, None),
        ({"PatientBirthDate": "20200101", "StudyDate": "20100101"}, None, None),
        ({}, None, None),
    ],
)
def test_age_and_sex_come_from_the_header(
    header: dict[str, str], age: float | None, female: bool | None
) -> None:
    ds = Dataset()
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    patient = patient_of(ds)
    assert (patient.age_years, patient.female) == (age, female)
    assert repr(patient) == "Patient(<hidden>)"


def test_without_age_or_sex_there_is_no_risk_but_the_reason() -> None:
    no_age = nodule_risk(Patient(None, True), 10.0, "solid", True, 1)
    assert no_age.probability is None and "age" in no_age.note
    no_sex = nodule_risk(Patient(70.0, None), 10.0, "solid", True, 1)
    assert no_sex.probability is None and "sex" in no_sex.note
    known = nodule_risk(Patient(70.0, True), 10.0, "solid", True, 1)
    assert known.probability is not None and "assumed absent" in known.note
    assert "not for clinical use" in known.note


def test_a_nodule_type_the_model_does_not_know_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown nodule type"):
        logit(BrockInputs(60, False, 10.0, "mass", False, 1))
