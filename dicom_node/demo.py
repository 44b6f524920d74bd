"""``noduleai demo``: a synthetic chest CT with known nodules, through the running service.

1. Make a phantom (:func:`models.phantom.make_phantom`, fixed seed) and write it as a DICOM CT
   series to a temporary folder.
2. Send it to the service over DICOM: one association, C-STORE per slice (PS3.4 B.2).
3. Poll ``GET /api/studies`` until the study is ``done`` (or ``rejected``/``failed``), showing its
   state: ``receiving → queued → processing → delivering → done``.
4. Read ``GET /api/studies/{uid}/findings`` and compare the nodules with the phantom's truth by
   the LUNA16 hit rule (a finding hits a nodule when its centre lies within the nodule's radius).

Exit status: 0 when the service answered and the study was processed; 1 when the service cannot
be reached or the study did not finish in time; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from dicom_node.config import DicomWebDestination, DimseDestination, Settings

#: Seed of the default phantom: three nodules of 10, 12 and 28 mm (solid, part-solid, ground-glass).
DEFAULT_SEED = 9
DEFAULT_SLICES = 96
DEFAULT_CALLING_AET = "NODULEAI_DEMO"
STATES = ("receiving", "queued", "processing", "delivering", "done")
FINAL_STATES = {"done", "rejected", "failed"}


class DemoError(Exception):
    """The demo cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class Truth:
    """A nodule the phantom holds."""

    centre_mm: tuple[float, float, float]
    diameter_mm: float
    kind: str
    location: str


@dataclass(frozen=True)
class Match:
    """A true nodule and the finding that hit it (None: missed)."""

    truth: Truth
    finding: dict[str, Any] | None
    distance_mm: float | None


# --------------------------------------------------------------------------- arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's options."""
    parser.add_argument("--host", help="the node's DICOM host (default: from settings)")
    parser.add_argument("--port", type=int, help="the node's DICOM port (default: settings)")
    parser.add_argument("--aet", help="the node's AE title (default: NODULEAI_AE_TITLE)")
    parser.add_argument(
        "--calling-aet", default=DEFAULT_CALLING_AET, help="our AE title when sending"
    )
    parser.add_argument("--http-host", help="the node's HTTP host (default: --host)")
    parser.add_argument("--http-port", type=int, help="the node's HTTP port (default: settings)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="phantom seed")
    parser.add_argument(
        "--slices", type=int, default=DEFAULT_SLICES, help="slices of 512 x 512 (default: 96)"
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to wait for the results"
    )
    parser.add_argument("--viewer-url", help="a DICOMweb viewer (OHIF) to name at the end")


@dataclass(frozen=True)
class Target:
    """Where the service listens."""

    host: str
    port: int
    aet: str
    calling_aet: str
    http: str


def resolve_target(settings: Settings, args: argparse.Namespace) -> Target:
    """Flags first, then the settings; a wildcard listen address means this machine."""

    def local(host: str) -> str:
        return "127.0.0.1" if host in {"0.0.0.0", "::", ""} else host

    host = args.host or local(settings.dicom_host)
    http_host = args.http_host or (args.host or local(settings.http_host))
    http_port = args.http_port if args.http_port is not None else settings.http_port
    return Target(
        host=host,
        port=args.port if args.port is not None else settings.dicom_port,
        aet=args.aet or settings.ae_title,
        calling_aet=args.calling_aet,
        http=f"http://{http_host}:{http_port}",
    )


# --------------------------------------------------------------------------- HTTP


def get_json(url: str, timeout: float = 5.0) -> Any:
    """GET ``url`` and decode its JSON body.

    Raises
    ------
    DemoError
        When the service cannot be reached or answers an error.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        raise DemoError(f"{url} answered HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DemoError(f"cannot reach {url}: {reason}") from exc


def check_service(target: Target) -> str:
    """The service's version from ``/healthz``; raises :class:`DemoError` when unreachable."""
    try:
        health = get_json(f"{target.http}/healthz")
    except DemoError as exc:
        raise DemoError(
            f"{exc}\nIs the service running? Start it with `make serve` (or `noduleai serve`), "
            "or point the demo at it with --host/--port/--http-port."
        ) from exc
    if health.get("status") != "ok":
        raise DemoError(f"{target.http}/healthz: {health}")
    return str(health.get("version", "?"))


# --------------------------------------------------------------------------- phantom


def make_study(
    seed: int, slices: int, out: Path, step: Callable[[str], None] = lambda _what: None
) -> tuple[str, list[Path], list[Truth]]:
    """Write the phantom as DICOM; return its study UID, the files and the true nodules.
    ``step`` hears what is being done, before each of the slow parts."""
    from models.phantom import make_phantom, write_dicom_series

    step("drawing the anatomy, vessels and 3 nodules")
    phantom = make_phantom(seed, shape=(slices, 512, 512), n_nodules=3)
    step(f"writing {slices} DICOM slices")
    files = write_dicom_series(
        phantom.volume_hu,
        phantom.spacing_mm,
        out,
        seed,
        origin_mm=phantom.origin_mm,
        patient_id="NODULEAI-DEMO",
        patient_name="Demo^Phantom",
    )
    study_uid = fresh_uids(files)
    truth = [
        Truth(
            (float(n.centre_xyz_mm[0]), float(n.centre_xyz_mm[1]), float(n.centre_xyz_mm[2])),
            float(n.diameter_mm),
            n.kind,
            n.location,
        )
        for n in phantom.nodules
    ]
    return study_uid, files, truth


def fresh_uids(files: Sequence[Path]) -> str:
    """Give the series new study, series, frame-of-reference and instance UIDs; return the study's.

    The phantom's UIDs derive from its seed, so without this a second demo run would resend
    instances the node already holds (stored once, no new job).
    """
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    study, series, frame = generate_uid(None), generate_uid(None), generate_uid(None)
    for path in files:
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = generate_uid(None)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(path, enforce_file_format=True)
    return str(study)


# --------------------------------------------------------------------------- DICOM


def send(
    target: Target,
    files: Sequence[Path],
    progress: Callable[[int, int], None],
    attempts: int = 3,
) -> int:
    """C-STORE every file over one association; return the associations used.

    pynetdicom's requestor can lose a C-STORE response to its own association reactor under load
    ("Received unexpected C-STORE service message", then a DIMSE timeout: pynetdicom issue
    #875). The demo then opens a new association and resends from the instance whose response
    was lost (the node stores an instance sent twice once), at most ``attempts`` associations.

    Raises
    ------
    DemoError
        When the association is refused, an instance is refused, or responses keep getting lost.
    """
    from pydicom import dcmread
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=target.calling_aet)
    ae.dimse_timeout = 10
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    done = 0
    for association in range(1, attempts + 1):
        assoc = ae.associate(target.host, target.port, ae_title=target.aet)
        if not assoc.is_established:
            hint = (
                f"the node refused the association (is {target.calling_aet} allowed by its "
                "ae_policies?)"
                if assoc.is_rejected
                else "no DICOM listener answered"
            )
            raise DemoError(f"DICOM {target.aet}@{target.host}:{target.port}: {hint}")
        try:
            while done < len(files):
                status = assoc.send_c_store(dcmread(files[done]))
                code = getattr(status, "Status", None)
                if code is None:  # no response: lost, or the association went away
                    break
                if code not in (0x0000, 0xB000, 0xB006, 0xB007):
                    raise DemoError(f"C-STORE of {files[done].name} refused: status 0x{code:04X}")
                done += 1
                progress(done, len(files))
        finally:
            if assoc.is_established:
                assoc.release()
        if done == len(files):
            return association
    raise DemoError(
        f"C-STORE of {files[done].name}: no response on {attempts} associations in a row"
    )


# --------------------------------------------------------------------------- waiting


def find_study(target: Target, study_uid: str) -> dict[str, Any] | None:
    """The study's row from ``GET /api/studies`` (None while it is not listed)."""
    rows = get_json(f"{target.http}/api/studies?limit=200")
    return next((r for r in rows if r.get("study_instance_uid") == study_uid), None)


def state_line(state: str, elapsed: float, row: dict[str, Any] | None) -> str:
    """``[■■■□□] processing  12 s`` and the study's instance count."""
    step = STATES.index(state) + 1 if state in STATES else len(STATES)
    bar = "■" * step + "□" * (len(STATES) - step)
    instances = f"{row['instances']} instances" if row else ""
    return f"  [{bar}] {state:<11} {elapsed:5.0f} s  {instances}"


def wait_for_results(target: Target, study_uid: str, timeout: float, out: TextIO) -> dict[str, Any]:
    """Poll until the study reaches a final state; print its state as it changes.

    Raises
    ------
    DemoError
        When the service stops answering or the study is not done within ``timeout``.
    """
    start = time.monotonic()
    tty = out.isatty()
    last = ""
    row: dict[str, Any] | None = None
    while time.monotonic() - start < timeout:
        row = find_study(target, study_uid)
        state = str(row["state"]) if row else "receiving"
        line = state_line(state, time.monotonic() - start, row)
        if tty:
            out.write("\r" + line)
            out.flush()
        elif state != last:
            out.write(line + "\n")
            out.flush()
        last = state
        if row is not None and state in FINAL_STATES:
            if tty:
                out.write("\n")
            return row
        time.sleep(0.5)
    if tty:
        out.write("\n")
    raise DemoError(f"study not finished after {timeout:.0f} s (last state: {last})")


# --------------------------------------------------------------------------- truth


def match(
    truth: Sequence[Truth], findings: Sequence[dict[str, Any]]
) -> tuple[list[Match], list[dict[str, Any]]]:
    """Per true nodule the nearest finding that hits it (LUNA16), and the false positives."""
    used: set[int] = set()
    matches: list[Match] = []
    for nodule in truth:
        best: tuple[float, int] | None = None
        for i, finding in enumerate(findings):
            distance = math.dist(nodule.centre_mm, finding["center_mm"])
            if distance <= nodule.diameter_mm / 2.0 and (best is None or distance < best[0]):
                best = (distance, i)
        if best is None:
            matches.append(Match(nodule, None, None))
        else:
            used.add(best[1])
            matches.append(Match(nodule, findings[best[1]], best[0]))
    hits_any = {
        i
        for i, f in enumerate(findings)
        if any(math.dist(n.centre_mm, f["center_mm"]) <= n.diameter_mm / 2.0 for n in truth)
    }
    false_positives = [f for i, f in enumerate(findings) if i not in used | hits_any]
    return matches, false_positives


def report(matches: Sequence[Match], false_positives: Sequence[dict[str, Any]]) -> list[str]:
    """The comparison as lines of text."""
    lines = ["", "Truth vs findings (hit: centre within the nodule's radius, as LUNA16 counts)"]
    for k, m in enumerate(matches, start=1):
        t = m.truth
        where = ", ".join(f"{v:.0f}" for v in t.centre_mm)
        head = f"  #{k} {t.diameter_mm:5.1f} mm {t.kind:<12} {t.location:<14} at ({where}) mm:"
        if m.finding is None or m.distance_mm is None:
            lines.append(f"{head} MISSED")
            continue
        f = m.finding
        lines.append(
            f"{head} FOUND  {m.distance_mm:4.1f} mm off, long axis {f['long_axis_mm']:.1f} mm "
            f"(true {t.diameter_mm:.1f}), p={f['probability']:.2f}"
            + (f", Lung-RADS {f['lung_rads']}" if f.get("lung_rads") else "")
            + (" (needs review)" if f.get("needs_review") else "")
        )
    found = sum(1 for m in matches if m.finding is not None)
    lines.append(f"  found {found} of {len(matches)}; false positives: {len(false_positives)}")
    for f in false_positives:
        where = ", ".join(f"{v:.0f}" for v in f["center_mm"])
        lines.append(
            f"    FP at ({where}) mm, long axis {f['long_axis_mm']:.1f} mm, "
            f"p={f['probability']:.2f}"
        )
    return lines


def where_to_look(
    settings: Settings, target: Target, study_uid: str, viewer: str | None
) -> list[str]:
    """Dashboard page, the destinations results went to, a viewer if named."""
    lines = ["", "Where to look:", f"  dashboard: {target.http}/dashboard/studies/{study_uid}"]
    lines.append(f"  findings:  {target.http}/api/studies/{study_uid}/findings")
    try:
        destinations = settings.node_config().destinations
    except Exception:  # the local YAML need not be the service's
        destinations = []
    for d in destinations:
        if isinstance(d, DimseDestination):
            lines.append(f"  results (SEG, SR) stored to {d.ae_title}@{d.host}:{d.port} ({d.name})")
        elif isinstance(d, DicomWebDestination):
            lines.append(f"  results (SEG, SR) sent by STOW-RS to {d.url} ({d.name})")
    try:
        detail = get_json(f"{target.http}/api/studies/{study_uid}")
    except DemoError:
        detail = {}
    if not detail.get("deliveries") and detail.get("result_files"):
        lines.append(
            "  results:   sent nowhere, no destination is configured for the demo's AE title "
            "(NODULEAI_CONFIG); the files on the node:"
        )
        lines.extend(f"    {path}" for path in detail["result_files"])
    if viewer:
        lines.append(f"  viewer:    {viewer}")
    lines.append(
        "  Orthanc/OHIF (docker compose): http://127.0.0.1:8042/ui/app/ , a DICOMweb viewer "
        "against http://127.0.0.1:8042/dicom-web/"
    )
    return lines


# --------------------------------------------------------------------------- command


def run(settings: Settings, args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """The ``noduleai demo`` command; returns the exit status."""
    target = resolve_target(settings, args)

    def say(text: str = "") -> None:
        out.write(text + "\n")
        out.flush()

    try:
        version = check_service(target)
        say(f"NoduleAI {version} at {target.http}; DICOM {target.aet}@{target.host}:{target.port}")
        with tempfile.TemporaryDirectory(prefix="noduleai-demo-") as tmp:
            t0 = time.monotonic()
            say(f"Making a synthetic chest CT (seed {args.seed}, {args.slices} x 512 x 512) ...")

            def step(what: str) -> None:
                say(f"  {time.monotonic() - t0:4.1f} s  {what} ...")

            study_uid, files, truth = make_study(args.seed, args.slices, Path(tmp), step)
            sizes = ", ".join(f"{t.diameter_mm:.1f} mm {t.kind}" for t in truth)
            say(f"  {len(files)} slices in {time.monotonic() - t0:.1f} s; nodules: {sizes}")
            say(f"  StudyInstanceUID {study_uid}")
            t0 = time.monotonic()

            def progress(i: int, n: int) -> None:
                if out.isatty() or i == n:
                    out.write(f"\r  sending {i}/{n} as {target.calling_aet}")
                    out.flush()

            say(f"Sending over DICOM (C-STORE, one association) to {target.aet} ...")
            used = send(target, files, progress)
            again = f", {used} associations: a response was lost" if used > 1 else ""
            say(f" ({time.monotonic() - t0:.1f} s{again})")
        say("Waiting for the service (receiving → queued → processing → delivering → done):")
        row = wait_for_results(target, study_uid, args.timeout, out)
        timings = row.get("timings_ms") or {}
        say(
            f"Study {row['state']}"
            + (f": {row['error']}" if row.get("error") else "")
            + (f"; backend {row['backend']}" if row.get("backend") else "")
            + (f"; {', '.join(f'{k} {v:.0f} ms' for k, v in timings.items())}" if timings else "")
        )
        findings = get_json(f"{target.http}/api/studies/{study_uid}/findings")
        matches, false_positives = match(truth, list(findings.get("nodules") or []))
        for line in report(matches, false_positives):
            say(line)
        if findings.get("lung_rads"):
            say(
                f"  study Lung-RADS v2022 category {findings['lung_rads']} (baseline rules; "
                "decision support, not for clinical use)"
            )
        for line in where_to_look(settings, target, study_uid, args.viewer_url):
            say(line)
    except DemoError as exc:
        say()
        print(f"noduleai demo: {exc}", file=sys.stderr)
        return 1
    if row["state"] != "done":
        print(f"noduleai demo: the study ended {row['state']}: {row.get('error')}", file=sys.stderr)
        return 1
    return 0
