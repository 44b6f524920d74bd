"""onnxruntime and torch agree on both stages, and the shipped files match their manifests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from pipelines.manifest import WEIGHTS_DIR, sha256

TOLERANCE = 1e-4
"""Largest allowed absolute difference between onnxruntime and torch probabilities."""


def _randomise_batchnorm(net: object) -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    for m in net.modules():  # type: ignore[attr-defined]
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def test_stage1_onnxruntime_matches_torch_within_tolerance(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from models.export import export_stage1
    from models.nets import ScreenNet

    torch.manual_seed(0)
    net = ScreenNet()
    _randomise_batchnorm(net)
    net.eval()
    path = tmp_path / "s1.onnx"
    export_stage1(net, path)
    x = np.random.default_rng(0).random((3, 5, 80, 112), dtype=np.float32)  # batch 3, new H, W
    with torch.no_grad():
        ref = torch.sigmoid(net(torch.from_numpy(x))).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"slices": x}
    )[0]
    diff = float(np.abs(got - ref).max())
    print(f"stage 1 largest |onnxruntime - torch| = {diff:.3e} (tolerance {TOLERANCE:g})")
    assert got.shape == (3, 1, 80, 112)
    assert diff <= TOLERANCE


def test_stage2_onnxruntime_matches_torch_within_tolerance(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from models.export import export_stage2
    from models.nets import RefineNet

    torch.manual_seed(1)
    net = RefineNet()
    _randomise_batchnorm(net)
    net.eval()
    path = tmp_path / "s2.onnx"
    export_stage2(net, path)
    x = np.random.default_rng(1).random((5, 1, 32, 32, 32), dtype=np.float32)
    with torch.no_grad():
        logit, mask = net(torch.from_numpy(x))
    p_ref, m_ref = torch.sigmoid(logit).numpy(), torch.sigmoid(mask).numpy()
    p, m = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"patch": x}
    )
    diff = max(float(np.abs(p - p_ref).max()), float(np.abs(m - m_ref).max()))
    print(f"stage 2 largest |onnxruntime - torch| = {diff:.3e} (tolerance {TOLERANCE:g})")
    assert p.shape == (5, 1) and m.shape == (5, 1, 32, 32, 32)
    assert diff <= TOLERANCE


@pytest.mark.parametrize("name", ["stage1_screen", "stage2_refine", "stage2_score"])
def test_shipped_onnx_matches_its_manifest(name: str) -> None:
    manifest = json.loads((WEIGHTS_DIR / f"{name}.json").read_text())
    path = WEIGHTS_DIR / manifest["file"]
    assert sha256(path) == manifest["sha256"]
    assert manifest["opset"] >= 17
    assert manifest["inputs"][0]["shape"][0] == "batch"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == manifest["inputs"][0]["name"]
    assert [o.name for o in sess.get_outputs()] == [o["name"] for o in manifest["outputs"]]
    assert path.stat().st_size < 5_000_000
    assert manifest["preprocessing"]["hu_window"] == [-1000.0, 400.0]


def test_a_weight_file_that_differs_from_its_manifest_is_refused(tmp_path: Path) -> None:
    import shutil

    from dicom_node.errors import ConfigError
    from pipelines.manifest import load_manifest

    for f in WEIGHTS_DIR.glob("stage1_screen.*"):
        shutil.copy(f, tmp_path / f.name)
    load_manifest("stage1_screen", tmp_path)
    with open(tmp_path / "stage1_screen.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ConfigError, match="sha256"):
        load_manifest("stage1_screen", tmp_path)


def test_the_score_network_is_stage_2s_probability_bit_for_bit_and_made_again_identically(
    tmp_path: Path,
) -> None:
    import shutil

    pytest.importorskip("onnx")
    from models.export import write_stage2_score

    score = json.loads((WEIGHTS_DIR / "stage2_score.json").read_text())
    full = json.loads((WEIGHTS_DIR / "stage2_refine.json").read_text())
    assert score["derived_from"] == {"file": full["file"], "sha256": full["sha256"]}
    assert score["version"] == full["version"]
    for f in WEIGHTS_DIR.glob("stage2_refine.*"):
        shutil.copy(f, tmp_path / f.name)
    assert write_stage2_score(tmp_path) == score  # what export writes, byte for byte (sha256)
    x = np.random.default_rng(0).random((6, 1, 32, 32, 32), dtype=np.float32)
    run = {
        name: ort.InferenceSession(
            str(WEIGHTS_DIR / f"{name}.onnx"), providers=["CPUExecutionProvider"]
        )
        for name in ("stage2_refine", "stage2_score")
    }
    p_full = run["stage2_refine"].run(None, {"patch": x})[0]
    (p_score,) = run["stage2_score"].run(None, {"patch": x})
    assert np.array_equal(p_full, p_score)


def test_a_score_network_of_other_stage_2_weights_is_refused(tmp_path: Path) -> None:
    import shutil

    from dicom_node.errors import ConfigError
    from pipelines.detect import Detector, DetectorConfig

    for f in WEIGHTS_DIR.iterdir():
        shutil.copy(f, tmp_path / f.name)
    assert Detector(DetectorConfig(models_dir=tmp_path, backend="onnx-cpu")).stage2_score
    manifest = json.loads((tmp_path / "stage2_score.json").read_text())
    manifest["derived_from"]["sha256"] = "0" * 64
    (tmp_path / "stage2_score.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="not derived from"):
        Detector(DetectorConfig(models_dir=tmp_path, backend="onnx-cpu"))
    for f in tmp_path.glob("stage2_score.*"):
        f.unlink()  # weights without it (older folders): stage 2 runs the full network only
    assert Detector(DetectorConfig(models_dir=tmp_path, backend="onnx-cpu")).stage2_score is None
