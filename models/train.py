"""Regenerate the phantom data, train both stages, export ONNX and write manifests.

One command does all of it, deterministically from ``--seed``::

    python -m models.train all --seed 0 --out models/weights --threads 2

``stage2`` runs the second half alone on the stage 1 already in ``--stage1 DIR`` (what ``all``
does after exporting its stage 1)::

    python -m models.train stage2 --stage1 models/weights --seed 0 --out models/weights

Seeds: training phantoms ``seed*100000 + 10000 + i`` (stage 2 also learns from the
``--n-stage2-extra`` after stage 1's ``--n-train``), validation phantoms
``seed*100000 + 20000 + i``; stage 2 also learns from phantoms with confounders (pneumonia-like
opacities, atelectasis, fissures, pleural plaques; :func:`models.phantom.make_phantom`),
``seed*100000 + 30000 + i`` for training and ``+ 40000 + i`` for validation (the held-out
evaluation in :mod:`models.evaluate` uses ``seed*100000 + 50000 + i`` and, with confounders,
``+ 60000 + i``, never seen here). The validation set fixes the stage-2 operating
threshold (false positives per scan) and measures stage 1's recall at its candidate threshold
(:data:`CANDIDATE_THRESHOLD`). Uses CUDA and
mixed precision when a GPU is present; on CPU honour ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from models.phantom import CONFOUNDER_MASS_CHANCE, make_phantom
from models.realdata import (
    RealCase,
    lidc_cases,
    load_case,
    luna16_cases,
    sphere_labels,
    split_cases,
)
from pipelines.manifest import sha256
from pipelines.preprocess import (
    HU_WINDOW,
    ISO_SPACING_MM,
    STAGE1_CONTEXT,
    STAGE2_PATCH,
    FloatArray,
    crop_patch,
    lung_mask,
    near_lung,
    normalise_hu,
    resample_to_iso,
)
from pipelines.refine import refine_candidates
from pipelines.screen import (
    MAX_CANDIDATES,
    Candidate,
    extract_candidates,
    inside,
    lung_box,
    screen_volume,
)

TRAIN_OFFSET, VAL_OFFSET, TEST_OFFSET = 10000, 20000, 50000
CONFOUNDER_TRAIN_OFFSET, CONFOUNDER_VAL_OFFSET, CONFOUNDER_TEST_OFFSET = 30000, 40000, 60000
N_STAGE2_EXTRA = 180
"""Training phantoms that stage 2 alone learns from (``--n-stage2-extra``), after stage 1's."""
CONFOUNDER_NODULES = (0, 3)
"""Nodules in each confounder phantom (inclusive range): they sit among the confounders."""


@dataclass
class TrainingVolume:
    """A phantom prepared for training on the isotropic grid."""

    iso: npt.NDArray[np.float16]
    labels: npt.NDArray[np.uint8]
    allowed: npt.NDArray[np.bool_]
    box: tuple[slice, slice, slice]
    centres: npt.NDArray[np.float64]
    radii: npt.NDArray[np.float64]
    origin_mm: tuple[float, float, float]
    diameters_mm: list[float]
    hard: npt.NDArray[np.int32]
    """Stage-1 hard-negative voxels ``(K, 3)``: dense lung structures (vessels, airway walls,
    pleura) away from every nodule, later joined by the screen's own false positives."""
    confounders: npt.NDArray[np.float64]
    """Isotropic voxel ``(z, y, x)`` of a point in each confounder ``(K, 3)``: stage-2
    negatives."""


def phantom_seeds(seed: int, offset: int, n: int) -> list[int]:
    """Seeds of a data split."""
    return [seed * 100000 + offset + i for i in range(n)]


CANDIDATE_THRESHOLD = 0.05
"""Stage 1's candidate threshold (``--s1-threshold``): every peak at or above it, strongest
first, up to the detector's cap (:data:`pipelines.screen.MAX_CANDIDATES`). It is low on purpose:
stage 2 judges the candidates, and on 50 held-out phantoms stage 1 1.3.0 found 0.928 of the
nodules at 0.05 (the cap bound) against 0.887 at the 0.184 that the rule before it (0.7 times
the weakest validation nodule's score) gave; on real CT the cap binds above 0.25 anyway."""

HARD_NEGATIVE_HU = -500.0
"""Lung voxels denser than this (vessels, airway walls, pleura) are stage-1 hard negatives."""

HARD_NEGATIVE_GAP_VOX = 3.0
"""Hard negatives lie at least this far (isotropic voxels) outside every nodule."""


def prepare(
    seed: int,
    n_nodules: tuple[int, int] | None = None,
    confounders: bool = False,
    mass_chance: float = 0.0,
    opacity_model: int = 1,
) -> TrainingVolume:
    """Make phantom ``seed`` (with confounders and a mass when asked) and bring it to the
    isotropic grid with its targets."""
    ph = make_phantom(
        seed,
        n_nodules=n_nodules,
        confounders=confounders,
        mass_chance=mass_chance,
        opacity_model=opacity_model,
    )
    nodules = [(n.centre_xyz_mm, n.diameter_mm) for n in ph.nodules]
    v = to_volume(ph.volume_hu, ph.spacing_mm, ph.origin_mm, ph.labels, nodules, seed)
    v.confounders = np.array([_iso_voxel(v.origin_mm, c.centre_xyz_mm) for c in ph.confounders])
    v.confounders = v.confounders.reshape(-1, 3)
    return v


def _iso_voxel(
    origin_mm: tuple[float, float, float], p: tuple[float, float, float]
) -> tuple[float, float, float]:
    """Isotropic voxel ``(z, y, x)`` of the LPS point ``p``."""
    o = origin_mm
    return (
        (p[2] - o[2]) / ISO_SPACING_MM,
        (p[1] - o[1]) / ISO_SPACING_MM,
        (p[0] - o[0]) / ISO_SPACING_MM,
    )


def prepare_real(case: RealCase, seed: int) -> TrainingVolume:
    """Load a real annotated scan (LUNA16 / LIDC-IDRI) as a training :class:`TrainingVolume`."""
    ct, nodules = load_case(case)
    labels = sphere_labels(ct.volume_hu.shape, ct.spacing_mm, ct.origin_mm, nodules)
    return to_volume(ct.volume_hu, ct.spacing_mm, ct.origin_mm, labels, nodules, seed)


def to_volume(
    volume_hu: npt.NDArray[np.generic],
    spacing_mm: tuple[float, float, float],
    origin_mm: tuple[float, float, float],
    labels_native: npt.NDArray[np.generic],
    nodules: list[tuple[tuple[float, float, float], float]],
    seed: int,
) -> TrainingVolume:
    """Bring a HU volume, its nodule label volume and its nodules (LPS centre mm, diameter mm)
    to the isotropic grid with the training targets; ``seed`` picks the hard negatives."""
    iso_hu = resample_to_iso(volume_hu, spacing_mm)
    lung = lung_mask(iso_hu)
    labels = resample_to_iso(labels_native, spacing_mm, order=0).astype(np.uint8)
    dense = lung & (iso_hu > HARD_NEGATIVE_HU)
    dense &= ndimage.distance_transform_edt(labels == 0) > HARD_NEGATIVE_GAP_VOX
    pts = np.argwhere(dense)
    pick = np.random.default_rng(seed).choice(len(pts), min(len(pts), 4000), replace=False)
    o = origin_mm
    centres = np.array([_iso_voxel(o, c) for c, _ in nodules])
    return TrainingVolume(
        iso=normalise_hu(iso_hu).astype(np.float16),
        labels=labels,
        allowed=near_lung(lung),
        box=lung_box(lung),
        centres=centres.reshape(-1, 3),
        radii=np.array([d / 2 / ISO_SPACING_MM for _, d in nodules]),
        origin_mm=o,
        diameters_mm=[d for _, d in nodules],
        hard=pts[np.sort(pick)].astype(np.int32),
        confounders=np.zeros((0, 3)),
    )


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- stage 1 data


def _crop2d(vol: npt.NDArray[np.floating[Any]], z: int, cy: int, cx: int, size: int) -> FloatArray:
    idx = np.clip(np.arange(z - STAGE1_CONTEXT, z + STAGE1_CONTEXT + 1), 0, vol.shape[0] - 1)
    out = np.zeros((len(idx), size, size), np.float32)
    y0, x0 = cy - size // 2, cx - size // 2
    ys = slice(max(0, y0), min(vol.shape[1], y0 + size))
    xs = slice(max(0, x0), min(vol.shape[2], x0 + size))
    out[:, ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = vol[idx, ys, xs]
    return out


def heatmap_target(v: TrainingVolume, z: int, y0: int, x0: int, size: int) -> FloatArray:
    """Gaussian centre heatmap for a crop (1 exactly at each nodule's nearest voxel)."""
    yy, xx = np.mgrid[y0 : y0 + size, x0 : x0 + size].astype(np.float32)
    tgt = np.zeros((size, size), np.float32)
    for c, r in zip(v.centres, v.radii, strict=True):
        sigma = max(1.0, r / 3.0)
        d2 = (yy - c[1]) ** 2 + (xx - c[2]) ** 2 + (z - c[0]) ** 2
        tgt = np.maximum(tgt, np.exp(-d2 / (2 * sigma**2)))
        if round(c[0]) == z:
            iy, ix = round(c[1]) - y0, round(c[2]) - x0
            if 0 <= iy < size and 0 <= ix < size:
                tgt[iy, ix] = 1.0
    return tgt


def inverse_diameter_weights(diameters_mm: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Sampling probabilities proportional to 1/diameter (small nodules drawn more often); both
    stages draw their nodule examples with them."""
    w = 1.0 / np.asarray(diameters_mm, np.float64)
    return np.asarray(w / w.sum(), np.float64)


def stage1_batch(
    vols: list[TrainingVolume], rng: np.random.Generator, batch: int, size: int
) -> tuple[FloatArray, FloatArray]:
    """Half the crops around nodules (mostly their centre slice; small nodules drawn more
    often), a quarter centred on hard negatives, a quarter anywhere in the lungs' box."""
    xs, ys = [], []
    nodules = [(v, k) for v in vols for k in range(len(v.radii))]
    weights = inverse_diameter_weights([v.diameters_mm[k] for v, k in nodules])
    for i in range(batch):
        kind = i % 4
        if kind in (0, 1) and nodules:
            v, k = nodules[int(rng.choice(len(nodules), p=weights))]
            c = v.centres[k]
            z = round(c[0]) + int(rng.integers(-2, 3)) * int(rng.random() < 0.4)
            cy = int(c[1] + rng.integers(-size // 3, size // 3 + 1))
            cx = int(c[2] + rng.integers(-size // 3, size // 3 + 1))
        elif kind == 2 and any(len(v.hard) for v in vols):
            v = vols[int(rng.integers(len(vols)))]
            while not len(v.hard):
                v = vols[int(rng.integers(len(vols)))]
            z, cy, cx = (int(a) for a in v.hard[int(rng.integers(len(v.hard)))])
            cy += int(rng.integers(-size // 4, size // 4 + 1))
            cx += int(rng.integers(-size // 4, size // 4 + 1))
        else:
            v = vols[int(rng.integers(len(vols)))]
            z = int(rng.integers(v.box[0].start, v.box[0].stop))
            cy = int(rng.integers(v.box[1].start, v.box[1].stop))
            cx = int(rng.integers(v.box[2].start, v.box[2].stop))
        z = int(np.clip(z, 0, v.iso.shape[0] - 1))
        x = _crop2d(v.iso, z, cy, cx, size)
        t = heatmap_target(v, z, cy - size // 2, cx - size // 2, size)
        if rng.random() < 0.5:
            x, t = x[:, :, ::-1], t[:, ::-1]
        if rng.random() < 0.5:
            x = x[::-1]
        xs.append(np.ascontiguousarray(x) * rng.uniform(0.95, 1.05))
        ys.append(np.ascontiguousarray(t)[None])
    return np.stack(xs).astype(np.float32), np.stack(ys).astype(np.float32)


def mine_false_positives(net: Any, vols: list[TrainingVolume], per_volume: int = 200) -> int:
    """Add the screen's strongest peaks outside every nodule to each volume's hard negatives.

    Returns how many were added in all.
    """
    added = 0
    for v, cs in zip(vols, screen_all(net, vols, 0.05, max_candidates=per_volume), strict=True):
        fps = [
            c.voxel
            for c in cs
            if _nearest(v, np.array(c.voxel, np.float64))[1] > HARD_NEGATIVE_GAP_VOX
        ]
        if fps:
            v.hard = np.concatenate([v.hard, np.array(fps, np.int32)])
            added += len(fps)
    return added


# --------------------------------------------------------------------------- stage 2 data


@dataclass
class PatchSet:
    """Stage-2 training patches (float16), masks and the nodule diameter (mm) of each patch
    (0 for negatives)."""

    x: npt.NDArray[np.float16]
    m: npt.NDArray[np.uint8]
    d: npt.NDArray[np.float32]

    @property
    def y(self) -> npt.NDArray[np.uint8]:
        """Labels: 1 for a nodule patch, 0 for a negative."""
        return (self.d > 0).astype(np.uint8)


def _nearest(v: TrainingVolume, p: npt.NDArray[np.float64]) -> tuple[int, float]:
    if not len(v.radii):
        return -1, np.inf
    d = np.linalg.norm(v.centres - p, axis=1) - v.radii
    i = int(np.argmin(d))
    return i, float(d[i])


def stage2_patches(
    vols: list[TrainingVolume],
    cands: list[list[Candidate]],
    rng: np.random.Generator,
    jitter_per_nodule: int = 6,
    random_neg: int = 8,
    jitter_per_confounder: int = 3,
) -> PatchSet:
    """Positives (jittered nodule centres and stage-1 hits) and negatives (stage-1 false
    positives, jittered points in each confounder and random lung points); ambiguous candidates
    (just outside a nodule) are left out.
    """
    xs: list[FloatArray] = []
    ms: list[npt.NDArray[np.uint8]] = []
    ds: list[float] = []

    def add(v: TrainingVolume, centre: npt.NDArray[np.float64], diameter_mm: float) -> None:
        vox = (int(np.rint(centre[0])), int(np.rint(centre[1])), int(np.rint(centre[2])))
        xs.append(crop_patch(v.iso, vox, STAGE2_PATCH).astype(np.float16))
        lab = crop_patch(v.labels, vox, STAGE2_PATCH)
        ms.append((lab > 0).astype(np.uint8))
        ds.append(diameter_mm)

    for v, cs in zip(vols, cands, strict=True):
        for c, r, d in zip(v.centres, v.radii, v.diameters_mm, strict=True):
            for _ in range(jitter_per_nodule):
                add(v, c + rng.uniform(-1, 1, 3) * min(0.6 * r, 3.0), d)
        for cand in cs:
            p = np.array(cand.voxel, dtype=np.float64)
            k, gap = _nearest(v, p)
            if gap <= 0:
                add(v, p, v.diameters_mm[k])
            elif gap > 2.0:
                add(v, p, 0.0)
        for c in v.confounders:
            for _ in range(jitter_per_confounder):
                p = c + rng.uniform(-3, 3, 3)
                if _nearest(v, p)[1] > 2.0:
                    add(v, p, 0.0)
        pts = np.argwhere(v.allowed[v.box])
        for j in rng.choice(len(pts), size=min(random_neg, len(pts)), replace=False):
            p = pts[j] + [s.start for s in v.box]
            if _nearest(v, p)[1] > 2.0:
                add(v, p.astype(np.float64), 0.0)
    return PatchSet(x=np.stack(xs), m=np.stack(ms), d=np.asarray(ds, np.float32))


BLUR_SIGMA_VOX = (1.2, 0.6)
"""Largest Gaussian sigma (isotropic voxels, along z and in-plane) of :func:`scanner_augment`."""

NOISE_HU = 20.0
"""Largest standard deviation of the noise :func:`scanner_augment` adds, in HU."""
NOISE_SIGMA = NOISE_HU / (HU_WINDOW[1] - HU_WINDOW[0])
""":data:`NOISE_HU` on the [0, 1] scale of the patches."""


def scanner_augment(x: FloatArray, rng: np.random.Generator) -> FloatArray:
    """Blur half of the patches (smooth kernels, thick slices, a series resampled through a
    rotation) and add noise to a third: the phantoms' scanner is sharper and more uniform than
    real ones, so without it margin sharpness alone tells a nodule from a confounder."""
    if rng.random() < 0.5:
        sz, sxy = rng.uniform(0.0, BLUR_SIGMA_VOX[0]), rng.uniform(0.0, BLUR_SIGMA_VOX[1])
        x = ndimage.gaussian_filter(x, (sz, sxy, sxy), mode="nearest")
    if rng.random() < 0.33:
        x = x + rng.normal(0.0, rng.uniform(0.0, NOISE_SIGMA), x.shape).astype(np.float32)
    return x


ROTATE_DEG = 10.0
"""Largest angle of :func:`rotate_augment`'s rotation, in degrees."""


def rotate_augment(
    x: FloatArray, m: FloatArray, rng: np.random.Generator
) -> tuple[FloatArray, FloatArray]:
    """Resample half of the patches (and their masks) through a rotation of up to
    :data:`ROTATE_DEG` about a random axis through the centre and a shift of up to half a voxel,
    with linear interpolation: a patient who lay otherwise, and the interpolation's blur of a
    series resampled through a rotation (as the priors' moved copy is). The flips and transposes
    of :func:`stage2_batch` give only the 48 right-angle orientations, all without blur."""
    if rng.random() >= 0.5:
        return x, m
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-ROTATE_DEG, ROTATE_DEG))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)
    centre = (np.array(x.shape, np.float64) - 1) / 2
    # output voxel o reads input voxel rot @ (o - centre) + centre + shift
    offset = centre + rng.uniform(-0.5, 0.5, 3) - rot @ centre
    x = ndimage.affine_transform(x, rot, offset, order=1, mode="nearest")
    m = ndimage.affine_transform(m, rot, offset, order=1, mode="nearest")
    return x, (m > 0.5).astype(np.float32)


def stage2_batch(
    ps: PatchSet, rng: np.random.Generator, batch: int
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Balanced batch with flips, in-plane transposes, small rotations (:func:`rotate_augment`)
    and the blur and noise of other scanners (:func:`scanner_augment`); positives are drawn with
    weight 1/diameter, as stage 1 draws its nodule crops, so small nodules are seen more
    often."""
    y = ps.y
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    idx = np.concatenate(
        [
            rng.choice(pos, batch // 2, p=inverse_diameter_weights(ps.d[pos])),
            rng.choice(neg, batch - batch // 2),
        ]
    )
    xs, ms = [], []
    for i in idx:
        x, m = rotate_augment(ps.x[i].astype(np.float32), ps.m[i].astype(np.float32), rng)
        x = scanner_augment(x, rng)
        for ax in range(3):
            if rng.random() < 0.5:
                x, m = np.flip(x, ax), np.flip(m, ax)
        if rng.random() < 0.5:
            x, m = x.transpose(0, 2, 1), m.transpose(0, 2, 1)
        xs.append(np.ascontiguousarray(x) * rng.uniform(0.95, 1.05))
        ms.append(np.ascontiguousarray(m))
    return (
        np.stack(xs)[:, None].astype(np.float32),
        np.stack(ms)[:, None].astype(np.float32),
        y[idx].astype(np.float32)[:, None],
    )


# --------------------------------------------------------------------------- torch


def _torch_setup(threads: int, seed: int) -> tuple[Any, Any]:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch, device


def focal_loss(logits: Any, target: Any) -> Any:
    """CenterNet penalty-reduced focal loss on heatmap logits."""
    import torch.nn.functional as F

    pos = (target >= 1.0).float()
    logp, log1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = logp.exp()
    pos_loss = -(logp * (1 - p) ** 2 * pos).sum()
    neg_loss = -(log1mp * p**2 * (1 - target) ** 4 * (1 - pos)).sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1.0)


def _iterate(n: int, every: int) -> Iterator[tuple[int, bool]]:
    for i in range(n):
        yield i, (i + 1) % every == 0 or i == n - 1


def train_stage1(
    vols: list[TrainingVolume],
    iters: int,
    seed: int,
    threads: int,
    batch: int = 16,
    size: int = 64,
    mine_at: tuple[float, ...] = (0.3, 0.6),
) -> Any:
    """Train :class:`~models.nets.ScreenNet`; returns the model in eval mode.

    At each fraction ``mine_at`` of the iterations the net screens the training volumes and its
    false positives join the hard negatives for the rest of the training.
    """
    torch, device = _torch_setup(threads, seed)
    from models.nets import ScreenNet

    net = ScreenNet().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=iters)
    rng = np.random.default_rng(seed + 1)
    amp = device.type == "cuda"
    net.train()
    run = 0.0
    for i, show in _iterate(iters, 100):
        if i in {int(f * iters) for f in mine_at} and i:
            added = mine_false_positives(net.eval(), vols)
            net.train()
            _log(f"stage1 iter {i}: {added} mined false positives added to the hard negatives")
        x, t = stage1_batch(vols, rng, batch, size)
        with torch.autocast(device.type, enabled=amp):
            out = net(torch.from_numpy(x).to(device))
        loss = focal_loss(out.float(), torch.from_numpy(t).to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        run = 0.95 * run + 0.05 * loss.item() if i else loss.item()
        if show:
            _log(f"stage1 iter {i + 1}/{iters} loss {run:.3f}")
    return net.eval()


STAGE2_EMA_DECAY = 0.998
"""Decay of the exponential moving average of stage 2's weights (and batch-norm statistics)
that stage 2 returns (``--s2-ema``; 0 returns the last iterate)."""


def train_stage2(
    ps: PatchSet, iters: int, seed: int, threads: int, batch: int = 8, ema_decay: float = 0.0
) -> Any:
    """Train :class:`~models.nets.RefineNet`; returns it in eval mode, or the moving average of
    its weights and batch-norm statistics when ``ema_decay`` is set."""
    torch, device = _torch_setup(threads, seed)
    import torch.nn.functional as F
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from models.nets import RefineNet

    net = RefineNet().to(device)
    ema = None
    if ema_decay:
        avg = get_ema_multi_avg_fn(ema_decay)  # type: ignore[no-untyped-call]
        ema = AveragedModel(net, multi_avg_fn=avg, use_buffers=True)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=iters)
    rng = np.random.default_rng(seed + 2)
    amp = device.type == "cuda"
    net.train()
    run = 0.0
    for i, show in _iterate(iters, 50):
        x, m, y = (torch.from_numpy(a).to(device) for a in stage2_batch(ps, rng, batch))
        with torch.autocast(device.type, enabled=amp):
            logit, mask = net(x)
        logit, mask = logit.float(), mask.float()
        prob = torch.sigmoid(mask)
        inter = (prob * m).sum(dim=(1, 2, 3, 4))
        dice = 1 - (2 * inter + 1) / (prob.sum(dim=(1, 2, 3, 4)) + m.sum(dim=(1, 2, 3, 4)) + 1)
        loss = (
            F.binary_cross_entropy_with_logits(logit, y)
            + F.binary_cross_entropy_with_logits(mask, m) * 10
            + dice[y[:, 0] > 0].mean()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            ema.update_parameters(net)
        run = 0.95 * run + 0.05 * loss.item() if i else loss.item()
        if show:
            _log(f"stage2 iter {i + 1}/{iters} loss {run:.3f}")
    out: Any = net if ema is None else ema.module
    return out.eval()


def torch_predict1(net: Any) -> Any:
    """numpy -> numpy stage-1 prediction with a torch model (sigmoid applied)."""
    import torch

    device = next(net.parameters()).device

    def run(x: FloatArray) -> FloatArray:
        with torch.no_grad():
            out = torch.sigmoid(net(torch.from_numpy(x).to(device)))
        return np.asarray(out.float().cpu().numpy(), dtype=np.float32)

    return run


def torch_predict2(net: Any) -> Any:
    """numpy -> numpy stage-2 prediction with a torch model (sigmoid applied)."""
    import torch

    device = next(net.parameters()).device

    def run(x: FloatArray) -> tuple[FloatArray, FloatArray]:
        with torch.no_grad():
            logit, mask = net(torch.from_numpy(x).to(device))
        return (
            torch.sigmoid(logit).cpu().numpy().astype(np.float32),
            torch.sigmoid(mask).cpu().numpy().astype(np.float32),
        )

    return run


# --------------------------------------------------------------------------- thresholds


def best_candidate_scores(vols: list[TrainingVolume], cands: list[list[Candidate]]) -> list[float]:
    """Per nodule: highest candidate score within its radius (0 when none)."""
    out = []
    for v, cs in zip(vols, cands, strict=True):
        for c, r in zip(v.centres, v.radii, strict=True):
            hits = [k.score for k in cs if np.linalg.norm(np.array(k.voxel) - c) <= max(r, 1.0)]
            out.append(max(hits, default=0.0))
    return out


def screen_all(
    net: Any, vols: list[TrainingVolume], threshold: float, max_candidates: int = MAX_CANDIDATES
) -> list[list[Candidate]]:
    """Stage-1 candidates of every volume."""
    pred = torch_predict1(net)
    return [
        extract_candidates(
            screen_volume(v.iso.astype(np.float32), v.box, pred),
            inside(v.allowed),
            threshold,
            max_candidates,
        )
        for v in vols
    ]


def screen_all_onnx(
    path: Path, vols: list[TrainingVolume], threshold: float, threads: int
) -> list[list[Candidate]]:
    """Stage-1 candidates of every volume with the exported stage 1 at ``path`` (onnxruntime CPU,
    as the detector runs it), at most :data:`MAX_CANDIDATES` each."""
    from pipelines.backends import load_backend

    backend = load_backend(path, "onnx-cpu", path.parent, threads=threads)

    def pred(x: FloatArray) -> FloatArray:
        return backend.run(x)[0]

    return [
        extract_candidates(
            screen_volume(v.iso.astype(np.float32), v.box, pred), inside(v.allowed), threshold
        )
        for v in vols
    ]


def _world(v: TrainingVolume, c: npt.NDArray[np.float64]) -> tuple[float, float, float]:
    o = v.origin_mm
    return (
        float(o[0] + c[2] * ISO_SPACING_MM),
        float(o[1] + c[1] * ISO_SPACING_MM),
        float(o[2] + c[0] * ISO_SPACING_MM),
    )


def choose_operating_threshold(
    vols: list[TrainingVolume], cands: list[list[Candidate]], net2: Any, target_fps: float
) -> tuple[float, dict[str, Any]]:
    """Lowest stage-2 threshold (>= 0.5) with at most ``target_fps`` FPs/scan on validation."""
    from models.evaluation import EvalDetection, Reference, ScanCase, fps_per_scan, froc

    pred = torch_predict2(net2)
    cases = []
    for v, cs in zip(vols, cands, strict=True):
        fs = refine_candidates(v.iso.astype(np.float32), cs, pred, v.origin_mm)
        refs = [Reference(_world(v, c), d) for c, d in zip(v.centres, v.diameters_mm, strict=True)]
        cases.append(ScanCase(refs, [EvalDetection(f.centre_xyz_mm, f.probability) for f in fs]))
    res = froc(cases)
    thr = 0.5
    for t in sorted(set(np.round(np.linspace(0.5, 0.99, 50), 3))):
        thr = float(t)
        if fps_per_scan(cases, thr) <= target_fps:
            break
    return thr, {
        "val_cpm": res.cpm,
        "val_sensitivities": {str(k): v for k, v in res.sensitivities_at.items()},
        "val_fps_per_scan_at_threshold": fps_per_scan(cases, thr),
    }


# --------------------------------------------------------------------------- main


def onnx_parity(
    net1: Any | None, net2: Any, p1: Path, p2: Path, vols: list[TrainingVolume]
) -> dict[str, float]:
    """Largest |onnxruntime - torch| of the exported stages on validation inputs (stage 2 only
    when ``net1`` is None)."""
    import onnxruntime as ort

    v = vols[0]
    z = (v.box[0].start + v.box[0].stop) // 2
    out: dict[str, float] = {}
    if net1 is not None:
        out["stage1"] = stage1_parity(net1, p1, v, z)
    ctr: list[tuple[int, int, int]] = [(z, 64, 64)]
    if len(v.centres):
        ctr = [(int(v.centres[0][0]), int(v.centres[0][1]), int(v.centres[0][2]))]
    x2 = np.stack([crop_patch(v.iso.astype(np.float32), c, STAGE2_PATCH)[None] for c in ctr * 2])
    ref2 = torch_predict2(net2.eval())(x2)
    got2 = ort.InferenceSession(str(p2)).run(None, {"patch": x2})
    out["stage2"] = float(max(np.abs(got2[0] - ref2[0]).max(), np.abs(got2[1] - ref2[1]).max()))
    return out


def stage1_parity(net1: Any, p1: Path, v: TrainingVolume, z: int) -> float:
    """Largest |onnxruntime - torch| of the exported stage 1 on slices of ``v`` around ``z``."""
    import onnxruntime as ort

    x1 = np.stack(
        [
            np.pad(
                _crop2d(
                    v.iso.astype(np.float32), z + k, v.iso.shape[1] // 2, v.iso.shape[2] // 2, 128
                ),
                0,
            )
            for k in (-2, 0, 2)
        ]
    )
    ref1 = torch_predict1(net1.eval())(x1)
    got1 = ort.InferenceSession(str(p1)).run(None, {"slices": x1})[0]
    return float(np.abs(got1 - ref1).max())


def _pool_map(fn: Any, jobs: list[tuple[Any, ...]], processes: int) -> list[TrainingVolume]:
    """``fn(*job)`` for every job, in order, on ``processes`` worker processes."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(processes) as pool:
        out: list[TrainingVolume] = pool.starmap(fn, jobs, chunksize=4)
    _log(f"prepared {len(out)} volumes")
    return out


def training_data(
    args: argparse.Namespace,
) -> tuple[list[TrainingVolume], list[TrainingVolume], dict[str, Any]]:
    """Training and validation volumes (phantoms, or real scans with ``--luna16``/``--lidc``)
    and what the manifests record about them."""
    if args.luna16 or args.lidc:
        cases = luna16_cases(args.luna16) if args.luna16 else lidc_cases(args.lidc)
        tr, va = split_cases(cases, args.n_train, args.n_val, args.seed)
        train = _pool_map(prepare_real, [(c, args.seed) for c in tr], args.threads)
        val = _pool_map(prepare_real, [(c, args.seed) for c in va], args.threads)
        source = "luna16" if args.luna16 else "lidc-idri"
        info = {
            "data": f"{source}: {len(tr)} training and {len(va)} validation scans",
            "train_scans": [Path(c.path).name for c in tr],
            "val_scans": [Path(c.path).name for c in va],
        }
        return train, val, info
    train_seeds = phantom_seeds(args.seed, TRAIN_OFFSET, args.n_train)
    val_seeds = phantom_seeds(args.seed, VAL_OFFSET, args.n_val)
    train = _pool_map(prepare, [(s, (1, 6)) for s in train_seeds], args.threads)
    val = _pool_map(prepare, [(s, None) for s in val_seeds], args.threads)
    info = {
        "n_train_phantoms": args.n_train,
        "n_val_phantoms": args.n_val,
        "train_seeds": f"{train_seeds[0]}..+{args.n_train - 1}",
        "val_seeds": f"{val_seeds[0]}..+{args.n_val - 1}",
    }
    return train, val, info


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def training_environment() -> dict[str, str]:
    """Python, the package versions and the processor the weights depend on: the same command
    reproduces the same bytes only with the same versions, the same ``--threads`` and the same
    kind of processor (torch's CPU kernels may sum in another order on another one: with the
    same code and versions, ``all``'s stage 1 came out with other bytes on a later VM, an AMD
    EPYC, than on the earlier one, where two runs had matched)."""
    from importlib.metadata import version

    return {
        "python": platform.python_version(),
        **{p: version(p) for p in ("numpy", "scipy", "torch", "onnx")},
        "cpu": cpu_model(),
    }


def confounder_data(
    args: argparse.Namespace,
) -> tuple[list[TrainingVolume], list[TrainingVolume], dict[str, Any]]:
    """Stage 2's extra training and validation phantoms with confounders."""
    tr = phantom_seeds(args.seed, CONFOUNDER_TRAIN_OFFSET, args.n_confounder_train)
    va = phantom_seeds(args.seed, CONFOUNDER_VAL_OFFSET, args.n_confounder_val)
    model = args.opacity_model
    jobs = [(s, CONFOUNDER_NODULES, True, CONFOUNDER_MASS_CHANCE, model) for s in tr + va]
    vols = _pool_map(prepare, jobs, args.threads) if jobs else []
    info: dict[str, Any] = {
        "n_confounder_train_phantoms": len(tr),
        "n_confounder_val_phantoms": len(va),
        "confounder_mass_chance": CONFOUNDER_MASS_CHANCE,
    }
    if tr:
        info["opacity_model"] = model
        info["confounder_train_seeds"] = f"{tr[0]}..+{len(tr) - 1}"
    if va:
        info["confounder_val_seeds"] = f"{va[0]}..+{len(va) - 1}"
    return vols[: len(tr)], vols[len(tr) :], info


def stage2_extra_data(args: argparse.Namespace) -> tuple[list[TrainingVolume], dict[str, Any]]:
    """Training phantoms that only stage 2 learns from (``--n-stage2-extra``): the training
    split's seeds after stage 1's. Stage 2 learns from the nodules it sees (about 3.5 a
    phantom), and stage 1 scores these the way it scores a scan it never saw."""
    if not args.n_stage2_extra:
        return [], {}
    seeds = phantom_seeds(args.seed, TRAIN_OFFSET + args.n_train, args.n_stage2_extra)
    if seeds[-1] >= phantom_seeds(args.seed, VAL_OFFSET, 1)[0]:
        raise SystemExit("--n-train plus --n-stage2-extra reach the validation seeds")
    vols = _pool_map(prepare, [(s, (1, 6)) for s in seeds], args.threads)
    info = {
        "n_stage2_extra_phantoms": len(seeds),
        "stage2_extra_seeds": f"{seeds[0]}..+{len(seeds) - 1}",
    }
    return vols, info


@dataclass
class Stage2Result:
    """What :func:`fit_stage2` made: the torch model, its operating threshold and what the
    manifest records about it."""

    net: Any
    threshold: float
    info: dict[str, Any]


def fit_stage2(
    args: argparse.Namespace,
    train: list[TrainingVolume],
    val: list[TrainingVolume],
    stage1_onnx: Path,
    t1: float,
) -> Stage2Result:
    """Stage 2 on the candidates of the exported stage 1: screen the training and validation
    volumes plus the confounder phantoms, cut patches, train, choose the operating threshold."""
    extra, e_info = stage2_extra_data(args)
    c_train_v, c_val_v, c_info = confounder_data(args)
    train, val = train + extra + c_train_v, val + c_val_v
    c_train = screen_all_onnx(stage1_onnx, train, t1, args.threads)
    c_val = screen_all_onnx(stage1_onnx, val, t1, args.threads)
    _log(f"stage1 candidates: {sum(map(len, c_train))} train, {sum(map(len, c_val))} val")
    ps = stage2_patches(train, c_train, np.random.default_rng(args.seed + 3))
    _log(f"stage2 patches: {int(ps.y.sum())} positive, {int((ps.y == 0).sum())} negative")
    del train, extra, c_train_v, c_train  # the patches are all that training needs of them
    net2 = train_stage2(ps, args.s2_iters, args.seed, args.threads, ema_decay=args.s2_ema)
    t2, val_info = choose_operating_threshold(val, c_val, net2, args.operating_fps)
    _log(f"operating threshold {t2:.3f}: {val_info}")
    augment = {
        "blur_sigma_vox": list(BLUR_SIGMA_VOX),
        "noise_hu": NOISE_HU,
        "rotate_deg": ROTATE_DEG,
    }
    info = {**e_info, **c_info, "scanner_augment": augment}
    if args.s2_ema:
        info["ema_decay"] = args.s2_ema
    return Stage2Result(net2, t2, {**info, **val_info})


def _training_record(args: argparse.Namespace, data_info: dict[str, Any]) -> dict[str, Any]:
    return {
        "command": "python -m models.train " + " ".join(sys.argv[1:]),
        "seed": args.seed,
        **data_info,
        "stage1_iterations": args.s1_iters,
        "stage2_iterations": args.s2_iters,
        "threads": args.threads,
        "environment": training_environment(),
        "wall_s": None,
    }


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """The whole pipeline; returns what it recorded in the manifests."""
    from models import export as ex

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val, data_info = training_data(args)
    _log(f"data ready: {len(train)} train, {len(val)} val volumes")
    net1 = train_stage1(train, args.s1_iters, args.seed, args.threads)
    t1 = args.s1_threshold
    recall = np.mean([s >= t1 for s in best_candidate_scores(val, screen_all(net1, val, t1))])
    _log(f"stage1 threshold {t1:.3f}, validation recall {recall:.3f}")
    p1, p2 = out / "stage1_screen.onnx", out / "stage2_refine.onnx"
    ex.export_stage1(net1.cpu(), p1)
    s2 = fit_stage2(args, train, val, p1, t1)
    training = {**_training_record(args, data_info), "stage1_val_recall": float(recall), **s2.info}
    ex.export_stage2(s2.net.cpu(), p2)
    training["onnx_vs_torch_max_abs_diff"] = onnx_parity(net1, s2.net, p1, p2, val)
    training["wall_s"] = round(time.time() - t0, 1)
    ex.write_manifest(ex.manifest_stage1(p1, t1, training), out / "stage1_screen.json")
    ex.write_manifest(ex.manifest_stage2(p2, s2.threshold, training), out / "stage2_refine.json")
    ex.write_stage2_score(out)
    _log(f"done in {training['wall_s']} s; sha256 {sha256(p1)[:12]} {sha256(p2)[:12]}")
    return training


def run_stage2(args: argparse.Namespace) -> dict[str, Any]:
    """Stage 2 alone on the stage 1 in ``args.stage1`` (its manifest gives the candidate
    threshold); writes the stage-2 ONNX file and manifest to ``args.out``; returns what the
    stage-2 manifest records."""
    from models import export as ex

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    m1 = json.loads((Path(args.stage1) / "stage1_screen.json").read_text())
    p1 = Path(args.stage1) / m1["file"]
    if sha256(p1) != m1["sha256"]:
        raise SystemExit(f"{p1} does not match its manifest's sha256")
    train, val, data_info = training_data(args)
    _log(f"data ready: {len(train)} train, {len(val)} val volumes")
    s2 = fit_stage2(args, train, val, p1, float(m1["candidate_threshold"]))
    training = {
        **_training_record(args, data_info),
        "stage1_iterations": m1["training"].get("stage1_iterations"),
        "stage1": {"file": m1["file"], "version": m1["version"], "sha256": m1["sha256"]},
        "stage1_val_recall": m1["training"].get("stage1_val_recall"),
        **s2.info,
    }
    p2 = out / "stage2_refine.onnx"
    ex.export_stage2(s2.net.cpu(), p2)
    training["onnx_vs_torch_max_abs_diff"] = onnx_parity(None, s2.net, p1, p2, val)
    training["wall_s"] = round(time.time() - t0, 1)
    ex.write_manifest(ex.manifest_stage2(p2, s2.threshold, training), out / "stage2_refine.json")
    ex.write_stage2_score(out)
    _log(f"done in {training['wall_s']} s; sha256 {sha256(p2)[:12]}")
    return training


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m models.train", description=__doc__)
    p.add_argument("command", choices=["all", "stage2"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="models/weights")
    p.add_argument("--stage1", metavar="DIR", help="stage2: folder of the stage 1 to build on")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-train", type=int, default=120)
    p.add_argument("--n-val", type=int, default=40)
    p.add_argument(
        "--n-stage2-extra",
        type=int,
        default=None,
        help=f"training phantoms for stage 2 alone (default {N_STAGE2_EXTRA}; 0 with real data)",
    )
    p.add_argument("--n-confounder-train", type=int, default=100)
    p.add_argument("--n-confounder-val", type=int, default=10)
    p.add_argument(
        "--opacity-model",
        type=int,
        choices=(1, 2),
        default=2,
        help="stage 2's confounder phantoms: how opacities are painted (models.phantom)",
    )
    p.add_argument("--s1-iters", type=int, default=12000)
    p.add_argument("--s2-iters", type=int, default=6000)
    p.add_argument(
        "--s2-ema",
        type=float,
        default=STAGE2_EMA_DECAY,
        metavar="DECAY",
        help="stage 2: moving average of the weights (0: the last iterate)",
    )
    p.add_argument("--s1-threshold", type=float, default=CANDIDATE_THRESHOLD)
    p.add_argument("--operating-fps", type=float, default=0.25)
    real = p.add_mutually_exclusive_group()
    real.add_argument(
        "--luna16", metavar="DIR", help="train on LUNA16 (*.mhd + annotations.csv under DIR)"
    )
    real.add_argument(
        "--lidc", metavar="DIR", help="train on LIDC-IDRI (series folders with reader XML)"
    )
    args = p.parse_args(argv)
    if args.command == "stage2" and not args.stage1:
        p.error("stage2 needs --stage1 DIR")
    real_data = bool(args.luna16 or args.lidc)
    if args.n_stage2_extra is None:
        args.n_stage2_extra = 0 if real_data else N_STAGE2_EXTRA
    elif args.n_stage2_extra and real_data:
        p.error("--n-stage2-extra adds phantoms: not with --luna16 or --lidc")
    return args


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m models.train``."""
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    info = run_all(args) if args.command == "all" else run_stage2(args)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
