"""BatchNorm re-estimation after PM (edp_det.edp.calibration)."""
import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from edp_det.edp.calibration import batchnorm_layers, forward_batch, recalibrate_batchnorm


def _net(norm=nn.BatchNorm2d):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), norm(6), nn.ReLU(), nn.Conv2d(6, 4, 1), norm(4))


def test_statistics_are_exact_averages_over_the_batches():
    net = _net().double()
    net.train()
    net[1].momentum = 0.3
    batches = [torch.randn(5, 3, 8, 8, dtype=torch.float64) * (i + 1) + i for i in range(3)]
    params = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert recalibrate_batchnorm(net, batches) == 3
    with torch.no_grad():
        pre = [net[0](b) for b in batches]   # the first BN's input, batch by batch
    means = torch.stack([p.mean(dim=(0, 2, 3)) for p in pre])
    vars_ = torch.stack([p.transpose(0, 1).reshape(6, -1).var(dim=1, unbiased=True) for p in pre])
    torch.testing.assert_close(net[1].running_mean, means.mean(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(net[1].running_var, vars_.mean(0), rtol=1e-10, atol=1e-10)
    assert int(net[1].num_batches_tracked) == 3
    # nothing else changed; modes and momenta restored
    for k, v in params.items():
        assert torch.equal(net.state_dict()[k], v), k
    assert net.training and net[1].training and net[1].momentum == 0.3 and net[4].momentum == 0.1


def test_stale_statistics_are_replaced_and_eval_mode_is_kept():
    net = _net()
    for _, bn in batchnorm_layers(net):
        bn.running_mean.fill_(100.0)
        bn.running_var.fill_(1e-3)
    net.eval()
    x = torch.randn(4, 3, 8, 8)
    recalibrate_batchnorm(net, [x])
    assert not net.training and not net[1].training
    # eval output now equals the train-mode (batch statistics) output up to the unbiased-variance factor
    assert net[1].running_mean.abs().max() < 10
    ref = _net()
    ref.train()
    with torch.no_grad():
        h = ref[0](x)
    torch.testing.assert_close(net[1].running_mean, h.mean(dim=(0, 2, 3)))


def test_no_batchnorm_or_frozen_is_a_noop_and_empty_batches_rejected():
    frozen = _net(FrozenBatchNorm2d)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    assert batchnorm_layers(frozen) == []
    assert recalibrate_batchnorm(frozen, [torch.randn(2, 3, 8, 8)]) == 0
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())
    net = _net()
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batchnorm(net, [])
    assert net[1].momentum == 0.1 and net.training   # restored even on the error path


def test_forward_batch_accepts_detection_and_classification_batches():
    seen = []

    class Rec(nn.Module):
        def forward(self, x):
            seen.append(type(x).__name__)
            return x

    forward_batch(Rec(), (torch.zeros(2, 3, 4, 4), torch.zeros(2)), "cpu")
    forward_batch(Rec(), ([torch.zeros(3, 4, 4)], [{}]), "cpu")
    assert seen == ["Tensor", "list"]


def test_recalibration_restores_accuracy_of_a_pruned_bn_network():
    """A from-scratch BN ResNet pruned with a FLOPs target: stale statistics distort its outputs; recalibration
    brings the eval-mode output back to the train-mode (batch statistics) output of the pruned network."""
    import torchvision
    import edp_det

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    data = [torch.randn(8, 3, 64, 64) for _ in range(4)]
    model.train()
    with torch.no_grad():
        for x in data:
            model(x)             # running statistics of the unpruned network
    edp_det.decompose(model)
    edp_det.prune_and_merge(model, flops_target=0.5, input_size=(3, 64, 64))
    x = data[0]

    def gap():
        model.train()
        bns = batchnorm_layers(model)
        for _, bn in bns:
            bn.momentum = 0.0    # a train-mode forward that leaves the running statistics as they are
        with torch.no_grad():
            ref = model(x)       # batch statistics: what the statistics should describe
        for _, bn in bns:
            bn.momentum = 0.1
        model.eval()
        with torch.no_grad():
            out = model(x)
        return float((out - ref).norm() / ref.norm())

    stale = gap()
    recalibrate_batchnorm(model, [x])
    fresh = gap()
    assert fresh < 0.1 and stale > 0.5, (stale, fresh)   # residual: unbiased vs biased variance
