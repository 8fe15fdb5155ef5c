"""save_compressed / load_compressed: bit-exact round trips (decomposed, pruned ResNet, pruned Faster R-CNN),
pickle-free files, and clear errors on corrupt or foreign files."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from edp_det import CompressedAwareConv2d, iter_blocks, load_compressed, prune_and_merge, save_compressed
from edp_det.deploy.serialization import FORMAT

from _core_helpers import DET_KW, cached, det_image, one_thread, sparsify  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _module_types(model):
    return {n: type(m).__name__ for n, m in model.named_modules()}


def test_round_trip_decomposed_unpruned_resnet18(tmp_path):
    _, model = cached("resnet18", num_classes=10)
    model.layer2[0].conv2.forward_mode = "two_conv"
    model.layer3[1].conv1.forward_mode = "effective"
    path = save_compressed(model, tmp_path / "r18.pt", meta={"note": "decomposed"})
    loaded, meta = load_compressed(path, return_meta=True)
    assert meta["note"] == "decomposed"
    assert not loaded.training
    _same_state(model, loaded)
    assert _module_types(loaded) == _module_types(model)
    for (n, a), (n2, b) in zip(iter_blocks(model), iter_blocks(loaded)):
        assert n == n2 and isinstance(b, CompressedAwareConv2d)
        for attr in ("rank", "in_channels", "out_channels", "orig_in_channels", "orig_out_channels",
                     "channel_prunable", "norm_name", "forward_mode", "kernel_size"):
            assert getattr(a, attr) == getattr(b, attr), (n, attr)
    model.eval()
    x = torch.randn(2, 3, 37, 45, dtype=torch.float64)
    assert torch.equal(model(x), loaded(x))
    assert loaded.edp_arch == model.edp_arch


def test_round_trip_pruned_resnet50(tmp_path):
    _, model = cached("resnet50", num_classes=10)
    sparsify(model, seed=7)
    prune_and_merge(model, input_size=(3, 37, 45))
    assert not any(isinstance(m, CompressedAwareConv2d) for m in model.modules())
    path = save_compressed(model, tmp_path / "r50.pt")
    loaded = load_compressed(path)
    _same_state(model, loaded)
    assert _module_types(loaded) == _module_types(model)
    model.eval()
    x = torch.randn(2, 3, 37, 45, dtype=torch.float64)
    assert torch.equal(model(x), loaded(x))
    # the file is plain data: loads with weights_only=True, no pickled classes
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == FORMAT and obj["arch"]["name"] == "resnet50"
    assert set(obj["state_dict"]) == set(model.state_dict())
    assert obj["spec"]["layer1.0.conv2"]["type"] in ("conv2d", "lowrank")


def test_round_trip_pruned_faster_rcnn(tmp_path):
    _, model = cached("fasterrcnn", decompose_kw={"scope": "detector"}, **DET_KW)
    sparsify(model, seed=8)
    prune_and_merge(model, input_size=(3, 64, 64))
    model.classes = ["a", "b"]
    path = save_compressed(model, tmp_path / "det.pt")
    loaded = load_compressed(path)
    assert loaded.classes == ["a", "b"]
    _same_state(model, loaded)
    assert _module_types(loaded) == _module_types(model)
    assert loaded.transform.min_size == (64,) and loaded.rpn._post_nms_top_n["testing"] == 50
    model.eval()
    img = det_image(5)
    a, b = model([img])[0], loaded([img])[0]
    assert a["boxes"].shape[0] > 0
    for k in ("boxes", "scores", "labels"):
        assert torch.equal(a[k], b[k]), k
    assert torch.load(path, weights_only=True)["format"] == FORMAT


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    _, model = cached("resnet18", num_classes=10)
    return save_compressed(model, tmp_path_factory.mktemp("ser") / "good.pt")


def _expect_error(path):
    with pytest.raises(ValueError) as exc:
        load_compressed(path)
    assert str(path) in str(exc.value)
    return str(exc.value)


def test_corrupt_file(tmp_path):
    p = tmp_path / "random.pt"
    p.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                dtype=torch.uint8).numpy().tobytes())
    _expect_error(p)


def test_truncated_file(tmp_path, good_file):
    data = good_file.read_bytes()
    for n in (len(data) // 2, len(data) - 100, 10):
        p = tmp_path / f"trunc{n}.pt"
        p.write_bytes(data[:n])
        _expect_error(p)


def test_foreign_torch_file(tmp_path):
    p = tmp_path / "plain_state_dict.pt"
    torch.save(nn.Conv2d(3, 4, 3).state_dict(), p)
    msg = _expect_error(p)
    assert "format" in msg


def test_wrong_format_and_version(tmp_path, good_file):
    obj = torch.load(good_file, weights_only=True)
    p = tmp_path / "wrong_format.pt"
    torch.save({**obj, "format": "timm/pruned"}, p)
    assert "timm/pruned" in _expect_error(p)
    p = tmp_path / "wrong_version.pt"
    torch.save({**obj, "version": 99}, p)
    assert "99" in _expect_error(p)
    p = tmp_path / "bad_state.pt"
    sd = dict(obj["state_dict"])
    sd["layer1.0.conv1.coeff.weight"] = torch.zeros(3, 3, 1, 1, dtype=torch.float64)
    torch.save({**obj, "state_dict": sd}, p)
    _expect_error(p)
    p = tmp_path / "not_a_dict.pt"
    torch.save([1, 2, 3], p)
    _expect_error(p)


def test_missing_and_empty_file(tmp_path):
    _expect_error(tmp_path / "nope.pt")
    p = tmp_path / "empty.pt"
    p.write_bytes(b"")
    _expect_error(p)


def test_file_with_the_former_sequential_pair_loads(tmp_path):
    """Files written when PM's unmerged pairs were ``nn.Sequential(basis, coeff)``: same ``lowrank`` spec entry,
    same state-dict keys; they load into :class:`LowRankConv2d` and compute the same outputs."""
    from collections import OrderedDict

    from edp_det.deploy.serialization import VERSION, architecture_spec
    from edp_det.models import build_model
    from edp_det.ops.surgery import LowRankConv2d

    torch.manual_seed(3)
    model = build_model("resnet18", num_classes=10)
    basis = nn.Conv2d(64, 12, 3, stride=1, padding=1, bias=False)
    coeff = nn.Conv2d(12, 64, 1, bias=True)
    model.layer1[0].conv2 = nn.Sequential(OrderedDict([("basis", basis), ("coeff", coeff)]))
    model.eval()
    spec = {k: v for k, v in architecture_spec(model).items() if not k.startswith("layer1.0.conv2")}
    conv = {"stride": [1, 1], "dilation": [1, 1]}
    spec["layer1.0.conv2"] = {"type": "lowrank",     # the entry the former writer made for the Sequential pair
                              "basis": {"in": 64, "out": 12, "kernel": [3, 3], "padding": [1, 1], "bias": False, **conv},
                              "coeff": {"in": 12, "out": 64, "kernel": [1, 1], "padding": [0, 0], "bias": True, **conv}}
    sd = model.state_dict()
    assert {"layer1.0.conv2.basis.weight", "layer1.0.conv2.coeff.weight", "layer1.0.conv2.coeff.bias"} <= set(sd)
    torch.save({"format": FORMAT, "version": VERSION, "arch": {"name": "resnet18", "kwargs": {"num_classes": 10}},
                "spec": spec, "state_dict": sd, "meta": {}}, tmp_path / "old.pt")
    back = load_compressed(tmp_path / "old.pt")
    assert isinstance(back.layer1[0].conv2, LowRankConv2d)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    # and it is written back with the same spec entry
    assert architecture_spec(back)["layer1.0.conv2"] == spec["layer1.0.conv2"]
