"""YOLOv5s and YOLOv5m, the detectors of SMMF Table 1 (COCO), in plain PyTorch.

Written from the published architecture of Ultralytics YOLOv5 v6.x (models/yolov5s.yaml, yolov5m.yaml:
the layer list and its width and depth multiples); nothing is imported from Ultralytics (AGPL-3.0) and
no code is copied from it. Layout:

* Conv: Conv2d (no bias) → BatchNorm2d → SiLU, padding k // 2 (the stem: 6×6, stride 2, padding 2);
* C3: two 1×1 branches of half width, one through n Bottlenecks (1×1 then 3×3, residual in the backbone),
  concatenated and fused by a 1×1;
* SPPF: 1×1 halving, three chained 5×5 max-pools, concatenated, 1×1;
* backbone (P1–P5), PANet neck, and Detect: a 1×1 Conv2d (with bias) per scale to 3 anchors × (80 + 5).

Width multiple 0.50 / 0.75 and depth multiple 0.33 / 0.67 for s / m: 7,235,389 and 21,190,557 parameters
at 80 classes. The loss is a stand-in (the mean square of every scale's output): optimizer state, weights
and gradients do not depend on it, and Table 1 prints nothing else.

Use: ``memprof compare --model reports/configs/yolov5.py:yolov5s --image-size 640``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

CLASSES = 80
ANCHORS = 3
SIZES = {"s": (0.50, 0.33), "m": (0.75, 0.67)}  # (width multiple, depth multiple)


class Conv(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, p: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2 if p is None else p, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1, self.cv2 = Conv(c, c, 1), Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    def __init__(self, c_in: int, c_out: int, n: int, shortcut: bool = True) -> None:
        super().__init__()
        hidden = c_out // 2
        self.cv1, self.cv2, self.cv3 = Conv(c_in, hidden), Conv(c_in, hidden), Conv(2 * hidden, c_out)
        self.m = nn.Sequential(*(Bottleneck(hidden, shortcut) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        hidden = c_in // 2
        self.cv1, self.cv2 = Conv(c_in, hidden), Conv(4 * hidden, c_out)
        self.m = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class YOLOv5(nn.Module):
    def __init__(self, width: float, depth: float) -> None:
        super().__init__()
        c = {k: math.ceil(k * width / 8) * 8 for k in (64, 128, 256, 512, 1024)}
        n = {k: max(round(k * depth), 1) for k in (3, 6, 9)}
        self.stem = nn.Sequential(Conv(3, c[64], 6, 2, 2), Conv(c[64], c[128], 3, 2), C3(c[128], c[128], n[3]))
        self.p3 = nn.Sequential(Conv(c[128], c[256], 3, 2), C3(c[256], c[256], n[6]))
        self.p4 = nn.Sequential(Conv(c[256], c[512], 3, 2), C3(c[512], c[512], n[9]))
        self.p5 = nn.Sequential(Conv(c[512], c[1024], 3, 2), C3(c[1024], c[1024], n[3]), SPPF(c[1024], c[1024]),
                                Conv(c[1024], c[512]))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top_down4 = nn.Sequential(C3(c[1024], c[512], n[3], False), Conv(c[512], c[256]))
        self.top_down3 = C3(c[512], c[256], n[3], False)
        self.down3 = Conv(c[256], c[256], 3, 2)
        self.bottom_up4 = C3(c[512], c[512], n[3], False)
        self.down4 = Conv(c[512], c[512], 3, 2)
        self.bottom_up5 = C3(c[1024], c[1024], n[3], False)
        self.detect = nn.ModuleList(nn.Conv2d(ch, ANCHORS * (CLASSES + 5), 1) for ch in (c[256], c[512], c[1024]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        h4 = self.top_down4(torch.cat((self.up(p5), p4), 1))
        out3 = self.top_down3(torch.cat((self.up(h4), p3), 1))
        out4 = self.bottom_up4(torch.cat((self.down3(out3), h4), 1))
        out5 = self.bottom_up5(torch.cat((self.down4(out4), p5), 1))
        return [head(y) for head, y in zip(self.detect, (out3, out4, out5))]


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(y.float().square().mean() for y in model(batch["input"]))


def _build(size: str, options):
    images = torch.randn(options.batch_size, 3, options.image_size, options.image_size,
                         generator=torch.Generator().manual_seed(0))
    return YOLOv5(*SIZES[size]), {"input": images}, _loss


def yolov5s(options):
    return _build("s", options)


def yolov5m(options):
    return _build("m", options)
