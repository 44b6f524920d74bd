"""One study, start to finish: select the series, build the volume, detect.

Shared by the worker and by ``noduleai detect`` so that both compute exactly the same thing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pipelines.detect import Detection, Detector
from pipelines.selection import select_series
from pipelines.volume import Volume, build_volume


@dataclass
class Analysis:
    """What one study's analysis produced: the series' files, its volume, the detection."""

    paths: list[Path]
    volume: Volume
    detection: Detection


def analyse(
    paths: Iterable[Path],
    detector: Callable[[], Detector],
    min_slices: int,
    checkpoint: Callable[[], None] = lambda: None,
) -> Analysis:
    """Analyse the files of one study.

    ``detector`` is called only once the study proved analysable, so a rejection never waits
    for (or depends on) loading the models. ``checkpoint`` is called between the steps (after the
    volume is built, after detection); it raises to abandon the analysis (the worker's job was
    superseded meanwhile).

    Raises
    ------
    dicom_node.errors.StudyRejectedError
        No eligible series, or geometry that cannot be used; the code says which.
    """
    start = time.perf_counter()
    selected = select_series(paths, min_slices=min_slices)
    volume = build_volume(selected.paths)
    loaded = (time.perf_counter() - start) * 1000.0
    checkpoint()
    detection = detector().run(volume)
    checkpoint()
    detection.timings_ms = {"load": loaded, **detection.timings_ms}
    detection.timings_ms["total"] = (time.perf_counter() - start) * 1000.0
    return Analysis(list(selected.paths), volume, detection)
