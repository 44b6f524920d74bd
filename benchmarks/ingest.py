"""Ingest throughput: our SCP (durable path) against DCMTK's ``storescp``, in the same run.

One synthetic CT series (``--slices`` slices of 512x512 int16, CT Image Storage, explicit VR
little endian) is written to a temporary folder and sent with ``TCP_NODELAY=1 storescu`` over one
association, first to the node (``dicom_node.node.Node`` in this process: SQLite, files fsync'd
and rows committed before each C-STORE success) and then to ``storescp -od TMPDIR`` with the same
maximum PDU size. The time is the wall clock of the ``storescu`` process; every run checks that all
instances arrived. Each side is run ``--runs`` times (alternating) and the median is reported::

    .venv/bin/python benchmarks/ingest.py [--slices 300] [--pdu 65536] [--runs 3] [--profile]
        [--associations 8] [--diagnose]

``--associations N`` (default 8) then sends the same instances over N concurrent associations
(N storescu processes, the series split round robin) to the node and to ``storescp --fork``.

``--profile`` adds one more run against the node with cProfile on the association thread's
C-STORE handler (parse, fsync, commit) and prints where that time goes. ``--diagnose`` adds runs
that separate the disk from the rest: the node with fsync turned off (not durable, for diagnosis
only) with pynetdicom's stock polling reactors and with :mod:`dicom_node.reactor`, the durable
node with the stock reactors, and the protocol floor (the handler checks the header and stores
nothing: what receiving costs before any durability work).

Not a timed test: the numbers depend on the machine (two shared cores here) and its disk.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import event

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dicom_node import reactor  # noqa: E402
from dicom_node.config import load_settings  # noqa: E402
from dicom_node.node import Node  # noqa: E402

NODE_AET = "NODULEAI"
STORESCP_AET = "STORESCP"
CALLING_AET = "BENCH"


def write_series(folder: Path, slices: int, size: int = 512) -> list[Path]:
    """Write a synthetic axial CT series: a water cylinder with air outside, unique UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - size / 2, xx - size / 2)
    base_hu = np.where(radius < size * 0.4, 0, -1000).astype(np.int16)
    rng = np.random.default_rng(7)
    spacing, thickness = 0.7, 1.0
    paths = []
    for index in range(slices):
        hu = base_hu + rng.integers(-20, 20, size=base_hu.shape, dtype=np.int16)
        stored = (hu + 1024).astype(np.int16)  # RescaleIntercept -1024, slope 1

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName = "Bench^Phantom"
        ds.PatientID = "BENCH0001"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.ReferringPhysicianName = ""
        ds.AccessionNumber = ""
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = index + 1
        ds.AcquisitionNumber = 1
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = [-size * spacing / 2, -size * spacing / 2, -index * thickness]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = thickness
        ds.SliceLocation = -index * thickness
        ds.KVP = 120
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.PixelData = stored.tobytes()
        path = folder / f"CT{index + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send(port: int, aec: str, folder: Path, pdu: int, associations: int = 1) -> float:
    """Send ``folder`` with ``TCP_NODELAY=1 storescu``: over one association, or split over
    ``associations`` storescu processes at once (its ``part-<i>`` subfolders); return seconds
    until the last one finished."""
    folders = [folder] if associations == 1 else sorted(folder.glob("part-*"))
    env = {**os.environ, "TCP_NODELAY": "1"}
    start = time.perf_counter()
    running = []
    for part in folders:
        cmd = ["storescu", "-aet", CALLING_AET, "-aec", aec, "-pdu", str(pdu)]
        cmd += ["+sd", "+r", "+sp", "*.dcm", "127.0.0.1", str(port), str(part)]
        running.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
        )
    errors = [
        (proc.wait(timeout=600), proc.stderr.read() if proc.stderr else "") for proc in running
    ]
    elapsed = time.perf_counter() - start
    for code, err in errors:
        if code != 0:
            raise RuntimeError(f"storescu to {aec} failed ({code}): {err[-2000:]}")
    return elapsed


def split_series(paths: list[Path], folder: Path, parts: int) -> None:
    """Hard-link ``paths`` into ``folder/part-<i>`` round robin (one per association)."""
    for i, path in enumerate(paths):
        part = folder / f"part-{i % parts}"
        part.mkdir(parents=True, exist_ok=True)
        os.link(path, part / path.name)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not within {timeout} s")
        time.sleep(0.05)


def free_port() -> int:
    """A TCP port free right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def node(work: Path, pdu: int, durable: bool = True, stock: bool = False) -> Iterator[Node]:
    """Our node on loopback with a fresh data dir, SQLite, and no free-space floor.

    ``durable=False`` (diagnosis only) turns off the spool's fsyncs and SQLite's; ``stock=True``
    leaves pynetdicom's polling reactors in place (:mod:`dicom_node.reactor` not installed).
    """
    settings = load_settings(
        data_dir=work / "node",
        ae_title=NODE_AET,
        dicom_host="127.0.0.1",
        dicom_port=0,
        http_port=0,
        min_free_bytes=0,
        max_pdu_size=pdu,
        quiet_seconds=3600.0,  # no completeness job competing for the CPU during the run
    )
    with ExitStack() as stack:
        if stock:
            stack.enter_context(mock.patch.object(reactor, "install", lambda assoc, *_: assoc))
        instance = Node(settings)
        if not durable:
            stack.enter_context(mock.patch.object(os, "fsync", lambda fd: None))
            event.listen(instance.db.engine, "connect", _sqlite_unsynchronised)
            instance.db.engine.dispose()
        instance.start()
        try:
            yield instance
        finally:
            instance.stop()


def _sqlite_unsynchronised(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA synchronous=OFF")


@contextmanager
def storescp(work: Path, pdu: int, fork: bool = False) -> Iterator[tuple[int, Path]]:
    """DCMTK's storescp writing to a fresh folder (``--fork``: a process per association);
    stopped by its pid."""
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    cmd = ["storescp", "-aet", STORESCP_AET, "-pdu", str(pdu), "-od", str(out)]
    cmd += [*(["--fork"] if fork else []), str(port)]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def answers() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"storescp exited with {proc.returncode}")
            echo = ["echoscu", "-aet", CALLING_AET, "-aec", STORESCP_AET, "127.0.0.1", str(port)]
            return subprocess.run(echo, capture_output=True, check=False).returncode == 0

        wait_until(answers, 10, "storescp answering C-ECHO")
        yield port, out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def count_rows(instance: Node) -> int:
    """Instances committed by the node."""
    from sqlalchemy import func, select

    from dicom_node.db import Instance

    with instance.db.session() as session:
        return int(session.scalar(select(func.count(Instance.id))) or 0)


def run_node(
    series: Path,
    slices: int,
    pdu: int,
    profiler: cProfile.Profile | None = None,
    durable: bool = True,
    stock: bool = False,
    associations: int = 1,
) -> float:
    """One timed send to the node; checks rows and spool files."""
    with tempfile.TemporaryDirectory(prefix="bench-node-", dir=series.parent) as tmp:
        work = Path(tmp)
        with node(work, pdu, durable, stock) as instance:
            restore = _profile_store(instance, profiler) if profiler else None
            try:
                elapsed = send(instance.scp.port, NODE_AET, series, pdu, associations)
            finally:
                if restore:
                    restore()
            rows = count_rows(instance)
            files = sum(1 for _ in instance.settings.spool_dir.rglob("*.dcm"))
        if rows != slices or files != slices:
            raise RuntimeError(f"node stored {rows} rows and {files} files of {slices}")
    return elapsed


def protocol_floor(series: Path, pdu: int) -> float:
    """One timed send to the node whose ``Ingest.store`` only checks the header (no file, no row):
    what the DICOM receive path costs before anything is made durable (diagnosis only)."""
    from dicom_node.ingest import Ingest, Stored, read_header

    def header_only(_self: Ingest, data: bytes, _calling_ae: str) -> Stored:
        return Stored(read_header(data), duplicate=False, reopened=False)

    with (
        tempfile.TemporaryDirectory(prefix="bench-node-", dir=series.parent) as tmp,
        mock.patch.object(Ingest, "store", header_only),
        node(Path(tmp), pdu) as instance,
    ):
        return send(instance.scp.port, NODE_AET, series, pdu)


def run_storescp(series: Path, slices: int, pdu: int, associations: int = 1) -> float:
    """One timed send to storescp (``--fork`` for several associations); checks its files."""
    with tempfile.TemporaryDirectory(prefix="bench-storescp-", dir=series.parent) as tmp:
        with storescp(Path(tmp), pdu, fork=associations > 1) as (port, out):
            elapsed = send(port, STORESCP_AET, series, pdu, associations)
            files = sum(1 for p in out.iterdir() if p.is_file())
        if files != slices:
            raise RuntimeError(f"storescp wrote {files} files of {slices}")
    return elapsed


def _profile_store(instance: Node, profiler: cProfile.Profile) -> Callable[[], None]:
    """Profile every ``Ingest.store`` call (it runs on the association thread)."""
    ingest = instance.scp.ingest
    original = ingest.store

    def store(data: bytes, calling_ae: str) -> Any:
        profiler.enable()
        try:
            return original(data, calling_ae)
        finally:
            profiler.disable()

    ingest.store = store  # type: ignore[method-assign]

    def restore() -> None:
        ingest.store = original  # type: ignore[method-assign]

    return restore


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--pdu", type=int, default=65536, help="maximum PDU size on both SCPs")
    parser.add_argument("--runs", type=int, default=3, help="runs per SCP; the median counts")
    parser.add_argument("--profile", action="store_true", help="profile the C-STORE handler")
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="also time the node without fsync (NOT durable), with stock and event-driven reactors",
    )
    parser.add_argument("--tmp", type=Path, default=None, help="where the temp folders go")
    parser.add_argument(
        "--associations",
        type=int,
        default=8,
        help="also send over this many concurrent associations (against storescp --fork); 1: not",
    )
    args = parser.parse_args(argv)
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} (DCMTK) is not installed")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory(prefix="bench-ingest-", dir=args.tmp) as tmp:
        series = Path(tmp) / "series"
        paths = write_series(series, args.slices)
        size = sum(p.stat().st_size for p in paths)
        print(
            f"series: {args.slices} slices, 512x512 int16, {size / 1e6:.1f} MB; "
            f"max PDU {args.pdu}; {args.runs} runs each; {os.cpu_count()} CPUs"
        )
        ours: list[float] = []
        theirs: list[float] = []
        for run in range(1, args.runs + 1):
            ours.append(run_node(series, args.slices, args.pdu, None))
            theirs.append(run_storescp(series, args.slices, args.pdu))
            print(
                f"run {run}: node {args.slices / ours[-1]:7.0f} inst/s ({ours[-1]:.2f} s)   "
                f"storescp {args.slices / theirs[-1]:7.0f} inst/s ({theirs[-1]:.2f} s)"
            )
        node_rate = args.slices / statistics.median(ours)
        scp_rate = args.slices / statistics.median(theirs)
        print(f"median node (durable): {node_rate:7.0f} instances/s")
        print(f"median storescp:       {scp_rate:7.0f} instances/s")
        print(f"ratio node/storescp:   {node_rate / scp_rate:.2f}x (target >= 0.5x)")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS of this process (node + series generation): {rss:.0f} MiB")

        if args.associations > 1:
            n = args.associations
            split = Path(tmp) / "split"
            split_series(paths, split, n)
            ours, theirs = [], []
            for _ in range(args.runs):
                ours.append(run_node(split, args.slices, args.pdu, associations=n))
                theirs.append(run_storescp(split, args.slices, args.pdu, associations=n))
            node_rate = args.slices / statistics.median(ours)
            fork_rate = args.slices / statistics.median(theirs)
            print(f"\n{n} concurrent associations, median of {args.runs} runs, aggregate:")
            print(f"  node (durable):   {node_rate:7.0f} instances/s")
            print(f"  storescp --fork:  {fork_rate:7.0f} instances/s")
            print(f"  ratio:            {node_rate / fork_rate:.2f}x (target >= 0.5x)")

        if args.diagnose:
            print("\ndiagnosis, NOT durable (fsync off in the spool and SQLite), median of runs:")
            for label, stock in (
                ("stock pynetdicom reactors", True),
                ("dicom_node.reactor", False),
            ):
                times = [
                    run_node(series, args.slices, args.pdu, durable=False, stock=stock)
                    for _ in range(args.runs)
                ]
                print(f"  {label:26s} {args.slices / statistics.median(times):7.0f} instances/s")
            times = [run_node(series, args.slices, args.pdu, stock=True) for _ in range(args.runs)]
            rate = args.slices / statistics.median(times)
            print(f"  durable, stock reactors    {rate:7.0f} instances/s")
            times = [protocol_floor(series, args.pdu) for _ in range(args.runs)]
            rate = args.slices / statistics.median(times)
            print(
                f"  protocol floor (nothing stored: pynetdicom, our SCP, the header check) "
                f"{rate:7.0f} instances/s = {rate / scp_rate:.2f}x storescp"
            )

        if args.profile:
            profiler = cProfile.Profile()
            elapsed = run_node(series, args.slices, args.pdu, profiler)
            stream = io.StringIO()
            stats = pstats.Stats(profiler, stream=stream)
            total = stats.total_tt  # type: ignore[attr-defined]
            print(
                f"\nprofiled run: {args.slices / elapsed:.0f} inst/s; Ingest.store "
                f"{total / args.slices * 1e3:.2f} ms per instance (profiler on)"
            )
            stats.sort_stats("cumulative").print_stats(25)
            print(stream.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
