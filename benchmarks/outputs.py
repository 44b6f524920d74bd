"""Job time with all result outputs on LIDC-IDRI-0001: before and after the clinical outputs.

One run, one machine, the same detection (the shipped weights on onnxruntime CPU) for both:

- **reference** ("before"): SEG, SR and GSPS, encoded as the worker did before the clinical layer
  (one call per encoder, no assessment, no key images);
- **all outputs** ("after"): :func:`pipelines.outputs.encode_results` as the worker runs it now:
  lesion classes, Lung-RADS, Brock risk, SEG, SR with the evaluations, GSPS and one key image per
  nodule or mass;
- **with the heatmap** (``NODULEAI_HEATMAP``): the same plus the screening heatmap's Parametric
  Map; here each variant also writes its objects to disk as the worker does, since the map's
  size (4 bytes per CT pixel) is its cost.

Each encoding is repeated ``--repeat`` times and the median is taken; the job time is the detection
(once, keeping the heatmap) plus that encoding. Printed: the figures, their ratios, and the added
shares of the job.

Run: ``.venv/bin/python benchmarks/outputs.py [--threads 2] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pydicom import dcmread  # noqa: E402

from dicom_node.results import ModelIdentity  # noqa: E402
from pipelines.brock import BrockRisk  # noqa: E402
from pipelines.detect import Detector, DetectorConfig  # noqa: E402
from pipelines.findings import Nodule  # noqa: E402
from pipelines.gsps import GspsNodule, encode_gsps  # noqa: E402
from pipelines.lesions import LesionClass  # noqa: E402
from pipelines.masks import nodule_outline, project_mask, source_planes  # noqa: E402
from pipelines.outputs import EncodedResults, encode_results  # noqa: E402
from pipelines.seg import SegmentInput, encode_segmentation  # noqa: E402
from pipelines.sr import Assessment, NoduleReport, encode_sr  # noqa: E402
from pipelines.uids import ResultUIDs  # noqa: E402
from pipelines.volume import Volume, build_volume  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "lidc-idri-0001"
T = TypeVar("T")


def reference_encoding(
    paths: list[Path], volume: Volume, nodules: list[Nodule], model: ModelIdentity
) -> int:
    """SEG + SR + GSPS only (the outputs before the clinical layer); returns the object count."""
    headers = [dcmread(p, stop_before_pixels=True) for p in paths]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in headers}
    used = [by_uid[u] for u in volume.sop_instance_uids if u in by_uid]
    uids = ResultUIDs.create(volume.series_instance_uid, volume.sop_instance_uids, model.display)
    planes = source_planes(volume, by_uid)
    segments: list[SegmentInput] = []
    reports: list[NoduleReport] = []
    plain = Assessment(LesionClass.NODULE, 0.0, 0.0, "", BrockRisk(None, ""), False)
    for n in nodules:
        masks = project_mask(n, planes)
        outline = nodule_outline(masks, n)
        if outline is None:
            continue
        k = len(reports) + 1
        segments.append(SegmentInput(masks, f"Nodule {k}", uids.tracking_uid(k - 1), f"Nodule {k}"))
        reports.append(NoduleReport(n, outline, f"Nodule {k}", uids.tracking_uid(k - 1), k, plain))
    order = [(p.source.sop_instance_uid, p.source.frame_number) for p in planes]
    seg = encode_segmentation(used, order, segments, uids, model.name, model.version)
    encode_sr(reports, used, uids, model.name, model.version, seg=seg)
    encode_gsps(
        used,
        [GspsNodule(r.nodule, r.outline, r.tracking_id, r.tracking_uid, False) for r in reports],
        uids,
        model.name,
        model.version,
    )
    return 3


def _written(encoded: EncodedResults, folder: Path) -> int:
    """Write every object as the worker does; return the bytes written."""
    size = 0
    for i, ds in enumerate(encoded.datasets):
        path = folder / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        size += path.stat().st_size
        path.unlink()
    return size


def _median_ms(fn: Callable[[], T], repeat: int) -> tuple[float, T]:
    times: list[float] = []
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times), value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    paths = sorted(DATA.rglob("*.dcm"))
    volume = build_volume(paths)
    detector = Detector(DetectorConfig(threads=args.threads, heatmap=True))
    start = time.perf_counter()
    detection = detector.run(volume)
    detect_ms = (time.perf_counter() - start) * 1000.0
    model = ModelIdentity(detection.model_name, detection.model_version)
    nodules = detection.nodules

    before_ms, _ = _median_ms(
        lambda: reference_encoding(paths, volume, nodules, model), args.repeat
    )
    after_ms, encoded = _median_ms(
        lambda: encode_results(paths, volume, nodules, model), args.repeat
    )
    kinds = sorted(str(ds.Modality) for ds in encoded.datasets)
    job_before, job_after = detect_ms + before_ms, detect_ms + after_ms
    print(f"LIDC-IDRI-0001, {len(nodules)} findings, onnxruntime CPU, {args.threads} threads")
    print(f"  detection (once, shared):              {detect_ms:8.0f} ms")
    print(
        f"  reference: SEG+SR+GSPS encoding        {before_ms:8.0f} ms  (median of {args.repeat})"
    )
    print(f"  all outputs encoding:                  {after_ms:8.0f} ms  ({', '.join(kinds)})")
    print(f"  job, reference:                        {job_before:8.0f} ms")
    print(f"  job, all outputs:                      {job_after:8.0f} ms")
    print(f"  ratio all outputs / reference (job):   {job_after / job_before:8.3f}")
    added = 100 * (job_after - job_before) / job_after
    print(f"  added share of the job:                {added:7.1f} %")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        plain_ms, plain_bytes = _median_ms(
            lambda: _written(encode_results(paths, volume, nodules, model), folder), args.repeat
        )
        heat_ms, heat_bytes = _median_ms(
            lambda: _written(
                encode_results(paths, volume, nodules, model, heatmap=detection.heatmap), folder
            ),
            args.repeat,
        )
    job_plain, job_heat = detect_ms + plain_ms, detect_ms + heat_ms
    print("  -- the screening heatmap (encoding and writing every object):")
    print(f"  all outputs, written:           {plain_ms:8.0f} ms  {plain_bytes / 1e6:7.1f} MB")
    print(f"  all outputs + heatmap, written: {heat_ms:8.0f} ms  {heat_bytes / 1e6:7.1f} MB")
    print(f"  ratio with / without heatmap (job):    {job_heat / job_plain:8.3f}")
    share = 100 * (job_heat - job_plain) / job_plain
    print(f"  heatmap's cost, share of the job:      {share:7.1f} %  (default off above 10 %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
