"""The detector/backbone adapter: where the ResNet body, FPN and RPN live and what a scope covers, on Faster R-CNN
v1 and v2 and on a ResNet classifier."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from edp_det.models import build_model
from edp_det.ops import adapter
from edp_det.ops.graph import build_channel_graph

from _core_helpers import DET_KW, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def _model(kind: str) -> nn.Module:
    if kind == "resnet18":
        return build_model("resnet18", num_classes=10)
    if kind == "v1":
        return build_model("fasterrcnn", depth=18, norm="bn", **DET_KW)
    return build_model("fasterrcnn", depth=50, v2=True, **DET_KW)


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_detector_parts_and_prefixes(kind):
    det = _model(kind)
    assert adapter.is_detector(det) and adapter.is_detector(nn.DataParallel(det))
    prefix, body = adapter.find_resnet_body(det)
    assert prefix == "backbone.body." == adapter.BODY_PREFIX and body is det.backbone.body
    assert adapter.body_of(det) is det.backbone.body
    assert adapter.DETECTOR_PARTS == ("backbone.body", "backbone.fpn", "rpn", "roi_heads")
    for part in adapter.DETECTOR_PARTS:
        det.get_submodule(part)                     # every named part exists

    back = [n.name for n in build_channel_graph(det, scope="backbone")]
    full = [n.name for n in build_channel_graph(det, scope="detector")]
    assert back and all(n.startswith("backbone.body.") for n in back)
    extra = [n for n in full if n not in back]
    assert extra and all(n.startswith(("backbone.fpn.", "rpn.head.conv.")) for n in extra)
    assert any(n.startswith("rpn.head.conv.") for n in extra) and any(n.startswith("backbone.fpn.") for n in extra)
    assert [p for p, _ in adapter.scope_extra_modules(det)] == ["backbone.fpn.", "rpn.head.conv."]

    assert adapter.scope_prefixes(det, back) == ["backbone.body"]
    assert adapter.scope_prefixes(det, full) == ["backbone.body", "backbone.fpn", "rpn"]
    assert adapter.scope_of(det, back) == "backbone" and adapter.scope_of(det, full) == "detector"
    assert all(adapter.in_scope(n, adapter.scope_prefixes(det, full)) for n in full)
    assert not adapter.in_scope("roi_heads.box_head.fc6", adapter.scope_prefixes(det, full))
    assert not any(adapter.in_scope(n, ["backbone.body"]) for n in extra)


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_body_input_is_what_the_body_sees(kind):
    det = _model(kind).eval()
    img = torch.rand(3, 50, 70)
    x = adapter.body_input(det, [img])
    assert x.shape[:2] == (1, 3) and x.shape[-1] % 32 == 0
    seen = {}
    h = det.backbone.body.register_forward_pre_hook(lambda m, inp: seen.setdefault("x", inp[0]))
    try:
        with torch.no_grad():
            det([img])
    finally:
        h.remove()
    torch.testing.assert_close(seen["x"], x, rtol=0, atol=0)


def test_classifier():
    cls = _model("resnet18")
    assert not adapter.is_detector(cls)
    assert adapter.find_resnet_body(cls) == ("", cls)
    assert adapter.body_of(cls) is cls
    names = [n.name for n in build_channel_graph(cls, scope="backbone")]
    assert names[0] == "conv1" and adapter.scope_prefixes(cls, names) == [""]
    assert adapter.scope_of(cls, names) == "backbone"
    assert all(adapter.in_scope(n, [""]) for n in names + ["fc"])
    x = torch.rand(2, 3, 8, 8)
    assert adapter.body_input(cls, x) is x
    with pytest.raises(ValueError, match="needs a detector"):
        build_channel_graph(cls, scope="detector")
    with pytest.raises(TypeError, match="unsupported model Sequential"):
        adapter.find_resnet_body(nn.Sequential(nn.Conv2d(3, 3, 1)))
    with pytest.raises(ValueError, match="scope must be"):
        adapter.check_scope("fpn")


def test_under():
    assert adapter.under("layer1.0.conv1", "") and adapter.under("layer1", "layer1")
    assert adapter.under("layer1.0", "layer1") and not adapter.under("layer10.0", "layer1")
    assert adapter.under("layer1.0", "layer1.") and not adapter.under("layer1", "layer1.")
    assert adapter.short_body_name("backbone.body.layer1.0.conv1") == "layer1.0.conv1"
    assert adapter.short_body_name("rpn.head.conv.0.0") == "rpn.head.conv.0.0"
