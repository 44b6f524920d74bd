"""Malignancy risk of a detected nodule: the Brock (PanCan) full model, with spiculation.

Source: McWilliams A, Tammemagi MC, Mayo JR, et al. *Probability of cancer in pulmonary nodules
detected on first screening CT.* N Engl J Med 2013;369:910-919 (the Pan-Canadian Early Detection
of Lung Cancer Study), full logistic model with spiculation ("model 2b"; the coefficients as the
British Thoracic Society 2015 nodule guideline and the Brock University calculator apply them)::

    logit = -6.7892
            + 0.0287 x (age - 62)
            + 0.6011 x female
            + 0.2961 x family history of lung cancer
            + 0.2953 x emphysema
            - 5.3854 x ((size / 10) ** -0.5 - 1.58113883)      size in mm (1.58113883 = 4 mm)
            + 0.3770 x part-solid  - 0.1276 x non-solid (ground-glass)   (solid: 0)
            + 0.6581 x upper lobe
            - 0.0824 x (nodule count - 4)
            + 0.7729 x spiculation
    probability = 1 / (1 + exp(-logit))

What the node measures and what it assumes, stated with every value (:attr:`BrockRisk.note`):

- age and sex from the DICOM header: PatientAge (0010,1010), else PatientBirthDate with
  StudyDate; PatientSex (0010,0040) M or F. Without either there is no risk, only the reason;
- size: the nodule's long axis (its maximum diameter on the axial slice of largest extent), the
  diameter the guideline uses;
- type from the attenuation (solid, part-solid, ground-glass = non-solid);
- upper lobe: the nodule's centre in the cranial half of the lung mask (the upper zone), a proxy
  while lobes are not segmented;
- nodule count: the nodules reported for the study;
- family history, emphysema and spiculation are not measured: assumed absent (each would raise
  the risk).

The model was built on a screening population (first screening CT, age 50-75, smokers); outside
it, and always, the value is decision support, **not for clinical use**.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date, datetime

from pydicom import Dataset

INTERCEPT = -6.7892
AGE = 0.0287
AGE_CENTRE = 62.0
FEMALE = 0.6011
FAMILY_HISTORY = 0.2961
EMPHYSEMA = 0.2953
SIZE = -5.3854
#: ``(4 / 10) ** -0.5``: the size transform is centred on 4 mm.
SIZE_CENTRE = 1.58113883
TYPE = {"solid": 0.0, "part-solid": 0.3770, "ground-glass": -0.1276}
UPPER_LOBE = 0.6581
COUNT = -0.0824
COUNT_CENTRE = 4
SPICULATION = 0.7729

#: What every risk assumes (the model's inputs the node does not measure).
ASSUMED = (
    "family history of lung cancer, emphysema and spiculation assumed absent; "
    "upper lobe = upper zone of the lung mask; size = long axis"
)
NOT_FOR_CLINICAL_USE = "Brock (PanCan) model, McWilliams et al. NEJM 2013; not for clinical use"


@dataclass(frozen=True)
class BrockInputs:
    """The model's inputs for one nodule."""

    age_years: float
    female: bool
    size_mm: float
    type: str
    upper_lobe: bool
    nodule_count: int
    family_history: bool = False
    emphysema: bool = False
    spiculation: bool = False


@dataclass(frozen=True)
class BrockRisk:
    """A nodule's risk (``probability`` in 0..1), or ``None`` with the reason in ``note``."""

    probability: float | None
    note: str


def logit(inputs: BrockInputs) -> float:
    """The model's linear predictor.

    Raises
    ------
    ValueError
        For a size not above 0 or an unknown nodule type.
    """
    if inputs.size_mm <= 0:
        raise ValueError(f"nodule size must be positive, got {inputs.size_mm}")
    if inputs.type not in TYPE:
        raise ValueError(f"unknown nodule type {inputs.type!r}; expected one of {sorted(TYPE)}")
    return float(
        INTERCEPT
        + AGE * (inputs.age_years - AGE_CENTRE)
        + FEMALE * inputs.female
        + FAMILY_HISTORY * inputs.family_history
        + EMPHYSEMA * inputs.emphysema
        + SIZE * ((inputs.size_mm / 10.0) ** -0.5 - SIZE_CENTRE)
        + TYPE[inputs.type]
        + UPPER_LOBE * inputs.upper_lobe
        + COUNT * (inputs.nodule_count - COUNT_CENTRE)
        + SPICULATION * inputs.spiculation
    )


def probability(inputs: BrockInputs) -> float:
    """The probability of cancer, 0..1."""
    return 1.0 / (1.0 + math.exp(-logit(inputs)))


@dataclass(frozen=True)
class Patient:
    """Age and sex as the header gives them (``None``: not known). Never logged or stored."""

    age_years: float | None
    female: bool | None

    def __repr__(self) -> str:  # keep patient data out of logs and tracebacks
        return "Patient(<hidden>)"


def patient_of(ds: Dataset) -> Patient:
    """Age (PatientAge, else PatientBirthDate with StudyDate) and sex (PatientSex) of ``ds``."""
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    female = True if sex == "F" else False if sex == "M" else None
    age = _age_string(str(ds.get("PatientAge", "") or ""))
    if age is None:
        age = _age_from_dates(
            str(ds.get("PatientBirthDate", "") or ""), str(ds.get("StudyDate", "") or "")
        )
    return Patient(age, female)


def _age_string(value: str) -> float | None:
    """PatientAge (AS, PS3.5 6.2: ``nnnD``, ``nnnW``, ``nnnM`` or ``nnnY``) in years."""
    match = re.fullmatch(r"(\d{3})([DWMY])", value.strip())
    if match is None:
        return None
    per_year = {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0}[match.group(2)]
    return int(match.group(1)) / per_year


def _age_from_dates(birth: str, study: str) -> float | None:
    """Whole years between PatientBirthDate and StudyDate (DA, ``YYYYMMDD``)."""
    try:
        born = datetime.strptime(birth.strip(), "%Y%m%d").date()
        seen = datetime.strptime(study.strip(), "%Y%m%d").date()
    except ValueError:
        return None
    if seen < born:
        return None
    return float(_whole_years(born, seen))


def _whole_years(born: date, seen: date) -> int:
    return seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))


def nodule_risk(
    patient: Patient, size_mm: float, nodule_type: str, upper_zone: bool | None, count: int
) -> BrockRisk:
    """The risk of one nodule, with what it assumed, or the reason there is none."""
    if patient.age_years is None:
        return BrockRisk(None, "no risk: the patient's age is not in the header")
    if patient.female is None:
        return BrockRisk(None, "no risk: the patient's sex (M or F) is not in the header")
    if upper_zone is None:
        return BrockRisk(None, "no risk: no lung mask to place the nodule in a zone")
    inputs = BrockInputs(
        age_years=patient.age_years,
        female=patient.female,
        size_mm=size_mm,
        type=nodule_type,
        upper_lobe=upper_zone,
        nodule_count=count,
    )
    return BrockRisk(probability(inputs), f"{NOT_FOR_CLINICAL_USE}; {ASSUMED}")
