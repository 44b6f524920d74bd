"""``noduleai demo`` against a node and a worker running in this process."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dicom_node import demo
from dicom_node.config import Settings, load_settings
from dicom_node.node import Node

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = REPO / "models" / "weights"
E2E = REPO / "tests" / "e2e"
ARTIFACTS = REPO / "test-artifacts" / "dashboard"


def _args(**overrides: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[Settings]:
    """Node (embedded queue, SQLite) plus one worker thread, as ``noduleai serve`` runs them."""
    if not list(WEIGHTS.glob("*.onnx")) and not os.environ.get("CI"):
        pytest.skip("no ONNX weights in models/weights")
    from pipelines.worker import Worker, run_worker

    settings = load_settings(
        data_dir=tmp_path / "var",
        dicom_host="127.0.0.1",
        dicom_port=0,
        http_port=0,
        min_free_bytes=0,
        quiet_seconds=1.0,
        inference_threads=2,
    )
    node = Node(settings)
    node.start()
    worker = Worker(settings, node.db, node.config)
    thread = threading.Thread(target=run_worker, args=(settings, node.db, worker), daemon=True)
    thread.start()
    bound = settings.model_copy(update={"dicom_port": node.scp.port, "http_port": node.http_port})
    try:
        yield bound
    finally:
        node.scp.stop()
        worker.stop()
        thread.join(timeout=60)
        node.stop()


@pytest.mark.slow
def test_demo_sends_a_phantom_and_reports_its_nodules_against_the_truth(
    serving: Settings,
) -> None:
    out = io.StringIO()
    code = demo.run(serving, _args(timeout=300.0), out=out)
    text = out.getvalue()
    assert code == 0, text
    assert "96 slices" in text
    # phantom generation reports its steps as it goes
    assert re.search(r"s  drawing the anatomy, vessels and 3 nodules \.\.\.", text), text
    assert re.search(r"s  writing 96 DICOM slices \.\.\.", text), text
    assert "sending 96/96" in text
    assert re.search(r"\] done ", text), text
    rows = re.findall(r"#\d .* mm: (FOUND|MISSED)", text)
    assert len(rows) == 3, text
    found = re.search(r"found (\d) of 3; false positives: (\d+)", text)
    assert found is not None, text
    assert int(found[1]) == rows.count("FOUND")
    assert f"/dashboard/studies/{_study_uid(text)}" in text
    assert "study Lung-RADS v2022 category" in text
    # no destination is configured: the demo and the study page say so and where the files are
    assert "results:   sent nowhere" in text, text
    files = re.findall(r"^    (/\S+)$", text, flags=re.MULTILINE)
    assert any(f.endswith(".dcm") for f in files) and all(Path(f).is_file() for f in files)
    _check_study_page_in_a_browser(serving, _study_uid(text), files)


def _check_study_page_in_a_browser(settings: Settings, study_uid: str, files: list[str]) -> None:
    """The study page in Chromium: a row per finding with its thumbnail loaded, the same
    Lung-RADS and risk as the findings API; a screenshot in ``test-artifacts/dashboard``."""
    if shutil.which("chromium") is None or not (E2E / "node_modules" / "playwright-core").is_dir():
        if os.environ.get("CI"):
            pytest.fail("chromium and playwright-core are needed (make test installs them)")
        pytest.skip("chromium or playwright-core not installed")
    base = f"http://127.0.0.1:{settings.http_port}"
    findings = httpx.get(f"{base}/api/studies/{study_uid}/findings", timeout=10).json()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driven = subprocess.run(
        ["node", str(E2E / "study_page.mjs")],
        env={
            **os.environ,
            "E2E_URL": f"{base}/dashboard/studies/{study_uid}",
            "E2E_OUT": str(ARTIFACTS),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert driven.returncode == 0, driven.stderr[-4000:]
    seen = json.loads(driven.stdout)
    assert seen["errors"] == []
    nodules = findings["nodules"]
    assert [r["number"] for r in seen["rows"]] == [n["number"] for n in nodules]
    for row, nodule in zip(seen["rows"], nodules, strict=True):
        assert row["thumbnailWidth"] > 0
        assert row["lungRads"] == nodule["lung_rads"]
        risk = nodule["malignancy_risk"]  # the phantom's header has birth date and sex
        assert risk is not None and row["risk"] == f"{100 * risk:.1f} %"
    assert f"category {findings['lung_rads']}" in seen["studyLungRads"]
    assert seen["noDestination"] == files


def _study_uid(text: str) -> str:
    match = re.search(r"StudyInstanceUID (\S+)", text)
    assert match is not None, text
    return match[1]


def test_demo_says_what_is_wrong_when_the_service_is_not_reachable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.helpers import free_port

    settings = load_settings(http_port=free_port(), dicom_port=free_port())
    code = demo.run(settings, _args(), out=io.StringIO())
    assert code == 1
    err = capsys.readouterr().err
    assert "cannot reach http://127.0.0.1:" in err
    assert "make serve" in err


def test_findings_match_the_truth_by_the_luna16_rule() -> None:
    truth = [
        demo.Truth((0.0, 0.0, 0.0), 10.0, "solid", "parenchymal"),
        demo.Truth((50.0, 0.0, 0.0), 8.0, "solid", "parenchymal"),
    ]
    near = {"center_mm": [3.0, 0.0, 0.0], "long_axis_mm": 9.5, "probability": 0.9}
    far = {"center_mm": [0.0, 90.0, 0.0], "long_axis_mm": 5.0, "probability": 0.6}
    edge = {"center_mm": [54.5, 0.0, 0.0], "long_axis_mm": 7.0, "probability": 0.7}
    matches, false_positives = demo.match(truth, [near, far, edge])
    assert [m.finding for m in matches] == [near, None]
    assert matches[0].distance_mm == pytest.approx(3.0)
    assert false_positives == [far, edge]
    lines = "\n".join(demo.report(matches, false_positives))
    assert "FOUND" in lines and "MISSED" in lines and "found 1 of 2; false positives: 2" in lines
