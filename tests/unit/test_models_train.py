"""Training data: hard negatives, real-data sources (LUNA16 / LIDC-IDRI) and the training
command run end to end on a LUNA16-layout folder (tiny iteration counts; needs torch)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.evaluate import evaluation_detector
from models.modelcards import render_cards
from models.phantom import make_phantom
from models.realdata import RealCase, lidc_cases, luna16_cases, sphere_labels, split_cases
from models.train import (
    HARD_NEGATIVE_GAP_VOX,
    NOISE_SIGMA,
    TrainingVolume,
    prepare,
    prepare_real,
    rotate_augment,
    scanner_augment,
    stage1_batch,
    stage2_patches,
)
from pipelines.manifest import sha256
from pipelines.preprocess import ISO_SPACING_MM

SHAPE = (40, 160, 160)
SPACING = (2.5, 1.6, 1.6)


@pytest.fixture(scope="module")
def volume() -> TrainingVolume:
    return prepare(10003, (2, 3))


def test_hard_negatives_are_dense_lung_voxels_away_from_every_nodule(
    volume: TrainingVolume,
) -> None:
    v = volume
    assert len(v.hard) > 100
    gaps = np.linalg.norm(v.hard[:, None, :] - v.centres[None], axis=2) - v.radii[None]
    assert gaps.min() > HARD_NEGATIVE_GAP_VOX - 1.0
    assert np.all(v.labels[tuple(v.hard.T)] == 0)
    assert np.all(v.allowed[tuple(v.hard.T)])


def test_stage1_batches_hold_nodule_crops_and_background(volume: TrainingVolume) -> None:
    x, t = stage1_batch([volume], np.random.default_rng(0), 16, 96)
    assert x.shape == (16, 5, 96, 96) and t.shape == (16, 1, 96, 96)
    peaks = t.reshape(16, -1).max(axis=1)
    assert np.all(peaks[[i for i in range(16) if i % 4 in (0, 1)]] > 0.1)


def test_confounder_points_become_stage2_negatives() -> None:
    v = prepare(30007, (0, 1), confounders=True)
    assert len(v.confounders) >= 1
    assert np.all(v.confounders >= 0) and np.all(v.confounders < v.iso.shape)
    ps = stage2_patches([v], [[]], np.random.default_rng(0), random_neg=0)
    n_pos = len(v.radii) * 6
    assert len(ps.d) == n_pos + 3 * len(v.confounders)
    assert np.all(ps.d[n_pos:] == 0) and not ps.m[n_pos:].any()
    plain = prepare(30007, (0, 1))
    assert len(plain.confounders) == 0
    assert np.array_equal(plain.centres, v.centres)


def test_sphere_labels_draw_a_ball_of_the_annotated_diameter() -> None:
    spacing, origin = (2.0, 0.8, 0.8), (-100.0, -100.0, -50.0)
    labels = sphere_labels((50, 250, 250), spacing, origin, [((0.0, 0.0, 0.0), 20.0)])
    vol = labels.sum() * np.prod(spacing)
    assert vol == pytest.approx(4 / 3 * np.pi * 10**3, rel=0.05)
    centre = np.argwhere(labels).mean(0)
    assert centre == pytest.approx([25, 125, 125], abs=0.5)


def test_split_is_seeded_disjoint_and_needs_two_scans() -> None:
    cases = [RealCase("luna16", f"{i}.mhd") for i in range(10)]
    tr, va = split_cases(cases, 100, 3, seed=0)
    assert len(va) == 3 and len(tr) == 7 and not set(tr) & set(va)
    assert split_cases(cases, 100, 3, seed=0) == (tr, va)
    assert split_cases(cases, 100, 3, seed=1) != (tr, va)
    with pytest.raises(ValueError, match="at least 2"):
        split_cases(cases[:1], 10, 1, seed=0)


def _write_luna16(folder: Path, seeds: list[int]) -> dict[str, list[tuple[float, ...]]]:
    """Phantoms as LUNA16 ``.mhd``/``.raw`` scans plus ``annotations.csv``."""
    sub = folder / "subset0"
    sub.mkdir(parents=True)
    rows: dict[str, list[tuple[float, ...]]] = {}
    for s in seeds:
        ph = make_phantom(s, shape=SHAPE, spacing_mm=SPACING, n_nodules=2)
        uid = f"1.2.826.0.1.{s}"
        ph.volume_hu.astype(np.int16).tofile(sub / f"{uid}.raw")
        dz, dy, dx = ph.spacing_mm
        (sub / f"{uid}.mhd").write_text(
            "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
            "TransformMatrix = 1 0 0 0 1 0 0 0 1\n"
            f"Offset = {ph.origin_mm[0]} {ph.origin_mm[1]} {ph.origin_mm[2]}\n"
            f"ElementSpacing = {dx} {dy} {dz}\n"
            f"DimSize = {SHAPE[2]} {SHAPE[1]} {SHAPE[0]}\nElementType = MET_SHORT\n"
            f"ElementDataFile = {uid}.raw\n"
        )
        rows[uid] = [(*n.centre_xyz_mm, n.diameter_mm) for n in ph.nodules]
    with open(folder / "annotations.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
        for uid, nods in rows.items():
            for n in nods:
                w.writerow([uid, *n])
    return rows


def test_luna16_scan_becomes_a_training_volume_with_its_nodules(tmp_path: Path) -> None:
    rows = _write_luna16(tmp_path, [31])
    (case,) = luna16_cases(tmp_path)
    v = prepare_real(case, seed=0)
    ph = make_phantom(31, shape=SHAPE, spacing_mm=SPACING, n_nodules=2)
    assert v.diameters_mm == [n[3] for n in rows[Path(case.path).stem]]
    for c, n in zip(v.centres, ph.nodules, strict=True):
        world = [v.origin_mm[a] + c[2 - a] * ISO_SPACING_MM for a in range(3)]
        assert world == pytest.approx(n.centre_xyz_mm, abs=1e-6)
        assert v.labels[tuple(np.rint(c).astype(int))] > 0


def test_training_command_runs_on_a_luna16_folder(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from models.train import main

    _write_luna16(tmp_path / "luna", [41, 42, 43])
    out = tmp_path / "weights"
    tiny = ["--threads", "1", "--n-val", "1", "--s1-iters", "6", "--s2-iters", "4"]
    tiny += ["--n-confounder-train", "0", "--n-confounder-val", "0"]
    main(["all", "--luna16", str(tmp_path / "luna"), "--out", str(out), *tiny])
    m1 = json.loads((out / "stage1_screen.json").read_text())
    m2 = json.loads((out / "stage2_refine.json").read_text())
    assert m1["sha256"] == sha256(out / "stage1_screen.onnx")
    assert m2["sha256"] == sha256(out / "stage2_refine.onnx")
    assert m1["training"]["data"] == "luna16: 2 training and 1 validation scans"
    assert len(m1["training"]["val_scans"]) == 1
    env = m1["training"]["environment"]
    assert set(env) == {"python", "numpy", "scipy", "torch", "onnx", "cpu"} and env["cpu"]
    ph = make_phantom(41, shape=SHAPE, spacing_mm=SPACING, n_nodules=2)
    res = evaluation_detector(out, threads=1).run_stages(ph.volume_hu, ph.spacing_mm, ph.origin_mm)
    assert res.timings_ms["stage1"] > 0
    render_cards({}, m1, m2, tmp_path / "cards")
    card = (tmp_path / "cards" / "stage1_screen.md").read_text()
    assert "These weights: luna16: 2 training and 1 validation scans, real CT." in card

    # The same command in a fresh process makes byte-identical weights (the manifests' hashes
    # of shipped weights can be reproduced).
    again = tmp_path / "again"
    cmd = ["all", "--luna16", str(tmp_path / "luna"), "--out", str(again), *tiny]
    subprocess.run([sys.executable, "-m", "models.train", *cmd], check=True, capture_output=True)
    for name in ("stage1_screen.onnx", "stage2_refine.onnx"):
        assert sha256(again / name) == sha256(out / name), name

    # Stage 2 alone on that stage 1, with a phantom with confounders: a new stage 2 whose
    # manifest names the stage 1 it was built on; the stage-1 files are left as they were.
    s2 = tmp_path / "stage2"
    before = sha256(out / "stage1_screen.onnx")
    tiny2 = [*tiny[:-4], "--n-confounder-train", "1", "--n-confounder-val", "0"]
    tiny2 += ["--s2-ema", "0.9", "--opacity-model", "2"]
    luna = str(tmp_path / "luna")
    main(["stage2", "--stage1", str(out), "--luna16", luna, "--out", str(s2), *tiny2])
    m2b = json.loads((s2 / "stage2_refine.json").read_text())
    assert m2b["sha256"] == sha256(s2 / "stage2_refine.onnx")
    assert m2b["training"]["stage1"]["sha256"] == before == sha256(out / "stage1_screen.onnx")
    assert m2b["training"]["n_confounder_train_phantoms"] == 1
    assert not (s2 / "stage1_screen.onnx").exists()
    assert m2b["training"]["confounder_mass_chance"] == 0.5
    assert m2b["training"]["ema_decay"] == 0.9 and m2["training"]["ema_decay"] == 0.998
    assert m2b["training"]["opacity_model"] == 2 and "opacity_model" not in m2["training"]
    assert m2b["training"]["scanner_augment"] == {
        "blur_sigma_vox": [1.2, 0.6],
        "noise_hu": 20.0,
        "rotate_deg": 10.0,
    }
    render_cards({}, m1, m2b, tmp_path / "cards2")
    card2 = " ".join((tmp_path / "cards2" / "stage2_refine.md").read_text().split())
    assert "wall for stage 2 alone, on stage 1" in card2
    assert "In 50% of those phantoms a mass of 30-45 mm" in card2
    assert "Gaussian sigma up to 1.2 voxels along z" in card2
    assert "rotation of up to 10.0 degrees" in card2
    assert "moving average of its training iterates (decay 0.9," in card2
    assert "(opacity model 2), and each of 15 mm or more has one to four" in card2


def test_stage2_extra_phantoms_follow_stage_1s_training_seeds() -> None:
    from models.train import parse_args, stage2_extra_data

    vols, info = stage2_extra_data(parse_args(["all", "--n-train", "3", "--n-stage2-extra", "1"]))
    assert info == {"n_stage2_extra_phantoms": 1, "stage2_extra_seeds": "10003..+0"}
    assert len(vols) == 1 and len(vols[0].radii) >= 1  # the training split draws 1-6 nodules
    assert stage2_extra_data(parse_args(["all", "--n-stage2-extra", "0"])) == ([], {})
    assert parse_args(["all"]).n_stage2_extra == 180
    assert parse_args(["all", "--luna16", "/data"]).n_stage2_extra == 0
    with pytest.raises(SystemExit, match="validation seeds"):
        stage2_extra_data(parse_args(["all", "--n-train", "9999", "--n-stage2-extra", "2"]))
    with pytest.raises(SystemExit):  # argparse's error: phantoms are not real scans
        parse_args(["all", "--luna16", "/data", "--n-stage2-extra", "2"])


def test_lidc_series_with_reader_xml_is_a_training_case(shared_data: Path) -> None:
    folder = shared_data / "lidc-idri-0001"
    if not folder.exists():
        pytest.skip("LIDC-IDRI-0001 not available")
    (case,) = lidc_cases(folder)
    v = prepare_real(case, seed=0)
    assert len(v.diameters_mm) == 1 and v.diameters_mm[0] == pytest.approx(32.8, abs=1.0)
    world = [v.origin_mm[a] + v.centres[0][2 - a] * ISO_SPACING_MM for a in range(3)]
    assert world == pytest.approx([56.2, 86.2, -115.9], abs=1.0)
    assert v.labels.sum() * ISO_SPACING_MM**3 > 0.3 * 4 / 3 * np.pi * 16.4**3


def test_scanner_augment_blurs_about_half_the_patches_and_noises_some() -> None:
    rng = np.random.default_rng(5)
    x = (rng.random((32, 32, 32)) > 0.5).astype(np.float32)  # sharp edges everywhere

    def edges(a: np.ndarray) -> float:
        return float(np.abs(np.diff(a, axis=0)).mean())

    out = [scanner_augment(x, np.random.default_rng(s)) for s in range(200)]
    assert all(o.shape == x.shape and o.dtype == np.float32 for o in out)
    unchanged = sum(np.array_equal(o, x) for o in out)
    blurred = sum(edges(o) < 0.99 * edges(x) for o in out)
    assert 0.25 * 200 < unchanged < 0.5 * 200  # neither blurred nor noised: 0.5 * 0.67
    assert 0.3 * 200 < blurred < 0.6 * 200  # half blurred, a few of them noised again
    # the same generator state gives the same patch (training reruns byte for byte)
    assert np.array_equal(scanner_augment(x, np.random.default_rng(9)), out[9])
    # noise stays within a few NOISE_SIGMA of the (possibly blurred) patch
    assert max(float(np.abs(o - x).max()) for o in out) <= 1.0 + 5 * NOISE_SIGMA


def test_rotate_augment_resamples_about_half_the_patches_with_their_masks() -> None:
    zz, yy, xx = np.mgrid[:32, :32, :32]
    # an off-centre ellipsoid, so that a rotation moves it
    m = ((zz - 15.5) ** 2 / 25 + (yy - 15.5) ** 2 / 9 + (xx - 21.0) ** 2 / 16 <= 1).astype(
        np.float32
    )
    x = 0.2 + 0.6 * m
    out = [rotate_augment(x, m, np.random.default_rng(s)) for s in range(200)]
    moved = [(a, b) for a, b in out if a is not x]
    assert 0.35 * 200 < len(moved) < 0.65 * 200
    assert all(a is x and b is m for a, b in out if a is x)
    for a, b in moved:
        assert a.shape == b.shape == x.shape
        assert set(np.unique(b)) <= {0.0, 1.0}
        # a rotation about the centre keeps the volume, and the mask follows the image
        assert abs(b.sum() - m.sum()) < 0.1 * m.sum()
        assert np.array_equal(b > 0.5, a > 0.5)
        assert a.min() >= 0.2 - 1e-6 and a.max() <= 0.8 + 1e-6
    # up to 10 degrees: the ellipsoid's centre (5.5 voxels off the axis) moves by at most
    # 5.5 * 2 sin(5 deg) + the half-voxel shift
    for a, _ in moved:
        c = np.argwhere(a > 0.5).mean(axis=0)
        assert np.linalg.norm(c - [15.5, 15.5, 21.0]) < 5.5 * 2 * np.sin(np.deg2rad(5)) + 0.9 + 0.3
    # interpolation blurs: some patch has values strictly between the two levels
    assert any(((a > 0.21) & (a < 0.79)).any() for a, _ in moved)
    a9, b9 = rotate_augment(x, m, np.random.default_rng(9))
    assert np.array_equal(a9, out[9][0]) and np.array_equal(b9, out[9][1])
