"""The torch-free detection steps: resampling, lung mask, candidates, mask measurement, merging."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from scipy import ndimage

from models.phantom import make_phantom
from pipelines.preprocess import (
    ISO_SPACING_MM,
    LUNG_MARGIN_MM,
    STAGE2_PATCH,
    closing_3x5x5_twice,
    iso_shape,
    lung_mask,
    near_lung,
    near_lung_at,
    normalise_hu,
    resample_to_iso,
)
from pipelines.refine import (
    Finding,
    make_finding,
    merge_findings,
    recentre_findings,
    refine_candidates,
)
from pipelines.screen import Candidate, extract_candidates, inside, screen_volume


def test_resampling_keeps_voxel_zero_and_places_samples_at_iso_spacing() -> None:
    z = np.arange(10, dtype=np.float32)[:, None, None] * 2.5  # value = position in mm
    vol = np.broadcast_to(z, (10, 4, 4))
    iso = resample_to_iso(vol, (2.5, 1.25, 1.25))
    assert iso.shape == iso_shape(vol.shape, (2.5, 1.25, 1.25)) == (19, 4, 4)
    assert np.allclose(iso[:, 0, 0], np.arange(19) * ISO_SPACING_MM)


def test_nearest_resampling_keeps_label_values() -> None:
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2:6, 2:6, 2:6] = 3
    out = resample_to_iso(lab, (2.5, 2.5, 2.5), order=0)
    assert set(np.unique(out)) == {0.0, 3.0}


def test_hu_window_maps_to_unit_interval() -> None:
    out = normalise_hu(np.array([-3000, -1000, -300, 400, 3000]))
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])


def test_lung_mask_covers_phantom_lungs_and_their_nodules() -> None:
    ph = make_phantom(5, shape=(24, 128, 128), spacing_mm=(2.5, 2.8, 2.8), n_nodules=2)
    iso = resample_to_iso(ph.volume_hu, ph.spacing_mm)
    lung = lung_mask(iso)
    assert 0.05 < lung.mean() < 0.6
    labels = resample_to_iso(ph.labels, ph.spacing_mm, order=0)
    if (labels > 0).any():
        assert lung[labels > 0].mean() > 0.5


def test_screen_volume_runs_every_slice_in_the_box_and_pads_to_multiples_of_eight() -> None:
    iso = np.zeros((6, 30, 21), np.float32)
    seen: list[tuple[int, ...]] = []

    def fake(x: np.ndarray) -> np.ndarray:
        seen.append(x.shape)
        assert x.shape[2] % 8 == 0 and x.shape[3] % 8 == 0
        return np.full((x.shape[0], 1, x.shape[2], x.shape[3]), 0.5, np.float32)

    heat = screen_volume(iso, (slice(1, 5), slice(2, 27), slice(0, 21)), fake, batch=3)
    assert sum(s[0] for s in seen) == 4
    assert heat[1:5, 2:27].min() == 0.5 and heat[0].max() == 0 and heat[5].max() == 0


def test_candidates_are_thresholded_local_maxima_strongest_first() -> None:
    heat = np.zeros((10, 20, 20), np.float32)
    heat[5, 5, 5] = 0.9
    heat[5, 6, 5] = 0.8  # beside a stronger peak: not a local maximum
    heat[2, 15, 15] = 0.4
    heat[8, 15, 3] = 0.05  # below threshold
    allowed = np.ones_like(heat, bool)
    cands = extract_candidates(heat, inside(allowed), threshold=0.1)
    assert [c.voxel for c in cands] == [(5, 5, 5), (2, 15, 15)]
    allowed[2] = False
    assert len(extract_candidates(heat, inside(allowed), threshold=0.1)) == 1


def test_finding_measures_a_sphere_mask_and_recentres_on_it() -> None:
    n = STAGE2_PATCH
    zz, yy, xx = np.mgrid[:n, :n, :n]
    r_vox = 8.0  # 20 mm diameter sphere, centred 2 voxels off the patch centre in x
    mask = (((zz - 16) ** 2 + (yy - 16) ** 2 + (xx - 18) ** 2) <= r_vox**2).astype(np.float32)
    f = make_finding(Candidate((40, 50, 60), 0.7), 0.95, mask, origin_mm=(0.0, 0.0, 0.0))
    assert f.centre_xyz_mm == pytest.approx(
        (62 * ISO_SPACING_MM, 50 * ISO_SPACING_MM, 40 * ISO_SPACING_MM), abs=0.1
    )
    assert f.diameter_mm == pytest.approx(20.0, rel=0.1)
    assert f.equivalent_diameter_mm == pytest.approx(20.0, rel=0.1)
    assert f.probability == 0.95 and f.stage1_score == 0.7


def test_empty_mask_keeps_the_candidate_centre_and_zero_size() -> None:
    f = make_finding(
        Candidate((4, 5, 6), 0.3), 0.2, np.zeros((32, 32, 32), np.float32), (10.0, 20.0, 30.0)
    )
    assert f.centre_xyz_mm == pytest.approx((10 + 6 * 1.25, 20 + 5 * 1.25, 30 + 4 * 1.25))
    assert f.diameter_mm == 0.0


def _finding(x: float, p: float, d: float) -> Finding:
    return Finding((x, 0.0, 0.0), p, d, d, 0.0, 0.5, np.zeros((1, 1, 1), bool))


def test_overlapping_findings_merge_into_the_most_probable() -> None:
    kept = merge_findings(
        [_finding(0.0, 0.6, 20.0), _finding(5.0, 0.9, 20.0), _finding(40.0, 0.5, 4.0)]
    )
    assert [f.probability for f in kept] == [0.9, 0.5]


def test_recentring_on_the_mask_recovers_a_large_nodule_cut_by_the_patch_border() -> None:
    iso = np.zeros((64, 64, 64), np.float32)
    zz, yy, xx = np.mgrid[:64, :64, :64]
    iso[((zz - 32) ** 2 + (yy - 32) ** 2 + (xx - 32) ** 2) <= 12**2] = 1.0  # 30 mm sphere

    def fake(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.full((len(x), 1), 0.9, np.float32), (x > 0.5).astype(np.float32)

    first = refine_candidates(
        iso, [Candidate((32, 44, 44), 0.5)], fake, (0.0, 0.0, 0.0), max_offset=1.0
    )
    assert first[0].equivalent_diameter_mm < 27.0  # cut by the patch border
    again = recentre_findings(iso, first, fake, (0.0, 0.0, 0.0))
    assert again[0].centre_xyz_mm == pytest.approx((40.0, 40.0, 40.0), abs=0.7)
    assert again[0].equivalent_diameter_mm == pytest.approx(30.0, abs=1.0)
    assert again[0].diameter_mm == pytest.approx(31.25, abs=1.5)
    assert again[0].probability == pytest.approx(0.9)


def _masks() -> list[npt.NDArray[np.bool_]]:
    """Masks of balls, some touching the array's faces, and an empty one."""
    rng = np.random.default_rng(7)
    masks = []
    for _ in range(12):
        shape = tuple(int(n) for n in rng.integers(16, 60, 3))
        zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
        mask = np.zeros(shape, bool)
        for _ in range(int(rng.integers(1, 4))):
            c = [int(rng.integers(0, n)) for n in shape]
            r = int(rng.integers(1, 12))
            mask |= (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r
        masks.append(mask)
    masks.append(np.zeros((20, 20, 20), bool))
    return masks


@pytest.mark.parametrize("index", range(13))
def test_near_lung_in_the_masks_box_equals_the_whole_volume_distance(index: int) -> None:
    mask = _masks()[index]
    if not mask.any():
        assert near_lung(mask).all()
        return
    whole = ndimage.distance_transform_edt(~mask, sampling=ISO_SPACING_MM) <= LUNG_MARGIN_MM
    assert np.array_equal(near_lung(mask), whole)


@pytest.mark.parametrize("index", range(15))
def test_near_lung_at_voxels_equals_the_whole_volume_distance(index: int) -> None:
    # The balls of _masks(), then two non-convex masks: scattered voxels and a hollow shell.
    if index < 13:
        mask = _masks()[index]
    elif index == 13:
        mask = np.random.default_rng(3).random((30, 41, 37)) < 0.002
    else:
        zz, yy, xx = np.ogrid[:40, :40, :40]
        r2 = (zz - 20) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2
        mask = (r2 <= 18**2) & (r2 >= 15**2)
    every = np.argwhere(np.ones_like(mask))
    if not mask.any():
        assert near_lung_at(mask, every).all()
        return
    whole = ndimage.distance_transform_edt(~mask, sampling=ISO_SPACING_MM) <= LUNG_MARGIN_MM
    assert np.array_equal(near_lung_at(mask, every).reshape(mask.shape), whole)
    picked = every[np.random.default_rng(index).permutation(len(every))[:50]]
    assert np.array_equal(near_lung_at(mask, picked), whole[tuple(picked.T)])
    assert near_lung_at(mask, every[:0]).shape == (0,)


def _lung_mask_whole_volume(iso_hu: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    """:func:`lung_mask` as first written: every step over the whole volume."""
    air = iso_hu < -400.0
    outside = np.zeros_like(air)
    for z in range(air.shape[0]):
        lab, _ = ndimage.label(air[z])
        border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        outside[z] = np.isin(lab, border[border > 0])
    inner = air & ~outside
    lab3, n = ndimage.label(inner)
    if n == 0:
        return inner
    sizes = np.bincount(lab3.ravel())[1:]
    keep = [i + 1 for i in np.argsort(sizes)[::-1][:3] if sizes[i] >= 0.08 * sizes.sum()]
    mask = np.isin(lab3, keep)
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 5, 5), bool), iterations=2)
    for z in range(mask.shape[0]):
        mask[z] = ndimage.binary_fill_holes(mask[z])
    return np.asarray(mask, dtype=bool)


@pytest.mark.parametrize("seed", [90_000, 90_001, 90_002])
def test_lung_mask_in_the_lungs_box_equals_the_whole_volume_mask(seed: int) -> None:
    phantom = make_phantom(seed)
    iso = resample_to_iso(phantom.volume_hu, phantom.spacing_mm)
    assert np.array_equal(lung_mask(iso), _lung_mask_whole_volume(iso))
    # lungs cut by the field of view: the mask reaches the array's faces
    cut = np.ascontiguousarray(iso[5:-5, 40:-40, 30:-30])
    assert np.array_equal(lung_mask(cut), _lung_mask_whole_volume(cut))


@pytest.mark.parametrize("density", [0.02, 0.2, 0.6])
def test_closing_by_filters_equals_scipys_iterated_binary_closing(density: float) -> None:
    mask = np.random.default_rng(int(density * 100)).random((23, 37, 31)) < density
    expected = ndimage.binary_closing(mask, structure=np.ones((3, 5, 5), bool), iterations=2)
    assert np.array_equal(closing_3x5x5_twice(mask), expected)


def test_a_floor_skips_candidates_that_cannot_reach_it_and_keeps_every_finding_above_it() -> None:
    """Stage 2 with a floor (and a score network) reports exactly the findings at or above the
    floor that it reports without one, and runs the full network only where they can be."""
    rng = np.random.default_rng(5)
    iso = rng.random((60, 60, 60), dtype=np.float32)
    cands = [Candidate(tuple(int(v) for v in rng.integers(0, 60, 3)), 0.5) for _ in range(40)]
    full_calls: list[int] = []

    def prob(x: np.ndarray) -> np.ndarray:
        # depends on the patch and its mirror image differently, spread over [0, 1]
        return np.clip(x[:, :, :8, :8, :8].mean(axis=(2, 3, 4)) * 3 - 0.9, 0, 1).astype(np.float32)

    def full(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        full_calls.append(len(x))
        return prob(x), (x > 0.7).astype(np.float32)

    everything = refine_candidates(iso, cands, full, (0.0, 0.0, 0.0), max_offset=1.0)
    floor = 0.55
    wanted = [f for f in everything if f.probability >= floor]
    assert 0 < len(wanted) < len(everything)
    full_calls.clear()
    skipped = refine_candidates(
        iso, cands, full, (0.0, 0.0, 0.0), max_offset=1.0, floor=floor, score=prob
    )
    kept = [f for f in skipped if f.probability >= floor]
    assert [(f.centre_xyz_mm, f.probability) for f in kept] == [
        (f.centre_xyz_mm, f.probability) for f in wanted
    ]
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(kept, wanted, strict=True))
    assert sum(full_calls) < 2 * len(cands)  # the full network skipped some candidates


def test_stage_2_without_candidates_finds_nothing_with_or_without_a_floor() -> None:
    iso = np.zeros((40, 40, 40), np.float32)

    def full(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.ones((len(x), 1), np.float32), np.ones_like(x)

    def prob(x: np.ndarray) -> np.ndarray:
        return np.ones((len(x), 1), np.float32)

    assert refine_candidates(iso, [], full, (0.0, 0.0, 0.0)) == []
    assert refine_candidates(iso, [], full, (0.0, 0.0, 0.0), floor=0.8, score=prob) == []
