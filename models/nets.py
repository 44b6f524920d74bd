"""The two networks (torch; training and export only, never imported by the service).

- :class:`ScreenNet` (stage 1): 2.5D slice screen. Input ``(N, 5, H, W)``: slices ``z-2 .. z+2``
  of the isotropic grid, HU window scaled to [0, 1]. Depthwise-separable convolutions at strides
  1 to 8, top-down multi-scale fusion back to full resolution (small nodules keep their detail),
  output ``(N, 1, H, W)`` nodule-centre heatmap logits.
- :class:`RefineNet` (stage 2): small 3D U-Net on ``(N, 1, 32, 32, 32)`` isotropic patches;
  outputs a nodule logit ``(N, 1)`` and mask logits ``(N, 1, 32, 32, 32)``.

The export wrappers apply the sigmoid so the ONNX files output probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.preprocess import STAGE1_CONTEXT


class DSConv(nn.Module):
    """Depthwise 3x3 (optionally strided) then pointwise 1x1 convolution, each with BN + ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.pw = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.dw(x)))
        return F.relu(self.bn2(self.pw(x)))


class ScreenNet(nn.Module):
    """Stage 1: light 2.5D screening network with multi-scale fusion (see module docstring)."""

    def __init__(self, in_ch: int = 2 * STAGE1_CONTEXT + 1, width: int = 12) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(in_ch, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )
        self.s1 = DSConv(w, w)
        self.s2 = nn.Sequential(DSConv(w, 2 * w, 2), DSConv(2 * w, 2 * w))
        self.s3 = nn.Sequential(DSConv(2 * w, 3 * w, 2), DSConv(3 * w, 3 * w))
        self.s4 = nn.Sequential(DSConv(3 * w, 4 * w, 2), DSConv(4 * w, 4 * w), DSConv(4 * w, 4 * w))
        f = w
        self.lat = nn.ModuleList([nn.Conv2d(c, f, 1) for c in (w, 2 * w, 3 * w, 4 * w)])
        self.smooth = nn.ModuleList([DSConv(f, f) for _ in range(3)])
        last = nn.Conv2d(f, 1, 1)
        nn.init.constant_(last.bias, -4.0)  # type: ignore[arg-type]
        self.head = nn.Sequential(DSConv(f, f), last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1 = self.s1(self.stem(x))
        c2 = self.s2(c1)
        c3 = self.s3(c2)
        c4 = self.s4(c3)
        feats = [lat(c) for lat, c in zip(self.lat, (c1, c2, c3, c4), strict=True)]
        top = feats[3]
        for i in (2, 1, 0):
            top = F.interpolate(top, size=feats[i].shape[-2:], mode="nearest") + feats[i]
            top = self.smooth[i](top)
        out: torch.Tensor = self.head(top)
        return out


def _block3d(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, 3, 1, 1, bias=False),
        nn.BatchNorm3d(c_out),
        nn.ReLU(),
        nn.Conv3d(c_out, c_out, 3, 1, 1, bias=False),
        nn.BatchNorm3d(c_out),
        nn.ReLU(),
    )


class RefineNet(nn.Module):
    """Stage 2: small 3D U-Net with a classification head on the bottleneck."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        w = width
        self.e1 = _block3d(1, w)
        self.e2 = _block3d(w, 2 * w)
        self.e3 = _block3d(2 * w, 4 * w)
        self.e4 = _block3d(4 * w, 6 * w)
        self.d3 = _block3d(6 * w + 4 * w, 4 * w)
        self.d2 = _block3d(4 * w + 2 * w, 2 * w)
        self.d1 = _block3d(2 * w + w, w)
        self.mask = nn.Conv3d(w, 1, 1)
        self.cls = nn.Sequential(nn.Linear(12 * w, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1 = self.e1(x)
        x2 = self.e2(F.max_pool3d(x1, 2))
        x3 = self.e3(F.max_pool3d(x2, 2))
        x4 = self.e4(F.max_pool3d(x3, 2))
        pooled = torch.cat([x4.mean(dim=(2, 3, 4)), x4.amax(dim=(2, 3, 4))], dim=1)
        logit = self.cls(pooled)
        y = self.d3(torch.cat([F.interpolate(x4, scale_factor=2.0, mode="nearest"), x3], 1))
        y = self.d2(torch.cat([F.interpolate(y, scale_factor=2.0, mode="nearest"), x2], 1))
        y = self.d1(torch.cat([F.interpolate(y, scale_factor=2.0, mode="nearest"), x1], 1))
        return logit, self.mask(y)


class ScreenExport(nn.Module):
    """ScreenNet returning probabilities (what the ONNX file computes)."""

    def __init__(self, net: ScreenNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


class RefineExport(nn.Module):
    """RefineNet returning (probability, mask probability) (what the ONNX file computes)."""

    def __init__(self, net: RefineNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit, mask = self.net(x)
        return torch.sigmoid(logit), torch.sigmoid(mask)
