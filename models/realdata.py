"""Real CT as training data: LUNA16 and LIDC-IDRI through the same training command.

``python -m models.train all --luna16 DIR`` (MetaImage ``*.mhd`` + ``.raw`` and an
``annotations.csv`` anywhere under ``DIR``) or ``--lidc DIR`` (DICOM series folders, each with
its LIDC-IDRI reader XML) trains on those scans instead of phantoms. Every scan becomes the same
:class:`models.train.TrainingVolume` a phantom does; the masks stage 2 learns are spheres of the
annotated diameter (LUNA16 gives only a centre and a diameter; for LIDC-IDRI the readers'
consensus centre and long axis are used the same way). Scans are split into training and
validation by a seeded shuffle of the scans, so no patient is in both.

numpy and scipy only; the loading runs in the training's worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.annotations import (
    CTVolume,
    lidc_consensus,
    load_dicom_series,
    load_mhd,
    read_lidc_xml,
    read_luna16_annotations,
)

AnnotatedNodule = tuple[tuple[float, float, float], float]
"""A reference nodule: LPS centre ``(x, y, z)`` mm and diameter mm."""

LIDC_MIN_READERS = 3
"""LIDC-IDRI nodules marked by at least this many of the four readers are kept (as LUNA16)."""


@dataclass(frozen=True)
class RealCase:
    """One annotated scan: ``kind`` ``luna16`` (``path`` an ``.mhd`` file, ``nodules`` from
    ``annotations.csv``) or ``lidc`` (``path`` a series folder, ``xml`` its reader XML)."""

    kind: str
    path: str
    nodules: tuple[AnnotatedNodule, ...] = ()
    xml: str = ""


def luna16_cases(folder: str | Path) -> list[RealCase]:
    """Every ``*.mhd`` under ``folder`` with its rows of the ``annotations.csv`` found there.

    Scans without a row are kept: they are nodule-free scans (negatives), as in LUNA16.

    Raises
    ------
    FileNotFoundError
        Without an ``annotations.csv`` or without any ``.mhd`` file.
    """
    root = Path(folder)
    csvs = sorted(root.rglob("annotations.csv"))
    if not csvs:
        raise FileNotFoundError(f"{root}: no annotations.csv (LUNA16 layout expected)")
    annotations = read_luna16_annotations(csvs[0])
    scans = sorted(root.rglob("*.mhd"))
    if not scans:
        raise FileNotFoundError(f"{root}: no .mhd scans")
    return [
        RealCase(
            "luna16",
            str(p),
            tuple((a.centre_xyz_mm, a.diameter_mm) for a in annotations.get(p.stem, [])),
        )
        for p in scans
    ]


def lidc_cases(folder: str | Path) -> list[RealCase]:
    """Every LIDC-IDRI reader XML under ``folder`` whose folder holds the series' ``*.dcm``."""
    root = Path(folder)
    out = []
    for xml in sorted(root.rglob("*.xml")):
        if "LidcReadMessage" in xml.read_text(errors="replace")[:2000] and any(
            xml.parent.glob("*.dcm")
        ):
            out.append(RealCase("lidc", str(xml.parent), xml=str(xml)))
    if not out:
        raise FileNotFoundError(f"{root}: no LIDC-IDRI series (folder with *.dcm + reader XML)")
    return out


def load_case(case: RealCase) -> tuple[CTVolume, list[AnnotatedNodule]]:
    """The scan's HU volume and its reference nodules."""
    if case.kind == "luna16":
        return load_mhd(case.path), list(case.nodules)
    ct = load_dicom_series(case.path)
    readers = lidc_consensus(
        read_lidc_xml(case.xml), ct.origin_mm, ct.spacing_mm[1:], ct.spacing_mm[0]
    )
    nodules = [
        (n.centre_xyz_mm, n.diameter_mm)
        for n in readers
        if n.kind == "nodule" and n.readers >= LIDC_MIN_READERS
    ]
    return ct, nodules


def sphere_labels(
    shape: tuple[int, ...],
    spacing_mm: tuple[float, float, float],
    origin_mm: tuple[float, float, float],
    nodules: list[AnnotatedNodule],
) -> npt.NDArray[np.uint8]:
    """Label volume ``[z, y, x]``: nodule ``k`` (1-based) is the ball of its diameter."""
    labels = np.zeros(shape, np.uint8)
    spacing = np.array(spacing_mm)
    for k, (c, d) in enumerate(nodules, start=1):
        centre = np.array(
            [
                (c[2] - origin_mm[2]) / spacing[0],
                (c[1] - origin_mm[1]) / spacing[1],
                (c[0] - origin_mm[0]) / spacing[2],
            ]
        )
        reach = d / 2 / spacing
        lo = np.maximum(np.floor(centre - reach).astype(int), 0)
        hi = np.minimum(np.ceil(centre + reach).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        grids = np.meshgrid(
            *[(np.arange(lo[a], hi[a]) - centre[a]) * spacing[a] for a in range(3)],
            indexing="ij",
        )
        inside = sum(g**2 for g in grids) <= (d / 2) ** 2
        box = labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        box[inside] = k
    return labels


def split_cases(
    cases: list[RealCase], n_train: int, n_val: int, seed: int
) -> tuple[list[RealCase], list[RealCase]]:
    """Seeded shuffle of the scans; the first ``n_val`` validate, up to ``n_train`` more train.

    Raises
    ------
    ValueError
        When fewer than two scans are given (one must validate).
    """
    if len(cases) < 2:
        raise ValueError(f"{len(cases)} annotated scan(s): at least 2 are needed (1 validates)")
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = min(n_val, len(cases) - 1)
    val = [cases[i] for i in order[:n_val]]
    train = [cases[i] for i in order[n_val : n_val + n_train]]
    return train, val
