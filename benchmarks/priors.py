"""Prior retrieval and comparison time on LIDC-IDRI-0001, each beside a reference from the same run.

Orthanc (the PACS) holds LIDC-IDRI-0001 as the prior and a moved copy of it 200 days later as
the current study (:mod:`models.followup`). Measured, on this machine in one run:

- **retrieval**: the node's path (:class:`pipelines.priors.PriorLocator`: C-FIND, then C-GET of
  the prior, every instance fsync'd into the spool with its database row) against DCMTK's
  ``getscu`` fetching the same study from the same Orthanc into a folder (the reference);
- **comparison**: the prior's analysis (volume, detection: no stored result or SR to reuse), its
  rigid alignment to the current study and the nodule matching, against the detection of the
  current study (what any job costs anyway).

Run: ``.venv/bin/python benchmarks/priors.py [--threads 2]`` (needs Orthanc and DCMTK, as the
tests do). Prints each figure and its ratio to the reference.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from pydicom import dcmread  # noqa: E402

from dicom_node.config import NodeConfig  # noqa: E402
from dicom_node.db import Database  # noqa: E402
from dicom_node.migrate import upgrade  # noqa: E402
from dicom_node.spool import LocalSpool  # noqa: E402
from models.followup import write_moved_copy  # noqa: E402
from pipelines.comparison import Measured, compare  # noqa: E402
from pipelines.detect import Detector, DetectorConfig  # noqa: E402
from pipelines.priors import PriorFindings, PriorLocator  # noqa: E402
from pipelines.registration import RigidTransform  # noqa: E402
from pipelines.volume import build_volume  # noqa: E402
from tests.helpers import system_program  # noqa: E402
from tests.peers import Orthanc  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "lidc-idri-0001"
CALLING_AE = "BENCH"


def getscu_seconds(orthanc: Orthanc, study_uid: str, out: Path) -> float:
    """DCMTK ``getscu`` of the study (Study Root, C-GET) into ``out``: the reference."""
    out.mkdir()
    start = time.perf_counter()
    subprocess.run(
        [
            system_program("getscu"),
            "-S",
            "-aet",
            CALLING_AE,
            "-aec",
            orthanc.aet,
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study_uid}",
            "127.0.0.1",
            str(orthanc.dicom_port),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-priors-"))
    prior_paths = sorted(DATA.rglob("*.dcm"))
    truth = RigidTransform.from_params((2.0, -1.5, 3.0), (6.0, -4.0, 10.0), (0.0, 0.0, -180.0))
    current_paths = write_moved_copy(prior_paths, work / "current", truth, 200, salt="bench")
    prior_uid = str(dcmread(prior_paths[0], stop_before_pixels=True).StudyInstanceUID)
    detector = Detector(DetectorConfig(backend="onnx-cpu", threads=args.threads))
    with Orthanc(work / "orthanc") as orthanc:
        for path in [*prior_paths, *current_paths]:
            orthanc.upload(path)
        orthanc._check(
            orthanc.client.put(
                "/modalities/bench",
                json={"AET": CALLING_AE, "Host": "127.0.0.1", "Port": 4242, "AllowGet": True},
            )
        )
        reference = getscu_seconds(orthanc, prior_uid, work / "getscu")

        config = NodeConfig.model_validate(
            {
                "ae_policies": [
                    {
                        "ae_title": CALLING_AE,
                        "priors": {"source": "pacs", "retrieve": "get", "timeout_seconds": 600},
                    }
                ],
                "destinations": [
                    {
                        "name": "pacs",
                        "type": "dimse",
                        "ae_title": orthanc.aet,
                        "host": "127.0.0.1",
                        "port": orthanc.dicom_port,
                    }
                ],
            }
        )
        db = Database(f"sqlite:///{work / 'bench.db'}")
        upgrade(db)
        locator = PriorLocator(
            db, LocalSpool(work / "spool", 0), config, CALLING_AE, lambda: detector, 20
        )
        current = build_volume(current_paths)
        start = time.perf_counter()
        detection = detector.run(current)
        current_detection = time.perf_counter() - start
        header = dcmread(current_paths[0], stop_before_pixels=True)
        timings: dict[str, float] = {}
        located = locator.locate(CALLING_AE, header, current, timings)
    assert isinstance(located, PriorFindings), located
    now = [Measured.of(n) for n in detection.nodules]
    start = time.perf_counter()
    changes = compare(now, located.nodules, located.registration.transform, located.interval_days)
    matching = (time.perf_counter() - start) * 1000.0
    retrieve = timings["prior_retrieve"] / 1000.0
    findings = timings["prior_findings"] / 1000.0
    register = timings["prior_register"] / 1000.0
    lung = np.array([[-100.0, -50.0, -150.0], [100.0, 20.0, -200.0], [0.0, 0.0, -120.0]])
    error = np.linalg.norm(
        located.registration.transform.to_prior(lung) - truth.to_prior(lung), axis=1
    )
    print(f"LIDC-IDRI-0001 prior ({len(prior_paths)} instances), moved copy as the current study")
    print(f"retrieval, node (C-FIND + C-GET, durable)  {retrieve:7.2f} s")
    print(
        f"retrieval, DCMTK getscu (reference)        {reference:7.2f} s"
        f"   ratio {retrieve / reference:.2f}"
    )
    print(f"prior analysis (volume + detection)        {findings:7.2f} s")
    print(f"rigid alignment                            {register:7.2f} s")
    print(f"nodule matching                            {matching:7.2f} ms")
    compare_total = findings + register + matching / 1000.0
    print(
        f"comparison in all                          {compare_total:7.2f} s"
        f"   ratio {compare_total / current_detection:.2f} to the current detection"
    )
    print(f"current detection (reference)              {current_detection:7.2f} s")
    print(f"alignment error at 3 lung points           {', '.join(f'{e:.2f}' for e in error)} mm")
    print("changes:", ", ".join(c.status.value for c in changes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
