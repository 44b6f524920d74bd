"""Lesion classes: what each detected finding is called, so that a mass or diffuse disease is never
reported as a nodule.

The detector finds focal opacities; the radiological definitions decide what to call them:

- **nodule**: a focal, rounded opacity up to 30 mm (Fleischner Society glossary of terms for
  thoracic imaging, Hansell et al., Radiology 2008;246:697-722: "nodule ... measuring up to
  3 cm"). Lung-RADS and the Brock risk apply.
- **mass**: a focal lesion whose long axis exceeds :data:`MASS_MM` (30 mm; same glossary: "any
  pulmonary, pleural, or mediastinal lesion ... greater than 3 cm"). Still reported, because a
  radiologist must see it, always as *needs review*; Lung-RADS still gives its category by size
  and type (a solid lesion of 30 mm or more is 4B), the Brock model (built on nodules) gives no
  risk.
- **diffuse**: multifocal sub-solid opacity, the pattern of an infection or inflammation (e.g.
  COVID-19 or other pneumonia) rather than of nodules: when the study holds at least
  :data:`MULTIFOCAL_COUNT` sub-solid findings (ground-glass or part-solid) of at least
  :data:`MULTIFOCAL_MIN_MM` long axis, in both lungs, every sub-solid finding of the study is an
  opacity of that diffuse process, not a nodule or a mass. Such findings are still listed (class
  ``diffuse``, needs review) so that nothing the detector saw is hidden, but they get no Lung-RADS
  nodule category and no risk: the study is Lung-RADS **0** (v2022: "findings suggestive of an
  inflammatory or infectious process", follow-up CT in 1-3 months) unless a nodule or mass of its
  own is 4A or 4B. Solid findings keep their own class.

The thresholds are the published size definitions and a deliberately conservative multifocal
rule (several large sub-solid opacities *and* both lungs); a patient with several persistent
sub-solid nodules in both lungs (multifocal adenocarcinoma spectrum) would also meet it, which is
why the findings stay listed and flagged for review instead of being dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

#: Long axis (mm) above which a focal lesion is a mass, not a nodule.
MASS_MM = 30.0
#: Sub-solid findings of at least this long axis (mm) count towards the multifocal rule.
MULTIFOCAL_MIN_MM = 10.0
#: That many of them, in both lungs, make the study's sub-solid findings diffuse disease.
MULTIFOCAL_COUNT = 4
SUB_SOLID = frozenset({"ground-glass", "part-solid"})


class LesionClass(StrEnum):
    """What a finding is called in every output."""

    NODULE = "nodule"
    MASS = "mass"
    DIFFUSE = "diffuse"

    @property
    def label(self) -> str:
        """The word in tracking identifiers, segment labels and captions."""
        return {"nodule": "Nodule", "mass": "Mass", "diffuse": "Opacity"}[self.value]

    @property
    def code(self) -> Code:
        """Finding type: SCT 27925004 Nodule, SCT 4147007 Mass, DCM 112001 Opacity."""
        code: Code = {
            "nodule": codes.SCT.Nodule,
            "mass": codes.SCT.Mass,
            "diffuse": codes.DCM.Opacity,
        }[self.value]
        return code


@dataclass(frozen=True)
class Focus:
    """What the classes are decided from: type, long axis (mm) and the LPS x of the centre."""

    type: str
    long_axis_mm: float
    x_mm: float


def diffuse_disease(findings: Sequence[Focus]) -> bool:
    """Whether the study's sub-solid findings form a multifocal, bilateral pattern."""
    large = [f for f in findings if f.type in SUB_SOLID and f.long_axis_mm >= MULTIFOCAL_MIN_MM]
    both_lungs = any(f.x_mm > 0 for f in large) and any(f.x_mm <= 0 for f in large)
    return len(large) >= MULTIFOCAL_COUNT and both_lungs


def classify(findings: Sequence[Focus]) -> list[LesionClass]:
    """The class of each finding (same order), by the rules of this module."""
    diffuse = diffuse_disease(findings)
    classes = []
    for f in findings:
        if diffuse and f.type in SUB_SOLID:
            classes.append(LesionClass.DIFFUSE)
        elif f.long_axis_mm > MASS_MM:
            classes.append(LesionClass.MASS)
        else:
            classes.append(LesionClass.NODULE)
    return classes
