"""Transfer of a tools/train_cls.py output into the detector body (model.backbone_checkpoint): the compressed
(after PM) and the decomposed (before PM: EDP continues in the detector) paths end to end on tiny synthetic data,
norm conversion, FPN channels, save/load round trip, and clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from _cls_helpers import REPO_ROOT, tiny_cls_run
from edp_det import CompressedAwareConv2d, load_compressed, save_compressed
from edp_det.runtime.checkpoint import atomic_save, load_checkpoint
from edp_det.harness.run_config import resolve_config
from edp_det.train.detection import DetectionTask
from edp_det.train.engine import Trainer
from edp_det.runtime.errors import CheckpointError, ConfigError
from edp_det.models import build_model
from edp_det.train.transfer import load_classifier_backbone

TINY_DET = REPO_ROOT / "configs" / "tiny_synthetic.yaml"
FAST = ["model.min_size=64", "model.max_size=64", "train.max_iters_per_epoch=2", "benchmark.enabled=false",
        "train.threads=1", "model.returned_layers=[2,3,4]", "model.fpn_out_channels=32",
        "model.representation_size=32", "model.anchor_sizes=[16,32,64,128]"]
# light heads: building the default 256-channel FPN / 1024-wide box head costs more than the ResNet-18 body
DET_KW = dict(depth=18, num_classes=4, min_size=64, max_size=64, rpn_post_nms_top_n_test=20, returned_layers=[2, 3, 4],
              fpn_out_channels=32, representation_size=32, anchor_sizes=[16, 32, 64, 128])


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    return tiny_cls_run(tmp_path_factory)[1]


def _det_cfg(voc, out, ckpt, *overrides):
    return resolve_config(TINY_DET, [*FAST, f"data.root={voc}", f"model.backbone_checkpoint={ckpt}", *overrides],
                          task="detection", output_dir=out)


def _assert_roundtrip(model, path):
    save_compressed(model, path)
    back = load_compressed(path)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = torch.rand(3, 64, 64)
    model.eval()
    with torch.no_grad():
        ya, yb = model.backbone(x[None]), back.backbone(x[None])
    for k in ya:
        torch.testing.assert_close(ya[k], yb[k], rtol=0, atol=0)


def test_compressed_path_end_to_end(cls_run, synthetic_voc, tmp_path):
    """(a) model_final.pt after PM: the body takes the pruned structure and weights; fine-tune with baseline."""
    final = cls_run / "model_final.pt"
    cfg = _det_cfg(synthetic_voc, tmp_path / "det", final, "method=baseline", "train.epochs=1")
    task = DetectionTask(cfg)
    task.setup(type("D", (), {"world_size": 1, "rank": 0, "distributed": False})())
    det = task.build_model()
    cls = load_compressed(final)
    cls_sd, body_sd = cls.state_dict(), det.backbone.body.state_dict()
    assert set(body_sd) == {k for k in cls_sd if not k.startswith("fc.")}
    for k in body_sd:
        assert torch.equal(body_sd[k], cls_sd[k]), k
    assert not any(isinstance(m, CompressedAwareConv2d) for m in det.modules())
    _assert_roundtrip(det, tmp_path / "det0.pt")          # a detector around a compressed body saves/loads
    # a few detection steps, eval, saved model reloads bit-exact
    metrics = Trainer(cfg, DetectionTask(cfg), tmp_path / "det").run()
    assert "mAP_voc07" in metrics and 0.39 <= metrics["r_flops_backbone"] <= 0.42
    back = load_compressed(tmp_path / "det" / "model_final.pt")
    body = back.backbone.body.state_dict()
    assert {k: v.shape for k, v in body.items()} == {k: v.shape for k, v in body_sd.items()}


def test_decomposed_path_continues_edp(cls_run, synthetic_voc, tmp_path):
    """(b) a checkpoint before PM: the blocks go into the body, EDP goes on (no second decompose), PM, eval."""
    ck = cls_run / "checkpoint_epoch0001.pt"
    cfg = _det_cfg(synthetic_voc, tmp_path / "det", ck, "method=edp", "train.epochs=2", "compress.epoch_es=1")
    det = build_model("fasterrcnn", norm="bn", **DET_KW)
    info = load_classifier_backbone(det, ck)
    assert info["kind"] == "decomposed"
    blocks = {n: m for n, m in det.named_modules() if isinstance(m, CompressedAwareConv2d)}
    assert blocks and all(n.startswith("backbone.body.") for n in blocks)
    normed = [m for m in blocks.values() if m.norm_name]
    assert normed and all(m.norm_name.startswith("backbone.body.") for m in normed)
    for m in normed:
        det.get_submodule(m.norm_name)                      # the norm names resolve in the detector
    trainer = Trainer(cfg, DetectionTask(cfg), tmp_path / "det")
    metrics = trainer.run()
    out = tmp_path / "det"
    log = [json.loads(line) for line in (out / "metrics_log.jsonl").read_text().splitlines()]
    ends = [r for r in log if r.get("phase") == "end_epoch"]
    assert ends[0]["regularized"] and ends[0].get("pruned") is True
    pm = json.loads((out / "pm_report.json").read_text())
    assert 0.40 <= pm["achieved_r_flops"] <= 0.41
    assert "mAP_voc07" in metrics and 0.40 <= metrics["r_flops_backbone"] <= 0.41
    assert not any(isinstance(m, CompressedAwareConv2d) for m in trainer.model.modules())
    _assert_roundtrip(load_compressed(out / "model_final.pt"), tmp_path / "again.pt")


@pytest.mark.parametrize("which", ["checkpoint_epoch0001.pt", "model_final.pt"])
def test_bn_classifier_into_frozen_detector_is_exact(cls_run, which):
    """BatchNorm2d statistics become FrozenBatchNorm2d (folded into the blocks when decomposed): in eval mode the
    body computes the same function either way."""
    dets = {}
    for norm in ("bn", "frozen"):
        dets[norm] = build_model("fasterrcnn", norm=norm, trainable_layers=3, **DET_KW)
        load_classifier_backbone(dets[norm], cls_run / which)
        dets[norm].eval()
    body = dets["frozen"].backbone.body
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    if which == "model_final.pt":
        assert isinstance(body.bn1, FrozenBatchNorm2d)
    else:
        assert all(b.norm_name is None for b in body.modules() if isinstance(b, CompressedAwareConv2d))
    # trainable_layers=3: the stem and layer1 stay frozen
    assert not any(p.requires_grad for n, p in body.named_parameters() if n.startswith(("conv1", "layer1.")))
    assert all(p.requires_grad for n, p in body.named_parameters() if n.startswith("layer4."))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = dets["bn"].backbone.body(x), dets["frozen"].backbone.body(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4 * float(a[k].abs().max()))


def test_errors_are_clear(cls_run, synthetic_voc, tmp_path):
    final = cls_run / "model_final.pt"
    with pytest.raises(CheckpointError, match="resnet18.*model.depth=50"):
        load_classifier_backbone(build_model("fasterrcnn", **{**DET_KW, "depth": 50}), final)
    plain = tmp_path / "plain.pt"
    atomic_save(load_compressed(final).state_dict(), plain)
    with pytest.raises(CheckpointError, match="weights_backbone"):
        load_classifier_backbone(build_model("fasterrcnn", **DET_KW), plain)
    # a pruned body cannot be decomposed again
    cfg = _det_cfg(synthetic_voc, tmp_path / "x", final, "method=edp")
    task = DetectionTask(cfg)
    task.setup(type("D", (), {"world_size": 1, "rank": 0, "distributed": False})())
    with pytest.raises(ConfigError, match="method: baseline"):
        task.build_model()
    # a detector checkpoint is not a classifier
    det = build_model("fasterrcnn", **DET_KW)
    save_compressed(det, tmp_path / "det.pt")
    with pytest.raises(CheckpointError, match="ResNet classifier"):
        load_classifier_backbone(build_model("fasterrcnn", **DET_KW), tmp_path / "det.pt")
    assert load_checkpoint(final)["arch"]["name"] == "resnet18"


@pytest.mark.parametrize("norm,returned", [("frozen", [1, 2, 3, 4]), ("bn", [2, 3, 4])])
def test_torchvision_backbone_weights_load_into_the_body_of_their_depth_only(tmp_path, norm, returned):
    """``model.weights_backbone``: a torchvision ResNet-18 state dict fills a depth-18 body exactly (the stages the
    body holds, frozen or trainable norms); a ResNet-34 file (extra blocks of the same shapes) or a file that lacks
    a body weight is refused naming a key and the depth, not loaded in part."""
    import torchvision

    from edp_det.models import load_backbone_weights

    files = {}
    for depth in (18, 34):
        torch.manual_seed(depth)
        files[depth] = tmp_path / f"resnet{depth}.pth"
        torch.save(getattr(torchvision.models, f"resnet{depth}")(weights=None).state_dict(), files[depth])
    kw = {**DET_KW, "depth": 18, "norm": norm, "returned_layers": returned,
          "anchor_sizes": [8, 16, 32, 64, 128][-len(returned) - 1:]}
    det = build_model("fasterrcnn", **kw)
    missing = load_backbone_weights(det, files[18])
    assert all(k.endswith("num_batches_tracked") for k in missing)
    ref = torch.load(files[18], weights_only=True)
    body = det.backbone.body.state_dict()
    assert body and all(torch.equal(v, ref[k]) for k, v in body.items() if k in ref)
    with pytest.raises(ValueError, match=r"has 'layer1\.2\..*model\.depth=18"):
        load_backbone_weights(build_model("fasterrcnn", **kw), files[34])
    partial = {k: v for k, v in ref.items() if not k.startswith("layer2.1.conv2")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"lacks the body's 'layer2\.1\.conv2\.weight'"):
        load_backbone_weights(build_model("fasterrcnn", **kw), tmp_path / "partial.pth")
