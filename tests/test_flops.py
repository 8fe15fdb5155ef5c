"""count_flops: exact FLOPs/params of torchvision ResNets against an independent count from the layer shapes,
decomposed blocks counted as two convs, the detector's per-part report, float32/float64 models."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck

from edp_det import count_flops, iter_blocks

from _core_helpers import DET_KW, cached, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _out(size: int, conv) -> int:
    k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_flops(conv, size: int) -> tuple[int, int]:
    """(FLOPs = 2·MACs, output size) of one conv on a square input of side ``size``."""
    o = _out(size, conv)
    kh, kw = conv.kernel_size
    return 2 * o * o * conv.out_channels * conv.in_channels * kh * kw, o


def resnet_flops_by_hand(model: torchvision.models.ResNet, size: int, with_fc: bool = True) -> int:
    """Walk the ResNet's layer shapes (square input): stem conv, 3×3/s2 max-pool, blocks, fc."""
    total, s = _conv_flops(model.conv1, size)
    mp = model.maxpool
    s = (s + 2 * mp.padding - mp.kernel_size) // mp.stride + 1
    for li in range(1, 5):
        for block in getattr(model, f"layer{li}"):
            convs = [block.conv1, block.conv2] + ([block.conv3] if isinstance(block, Bottleneck) else [])
            t = s
            for c in convs:
                f, t = _conv_flops(c, t)
                total += f
            if block.downsample is not None:
                total += _conv_flops(block.downsample[0], s)[0]
            s = t
    if with_fc:
        total += 2 * model.fc.in_features * model.fc.out_features
    return total


@functools.lru_cache(maxsize=None)
def _tv(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()     # shared: read-only use


# Published multiply-add counts at 224²: ResNet-50 4.09 GMACs, ResNet-18 1.82 GMACs (the "1.8 GFLOPs" usually
# quoted for ResNet-18 is MACs). Our convention is FLOPs = 2·MACs: 8.18 G and 3.63 G.
@pytest.mark.parametrize("name,gmacs,params", [("resnet50", 4.09, 25_557_032), ("resnet18", 1.82, 11_689_512)])
def test_resnet_flops_and_params_at_224(name, gmacs, params):
    model = _tv(name)
    report = count_flops(model, input_size=(3, 224, 224))
    by_hand = resnet_flops_by_hand(model, 224)
    assert report.flops == by_hand
    assert report.flops == pytest.approx(2 * gmacs * 1e9, rel=5e-3)
    assert report.params == params == sum(p.numel() for p in model.parameters())
    assert report.gflops == report.flops / 1e9
    # only conv and linear layers are counted
    assert {m.kind for m in report.modules} == {"conv", "linear"}
    assert len([m for m in report.modules if m.kind == "conv"]) == len(
        [m for m in model.modules() if isinstance(m, nn.Conv2d)])
    assert report.module("fc").flops == 2 * 512 * (4 if name == "resnet50" else 1) * 1000
    assert report.module("conv1").flops == 2 * 112 * 112 * 64 * 3 * 49
    assert report.input_size == (3, 224, 224)


@pytest.mark.parametrize("name,flops", [("resnet50", 8_178_368_512), ("resnet18", 3_628_146_688)])
def test_exact_pins_at_224(name, flops):
    """The exact integers the hand count gives (4,089,184,256 and 1,814,073,344 MACs), pinned so that a change of
    either count is noticed."""
    assert resnet_flops_by_hand(_tv(name), 224) == flops
    assert count_flops(_tv(name), input_size=(3, 224, 224)).flops == flops


def test_decomposed_full_rank_block_counts_as_two_convs():
    original, model = cached("resnet18", dtype=torch.float32, num_classes=10)
    before = count_flops(original, input_size=(3, 48, 48))
    after = count_flops(model, input_size=(3, 48, 48))
    assert before.flops == resnet_flops_by_hand(original, 48)
    blocks = dict(iter_blocks(model))
    assert {m.name for m in after.modules if m.kind == "edp_block"} == set(blocks)
    assert not any(m.name.endswith((".basis", ".coeff")) for m in after.modules)   # not double counted
    expected_total = 0
    for m in after.modules:
        if m.kind != "edp_block":
            assert m.flops == before.module(m.name).flops
            expected_total += m.flops
            continue
        b = blocks[m.name]
        conv = original.get_submodule(m.name)
        kk = conv.kernel_size[0] * conv.kernel_size[1]
        pos = before.module(m.name).positions
        r = min(conv.out_channels, conv.in_channels * kk)
        assert m.rank == b.rank == r
        assert m.flops == 2 * pos * r * (conv.in_channels * kk + conv.out_channels)     # θ' then β
        assert m.orig_flops == before.module(m.name).flops
        assert m.params == b.basis.weight.numel() + b.coeff.weight.numel()
        expected_total += m.flops
    assert after.flops == expected_total > before.flops
    assert after.original_flops_under("") == before.flops
    assert after.params == sum(p.numel() for p in model.parameters())
    # 1×1 128→256 stride-2 downsample: r = min(256, 128) = 128, two convs cost 2·pos·128·(128 + 256)
    m, conv = after.module("layer3.0.downsample.0"), before.module("layer3.0.downsample.0")
    assert m.rank == 128 and m.flops == 2 * conv.positions * 128 * 384 == conv.flops * 384 // 256


def test_detector_report_parts():
    det, _ = cached("fasterrcnn", decompose_kw={"scope": "detector"}, **DET_KW)   # the undecomposed (float64) one
    assert det.backbone.body.conv1.weight.dtype == torch.float64
    report = count_flops(det, input_size=(3, 64, 64))
    assert set(report.parts) == {"backbone.body", "backbone.fpn", "rpn", "roi_heads"}
    assert sum(p["flops"] for p in report.parts.values()) == report.flops
    for part, d in report.parts.items():
        assert d["params"] == sum(p.numel() for p in det.get_submodule(part).parameters())
    # body = the classifier ResNet-50's convs at the same input (no fc)
    cls = _tv("resnet50")
    cls_report = count_flops(cls, input_size=(3, 64, 64))
    assert report.parts["backbone.body"]["flops"] == cls_report.flops - cls_report.module("fc").flops \
        == resnet_flops_by_hand(cls, 64, with_fc=False)
    # FPN levels at strides 4..32 of a 64×64 input: 16², 8², 4², 2² positions; inner 1×1 + layer 3×3 convs
    pos = [16 * 16, 8 * 8, 4 * 4, 2 * 2]
    c_in = [256, 512, 1024, 2048]
    assert report.parts["backbone.fpn"]["flops"] == sum(2 * p * (c * 256 + 256 * 256 * 9) for p, c in zip(pos, c_in))
    # RPN head on every level incl. the max-pooled 1×1 one: 3×3 conv + objectness (3 anchors) + 12 box deltas
    n_pos = sum(pos) + 1
    assert report.parts["rpn"]["flops"] == 2 * n_pos * (256 * 256 * 9 + 256 * 3 + 256 * 12)
    # box head on rpn_post_nms_top_n_test proposals: fc6, fc7, cls (3 classes), bbox (12)
    n = DET_KW["rpn_post_nms_top_n_test"]
    assert report.parts["roi_heads"]["flops"] == 2 * n * (256 * 7 * 7 * 1024 + 1024 * 1024 + 1024 * 3 + 1024 * 12)


def test_float32_and_float64_models_give_the_same_count():
    m32 = torchvision.models.resnet18(weights=None, num_classes=10)
    m64 = copy.deepcopy(m32).double()
    r32 = count_flops(m32, input_size=(3, 40, 40))
    r64 = count_flops(m64, input_size=(3, 40, 40))
    assert r32.flops == r64.flops == resnet_flops_by_hand(m32, 40) and r32.params == r64.params
    assert m64.fc.weight.dtype == torch.float64                    # the model was not converted
    x = torch.zeros(2, 3, 40, 40, dtype=torch.float64)
    r_ex = count_flops(m64, example_inputs=x)                         # batch 2: FLOPs of the batch
    assert r_ex.flops == 2 * r64.flops
    _, dec64 = cached("resnet18", num_classes=10)
    assert count_flops(dec64, input_size=(3, 40, 40)).original_flops_under("") == r64.flops


def test_count_flops_restores_training_mode_and_rejects_bad_size():
    m = torchvision.models.resnet18(weights=None, num_classes=10).train()
    count_flops(m, input_size=(3, 32, 32))
    assert m.training and m.layer1[0].bn1.training
    assert all(not mod._forward_hooks for mod in m.modules())
    for bad in [(32, 32), (3, 0, 32), (3, 32.0, 32)]:
        with pytest.raises(ValueError):
            count_flops(m, input_size=bad)


def test_flops_cut_is_one_rounding_and_cut_reaches_is_exact():
    """``1 - after/original`` rounds twice and can land one ulp below a target the exact cut reaches;
    :func:`flops_cut` (one division of integers) never does, and :func:`cut_reaches` compares exactly."""
    from fractions import Fraction

    from edp_det.ops.flops import cut_reaches, flops_cut

    orig, after = 79615774, 77601456
    target = flops_cut(orig, after)
    assert Fraction(orig - after, orig) >= Fraction(target) and cut_reaches(orig, after, target)
    assert 1 - after / orig < target                       # the double rounding undershoots here
    assert not cut_reaches(orig, after + 1, target) and cut_reaches(orig, after - 1, target)
    assert cut_reaches(4, 3, 0.25) and not cut_reaches(4, 3, 0.25000000000000006)
    assert not cut_reaches(10, 6, 0.4)                     # the float 0.4 is slightly above 2/5
    with pytest.raises(ValueError, match="positive"):
        flops_cut(0, 0)
