"""A YOLOv5-style detector in plain PyTorch: the model the YOLOv5 recipes of :mod:`qdq.rules.yolov5` work on.

The model has the YOLOv5 (v6) layout: a CSP backbone of ``Conv`` and ``C3`` stages ending in ``SPPF``, a PANet neck
(nearest upsampling, concatenations with backbone features, ``C3`` blocks without shortcut) and a ``Detect`` head
with one 1x1 convolution per scale (strides 8, 16 and 32). ``width`` and ``depth`` scale the channels and the
number of bottlenecks per ``C3`` as the n/s/m/l/x sizes do (:data:`SCALES`).

The float model writes its adds and concatenations the plain way (``x + y`` and ``torch.cat``); the recipes give
the blocks a forward through :class:`~qdq.nn.QuantAdd` / :class:`~qdq.nn.QuantConcat`. The neck's concatenations are
:class:`Concat` modules rather than inline ``torch.cat`` calls so that they too are modules a recipe can reach.

The forward returns the raw head outputs, one ``(batch, anchors, ny, nx, nc + 5)`` tensor per scale; boxes come
from :meth:`Detect.decode` (no non-maximum suppression here).

Example:
    >>> import torch
    >>> model = yolov5_tiny(nc=3).eval()
    >>> outputs = model(torch.randn(1, 3, 64, 64))
    >>> [tuple(o.shape) for o in outputs]
    [(1, 3, 8, 8, 8), (1, 3, 4, 4, 8), (1, 3, 2, 2, 8)]
    >>> model.detect.decode(outputs).shape          # (batch, boxes, xywh + objectness + classes)
    torch.Size([1, 252, 8])
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
from torch import nn

__all__ = [
    "Conv",
    "Bottleneck",
    "C3",
    "SPPF",
    "Concat",
    "Backbone",
    "Neck",
    "Detect",
    "YOLOv5",
    "SCALES",
    "ANCHORS",
    "make_divisible",
    "init_weights",
    "yolov5",
    "yolov5_tiny",
]

logger = logging.getLogger(__name__)

#: ``{size: (depth multiple, width multiple)}`` of the YOLOv5 model sizes.
SCALES: dict[str, tuple[float, float]] = {
    "n": (0.33, 0.25),
    "s": (0.33, 0.50),
    "m": (0.67, 0.75),
    "l": (1.00, 1.00),
    "x": (1.33, 1.25),
}

#: Anchor (width, height) pairs in pixels per output scale (strides 8, 16, 32), as trained on COCO at 640x640.
ANCHORS: tuple[tuple[tuple[float, float], ...], ...] = (
    ((10, 13), (16, 30), (33, 23)),
    ((30, 61), (62, 45), (59, 119)),
    ((116, 90), (156, 198), (373, 326)),
)


def make_divisible(x: float, divisor: int = 8) -> int:
    """The smallest multiple of ``divisor`` that is at least ``x`` (channel counts after the width multiple).

    >>> make_divisible(64 * 0.25), make_divisible(1024 * 0.33)
    (16, 344)
    """
    return int(math.ceil(x / divisor) * divisor)


def _repeats(n: int, depth: float) -> int:
    return max(round(n * depth), 1) if n > 1 else n


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + SiLU, with "same" padding for odd kernels.

    Args:
        c1: input channels.
        c2: output channels.
        k: kernel size.
        s: stride.
        p: padding (default ``k // 2``).
        g: groups.
    """

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 conv then 3x3 conv, with a residual add when ``add`` (shortcut asked for and ``c1 == c2``).

    Args:
        c1: input channels.
        c2: output channels.
        shortcut: add the input to the output (only possible when ``c1 == c2``).
        g: groups of the 3x3 conv.
        e: hidden channels as a fraction of ``c2``.
    """

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 1.0):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = bool(shortcut and c1 == c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C3(nn.Module):
    """CSP block: ``cv3(cat(m(cv1(x)), cv2(x)))`` with ``n`` bottlenecks in ``m``.

    Args:
        c1: input channels.
        c2: output channels.
        n: number of bottlenecks.
        shortcut: whether the bottlenecks add their input (the backbone's do, the neck's do not).
        g: groups of the bottlenecks' 3x3 convs.
        e: hidden channels as a fraction of ``c2``.
    """

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: one ``k x k`` max pool applied three times in a chain, four tensors concatenated.

    Args:
        c1: input channels.
        c2: output channels.
        k: pooling kernel (stride 1, padding ``k // 2``: the spatial size is kept).
    """

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Concat(nn.Module):
    """``torch.cat`` of a list of tensors along ``d``, as a module (so a recipe can give it a quantizer).

    >>> Concat(1)([torch.ones(1, 2, 4, 4), torch.ones(1, 3, 4, 4)]).shape
    torch.Size([1, 5, 4, 4])
    """

    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, x: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)

    def extra_repr(self) -> str:
        return f"d={self.d}"


class Backbone(nn.Module):
    """Stem (6x6/2 conv), four ``Conv 3x3/2 + C3`` stages and SPPF; returns the stride 8, 16 and 32 features.

    Args:
        ch: channels of the stem and of the four stages (five values).
        n: bottlenecks per stage's C3 (four values).
        in_channels: image channels.
    """

    def __init__(self, ch: Sequence[int], n: Sequence[int], in_channels: int = 3):
        super().__init__()
        self.stem = Conv(in_channels, ch[0], 6, 2, 2)
        self.stage1 = nn.Sequential(Conv(ch[0], ch[1], 3, 2), C3(ch[1], ch[1], n[0]))
        self.stage2 = nn.Sequential(Conv(ch[1], ch[2], 3, 2), C3(ch[2], ch[2], n[1]))
        self.stage3 = nn.Sequential(Conv(ch[2], ch[3], 3, 2), C3(ch[3], ch[3], n[2]))
        self.stage4 = nn.Sequential(Conv(ch[3], ch[4], 3, 2), C3(ch[4], ch[4], n[3]))
        self.sppf = SPPF(ch[4], ch[4], 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stage1(self.stem(x))
        c3 = self.stage2(x)
        c4 = self.stage3(c3)
        c5 = self.sppf(self.stage4(c4))
        return c3, c4, c5


class Neck(nn.Module):
    """PANet: a top-down path (1x1 conv, nearest 2x upsampling, concat, C3) then a bottom-up path (3x3/2 conv,
    concat, C3). Each concatenation is its own :class:`Concat` module.

    Args:
        ch: channels of the stride 8, 16 and 32 backbone features (three values).
        n: bottlenecks per C3.
    """

    def __init__(self, ch: Sequence[int], n: int):
        super().__init__()
        c3, c4, c5 = ch
        self.reduce5 = Conv(c5, c4, 1, 1)
        self.up5 = nn.Upsample(scale_factor=2, mode="nearest")
        self.cat_up4 = Concat(1)
        self.c3_up4 = C3(2 * c4, c4, n, shortcut=False)
        self.reduce4 = Conv(c4, c3, 1, 1)
        self.up4 = nn.Upsample(scale_factor=2, mode="nearest")
        self.cat_up3 = Concat(1)
        self.c3_out3 = C3(2 * c3, c3, n, shortcut=False)
        self.down3 = Conv(c3, c3, 3, 2)
        self.cat_down4 = Concat(1)
        self.c3_out4 = C3(2 * c3, c4, n, shortcut=False)
        self.down4 = Conv(c4, c4, 3, 2)
        self.cat_down5 = Concat(1)
        self.c3_out5 = C3(2 * c4, c5, n, shortcut=False)

    def forward(self, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor) -> list[torch.Tensor]:
        p5 = self.reduce5(c5)
        p4 = self.reduce4(self.c3_up4(self.cat_up4([self.up5(p5), c4])))
        out3 = self.c3_out3(self.cat_up3([self.up4(p4), c3]))
        out4 = self.c3_out4(self.cat_down4([self.down3(out3), p4]))
        out5 = self.c3_out5(self.cat_down5([self.down4(out4), p5]))
        return [out3, out4, out5]


class Detect(nn.Module):
    """One 1x1 conv per scale giving ``na * (nc + 5)`` channels: box (4), objectness (1) and class scores (nc).

    Args:
        nc: number of classes.
        ch: input channels per scale.
        anchors: anchor (w, h) pairs in pixels per scale (default :data:`ANCHORS`).
        strides: the stride of each scale.
    """

    def __init__(
        self,
        nc: int,
        ch: Sequence[int],
        anchors: Sequence[Sequence[Sequence[float]]] = ANCHORS,
        strides: Sequence[int] = (8, 16, 32),
    ):
        super().__init__()
        if not len(ch) == len(anchors) == len(strides):
            raise ValueError(f"Detect: {len(ch)} scales of channels, {len(anchors)} of anchors, {len(strides)} strides")
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0])
        self.m = nn.ModuleList(nn.Conv2d(c, self.na * self.no, 1) for c in ch)
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32), persistent=False)
        self.register_buffer("stride", torch.tensor(strides, dtype=torch.float32), persistent=False)

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for conv, x in zip(self.m, xs):
            y = conv(x)
            bs, _, ny, nx = y.shape
            out.append(y.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous())
        return out

    def decode(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Boxes in input pixels from the raw outputs: ``(batch, boxes, 4 + 1 + nc)`` with ``xywh``, objectness and
        class probabilities (sigmoids), YOLOv5 v6 style: ``xy = (2 s - 0.5 + cell) * stride`` and
        ``wh = (2 s)^2 * anchor`` with ``s`` the sigmoid of the raw value.
        """
        if len(outputs) != self.nl:
            raise ValueError(f"Detect.decode expects {self.nl} outputs, got {len(outputs)}")
        boxes = []
        for i, y in enumerate(outputs):
            bs, na, ny, nx, no = y.shape
            yv, xv = torch.meshgrid(torch.arange(ny, device=y.device), torch.arange(nx, device=y.device), indexing="ij")
            grid = torch.stack((xv, yv), -1).to(y.dtype).view(1, 1, ny, nx, 2)
            anchor = self.anchors[i].to(y.dtype).view(1, na, 1, 1, 2)
            s = y.sigmoid()
            xy = (s[..., :2] * 2 - 0.5 + grid) * self.stride[i].to(y.dtype)
            wh = (s[..., 2:4] * 2) ** 2 * anchor
            boxes.append(torch.cat((xy, wh, s[..., 4:]), -1).view(bs, -1, no))
        return torch.cat(boxes, 1)


class YOLOv5(nn.Module):
    """The detector: :class:`Backbone`, :class:`Neck` and :class:`Detect`.

    Args:
        nc: number of classes.
        width: channel multiple (0.25 for the n size, 0.5 for s, see :data:`SCALES`).
        depth: bottleneck-count multiple (0.33 for n and s).
        in_channels: image channels.
        seed: with an int, weights come from :func:`init_weights` with that seed (reproducible); ``None`` keeps
            PyTorch's default initialisation from the global generator.
    """

    def __init__(
        self,
        nc: int = 80,
        width: float = 0.25,
        depth: float = 0.33,
        in_channels: int = 3,
        seed: int | None = None,
    ):
        super().__init__()
        if nc < 1 or width <= 0 or depth <= 0:
            raise ValueError(f"YOLOv5: nc must be >= 1 and width, depth > 0; got nc={nc}, width={width}, depth={depth}")
        ch = [make_divisible(c * width) for c in (64, 128, 256, 512, 1024)]
        n = [_repeats(k, depth) for k in (3, 6, 9, 3)]
        self.nc, self.width, self.depth = nc, width, depth
        self.backbone = Backbone(ch, n, in_channels)
        self.neck = Neck(ch[2:], _repeats(3, depth))
        self.detect = Detect(nc, ch[2:])
        if seed is not None:
            init_weights(self, seed)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.detect(self.neck(*self.backbone(x)))


def init_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Reproducible random weights (from a private generator; the global one is untouched), in place.

    Convolutions get He-normal weights; batch norms get weights near 1, small biases and running statistics that
    are not the identity, so that a test exercises the folded arithmetic of an eval-mode model.

    >>> a, b = init_weights(Conv(3, 4, 3), seed=1), init_weights(Conv(3, 4, 3), seed=1)
    >>> torch.equal(a.conv.weight, b.conv.weight), torch.equal(a.bn.running_var, b.bn.running_var)
    (True, True)
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return torch.rand(t.shape, generator=gen) * (high - low) + low

    convs = norms = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                convs += 1
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(rand(m.bias, -0.1, 0.1))
            elif isinstance(m, nn.BatchNorm2d):
                norms += 1
                m.weight.copy_(rand(m.weight, 0.5, 1.5))
                m.bias.copy_(rand(m.bias, -0.1, 0.1))
                m.running_mean.copy_(rand(m.running_mean, -0.1, 0.1))
                m.running_var.copy_(rand(m.running_var, 0.5, 1.5))
    logger.debug("init_weights(seed=%d): %d convolutions, %d batch norms", seed, convs, norms)
    return model


def yolov5(size: str = "n", nc: int = 80, seed: int | None = None) -> YOLOv5:
    """A model of one of the YOLOv5 sizes (``"n"``, ``"s"``, ``"m"``, ``"l"``, ``"x"``).

    >>> yolov5("s").backbone.stem.conv.out_channels
    32
    """
    if size not in SCALES:
        raise ValueError(f"unknown YOLOv5 size {size!r}; choose one of {', '.join(SCALES)}")
    depth, width = SCALES[size]
    return YOLOv5(nc=nc, width=width, depth=depth, seed=seed)


def yolov5_tiny(nc: int = 3, seed: int | None = 0) -> YOLOv5:
    """A very small model for tests: channels 8 to 128, the n/s depth (C3 bottlenecks 1, 2, 3, 1; neck 1).

    >>> model = yolov5_tiny()
    >>> sum(p.numel() for p in model.parameters()) < 500_000
    True
    """
    return YOLOv5(nc=nc, width=0.125, depth=0.33, seed=seed)
