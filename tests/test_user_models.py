"""save_compressed / load_compressed on models the user built with torchvision directly (no ``arch=``): Faster R-CNN
v1 and v2 and a ResNet classifier, before and after decompose + prune_and_merge; incomplete and contradicting
``arch`` arguments."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models.detection import fasterrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn_v2

import edp_det
from edp_det.deploy.serialization import FORMAT

from _core_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

# small, fast, non-default settings everywhere: a rebuild from defaults would differ in each of them
USER_KW = dict(weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=80,
               image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], rpn_pre_nms_top_n_test=150,
               rpn_post_nms_top_n_test=40, rpn_nms_thresh=0.65, rpn_score_thresh=0.01, rpn_fg_iou_thresh=0.6,
               rpn_bg_iou_thresh=0.25, rpn_batch_size_per_image=128, box_score_thresh=0.0, box_nms_thresh=0.45,
               box_detections_per_img=30, box_fg_iou_thresh=0.55, box_bg_iou_thresh=0.45,
               box_batch_size_per_image=256, box_positive_fraction=0.3)


def _image():
    return torch.rand(3, 60, 75, generator=torch.Generator().manual_seed(4))


def _assert_same(model, loaded, x, detector=True):
    sa, sb = model.state_dict(), loaded.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    model.eval()
    assert not loaded.training
    with torch.no_grad():
        if not detector:
            assert torch.equal(model(x), loaded(x))
            return
        a, b = model([x])[0], loaded([x])[0]
    assert a["boxes"].shape[0] > 0        # box_score_thresh=0: the comparison covers real detections
    for k in ("boxes", "scores", "labels"):
        assert torch.equal(a[k], b[k]), k


def _settings(m):
    rpn, rh, t = m.rpn, m.roi_heads, m.transform
    return (t.min_size, t.max_size, list(t.image_mean), list(t.image_std), dict(rpn._pre_nms_top_n),
            dict(rpn._post_nms_top_n), rpn.nms_thresh, rpn.score_thresh, rpn.proposal_matcher.high_threshold,
            rpn.proposal_matcher.low_threshold, rpn.fg_bg_sampler.batch_size_per_image, rh.score_thresh,
            rh.nms_thresh, rh.detections_per_img, rh.proposal_matcher.high_threshold,
            rh.proposal_matcher.low_threshold, rh.fg_bg_sampler.batch_size_per_image,
            rh.fg_bg_sampler.positive_fraction, rpn.anchor_generator.sizes, rpn.anchor_generator.aspect_ratios,
            type(rh.box_head).__name__, type(m.backbone.body.bn1).__name__)


@pytest.mark.parametrize("builder", [fasterrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn_v2], ids=["v1", "v2"])
def test_user_built_faster_rcnn_round_trip_without_arch(builder, tmp_path):
    torch.manual_seed(0)
    model = builder(**USER_KW)
    path = edp_det.save_compressed(model, tmp_path / "user.pt")
    loaded = edp_det.load_compressed(path)
    assert _settings(loaded) == _settings(model)
    _assert_same(model, loaded, _image())
    assert torch.load(path, weights_only=True)["format"] == FORMAT


def test_user_built_faster_rcnn_custom_anchors_round_trip(tmp_path):
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.faster_rcnn import FasterRCNN

    torch.manual_seed(1)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, returned_layers=[2, 3, 4],
                                   trainable_layers=3)
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0, 3.0),) * 4)
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign
    model = FasterRCNN(backbone, num_classes=5, min_size=64, max_size=64, rpn_anchor_generator=anchors,
                       rpn_head=RPNHead(256, 4), box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], 7, 2),
                       box_score_thresh=0.0)
    loaded = edp_det.load_compressed(edp_det.save_compressed(model, tmp_path / "a.pt"))
    assert _settings(loaded) == _settings(model)
    _assert_same(model, loaded, _image())


def test_user_built_resnet_classifier_round_trip(tmp_path):
    torch.manual_seed(2)
    model = torchvision.models.resnet18(num_classes=7)
    loaded = edp_det.load_compressed(edp_det.save_compressed(model, tmp_path / "r.pt"))
    assert loaded.fc.out_features == 7
    _assert_same(model, loaded, torch.rand(2, 3, 40, 40), detector=False)


def test_user_built_faster_rcnn_after_decompose_and_pm(tmp_path):
    torch.manual_seed(3)
    model = fasterrcnn_resnet50_fpn(**USER_KW)
    edp_det.decompose(model, init="identity")
    edp_det.prune_and_merge(model, flops_target=0.4, input_size=(3, 64, 64))
    loaded = edp_det.load_compressed(edp_det.save_compressed(model, tmp_path / "pm.pt"))
    assert _settings(loaded) == _settings(model)
    assert {n: type(m) for n, m in loaded.named_modules()} == {n: type(m) for n, m in model.named_modules()}
    _assert_same(model, loaded, _image())


def test_incomplete_arch_is_completed_and_contradictions_are_rejected(tmp_path):
    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(**USER_KW)
    for arch in ({"num_classes": 3}, {"name": "fasterrcnn", "kwargs": {"num_classes": 3}}):
        loaded = edp_det.load_compressed(edp_det.save_compressed(model, tmp_path / "c.pt", arch=arch))
        assert loaded.transform.min_size == (64,) and _settings(loaded) == _settings(model)
    for arch, field in (({"num_classes": 3, "min_size": 800}, "min_size"), ({"num_classes": 9}, "num_classes")):
        with pytest.raises(ValueError, match=field) as ei:
            edp_det.save_compressed(model, tmp_path / "x.pt", arch=arch)
        assert "contradicts" in str(ei.value)
    with pytest.raises(ValueError, match="rebuild this model"):   # another builder: structure differs
        edp_det.save_compressed(model, tmp_path / "x.pt", arch={"name": "resnet50", "kwargs": {}})
    assert not (tmp_path / "x.pt").exists()


def test_model_changed_after_build_model_is_saved_as_it_is(tmp_path):
    """The build_model stamp records how the model was built; a setting changed afterwards is what is saved."""
    torch.manual_seed(0)
    model = edp_det.build_model("fasterrcnn", num_classes=3, depth=18, norm="bn", min_size=64, max_size=64,
                                rpn_post_nms_top_n_test=40)
    model.roi_heads.score_thresh = 0.0
    model.roi_heads.detections_per_img = 17
    loaded = edp_det.load_compressed(edp_det.save_compressed(model, tmp_path / "m.pt"))
    assert loaded.roi_heads.score_thresh == 0.0 and loaded.roi_heads.detections_per_img == 17
    _assert_same(model, loaded, _image())


def test_undescribable_detector_is_refused_before_writing(tmp_path):
    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(**USER_KW)
    model.roi_heads.box_roi_pool.sampling_ratio = 0
    with pytest.raises(ValueError, match="box_roi_pool"):
        edp_det.save_compressed(model, tmp_path / "n.pt")
    assert not (tmp_path / "n.pt").exists()


class _UserObject:
    def __init__(self):
        self.x = 1


def _user_function():
    return 1


def test_file_with_pickled_objects_is_refused_for_safety(tmp_path, capsys):
    """load_compressed and the tools refuse a file holding pickled objects (custom class instance, function
    reference) with one line that says so, exit 2, and never suggest weights_only=False."""
    import importlib.util
    from pathlib import Path

    from edp_det.harness.cli import cli_main

    spec = importlib.util.spec_from_file_location("export_tool", Path(__file__).resolve().parents[1] / "tools" /
                                                  "export.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for name, obj in (("instance", _UserObject()), ("function", _user_function)):
        p = tmp_path / f"{name}.pt"
        torch.save({"format": FORMAT, "version": 1, "arch": obj}, p)
        with pytest.raises(ValueError) as ei:
            edp_det.load_compressed(p)
        for msg in (str(ei.value), None):
            if msg is None:
                with pytest.raises(SystemExit) as ex:
                    cli_main(tool.main, tool.get_args_parser().parse_args(["--model", str(p), "--format", "onnx"]),
                             "export")
                assert ex.value.code == 2
                msg = capsys.readouterr().err
                assert msg.count("\n") == 1
            assert str(p) in msg and "pickled Python objects" in msg and "refused for safety" in msg, msg
            assert "weights_only" not in msg and "corrupt" not in msg, msg
