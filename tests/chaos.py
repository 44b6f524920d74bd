"""Fuzzing the DICOM port: malformed PDUs and mutated datasets against a node of its own.

Two bounded loops on loopback against an in-process :class:`dicom_node.node.Node` (its own spool
and SQLite database):

* **PDUs**: each case on a new TCP connection: random bytes, unknown PDU types, a P-DATA-TF
  before any association, and a valid A-ASSOCIATE-RQ truncated, with bits flipped, with its
  lengths corrupted, with an even presentation-context ID, a presentation context without an
  abstract syntax, or with unknown items. The answer is
  classified: A-ASSOCIATE-AC (then aborted by us), A-ASSOCIATE-RJ, A-ABORT, closed without a
  PDU, or none within the node's request timeout plus a margin (a failure).
* **Datasets**: a small valid CT slice whose encoded dataset (the file meta kept) is mutated:
  bytes flipped, truncated, a VR replaced, a length corrupted, UIDs emptied or filled with
  non-UID characters; sent as is by C-STORE over a few associations. Every request must get a
  status (counted by kind) or an A-ABORT within the DIMSE timeout.

Checked: no uncaught exception in any thread (``threading.excepthook``), the node still answers
a C-ECHO within 5 s, spool files equal database rows, and the process's RSS after the run within
20 MB of before (measured after a warm-up).

``make chaos`` runs 10,000 of each (``python -m tests.chaos``); the normal suite runs a short
version (``tests/integration/test_chaos.py``).
"""

from __future__ import annotations

import argparse
import gc
import random
import socket
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from dicom_node.config import load_settings
from dicom_node.db import Instance, ReturnedResult
from dicom_node.node import Node
from tests.helpers import free_port

CT = "1.2.840.10008.5.1.4.1.1.2"
CALLING = b"FUZZER".ljust(16)
CALLED = b"NODULEAI".ljust(16)
#: How long past the node's request timeout a connection may go unanswered.
MARGIN_S = 3.0
#: RSS growth allowed over the run (bytes).
RSS_LIMIT = 20 << 20


# ---------------------------------------------------------------------------------- PDUs


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def associate_rq(
    context_id: int = 1,
    max_length: int = 16384,
    abstract_syntax: bytes | None = b"1.2.840.10008.1.1",
) -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) proposing Verification, valid with the defaults; a
    presentation context without an abstract syntax item for ``abstract_syntax=None``."""
    application = _item(0x10, b"1.2.840.10008.3.1.1.1")
    abstract = b"" if abstract_syntax is None else _item(0x30, abstract_syntax)
    context = _item(
        0x20,
        bytes([context_id, 0, 0, 0]) + abstract + _item(0x40, ExplicitVRLittleEndian.encode()),
    )
    user = _item(0x50, _item(0x51, struct.pack(">I", max_length)))
    body = struct.pack(">HH", 1, 0) + CALLED + CALLING + bytes(32) + application + context + user
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _flip(data: bytes, rng: random.Random, bits: int) -> bytes:
    out = bytearray(data)
    for _ in range(bits):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def malformed_pdu(rng: random.Random) -> tuple[str, bytes]:
    """One malformed PDU and the name of its kind."""
    valid = associate_rq()
    kind = rng.choice(
        [
            "random",
            "unknown_type",
            "p_data_first",
            "truncated_rq",
            "bit_flipped_rq",
            "bad_length_rq",
            "even_context_id",
            "unknown_item",
            "zero_max_length",
            "no_abstract_syntax",
        ]
    )
    if kind == "random":
        return kind, rng.randbytes(rng.randint(1, 2048))
    if kind == "unknown_type":
        payload = rng.randbytes(rng.randint(0, 64))
        return kind, struct.pack(">BBI", rng.randint(8, 255), 0, len(payload)) + payload
    if kind == "p_data_first":
        pdv = struct.pack(">IBB", 6, 1, 0x03) + b"\0\0\0\0"
        return kind, struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv
    if kind == "truncated_rq":
        return kind, valid[: rng.randint(1, len(valid) - 1)]
    if kind == "bit_flipped_rq":
        return kind, _flip(valid, rng, rng.randint(1, 8))
    if kind == "bad_length_rq":
        length = rng.choice([0, 1, 7, len(valid) + 1000, 0xFFFFFFFF, rng.randrange(1 << 32)])
        return kind, valid[:2] + struct.pack(">I", length) + valid[6:]
    if kind == "even_context_id":
        return kind, associate_rq(context_id=rng.choice([0, 2, 4, 254]))
    if kind == "no_abstract_syntax":
        return kind, associate_rq(abstract_syntax=None)
    if kind == "unknown_item":
        extra = _item(rng.choice([0x11, 0x22, 0x60, 0xFF]), rng.randbytes(rng.randint(0, 32)))
        body = valid[6:] + extra
        return kind, struct.pack(">BBI", 0x01, 0, len(body)) + body
    return kind, associate_rq(max_length=0)


def answer_of(port: int, data: bytes, wait_s: float) -> str:
    """Send ``data`` on a new connection; classify what comes back within ``wait_s``."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as conn:
        try:
            conn.sendall(data)
        except OSError:
            return "closed"
        conn.settimeout(wait_s)
        try:
            first = conn.recv(1)
        except TimeoutError:
            return "no_answer"
        except OSError:
            return "closed"
        if not first:
            return "closed"
        answer = {0x02: "associate_ac", 0x03: "associate_rj", 0x07: "abort"}.get(
            first[0], f"pdu_{first[0]:02x}"
        )
        if first[0] == 0x02:  # accepted: abort it ourselves
            abort = struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 0, 0)
            with suppress(OSError):
                conn.sendall(abort)
        return answer


# ---------------------------------------------------------------------------------- datasets


def base_slice() -> Dataset:
    """A small valid CT slice (64 x 64) with fresh UIDs."""
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1.1.1"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.10.1.1.2"
    ds.Modality = "CT"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "FUZZ^ME", "FZ1", "", ""
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1, 1]
    ds.SliceThickness = 1
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = np.zeros((64, 64), np.int16).tobytes()
    return ds


def _encoded(ds: Dataset) -> tuple[bytes, bytes]:
    """(file meta + preamble, dataset) bytes of ``ds`` as Explicit VR Little Endian; the file
    meta names a CT instance whatever the dataset says."""
    ds.file_meta = Dataset()  # type: ignore[assignment]
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    whole = BytesIO()
    ds.save_as(whole, enforce_file_format=True)
    head = BytesIO()
    empty = Dataset()
    empty.file_meta = ds.file_meta
    empty.save_as(head, enforce_file_format=True)
    size = len(head.getvalue())
    return whole.getvalue()[:size], whole.getvalue()[size:]


def mutated_dataset(rng: random.Random) -> tuple[str, bytes]:
    """One mutated dataset as a Part 10 file (its file meta intact) and the mutation's name."""
    ds = base_slice()
    kind = rng.choice(
        [
            "bytes_flipped",
            "truncated",
            "vr_replaced",
            "length_corrupted",
            "uid_emptied",
            "uid_not_a_uid",
            "element_removed",
        ]
    )
    if kind == "uid_emptied":  # the file meta keeps naming the instance
        setattr(ds, rng.choice(["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]), "")
    elif kind == "uid_not_a_uid":
        setattr(ds, rng.choice(["StudyInstanceUID", "SeriesInstanceUID"]), "../é/" + "9" * 70)
    elif kind == "element_removed":
        delattr(ds, rng.choice(["Rows", "PixelData", "Modality", "SOPClassUID", "PatientID"]))
    head, body = _encoded(ds)
    if kind == "bytes_flipped":
        body = _flip(body[:600], rng, rng.randint(1, 16)) + body[600:]
    elif kind == "truncated":
        body = body[: rng.randint(0, len(body) - 1)]
    elif kind == "vr_replaced":
        spots = [i for i in range(8, min(len(body), 800)) if body[i : i + 2].isalpha()]
        if spots:
            i = rng.choice(spots)
            body = (
                body[:i]
                + bytes(rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in "xx")
                + body[i + 2 :]
            )
    elif kind == "length_corrupted":
        i = rng.randrange(0, min(len(body), 600) - 4)
        body = (
            body[:i] + struct.pack("<I", rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 3, 0])) + body[i + 4 :]
        )
    return kind, head + body


# ---------------------------------------------------------------------------------- the run


@dataclass
class Report:
    """What a run saw."""

    pdus: Counter[str] = field(default_factory=Counter)
    pdu_answers: Counter[str] = field(default_factory=Counter)
    unanswered: Counter[str] = field(default_factory=Counter)
    datasets: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    thread_crashes: list[str] = field(default_factory=list)
    echo_seconds: float = 0.0
    files: int = 0
    rows: int = 0
    rss_before: int = 0
    rss_after: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        """The figures, one per line (README's Reliability table is made from these)."""
        return [
            f"malformed PDUs: {sum(self.pdus.values())} ({dict(self.pdus)})",
            f"  answers: {dict(self.pdu_answers)}; unanswered by kind {dict(self.unanswered)}",
            f"mutated datasets: {sum(self.datasets.values())} ({dict(self.datasets)})",
            f"  statuses: {dict(self.statuses)}",
            f"thread crashes: {len(self.thread_crashes)}",
            f"C-ECHO after the run: {self.echo_seconds:.2f} s",
            f"spool files {self.files}, database rows {self.rows}",
            f"RSS before {self.rss_before / 2**20:.1f} MiB, after {self.rss_after / 2**20:.1f} MiB"
            f" (growth {(self.rss_after - self.rss_before) / 2**20:+.1f} MiB)",
            f"run time {self.seconds:.0f} s",
        ]


def rss_bytes() -> int:
    """This process's resident set size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@contextmanager
def crash_watch(report: Report) -> Iterator[None]:
    """Record every exception that ends a thread."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        report.thread_crashes.append(
            f"{args.thread.name if args.thread else '?'}: {args.exc_value!r}"
        )

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def start_node(data_dir: Path, **overrides: Any) -> Node:
    """A node with no workers, on loopback, with short request timeouts."""
    settings = load_settings(
        data_dir=data_dir,
        dicom_host="127.0.0.1",
        dicom_port=free_port(),
        http_port=free_port(),
        min_free_bytes=0,
        workers=0,
        association_request_timeout=1.0,
        max_pending_per_peer=64,
        max_associations=64,
        dimse_timeout=10.0,
        network_timeout=10.0,
        quiet_seconds=3600.0,
        **overrides,
    )
    node = Node(settings)
    node.start()
    return node


#: Cases made and sent at a time: the fuzzer's own memory stays small, so that the process's RSS
#: growth is the node's (it runs in this process).
BATCH = 256


def fuzz_pdus(port: int, count: int, rng: random.Random, report: Report, workers: int = 16) -> None:
    """``count`` malformed PDUs, ``workers`` connections at a time."""
    wait = 1.0 + MARGIN_S

    def one(case: tuple[str, bytes]) -> str:
        try:
            return answer_of(port, case[1], wait)
        except OSError:
            return "refused_connection"

    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, count, BATCH):
            n = min(BATCH, count - start)
            cases = [malformed_pdu(random.Random(rng.random())) for _ in range(n)]
            for (kind, _), answer in zip(cases, pool.map(one, cases), strict=True):
                report.pdus[kind] += 1
                report.pdu_answers[answer] += 1
                if answer == "no_answer":
                    report.unanswered[kind] += 1


def fuzz_datasets(
    port: int, count: int, rng: random.Random, report: Report, folder: Path, workers: int = 4
) -> None:
    """``count`` mutated datasets by C-STORE over ``workers`` parallel associations."""
    folder.mkdir(parents=True, exist_ok=True)
    per_worker = [count // workers + (i < count % workers) for i in range(workers)]
    lock = threading.Lock()

    def run(index: int, n: int) -> None:
        local = random.Random(rng.random() + index)
        ae = AE(ae_title="FUZZER")
        ae.add_requested_context(CT, [ExplicitVRLittleEndian])
        ae.add_requested_context(Verification)
        ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 15
        assoc = None
        path = folder / f"case-{index}.dcm"
        for _ in range(n):
            try:
                kind, data = mutated_dataset(local)
            except (AttributeError, ValueError, TypeError) as exc:  # pydicom cannot write it
                kind, data = f"unwritable:{type(exc).__name__}", b""
            if not data:
                with lock:
                    report.datasets[kind] += 1
                continue
            path.write_bytes(data)
            if assoc is None or not assoc.is_established:
                assoc = ae.associate("127.0.0.1", port, ae_title="NODULEAI")
            if not assoc.is_established:
                answer = "association_refused"
            else:
                try:
                    status = assoc.send_c_store(path)
                    answer = f"0x{int(status.Status):04X}" if "Status" in status else "aborted"
                except (ValueError, AttributeError, OSError, RuntimeError) as exc:
                    answer = f"not_sent:{type(exc).__name__}"
            with lock:
                report.datasets[kind] += 1
                report.statuses[answer] += 1
        if assoc is not None and assoc.is_established:
            assoc.release()

    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes as they are
    try:
        threads = [threading.Thread(target=run, args=(i, n)) for i, n in enumerate(per_worker)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def echo_seconds(port: int) -> float:
    """Seconds a C-ECHO from an allowed AE takes (inf when it fails)."""
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    start = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title="NODULEAI")
    if not assoc.is_established:
        return float("inf")
    status = assoc.send_c_echo()
    assoc.release()
    return time.monotonic() - start if int(status.get("Status", -1)) == 0 else float("inf")


def _progress(message: str) -> None:
    print(message, file=sys.stderr)


def run(pdus: int, datasets: int, seed: int = 0, log: Callable[[str], None] = _progress) -> Report:
    """Both loops against a fresh node; return the figures."""
    rng = random.Random(seed)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp, crash_watch(report):
        node = start_node(Path(tmp) / "var")
        try:
            port = node.scp.port
            warm = Report()  # the first cases load code and caches: not counted as growth
            fuzz_pdus(port, min(200, pdus), rng, warm)
            fuzz_datasets(port, min(200, datasets), rng, warm, Path(tmp) / "warm")
            gc.collect()
            report.rss_before = rss_bytes()
            start = time.monotonic()
            fuzz_pdus(port, pdus, rng, report)
            log(f"{pdus} PDUs done in {time.monotonic() - start:.0f} s")
            fuzz_datasets(port, datasets, rng, report, Path(tmp) / "cases")
            report.seconds = time.monotonic() - start
            report.echo_seconds = echo_seconds(port)
            time.sleep(1.5)  # the node's own timeouts let go of what the cases left
            gc.collect()
            report.rss_after = rss_bytes()
            report.files = sum(1 for p in node.spool.root.rglob("*") if p.is_file())
            with node.db.session() as session:
                report.rows = int(session.scalar(select(func.count(Instance.id))) or 0) + int(
                    session.scalar(select(func.count(ReturnedResult.id))) or 0
                )
        finally:
            node.stop()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pdus", type=int, default=10_000)
    parser.add_argument("--datasets", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = run(args.pdus, args.datasets, args.seed)
    for line in report.lines():
        print(line)
    failures = failed(report)
    for line in failures:
        print("FAIL:", line)
    return 1 if failures else 0


def failed(report: Report) -> list[str]:
    """What the run must not show (empty: passed)."""
    problems = []
    if report.thread_crashes:
        problems.append(f"threads crashed: {report.thread_crashes[:5]}")
    if report.pdu_answers.get("no_answer"):
        problems.append(f"{report.pdu_answers['no_answer']} PDUs unanswered past the timeout")
    unanswered = {k: v for k, v in report.statuses.items() if k.startswith("not_sent")}
    if report.statuses.get("association_refused"):
        unanswered["association_refused"] = report.statuses["association_refused"]
    if unanswered:
        problems.append(f"datasets without an answer: {unanswered}")
    if report.statuses.get("0x0110"):
        # the node and its database are healthy here: a malformed dataset is the sender's
        # fault (0xA900 or 0xC210), not a processing failure
        problems.append(f"{report.statuses['0x0110']} datasets answered 0x0110 (processing fault)")
    if not report.echo_seconds < 5.0:
        problems.append(f"C-ECHO after the run took {report.echo_seconds:.1f} s")
    if report.files != report.rows:
        problems.append(f"{report.files} spool files for {report.rows} rows")
    if report.rss_after - report.rss_before > RSS_LIMIT:
        problems.append("RSS grew by more than 20 MiB")
    return problems


if __name__ == "__main__":
    sys.exit(main())
