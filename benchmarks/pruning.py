"""Structured pruning of stage 1 (issue 22): channels removed against held-out accuracy and speed,
all measured in one run against the shipped stage 1.

The shipped stage 1 (``models/weights/stage1_screen.onnx``: its batch norms are folded into the
convolutions) is read back into torch, and each feature map loses the given fraction of its
channels, those whose producing filters have the smallest L1 norm (the FPN maps that are summed,
the lateral and smoothing outputs, lose the same channels). The pruned net is fine-tuned with the
training's stage-1 loss and batches (``models.train``: focal loss, crops around nodules, hard
negatives, lung crops) on training phantoms, exported to ONNX with the shipped stage 1's
candidate threshold and evaluated with the shipped stage 2 on held-out
phantoms (``models.evaluate.evaluate_synthetic``: the service's detector). Speed is stage 1's
network time over the lungs' box of LIDC-IDRI-0001 and of the 300-slice benchmark series, shipped
and pruned alternating, median of ``--runs``.

Run: ``.venv/bin/python benchmarks/pruning.py [--ratios 0.2 0.3 0.4] [--iters 1500]
[--n-train 24] [--n-eval 50] [--threads 2] [--out DIR]`` (needs the ``train`` extra).
Not a timed test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from models.evaluate import evaluate_synthetic  # noqa: E402
from models.export import manifest_stage1, write_manifest  # noqa: E402
from models.phantom import make_phantom  # noqa: E402
from models.train import (  # noqa: E402
    TRAIN_OFFSET,
    _pool_map,
    focal_loss,
    phantom_seeds,
    prepare,
    stage1_batch,
)
from pipelines.backends import load_backend  # noqa: E402
from pipelines.detect import Detector, DetectorConfig  # noqa: E402
from pipelines.manifest import STAGE1_NAME, WEIGHTS_DIR, load_manifest  # noqa: E402
from pipelines.preprocess import lung_mask, normalise_hu, resample_to_iso  # noqa: E402
from pipelines.screen import lung_box, screen_volume  # noqa: E402

#: The convolutions of ScreenNet in the order the ONNX export traced them:
#: (name, input map, output map, depthwise, stride, kernel).
LAYERS: list[tuple[str, str, str, bool, int, int]] = [
    ("stem", "in", "c0", False, 1, 3),
    ("s1.dw", "c0", "c0", True, 1, 3),
    ("s1.pw", "c0", "c1", False, 1, 1),
    ("s2.0.dw", "c1", "c1", True, 2, 3),
    ("s2.0.pw", "c1", "c2a", False, 1, 1),
    ("s2.1.dw", "c2a", "c2a", True, 1, 3),
    ("s2.1.pw", "c2a", "c2", False, 1, 1),
    ("s3.0.dw", "c2", "c2", True, 2, 3),
    ("s3.0.pw", "c2", "c3a", False, 1, 1),
    ("s3.1.dw", "c3a", "c3a", True, 1, 3),
    ("s3.1.pw", "c3a", "c3", False, 1, 1),
    ("s4.0.dw", "c3", "c3", True, 2, 3),
    ("s4.0.pw", "c3", "c4a", False, 1, 1),
    ("s4.1.dw", "c4a", "c4a", True, 1, 3),
    ("s4.1.pw", "c4a", "c4b", False, 1, 1),
    ("s4.2.dw", "c4b", "c4b", True, 1, 3),
    ("s4.2.pw", "c4b", "c4", False, 1, 1),
    ("lat0", "c1", "f", False, 1, 1),
    ("lat1", "c2", "f", False, 1, 1),
    ("lat2", "c3", "f", False, 1, 1),
    ("lat3", "c4", "f", False, 1, 1),
    ("smooth2.dw", "f", "f", True, 1, 3),
    ("smooth2.pw", "f", "f", False, 1, 1),
    ("smooth1.dw", "f", "f", True, 1, 3),
    ("smooth1.pw", "f", "f", False, 1, 1),
    ("smooth0.dw", "f", "f", True, 1, 3),
    ("smooth0.pw", "f", "f", False, 1, 1),
    ("head.dw", "f", "f", True, 1, 3),
    ("head.pw", "f", "h", False, 1, 1),
    ("last", "h", "out", False, 1, 1),
]
#: Convolutions followed by a ReLU (the lateral 1x1s and the last one are linear).
LINEAR = {"lat0", "lat1", "lat2", "lat3", "last"}


class FoldedScreenNet(nn.Module):
    """ScreenNet with its batch norms folded into the convolutions (what the ONNX file holds),
    with any number of channels per feature map."""

    def __init__(self, widths: dict[str, int]) -> None:
        super().__init__()
        self.widths = dict(widths)
        self.convs = nn.ModuleDict()
        for name, src, dst, depthwise, stride, k in LAYERS:
            c_in, c_out = widths[src], widths[dst]
            groups = c_in if depthwise else 1
            self.convs[name.replace(".", "_")] = nn.Conv2d(
                c_in, c_out, k, stride, k // 2, groups=groups, bias=True
            )

    def _c(self, name: str, x: torch.Tensor) -> torch.Tensor:
        y = self.convs[name.replace(".", "_")](x)
        return y if name in LINEAR else F.relu(y)

    def _ds(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        return self._c(f"{prefix}.pw", self._c(f"{prefix}.dw", x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1 = self._ds("s1", self._c("stem", x))
        c2 = self._ds("s2.1", self._ds("s2.0", c1))
        c3 = self._ds("s3.1", self._ds("s3.0", c2))
        c4 = self._ds("s4.2", self._ds("s4.1", self._ds("s4.0", c3)))
        feats = [self._c(f"lat{i}", c) for i, c in enumerate((c1, c2, c3, c4))]
        top = feats[3]
        for i in (2, 1, 0):
            top = F.interpolate(top, size=feats[i].shape[-2:], mode="nearest") + feats[i]
            top = self._ds(f"smooth{i}", top)
        out: torch.Tensor = self._c("last", self._ds("head", top))
        return out


def load_shipped(path: Path) -> FoldedScreenNet:
    """The shipped stage-1 ONNX file as a :class:`FoldedScreenNet` (pre-sigmoid logits)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == len(LAYERS), f"{len(convs)} convolutions, expected {len(LAYERS)}"
    widths = {"in": 5, "out": 1}
    params = []
    for node, (_, _, dst, _, _, _) in zip(convs, LAYERS, strict=True):
        w, b = init[node.input[1]], init[node.input[2]]
        widths[dst] = w.shape[0]
        params.append((w, b))
    net = FoldedScreenNet(widths)
    with torch.no_grad():
        for (w, b), conv in zip(params, net.convs.values(), strict=True):
            conv.weight.copy_(torch.from_numpy(w))
            conv.bias.copy_(torch.from_numpy(b))
    return net.eval()


def prune(net: FoldedScreenNet, ratio: float) -> FoldedScreenNet:
    """Remove ``ratio`` of each inner feature map's channels (smallest L1 norm of the filters
    producing them, summed over producers); the network's input and output stay."""
    norms: dict[str, torch.Tensor] = {}
    for name, _, dst, depthwise, _, _ in LAYERS:
        if depthwise or dst == "out":
            continue
        w = net.convs[name.replace(".", "_")].weight.detach().abs().sum(dim=(1, 2, 3))
        norms[dst] = norms.get(dst, torch.zeros_like(w)) + w
    keep = {
        m: torch.sort(torch.argsort(n, descending=True)[: max(1, round(len(n) * (1 - ratio)))])[0]
        for m, n in norms.items()
    }
    keep["in"], keep["out"] = torch.arange(5), torch.arange(1)
    pruned = FoldedScreenNet({m: len(k) for m, k in keep.items()})
    with torch.no_grad():
        for name, src, dst, depthwise, _, _ in LAYERS:
            key = name.replace(".", "_")
            w, b = net.convs[key].weight, net.convs[key].bias
            w = w[keep[dst]] if depthwise else w[keep[dst]][:, keep[src]]
            pruned.convs[key].weight.copy_(w)
            pruned.convs[key].bias.copy_(b[keep[dst]])
    return pruned.eval()


def fine_tune(net: FoldedScreenNet, vols: list[Any], iters: int, seed: int) -> FoldedScreenNet:
    """The training's stage-1 loss and batches, ``iters`` steps (AdamW, one-cycle 1e-3)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=iters)
    net.train()
    for _ in range(iters):
        x, t = stage1_batch(vols, rng, 16, 64)
        loss = focal_loss(net(torch.from_numpy(x)), torch.from_numpy(t))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


class _Sigmoid(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


def export(net: FoldedScreenNet, path: Path) -> None:
    """ONNX with the shipped file's names and dynamic axes."""
    torch.onnx.export(
        _Sigmoid(net).eval(),
        (torch.zeros(1, 5, 64, 64),),
        str(path),
        dynamo=False,
        input_names=["slices"],
        output_names=["heatmap"],
        opset_version=17,
        dynamic_axes={
            "slices": {0: "batch", 2: "height", 3: "width"},
            "heatmap": {0: "batch", 2: "height", 3: "width"},
        },
    )


def weights_with_stage1(onnx_path: Path, threshold: float, folder: Path) -> None:
    """A weights folder: the shipped stage 2 (and its score network) with this stage 1."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in WEIGHTS_DIR.iterdir():
        if not f.name.startswith(STAGE1_NAME):
            shutil.copy(f, folder / f.name)
    shutil.copy(onnx_path, folder / f"{STAGE1_NAME}.onnx")
    shipped = json.loads((WEIGHTS_DIR / f"{STAGE1_NAME}.json").read_text())
    manifest = manifest_stage1(folder / f"{STAGE1_NAME}.onnx", threshold, {"pruning": True})
    manifest["version"] = shipped["version"] + "-pruned"
    write_manifest(manifest, folder / f"{STAGE1_NAME}.json")


def stage1_inputs() -> dict[str, tuple[np.ndarray, tuple[slice, slice, slice]]]:
    """The normalised iso volume and lungs' box of the two speed cases."""
    from pipelines.volume import build_volume

    out = {}
    lidc = REPO.parent / "shared/data/lidc-idri-0001"
    if lidc.is_dir():
        v = build_volume(sorted(p for p in lidc.rglob("*.dcm") if p.is_file()))
        out["LIDC-IDRI-0001"] = (v.hu, v.spacing_mm)
    ph = make_phantom(424242, shape=(300, 512, 512), spacing_mm=(1.0, 0.7, 0.7))
    out["300-slice series"] = (ph.volume_hu, ph.spacing_mm)
    cases = {}
    for name, (hu, spacing) in out.items():
        iso_hu = resample_to_iso(hu, spacing)
        cases[name] = (normalise_hu(iso_hu), lung_box(lung_mask(iso_hu)))
    return cases


def stage1_seconds(folder: Path, iso: np.ndarray, box: Any, threads: int) -> float:
    backend = load_backend(folder / f"{STAGE1_NAME}.onnx", "onnx-cpu", folder, threads=threads)
    start = time.perf_counter()
    screen_volume(iso, box, lambda x: backend.run(x)[0], batch=16)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.4])
    parser.add_argument("--iters", type=int, default=1500)
    parser.add_argument("--n-train", type=int, default=24)
    parser.add_argument("--n-eval", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="keep the pruned weights here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="pruning-"))
    t0 = time.time()

    shipped = load_shipped(WEIGHTS_DIR / f"{STAGE1_NAME}.onnx")
    x = np.random.default_rng(0).random((2, 5, 64, 64), dtype=np.float32)
    ort_out = load_backend(WEIGHTS_DIR / f"{STAGE1_NAME}.onnx", "onnx-cpu", out, threads=1).run(x)
    with torch.no_grad():
        torch_out = torch.sigmoid(shipped(torch.from_numpy(x))).numpy()
    parity = float(np.abs(ort_out[0] - torch_out).max())
    print(f"shipped stage 1 read back into torch: largest |onnxruntime - torch| {parity:.2e}")
    assert parity < 1e-4

    train_seeds = phantom_seeds(args.seed, TRAIN_OFFSET, args.n_train)
    train = _pool_map(prepare, [(s, (1, 6)) for s in train_seeds], args.threads)
    print(f"{len(train)} training phantoms ({time.time() - t0:.0f} s)")
    speed_cases = stage1_inputs()

    rows: list[dict[str, Any]] = []
    folders = {0.0: WEIGHTS_DIR}
    params = {0.0: sum(p.numel() for p in shipped.parameters())}
    threshold = load_manifest(STAGE1_NAME)["candidate_threshold"]
    for ratio in args.ratios:
        start = time.time()
        net = fine_tune(prune(shipped, ratio), train, args.iters, args.seed)
        path = out / f"stage1_pruned_{round(ratio * 100)}.onnx"
        export(net, path)
        params[ratio] = sum(p.numel() for p in net.parameters())
        folders[ratio] = out / f"weights_{round(ratio * 100)}"
        weights_with_stage1(path, threshold, folders[ratio])
        print(f"pruned {ratio:.0%}: fine-tuned {args.iters} steps in {time.time() - start:.0f} s")
    for ratio, folder in folders.items():
        det = Detector(DetectorConfig(models_dir=folder, threads=1, backend="onnx-cpu"))
        ev = evaluate_synthetic(det, args.seed, args.n_eval)
        size = (folder / f"{STAGE1_NAME}.onnx").stat().st_size
        rows.append(
            {
                "ratio": ratio,
                "params": params[ratio],
                "onnx_kb": round(size / 1024, 1),
                "cpm": ev["cpm"],
                "sens_at_1fp": ev["sensitivity_at_fp"]["1.0"],
                "stage1_recall": ev["stage1_recall"],
                "candidates_per_scan": ev["stage1_candidates_per_scan"],
                "stage1_threshold": round(det.candidate_threshold, 4),
            }
        )
    for name, (iso, box) in speed_cases.items():
        times: dict[float, list[float]] = {r: [] for r in folders}
        for _ in range(args.runs):
            for ratio, folder in folders.items():
                times[ratio].append(stage1_seconds(folder, iso, box, args.threads))
        for row in rows:
            row[f"stage1_s {name}"] = round(statistics.median(times[row["ratio"]]), 3)

    print(
        f"\nstage-1 pruning, {args.n_eval} held-out phantoms, shipped stage 2; "
        f"{args.threads} threads"
    )
    base = rows[0]
    for row in rows:
        speed = " ".join(
            f"{k[len('stage1_s ') :]} {row[k]:.2f} s ({base[k] / row[k]:.2f}x)"
            for k in row
            if k.startswith("stage1_s ")
        )
        print(
            f"  {row['ratio']:.0%} removed: {row['params']} parameters, {row['onnx_kb']} KB; "
            f"CPM {row['cpm']:.3f} ({row['cpm'] - base['cpm']:+.3f}), sensitivity at 1 FP/scan "
            f"{row['sens_at_1fp']:.3f}, stage-1 recall {row['stage1_recall']:.3f} at "
            f"{row['stage1_threshold']:.3f} ({row['candidates_per_scan']} candidates/scan); "
            f"stage 1 {speed}"
        )
    (out / "pruning.json").write_text(json.dumps(rows, indent=2))
    print(f"figures in {out / 'pruning.json'} ({time.time() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
