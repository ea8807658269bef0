"""The YOLOv5-style example model: shapes, scaling, block semantics, reproducible weights, decoding."""


import pytest
import torch
from torch import nn

from examples.yolov5 import model as yolo


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("hw", [(64, 64), (64, 96)])
def test_tiny_forward_shapes(hw):
    model = yolo.yolov5_tiny(nc=3).eval()
    h, w = hw
    outputs = model(torch.randn(2, 3, h, w))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, h // s, w // s, 8) for s in (8, 16, 32)]
    assert all(torch.isfinite(o).all() for o in outputs)


def test_width_and_depth_multiples():
    n, s, m = yolo.yolov5("n"), yolo.yolov5("s"), yolo.yolov5("m")
    assert [stage[0].conv.out_channels for stage in (n.backbone.stage1, n.backbone.stage4)] == [32, 256]
    assert s.backbone.stem.conv.out_channels == 32 and m.backbone.stem.conv.out_channels == 48
    assert [len(getattr(n.backbone, f"stage{i}")[1].m) for i in range(1, 5)] == [1, 2, 3, 1]
    assert [len(getattr(m.backbone, f"stage{i}")[1].m) for i in range(1, 5)] == [2, 4, 6, 2]
    assert n.backbone.stem.conv.kernel_size == (6, 6) and n.backbone.stem.conv.stride == (2, 2)
    assert 1.8e6 < sum(p.numel() for p in n.parameters()) < 2.0e6  # the published yolov5n has about 1.9M
    assert n.detect.m[0].out_channels == 3 * 85


def test_backbone_bottlenecks_add_and_neck_bottlenecks_do_not():
    model = yolo.yolov5_tiny()
    backbone = [b.add for b in model.backbone.modules() if isinstance(b, yolo.Bottleneck)]
    neck = [b.add for b in model.neck.modules() if isinstance(b, yolo.Bottleneck)]
    assert backbone == [True] * 7 and neck == [False] * 4
    assert _count(model.neck, yolo.Concat) == 4 and _count(model.neck, nn.Upsample) == 2


def test_bottleneck_forward():
    torch.manual_seed(1)
    x = torch.randn(1, 8, 5, 5)
    with_add = yolo.Bottleneck(8, 8).eval()
    assert torch.equal(with_add(x), x + with_add.cv2(with_add.cv1(x)))
    for block in (yolo.Bottleneck(8, 8, shortcut=False), yolo.Bottleneck(8, 16)):
        block.eval()
        assert not block.add
        assert torch.equal(block(x), block.cv2(block.cv1(x)))


def test_sppf_chain_is_spp_5_9_13():
    """Chained 5x5 stride-1 pools equal 9x9 and 13x13 pools: SPPF computes what SPP(5, 9, 13) does."""
    sppf = yolo.SPPF(16, 16).eval()
    x = torch.randn(1, 8, 7, 7)
    once, twice, thrice = sppf.m(x), sppf.m(sppf.m(x)), sppf.m(sppf.m(sppf.m(x)))
    assert torch.equal(once, nn.functional.max_pool2d(x, 5, 1, 2))
    assert torch.equal(twice, nn.functional.max_pool2d(x, 9, 1, 4))
    assert torch.equal(thrice, nn.functional.max_pool2d(x, 13, 1, 6))
    y = sppf.cv1(torch.randn(1, 16, 7, 7))
    assert sppf.cv2.conv.in_channels == 4 * y.shape[1]


def test_c3_forward():
    c3 = yolo.C3(8, 16, n=2).eval()
    x = torch.randn(1, 8, 6, 6)
    assert torch.equal(c3(x), c3.cv3(torch.cat([c3.m(c3.cv1(x)), c3.cv2(x)], 1)))


def test_neck_concats_are_used():
    model = yolo.yolov5_tiny().eval()
    calls = []
    for m in model.modules():
        if isinstance(m, yolo.Concat):
            m.register_forward_hook(lambda mod, inp, out: calls.append((len(inp[0]), out.shape[1])))
    model(torch.randn(1, 3, 64, 64))
    assert len(calls) == 4 and all(n == 2 for n, _ in calls)


def test_seeded_weights_are_reproducible_whatever_the_global_seed():
    torch.manual_seed(1)
    a = yolo.yolov5_tiny(seed=0)
    torch.manual_seed(2)
    b, c = yolo.yolov5_tiny(seed=0), yolo.yolov5_tiny(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["backbone.stem.conv.weight"], sc["backbone.stem.conv.weight"])
    assert not torch.equal(sa["backbone.stem.bn.running_var"], torch.ones_like(sa["backbone.stem.bn.running_var"]))


def test_init_weights_leaves_the_global_generator_alone():
    model = yolo.yolov5_tiny(seed=None)
    before = torch.get_rng_state()
    yolo.init_weights(model, seed=3)
    assert torch.equal(torch.get_rng_state(), before)


def test_decode_cell_centres_and_anchors():
    model = yolo.yolov5_tiny(nc=2)
    raw = [torch.zeros(1, 3, n, n, 7) for n in (8, 4, 2)]  # sigmoid(0) = 0.5: centre of the cell, w, h = anchor
    boxes = model.detect.decode(raw)
    assert boxes.shape == (1, 3 * (64 + 16 + 4), 7)
    p3 = boxes[0, :64 * 3].view(3, 8, 8, 7)
    assert torch.equal(p3[0, 2, 5, :2], torch.tensor([(5 + 0.5) * 8, (2 + 0.5) * 8]))
    assert torch.equal(p3[1, 0, 0, 2:4], torch.tensor([16.0, 30.0]))
    assert torch.equal(boxes[0, -1, 2:4], torch.tensor([373.0, 326.0]))
    assert torch.all(boxes[..., 4:] == 0.5)
    with pytest.raises(ValueError, match="expects 3 outputs"):
        model.detect.decode(raw[:2])


def test_train_step_backward():
    model = yolo.yolov5_tiny().train()
    sum(o.square().mean() for o in model(torch.randn(2, 3, 64, 64))).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.backbone.stem.conv.weight.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown YOLOv5 size"):
        yolo.yolov5("q")
    with pytest.raises(ValueError, match="width"):
        yolo.YOLOv5(width=0)
