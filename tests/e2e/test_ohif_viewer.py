"""OHIF 3 draws our SEG overlay, our SR outline with its diameter and our screening heatmap
(Parametric Map) on the LIDC-IDRI-0001 nodule.

Issue 5, must-show 5. The real viewer (npm ``@ohif/app``, its prebuilt static site fetched by
``tests/e2e/ohif/fetch-ohif.sh``) is served on loopback by ``tests/e2e/ohif/ohif_server.py``,
whose ``/dicom-web/`` proxies to a real Orthanc (DICOMweb plugin) adding its basic-auth header.
Orthanc holds the 133 LIDC-IDRI-0001 slices and the SEG, SR and GSPS that
:func:`pipelines.outputs.encode_results` writes for the readers' nodule (``069.xml``, as the issue
allows until the detector's weights exist), and the Parametric Map of a heatmap peaking at the
nodule's centre (issue 18: OHIF fuses it over the CT in a volume viewport).
``ohif_viewer.mjs`` drives Debian's chromium with
``playwright-core``; this test checks the screenshots' pixels where OHIF's own viewport projects
the nodule's centre. Screenshots, the browser console and the driver's report land in
``test-artifacts/ohif/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from pydicom import Dataset, dcmread

from dicom_node.results import ModelIdentity
from pipelines.findings import Nodule
from pipelines.outputs import encode_results
from pipelines.screen import Heatmap
from pipelines.volume import build_volume
from tests.conftest import REPO
from tests.helpers import free_port, wait_for
from tests.nodule_fixtures import lidc_nodules
from tests.peers import Orthanc, OrthancError

E2E = Path(__file__).parent
FETCH = E2E / "ohif" / "fetch-ohif.sh"
SERVER = E2E / "ohif" / "ohif_server.py"
ARTIFACTS = REPO / "test-artifacts" / "ohif"
MODEL = ModelIdentity("NoduleAI-e2e", "0.0.0-readers")
pytestmark = [pytest.mark.integration, pytest.mark.slow]
#: A pixel "changed" between two screenshots when its RGB channels differ by more than this in sum.
CHANGED = 30


def _unavailable(reason: str) -> None:
    """Fail in CI (the viewer test must run there), skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def ohif_dist() -> Path:
    """OHIF's static site (pinned, fetched once into a cache) and the browser driver's packages."""
    missing = [
        tool for tool in ("chromium", "node", "npm", "openssl") if shutil.which(tool) is None
    ]
    if missing:
        _unavailable(f"{', '.join(missing)} not installed; scripts/system-deps.sh installs them")
    if not (E2E / "node_modules" / "playwright-core").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=E2E, check=True, timeout=300)
    fetched = subprocess.run([str(FETCH)], capture_output=True, text=True, timeout=600, check=False)
    if fetched.returncode != 0:
        _unavailable(f"could not fetch @ohif/app (make ohif-deps): {fetched.stderr[-2000:]}")
    dist = Path(fetched.stdout.strip().splitlines()[-1])
    assert (dist / "index.html").is_file(), dist
    return dist


@dataclass
class Results:
    """The LIDC-IDRI-0001 slices and what we encoded for the readers' nodule (and a decoy copy
    of it elsewhere, segment 2)."""

    slices: list[Path]
    files: dict[str, Path]
    study_uid: str
    center_mm: tuple[float, float, float]
    outline_centre_mm: tuple[float, float, float]
    outline_extent_mm: float
    outline_image_uid: str
    long_axis_mm: float
    segment_rgb: tuple[int, int, int]
    decoy_center_mm: tuple[float, float, float]
    decoy_rgb: tuple[int, int, int]


def _sr_planar_group(sr: Dataset) -> tuple[Dataset, float]:
    """The first POLYLINE SCOORD of the SR and the Long axis NUM of its measurement group."""
    for group in sr.ContentSequence:
        for item in getattr(group, "ContentSequence", []):
            if item.ValueType != "CONTAINER":
                continue
            polylines = [c for c in item.ContentSequence if c.get("GraphicType") == "POLYLINE"]
            long_axes = [
                float(c.MeasuredValueSequence[0].NumericValue)
                for c in item.ContentSequence
                if c.ValueType == "NUM"
                and c.ConceptNameCodeSequence[0].CodeMeaning.lower() == "long axis"
            ]
            if polylines and long_axes:
                return polylines[0], long_axes[0]
    raise AssertionError("the SR has no measurement group with a POLYLINE and a long axis")


@pytest.fixture(scope="module")
def results(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Results:
    xml = next((shared_data / "lidc-idri-0001").rglob("069.xml"))
    slices = sorted(xml.parent.glob("*.dcm"))
    volume = build_volume(slices)
    nodules = lidc_nodules(xml, volume)
    assert len(nodules) == 1
    # A second segment 80 mm below, in the other lung: the SEG omits the empty slices between
    # the two, and OHIF must still draw each segment on its own slices (no shift).
    decoy = _moved(nodules[0], (-110.0, 0.0, -80.0))
    seg, sr, gsps, *_key_images, pmap = encode_results(
        slices, volume, [nodules[0], decoy], MODEL, heatmap=_peak(nodules[0].center_mm)
    ).datasets
    out = tmp_path_factory.mktemp("results")
    files = {}
    for name, ds in (("SEG", seg), ("SR", sr), ("GSPS", gsps), ("PMAP", pmap)):
        files[name] = out / f"{name}.dcm"
        ds.save_as(files[name])
    polyline, long_axis = _sr_planar_group(sr)
    image = polyline.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    source = {str(ds.SOPInstanceUID): ds for ds in map(_header, slices)}[image]
    columns_rows = np.asarray(polyline.GraphicData, dtype=float).reshape(-1, 2)
    spacing = np.asarray(source.PixelSpacing, dtype=float)  # row spacing (y), column spacing (x)
    origin = np.asarray(source.ImagePositionPatient, dtype=float)
    # Axial, identity orientation (as LIDC-IDRI-0001): x follows columns, y follows rows.
    world = np.column_stack(
        [
            origin[0] + columns_rows[:, 0] * spacing[1],
            origin[1] + columns_rows[:, 1] * spacing[0],
            np.full(len(columns_rows), origin[2]),
        ]
    )
    span = world[:, None, :2] - world[None, :, :2]
    segment_rgb, decoy_rgb = (
        hd.color.CIELabColor.from_dicom_value(tuple(item.RecommendedDisplayCIELabValue)).to_rgb()
        for item in seg.SegmentSequence
    )
    return Results(
        slices=slices,
        files=files,
        study_uid=str(seg.StudyInstanceUID),
        center_mm=tuple(float(v) for v in nodules[0].center_mm),  # type: ignore[arg-type]
        outline_centre_mm=tuple(float(v) for v in world.mean(axis=0)),  # type: ignore[arg-type]
        outline_extent_mm=float(np.sqrt((span**2).sum(-1)).max()),
        outline_image_uid=str(image),
        long_axis_mm=long_axis,
        segment_rgb=tuple(int(v) for v in segment_rgb),  # type: ignore[arg-type]
        decoy_center_mm=tuple(float(v) for v in decoy.center_mm),  # type: ignore[arg-type]
        decoy_rgb=tuple(int(v) for v in decoy_rgb),  # type: ignore[arg-type]
    )


def _peak(center_mm: tuple[float, ...], sigma_mm: float = 5.0) -> Heatmap:
    """A stage-1-like heatmap: a Gaussian peak of 0.9 at ``center_mm``, 0 beyond 4 sigma."""
    spacing = 1.25
    n = int(np.ceil(4 * sigma_mm / spacing))
    axis = np.arange(-n, n + 1) * spacing
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    values = 0.9 * np.exp(-(x**2 + y**2 + z**2) / (2 * sigma_mm**2))
    values[np.sqrt(x**2 + y**2 + z**2) > 4 * sigma_mm] = 0.0
    origin = tuple(float(c) - n * spacing for c in center_mm)
    return Heatmap(values.astype(np.float32), origin, spacing)  # type: ignore[arg-type]


def _moved(nodule: Nodule, shift_mm: tuple[float, float, float]) -> Nodule:
    """The same nodule (mask and all) moved by ``shift_mm`` (patient LPS)."""
    return dataclasses.replace(
        nodule,
        mask_origin_mm=tuple(o + d for o, d in zip(nodule.mask_origin_mm, shift_mm, strict=True)),
        center_mm=tuple(c + d for c, d in zip(nodule.center_mm, shift_mm, strict=True)),
    )


def _header(path: Path) -> Dataset:
    return dcmread(path, stop_before_pixels=True)


@pytest.fixture
def pacs(tmp_path_factory: pytest.TempPathFactory, results: Results) -> Iterator[Orthanc]:
    """Orthanc holding the CT series and our SEG, SR, GSPS and heatmap."""
    if shutil.which("Orthanc") is None:
        _unavailable("Orthanc not installed; scripts/system-deps.sh installs it")
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    server.start()
    try:
        for path in [*results.slices, *results.files.values()]:
            server.upload(path)
        yield server
    except OrthancError:
        print(server.log(), file=sys.stderr)
        raise
    finally:
        server.stop()


def app_config(dicomweb_root: str) -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source (our proxy), no tour or dialogs."""
    source = {
        "friendlyName": "Orthanc (test PACS)",
        "name": "orthanc",
        "qidoRoot": dicomweb_root,
        "wadoRoot": dicomweb_root,
        "wadoUriRoot": dicomweb_root,
        "qidoSupportsIncludeField": False,
        "supportsReject": False,
        "imageRendering": "wadors",
        "thumbnailRendering": "wadors",
        "enableStudyLazyLoad": True,
        "supportsFuzzyMatching": False,
        "supportsWildcard": True,
        "omitQuotationForMultipartRequest": True,
        "bulkDataURI": {"enabled": True},
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "investigationalUseDialog": {"option": "never"},
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": False,
        "maxNumberOfWebWorkers": 2,
        "defaultDataSourceName": "orthanc",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "orthanc",
                "configuration": source,
            }
        ],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


@pytest.fixture
def ohif(ohif_dist: Path, pacs: Orthanc, tmp_path: Path) -> Iterator[str]:
    """OHIF served on a free loopback port, DICOMweb proxied to ``pacs``; stopped by its pid."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = tmp_path / "app-config.js"
    config.write_text(app_config(f"{base}/dicom-web"), encoding="utf-8")
    env = {**os.environ, "ORTHANC_USER": pacs.username, "ORTHANC_PASSWORD": pacs.password}
    log = (tmp_path / "ohif-server.log").open("w")
    args = ["--dist", str(ohif_dist), "--config", str(config), "--port", str(port)]
    process = subprocess.Popen(
        [sys.executable, str(SERVER), *args, "--orthanc", pacs.url],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: _serving(base, process), timeout=30)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def _serving(base: str, process: subprocess.Popen[bytes]) -> bool:
    assert process.poll() is None, "the OHIF server exited"
    try:
        config = httpx.get(f"{base}/app-config.js", timeout=2)
        studies = httpx.get(f"{base}/dicom-web/studies", timeout=5)
    except httpx.HTTPError:
        return False
    return config.status_code == 200 and studies.status_code == 200


def _drive(base: str, results: Results) -> dict[str, Any]:
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    env = {
        **os.environ,
        "CHROMIUM": shutil.which("chromium") or "/usr/bin/chromium",
        "OHIF_BASE": base,
        "OHIF_STUDY": results.study_uid,
        "OHIF_OUT": str(ARTIFACTS),
        "OHIF_CENTER": json.dumps(results.center_mm),
        "OHIF_POINTS": json.dumps({"outline": results.outline_centre_mm}),
        "OHIF_DECOY": json.dumps(results.decoy_center_mm),
    }
    started = time.monotonic()
    driven = subprocess.run(
        ["node", str(E2E / "ohif_viewer.mjs")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert driven.returncode == 0, driven.stderr[-4000:]
    seen: dict[str, Any] = json.loads(driven.stdout)
    seen["driverSeconds"] = round(time.monotonic() - started, 1)
    (ARTIFACTS / "report.json").write_text(json.dumps(seen, indent=2), encoding="utf-8")
    assert "error" not in seen, (
        f"{seen['error']}\nconsole errors: {seen.get('consoleErrors')}\n"
        f"OHIF notes: {seen.get('consoleNotes')}\n(see {ARTIFACTS})"
    )
    return seen


def _rgb(path: str) -> npt.NDArray[np.int16]:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _in_viewport(shape: tuple[int, ...], geo: dict[str, Any]) -> npt.NDArray[np.bool_]:
    """The viewport's image area: its canvas less the image scrollbar (with a margin)."""
    x, y, w, h = (round(v) for v in geo["rect"])
    inside = np.zeros(shape[:2], dtype=bool)
    inside[y : y + h, x : x + w] = True
    for bx, _, bw, _ in geo["scrollbars"]:
        inside[:, max(0, round(bx) - 10) : round(bx + bw) + 10] = False
    return inside


def _distance(shape: tuple[int, ...], point: list[float]) -> npt.NDArray[np.float64]:
    ys, xs = np.indices(shape[:2])
    distance: npt.NDArray[np.float64] = np.hypot(xs - point[0], ys - point[1])
    return distance


def assert_seg_overlay_on_the_nodule(
    seg: dict[str, Any],
    shown: list[int],
    center_mm: tuple[float, float, float],
    segment_rgb: tuple[int, int, int],
) -> None:
    """Pixels that the segment's visibility toggles are tinted with its colour ``segment_rgb``
    (OHIF shows ``shown``), on the nodule at ``center_mm``, nowhere else."""
    geo = seg["geometry"]
    assert seg["geometryOff"]["rect"] == geo["rect"], "the viewport moved between screenshots"
    assert seg["geometryOff"]["nodule"] == geo["nodule"], "the camera moved between screenshots"
    assert abs(seg["target"]["z"] - center_mm[2]) <= 2.5, seg["target"]
    on, off = _rgb(seg["shots"]["on"]), _rgb(seg["shots"]["off"])
    changed = (np.abs(on - off).sum(axis=2) > CHANGED) & _in_viewport(on.shape, geo)
    mm = _distance(on.shape, geo["nodule"]) / geo["pxPerMm"]
    near, far = changed & (mm <= 25), changed & (mm > 40)
    px_per_mm2 = geo["pxPerMm"] ** 2
    # The readers' nodule is about 30 mm across: its section near the centre is hundreds of mm².
    assert near.sum() >= 150 * px_per_mm2, f"overlay covers {near.sum() / px_per_mm2:.0f} mm²"
    assert far.sum() <= 0.01 * near.sum(), f"{far.sum()} changed pixels far from the nodule"
    ys, xs = np.nonzero(near)
    centroid_mm = np.hypot(xs.mean() - geo["nodule"][0], ys.mean() - geo["nodule"][1])
    assert centroid_mm / geo["pxPerMm"] <= 6.0, "the overlay is not centred on the nodule"
    # OHIF took the segment's colour from our SEG, and the overlay is that colour blended over
    # grey CT: the tint it adds points the way of the colour's own chroma.
    assert np.abs(np.subtract(shown, segment_rgb)).max() <= 3, (shown, segment_rgb)
    added = (on[near] - off[near]).mean(axis=0)
    added_chroma = added - added.mean()
    colour_chroma = np.asarray(segment_rgb, dtype=float)
    colour_chroma -= colour_chroma.mean()
    cosine = (
        added_chroma @ colour_chroma / np.linalg.norm(added_chroma) / np.linalg.norm(colour_chroma)
    )
    off_chroma = off[near] - off[near].mean(axis=1, keepdims=True)
    assert np.abs(off_chroma).mean() < 3, "the CT under the overlay should be grey"
    assert np.linalg.norm(added_chroma) > 15, f"overlay tint {added_chroma} is faint"
    assert cosine > 0.9, f"overlay tint {added_chroma} is not the segment's colour {shown}"


def assert_sr_outline_and_diameter_on_the_nodule(sr: dict[str, Any], results: Results) -> None:
    """OHIF shows our SR's image, draws the outline around the nodule and prints the diameter."""
    geo = sr["geometry"]
    assert results.outline_image_uid in geo["imageId"], "OHIF opened another image than the SR's"
    # The diameter text OHIF renders (SVG text over the viewport) is the SR's long axis.
    lines = [line for text in sr["texts"] for line in text]
    long_axis = [line for line in lines if line.lower().startswith("long axis:")]
    assert long_axis, lines
    shown = float(long_axis[0].split(":")[1].strip().removesuffix("mm").strip())
    assert shown == pytest.approx(results.long_axis_mm, abs=0.01)
    assert 20.0 <= shown <= 35.0, f"long axis {shown} mm is not the readers' nodule"
    # The outline: one closed polyline, centred where OHIF projects our outline's centre, as wide
    # as our outline.
    assert len(sr["polylines"]) == 1, f"{len(sr['polylines'])} polylines drawn"
    points = np.asarray(sr["polylines"][0], dtype=float)
    expected = np.asarray(geo["points"]["outline"])
    assert np.hypot(*(points.mean(axis=0) - expected)) / geo["pxPerMm"] <= 3.0
    assert np.hypot(*(points.mean(axis=0) - geo["nodule"])) / geo["pxPerMm"] <= 10.0
    span = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1)).max() / geo["pxPerMm"]
    assert span == pytest.approx(results.outline_extent_mm, abs=1.5)
    # Pixels: annotation-green pixels appear around the nodule when the annotation layer is shown.
    on, off = _rgb(sr["shots"]["on"]), _rgb(sr["shots"]["off"])
    green = (on[..., 1] - np.maximum(on[..., 0], on[..., 2]) > 80) & _in_viewport(on.shape, geo)
    appeared = green & (np.abs(on - off).sum(axis=2) > CHANGED)
    mm = _distance(on.shape, geo["nodule"]) / geo["pxPerMm"]
    ring = appeared & (mm <= results.outline_extent_mm / 2 + 5)
    # A dashed line around a ~30 mm outline: well over 100 mm of stroke at >2 px per mm.
    assert ring.sum() >= 60 * geo["pxPerMm"], f"{ring.sum()} outline pixels near the nodule"
    grey_before = off[..., 1] - np.maximum(off[..., 0], off[..., 2])
    assert (grey_before[ring] < 20).all(), "the green came from the image, not the annotation"


def assert_heatmap_on_the_nodule(pmap: dict[str, Any], center_mm: tuple[float, ...]) -> None:
    """OHIF's volume viewport, its slice plane through the nodule centre, colours the pixels
    around the centre when our Parametric Map is shown, and nothing farther than the heatmap's
    reach (it is 0 beyond 20 mm)."""
    geo = pmap["geometry"]
    assert pmap["geometryOff"]["rect"] == geo["rect"], "the viewport moved between screenshots"
    assert pmap["geometryOff"]["nodule"] == geo["nodule"], "the camera moved between screenshots"
    offset = np.subtract(center_mm, pmap["plane"]["focalPoint"]) @ np.asarray(
        pmap["plane"]["normal"]
    )
    assert abs(offset) <= 1.0, f"the slice plane is {offset:.1f} mm off the nodule centre"
    on, off = _rgb(pmap["shots"]["on"]), _rgb(pmap["shots"]["off"])
    changed = (np.abs(on - off).sum(axis=2) > CHANGED) & _in_viewport(on.shape, geo)
    mm = _distance(on.shape, geo["nodule"]) / geo["pxPerMm"]
    near, far = changed & (mm <= 20), changed & (mm > 22)
    px_per_mm2 = geo["pxPerMm"] ** 2
    # The peak (0.9, sigma 5 mm) is above a tenth of itself within 10.7 mm of the centre; OHIF's
    # colour map is transparent at 0 only: a disc of well over 80 mm² must change colour.
    assert near.sum() >= 80 * px_per_mm2, f"heatmap covers {near.sum() / px_per_mm2:.0f} mm²"
    assert far.sum() <= 0.01 * near.sum(), f"{far.sum()} changed pixels far from the nodule"
    ys, xs = np.nonzero(near)
    centroid = np.hypot(xs.mean() - geo["nodule"][0], ys.mean() - geo["nodule"][1])
    assert centroid / geo["pxPerMm"] <= 2.5, "the heatmap is not centred on the nodule"


def test_ohif_draws_our_seg_overlay_and_sr_outline_with_diameter_on_the_lidc_nodule(
    ohif: str, results: Results
) -> None:
    seen = _drive(ohif, results)
    seg, sr = seen["seg"], seen["sr"]
    # the readers' lesion (about 34 mm) and its copy are masses (pipelines.lesions)
    assert [s["title"] for s in seg["segments"]] == ["Mass 1", "Mass 2"]
    colours = [[int(v) for v in s["color"].strip("rgb()").split(",")] for s in seg["segments"]]
    assert_seg_overlay_on_the_nodule(seg, colours[0], results.center_mm, results.segment_rgb)
    # segment 2's frames follow a gap of omitted empty slices: still drawn on its own slices
    assert_seg_overlay_on_the_nodule(
        seen["decoy"], colours[1], results.decoy_center_mm, results.decoy_rgb
    )
    assert_sr_outline_and_diameter_on_the_nodule(sr, results)
    assert_heatmap_on_the_nodule(seen["pmap"], results.center_mm)
    # OHIF reports what it could not take from our objects as notifications ("DICOM SEG import");
    # its PMAP viewport always says that it shows the values times 100 (its own notice).
    problems = [t for t in seen["toasts"] if not t.startswith("Parametric Map")]
    assert problems == [], seen["toasts"]
    assert seen["consoleErrors"] == [], seen["consoleErrors"]
    screenshots = {p.name for p in ARTIFACTS.glob("*.png")}
    expected = {"seg-on.png", "seg-off.png", "decoy-on.png", "sr-on.png", "sr-off.png"}
    assert expected | {"pmap-on.png", "pmap-off.png"} <= screenshots
