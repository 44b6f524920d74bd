"""The ``noduleai`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from dicom_node.config import Settings, load_settings
from dicom_node.db import Database
from dicom_node.errors import ConfigError
from dicom_node.migrate import upgrade

LOGGER = logging.getLogger("noduleai")


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Libraries log per-dataset details (pynetdicom and highdicom name source image UIDs).
    for library in ("pynetdicom", "highdicom", "pydicom"):
        logging.getLogger(library).setLevel(logging.WARNING)
    # pika logs every failed connection attempt at ERROR with a traceback; the node logs one
    # warning per attempt itself (publisher, consumer), naming the error.
    logging.getLogger("pika").setLevel(logging.CRITICAL)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    LOGGER.info("stopping")


def _run_node(settings: Settings, workers: int) -> int:
    from dicom_node.node import Node
    from pipelines.worker import Worker, run_worker

    node = Node(settings)
    node.start()
    pool = [Worker(settings, node.db, node.config) for _ in range(workers)]
    threads = [
        threading.Thread(target=run_worker, args=(settings, node.db, w), name=f"worker-{i}")
        for i, w in enumerate(pool)
    ]
    for thread in threads:
        thread.start()
    LOGGER.info("ready (%d worker%s)", workers, "" if workers == 1 else "s")
    _wait_for_signal()
    node.scp.stop()
    for worker in pool:
        worker.stop()
    for thread in threads:
        thread.join(timeout=settings.job_timeout_seconds)
    node.stop()
    return 0


def _run_worker(settings: Settings) -> int:
    from pipelines.worker import Worker, run_worker

    config = settings.node_config()
    db = Database(settings.database_url)
    upgrade(db)
    worker = Worker(settings, db, config)
    thread = threading.Thread(target=run_worker, args=(settings, db, worker), name="worker")
    thread.start()
    LOGGER.info("worker %s ready", worker.worker_id)
    _wait_for_signal()
    worker.stop()
    thread.join(timeout=settings.job_timeout_seconds)
    db.dispose()
    return 0


def _detect(settings: Settings, path: Path, out: Path) -> int:
    """Run the pipeline offline on a folder of DICOM files: ``out/findings.json`` and the
    SEG, SR, GSPS, key images and (``NODULEAI_HEATMAP``) the heatmap
    (``out/<modality>-<SOPInstanceUID>.dcm``)."""
    from dicom_node.errors import EncodingError, StudyRejectedError
    from dicom_node.results import ModelIdentity
    from pipelines.analysis import analyse
    from pipelines.detect import Detector
    from pipelines.outputs import encode_results
    from pipelines.worker import detector_config

    files = [p for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else [path]
    out.mkdir(parents=True, exist_ok=True)
    try:
        analysis = analyse(files, lambda: Detector(detector_config(settings)), settings.min_slices)
        detection = analysis.detection
        model = ModelIdentity(detection.model_name, detection.model_version)
        encoded = encode_results(
            analysis.paths,
            analysis.volume,
            detection.nodules,
            model,
            heatmap=detection.heatmap,
        )
        names = [f"{ds.Modality}-{ds.SOPInstanceUID}.dcm" for ds in encoded.datasets]
        for ds, name in zip(encoded.datasets, names, strict=True):
            ds.save_as(out / name, enforce_file_format=True)
        report: dict[str, object] = {
            "series_instance_uid": detection.series_instance_uid,
            "nodules": [n.to_json() for n in encoded.nodules],
            "not_encoded": encoded.not_encoded,
            "lung_rads": encoded.lung_rads,
            "input_review": list(detection.input_review),
            "candidates": detection.candidates,
            "timings_ms": {k: round(v, 1) for k, v in detection.timings_ms.items()},
            "backend": detection.backend,
            "models": detection.model_versions,
            "objects": names,
        }
        LOGGER.info("%d nodule(s) found", len(encoded.nodules))
    except StudyRejectedError as exc:
        report = {"rejected": {"code": exc.code, "detail": exc.detail}}
        LOGGER.info("rejected: %s", exc.code)
    except EncodingError as exc:
        report = {"failed": {"code": exc.code, "detail": str(exc)}}
        LOGGER.error("failed: %s", exc)
    (out / "findings.json").write_text(json.dumps(report, indent=2) + "\n")
    print(out / "findings.json")
    return 1 if "failed" in report else 0


def _db_upgrade(settings: Settings) -> int:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.database_url)
    upgrade(db)
    db.dispose()
    LOGGER.info("database schema is current")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``noduleai`` console script."""
    parser = argparse.ArgumentParser(prog="noduleai", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run everything in one process: SCP, jobs, workers, HTTP")
    commands.add_parser("node", help="run the DICOM node (SCP, completeness, jobs, HTTP)")
    commands.add_parser("worker", help="run an inference worker on the configured queue")
    detect = commands.add_parser("detect", help="run the pipeline offline on a folder of DICOM")
    detect.add_argument("path", type=Path, help="folder (any nesting) or file; non-DICOM ignored")
    detect.add_argument("--out", type=Path, required=True, help="folder for findings.json")
    from dicom_node import demo

    demo.add_arguments(commands.add_parser("demo", help="send a synthetic CT, compare findings"))
    db = commands.add_parser("db", help="database administration")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="create or migrate the schema to the newest revision")
    args = parser.parse_args(argv)

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"noduleai: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level)
    LOGGER.info("effective configuration: %s", settings.effective())
    try:
        if args.command == "serve":
            return _run_node(settings, workers=settings.workers)
        if args.command == "node":
            return _run_node(settings, workers=0)
        if args.command == "worker":
            return _run_worker(settings)
        if args.command == "detect":
            return _detect(settings, args.path, args.out)
        if args.command == "demo":
            return demo.run(settings, args)
        return _db_upgrade(settings)
    except ConfigError as exc:
        LOGGER.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
